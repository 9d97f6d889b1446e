"""How long ``--help`` takes for each console script: the cached answer (what the installed script runs, via
``_cpc_models_cli``) against importing the command (``python -m ...``, what every other invocation pays).

Usage (from the repository root): python -m benchmarks.help_time [--repeats 5]
Prints a markdown table of the median wall time of each, in fresh interpreters (subprocesses). Not a test: timings
depend on the machine and its load.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = {'cpc-train': 'cpc_train', 'cpc-eval': 'cpc_eval', 'cpc-extract': 'cpc_extract', 'cpc-demo': 'cpc_demo'}
MODULE = {'cpc-train': 'cpc_models.train', 'cpc-eval': 'cpc_models.evaluate', 'cpc-extract': 'cpc_models.extract',
          'cpc-demo': 'cpc_models.demo'}


def _time(argv, repeats: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument('--repeats', type=int, default=5, help='runs of each, the median is printed (default: 5)')
    args = parser.parse_args(argv)
    print('| command | `--help` as installed (cached) | `python -m ... --help` (imports torch, timm) |')
    print('|---|---|---|')
    for command, func in SCRIPT.items():
        shim = [sys.executable, '-c', f'import sys, _cpc_models_cli as c; sys.argv = ["{command}", "--help"]; '
                                      f'sys.exit(c.{func}())']
        cached = _time(shim, args.repeats)
        live = _time([sys.executable, '-m', MODULE[command], '--help'], max(1, args.repeats // 2))
        print(f'| `{command}` | {cached:.2f} s | {live:.1f} s |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
