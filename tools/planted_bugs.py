"""Plant plausible one-line bugs, one at a time, and count the fast-tier tests each fails (issue 24's audit).

    python tools/planted_bugs.py [NAME ...]     # writes docs/mutation/planted.md (all bugs by default)

Each bug is a one-line replacement in one file of cpc_models/ (the text must occur exactly once). It is applied to
a copy of the package and the tests in a temporary folder (the working tree is never modified), and the tests
that should catch it run there (``pytest -m "not slow"``, one torch thread, at nice 10). A bug is caught well when
at least two tests fail; docs/testing.md says why this audit exists next to tools/mutation.py.
"""
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'docs' / 'mutation' / 'planted.md'


@dataclass
class Bug:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: Tuple[str, ...]


BUGS = [
    Bug('pretrained_strict', 'pretrained_strict=False in the encoder\'s create path: a renamed key would load with a '
        'logged warning, its layer random', 'cpc_models/encoder.py',
        '            pretrained_filter_fn=checkpoint_filter_fn,\n',
        '            pretrained_filter_fn=checkpoint_filter_fn, pretrained_strict=False,\n',
        ('tests/test_strict_loading.py', 'tests/test_hub.py')),
    Bug('filter_drops', 'checkpoint_filter_fn silently drops the keys the model does not have',
        'cpc_models/encoder.py', '        out[k] = v\n',
        '        out[k] = v\n    out = {k: v for k, v in out.items() if k in model.state_dict()}\n',
        ('tests/test_strict_loading.py', 'tests/test_hub.py')),
    Bug('resume_unchecked', 'resume loads a checkpoint without checking its keys first (torch\'s own strict error, '
        'a traceback without the file)', 'cpc_models/_weights.py',
        '    check_keys(state_dict, target, str(where), name)\n', '    pass\n',
        ('tests/test_strict_loading.py', 'tests/test_checkpoint.py')),
    Bug('shared_W', 'one prediction matrix W shared by all offsets of a direction', 'cpc_models/objective.py',
        "            d: nn.ModuleDict({f'k{k}': nn.Linear(latent_channels, target_dim) for k in self.offsets})\n",
        "            d: nn.ModuleDict(dict.fromkeys([f'k{k}' for k in self.offsets], "
        "nn.Linear(latent_channels, target_dim)))\n",
        ('tests/test_objective.py',)),
    Bug('gather_detached', 'the gathered negatives detached under DDP (no gradient to the other ranks\' targets)',
        'cpc_models/distributed.py', '    return _GatherWithGrad.apply(x)\n',
        '    return _GatherWithGrad.apply(x).detach()\n', ('tests/test_objective_distributed.py',)),
    Bug('op_per_batch', 'the AutoAugment op drawn once per batch instead of per patch', 'cpc_models/augment.py',
        '                op = rand.randint(len(self._ops), (n,))\n',
        '                op = rand.randint(len(self._ops), (1,)).expand(n)\n', ('tests/test_augment.py',)),
    Bug('resume_late', 'a resumed run restarts the sampler one step late', 'cpc_models/train.py',
        'cfg.seed, start_step=step)\n', 'cfg.seed, start_step=step + (resume_from is not None))\n',
        ('tests/test_resume_position.py', 'tests/test_train.py', '-k', 'resume and not signal')),
]


def _copy_tree(dst: Path) -> None:
    for name in ('cpc_models', 'tests', 'weights', 'benchmarks', 'examples', 'results'):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md', 'LICENSE', 'setup.py'):
        shutil.copy(ROOT / name, dst / name)
    (dst / 'docs').mkdir()
    for doc in (ROOT / 'docs').glob('*.md'):
        shutil.copy(doc, dst / 'docs' / doc.name)


def run(bug: Bug) -> Tuple[int, int, List[str], float]:
    """(failed, passed, failed test ids, seconds) of ``bug.tests`` with the bug planted in a copy of the tree."""
    with tempfile.TemporaryDirectory(prefix=f'planted_{bug.name}_') as tmp:
        tmp = Path(tmp)
        _copy_tree(tmp)
        path = tmp / bug.file
        text = path.read_text()
        if text.count(bug.old) != 1:
            raise SystemExit(f'{bug.name}: the line to change occurs {text.count(bug.old)} times in {bug.file}')
        path.write_text(text.replace(bug.old, bug.new))
        env = dict(os.environ, PYTHONPATH=str(tmp), OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
                   PYTHONDONTWRITEBYTECODE='1')
        t0 = time.time()
        proc = subprocess.run(['nice', '-n', '10', sys.executable, '-m', 'pytest', '-q', '-rf', '-p',
                               'no:cacheprovider', '-m', 'not slow', *bug.tests], cwd=tmp, env=env,
                              capture_output=True, text=True)
        seconds = time.time() - t0
    out = proc.stdout + proc.stderr
    failed = sorted(set(re.findall(r'^(?:FAILED|ERROR) (\S+)', out, re.MULTILINE)))
    n_failed = sum(int(n) for n in re.findall(r'(\d+) (?:failed|errors?)\b', out.splitlines()[-1] if out else ''))
    n_passed = int((re.findall(r'(\d+) passed', out.splitlines()[-1]) or ['0'])[0]) if out else 0
    return n_failed, n_passed, failed, seconds


def main(argv: List[str]) -> int:
    chosen = [b for b in BUGS if not argv or b.name in argv]
    # rows of the bugs not run now are kept from the last report (their own run line stays with them)
    old = {}
    if OUT.is_file():
        for line in OUT.read_text().splitlines():
            m = re.match(r'\| `(\w+)` \|', line)
            if m and m.group(1) in {b.name for b in BUGS} - {b.name for b in chosen}:
                old[m.group(1)] = line
    rows = {}
    for bug in chosen:
        failed, passed, ids, seconds = run(bug)
        print(f'{bug.name}: {failed} failed, {passed} passed ({seconds:.0f} s)', flush=True)
        tests = '<br>'.join(f'`{i}`' for i in ids) or '(none)'
        now = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
        rows[bug.name] = (f'| `{bug.name}` | {bug.what} | `{bug.file}` | {failed} | {passed} | '
                          f'{"yes" if failed >= 2 else "**no**"} | {tests} | {seconds:.0f} s, {now} |')
    rows = [rows.get(b.name) or old[b.name] for b in BUGS if b.name in rows or b.name in old]
    OUT.write_text(
        '# Planted one-line bugs\n\n'
        'Generated by `python tools/planted_bugs.py` (see [testing.md](../testing.md)); do not edit by hand. Each bug '
        'is planted alone in a copy of the tree and the fast tier of the tests named in the script runs against it; '
        'caught well = at least two tests fail.\n\n'
        '| bug | what it does | file | tests failed | passed | caught well | failing tests | run time, when |\n'
        '|---|---|---|---|---|---|---|---|\n' + '\n'.join(rows) + '\n\n'
        f'Runs on {platform.machine()} ({os.cpu_count()} cores, shared with other work), Python '
        f'{platform.python_version()}, nice 10, one torch thread.\n')
    print(f'wrote {OUT}')
    return 0 if all('| yes |' in r for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
