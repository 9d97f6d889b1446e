"""``cpc-eval``: ``figure1`` (options: every EvalConfig field, parsed by cpc_models.config), ``plot``, ``merge``."""
import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from .. import config as C
from .eval_config import EvalConfig
from .figure1 import check_config, merge_results, report, run_figure1
from .report import write_results

__all__ = ['main']

USAGE = '''cpc-eval figure1 --checkpoint CKPT --out DIR [--KEY VALUE ...]   run the arms over fractions and seeds
cpc-eval plot DIR                                                 table.md and figure1.png again from results.json
cpc-eval merge DIR PART [PART ...]                                merge figure1 outputs run as parallel parts'''


def _plot_or_merge(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog='cpc-eval', usage=USAGE)
    sub = p.add_subparsers(dest='command', required=True)
    sub.add_parser('plot').add_argument('out', type=Path)
    m = sub.add_parser('merge')
    m.add_argument('out', type=Path)
    m.add_argument('parts', type=Path, nargs='+', help='figure1 output folders, each with results.json')
    args = p.parse_args(argv)
    if args.command == 'merge':
        try:
            payload = merge_results([json.loads((part / 'results.json').read_text()) for part in args.parts])
        except ValueError as e:
            print(f'cpc-eval: error: {e}', file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
    else:
        payload = json.loads((args.out / 'results.json').read_text())
    print(report(args.out, payload))
    write_results(args.out, payload)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(f'usage:\n{USAGE}\n\ncpc-eval figure1 --help lists every option; docs/evaluation.md the protocols.')
        return 0 if argv else 2
    if argv[0] != 'figure1':
        return _plot_or_merge(argv)
    prog = 'cpc-eval figure1'
    cfg = C.parse_args(EvalConfig(), argv[1:], prog=prog, description=USAGE.splitlines()[0])
    try:
        check_config(cfg)
        if not cfg.out:
            raise ValueError('Give --out: the folder for results.json, table.md and figure1.png.')
    except ValueError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    command = 'python -m cpc_models.evaluate ' + ' '.join(shlex.quote(a) for a in argv)
    run_figure1(cfg, Path(cfg.out), command)
    return 0
