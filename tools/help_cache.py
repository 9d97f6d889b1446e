"""Write (or check) the cached ``--help`` of the console scripts: cpc_models/help/<command>.txt.

    python tools/help_cache.py           # regenerate after changing a parser, a config field or its comment
    python tools/help_cache.py --check   # exit 1 if a cached text differs from the live one

The text is what ``<command> --help`` prints, captured from the command's own main with COLUMNS=100 (argparse
wraps to the terminal; the cached text is this width everywhere). ``_cpc_models_cli`` prints it without importing
torch (docs in that module).
"""
import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _cpc_models_cli import COMMANDS, HELP_DIR  # noqa: E402

COLUMNS = '100'


def live_help(command: str) -> str:
    """What ``command --help`` prints now, from the command's main."""
    module, func = COMMANDS[command].split(':')
    main = getattr(importlib.import_module(module), func)
    before = os.environ.get('COLUMNS')
    os.environ['COLUMNS'] = COLUMNS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            try:
                code = main(['--help'])
            except SystemExit as e:
                code = e.code
    finally:
        if before is None:
            os.environ.pop('COLUMNS')
        else:
            os.environ['COLUMNS'] = before
    if code not in (0, None):
        raise RuntimeError(f'{command} --help exited with {code}')
    return out.getvalue()


def main(argv) -> int:
    check = '--check' in argv
    stale = []
    for command in COMMANDS:
        text, path = live_help(command), HELP_DIR / f'{command}.txt'
        if check:
            if not path.is_file() or path.read_text(encoding='utf-8') != text:
                stale.append(command)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding='utf-8')
            print(f'wrote {path.relative_to(ROOT)}')
    if stale:
        print(f'stale cached help: {", ".join(stale)}; run python tools/help_cache.py', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
