"""``cpc-eval``: ``figure1`` (options: every EvalConfig field, parsed by cpc_models.config), ``probe`` (ProbeConfig),
``plot``, ``merge``."""
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .. import config as C
from ..checks import one_line
from .eval_config import EvalConfig
from .linear import main as linear_main
from .figure1 import EvalInputError, check_config, merge_results, report, run_figure1, section
from .probe import ProbeConfig, check_probe, format_probe, run_probe
from .report import check_plotting, replace_section, write_results

__all__ = ['main', 'COMMANDS']

COMMANDS = ('figure1', 'probe', 'linear', 'plot', 'merge')
WRITTEN = ('results.json', 'table.md', 'figure1.png')  # what figure1, plot and merge write to their folder

USAGE = '''cpc-eval figure1 --checkpoint CKPT --out DIR [--KEY VALUE ...]   run the arms over fractions and seeds
cpc-eval probe --checkpoint CKPT [--KEY VALUE ...]                val-split linear probe at 1% labels (pooled, grid)
cpc-eval linear --checkpoint CKPT --data FOLDER --features DIR   linear top-1/top-5 from features on disk (any scale)
cpc-eval plot DIR [--readme MD] [--card MD]                       table.md and figure1.png again from results.json
cpc-eval merge DIR PART[:ARM,ARM] ...                             merge figure1 outputs run as parallel parts
                                                                  (PART:ARMS takes only those arms' runs)'''


def _read_results(folder: Path, command: str) -> Dict:
    path = folder / 'results.json'
    if not path.is_file():
        what = 'no such folder' if not folder.is_dir() else 'it has no results.json'
        raise ValueError(f'{folder}: {what}; {command} takes cpc-eval figure1 output folders (--out), each with '
                         f'results.json (written after each run)')
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); run that part again') from None


def _plot_or_merge(argv: List[str]) -> int:
    p = C.ArgumentParser(prog='cpc-eval', usage=USAGE)
    sub = p.add_subparsers(dest='command', required=True)
    plot = sub.add_parser('plot', help='table.md and figure1.png again')
    plot.add_argument('out', type=Path, help='a figure1 output folder (with results.json)')
    plot.add_argument('--readme', type=Path, help='also write the section between the figure1 markers of this file')
    plot.add_argument('--card', type=Path, help='the same in a model card (the figure is copied beside it)')
    m = sub.add_parser('merge', help='one table from parts run in parallel')
    m.add_argument('out', type=Path, help='the folder to write the merged results.json, table.md, figure1.png to')
    m.add_argument('parts', nargs='+', help='figure1 output folders, each with results.json; FOLDER:ARM,ARM takes '
                                            'only the runs of those arms from it')
    args = p.parse_args(argv)
    try:
        check_plotting()
        if args.command == 'merge':
            parts = [_part(p) for p in args.parts]
            payload = merge_results([_read_results(folder, 'merge') for folder, _ in parts], [t for _, t in parts])
            if args.out.exists() and not args.out.is_dir():
                raise ValueError(f'{args.out} is a file; give a folder for the merged results')
            args.out.mkdir(parents=True, exist_ok=True)
        else:
            payload = _read_results(args.out, 'plot')
            for flag in ('readme', 'card'):
                md = getattr(args, flag)
                if md is not None and not md.is_file():
                    raise ValueError(f'--{flag} {md}: no such file; give an existing markdown file (the section goes '
                                     f'between its figure1 markers, or at its end)')
    except ValueError as e:
        print(f'cpc-eval {args.command}: error: {e}', file=sys.stderr)
        return 2
    print(report(args.out, payload))
    write_results(args.out, payload)
    if getattr(args, 'readme', None):
        replace_section(args.readme, section(payload, _relative(args.out / 'figure1.png', args.readme.parent)))
    if getattr(args, 'card', None):
        replace_section(args.card, section(payload, 'figure1.png'))
        (args.card.parent / 'figure1.png').write_bytes((args.out / 'figure1.png').read_bytes())
    also = ''.join(f', and its section into {md}' for md in (getattr(args, 'readme', None), getattr(args, 'card', None))
                   if md)
    print(f'cpc-eval {args.command}: wrote {", ".join(WRITTEN)} to {args.out}{also}')
    return 0


def _part(spec: str) -> Tuple[Path, Optional[List[str]]]:
    """'FOLDER' or 'FOLDER:ARM,ARM' (a folder whose name has a ':' is taken whole)."""
    if ':' not in spec or Path(spec).is_dir():
        return Path(spec), None
    folder, arms = spec.rsplit(':', 1)
    names = [a for a in arms.split(',') if a]
    if not names:
        raise ValueError(f'{spec}: give the arms to take after the colon, e.g. {folder}:cpc_frozen,cpc_linear')
    return Path(folder), names


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def _probe(argv: List[str]) -> int:
    prog = 'cpc-eval probe'
    cfg = C.parse_args(ProbeConfig(), argv, prog=prog, description=USAGE.splitlines()[1])
    try:
        check_probe(cfg)
    except ValueError as e:
        return C.usage_error(prog, one_line(e))
    try:
        res = run_probe(cfg)
    except EvalInputError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    print(format_probe(res))
    print(f'cpc-eval probe: wrote {cfg.out}' if cfg.out else 'cpc-eval probe: done (printed only; --out FILE.json '
                                                            'also writes it)')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """cpc-eval. Exit status: 0 done, 2 bad input (one line says what to change)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return C.usage_error('cpc-eval', f'give a command: {", ".join(COMMANDS)} (cpc-eval --help says what each does)')
    if argv[0] in ('-h', '--help'):
        print(f'usage:\n{USAGE}\n\ncpc-eval figure1 --help lists every option; docs/evaluation.md the protocols.')
        return 0
    if argv[0] not in COMMANDS:
        return C.usage_error('cpc-eval', f'unknown command {argv[0]!r}{C.did_you_mean(argv[0], COMMANDS)}; choose '
                                         f'from {", ".join(COMMANDS)}')
    if argv[0] == 'probe':
        return _probe(argv[1:])
    if argv[0] == 'linear':
        return linear_main(argv[1:])
    if argv[0] != 'figure1':
        return _plot_or_merge(argv)
    prog = 'cpc-eval figure1'
    cfg = C.parse_args(EvalConfig(), argv[1:], prog=prog, description=USAGE.splitlines()[0])
    try:
        check_config(cfg)
        if not cfg.out:
            raise C.ConfigError('--out: give the folder for results.json, table.md and figure1.png')
        check_plotting()
    except ValueError as e:
        return C.usage_error(prog, one_line(e))
    command = 'python -m cpc_models.evaluate ' + ' '.join(shlex.quote(a) for a in argv)
    try:
        run_figure1(cfg, Path(cfg.out), command)
    except EvalInputError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    print(f'{prog}: wrote {", ".join(WRITTEN)} to {cfg.out}')
    return 0
