"""The console scripts' entry points (pyproject.toml [project.scripts]): ``--help`` without importing torch.

``import cpc_models`` registers the models with timm, so it imports torch and timm (about 6 s on a busy 2-core
machine). The console scripts start here instead, a module outside the package: a bare ``cpc-train --help`` (or
``-h``; likewise cpc-eval, cpc-extract, cpc-demo) prints the help cached in ``cpc_models/help/<command>.txt``,
generated from the live parsers by ``python tools/help_cache.py`` and checked against them by
tests/test_help_cache.py; anything else imports the command and runs it. ``python benchmarks/help_time.py`` times it.
"""
import importlib
import sys
from pathlib import Path

__all__ = ['COMMANDS', 'HELP_DIR', 'cpc_train', 'cpc_eval', 'cpc_extract', 'cpc_demo']

HELP_DIR = Path(__file__).resolve().parent / 'cpc_models' / 'help'
COMMANDS = {'cpc-train': 'cpc_models.train:main', 'cpc-eval': 'cpc_models.evaluate.cli:main',
            'cpc-extract': 'cpc_models.extract:main', 'cpc-demo': 'cpc_models.demo:main'}


def _run(command: str) -> int:
    if sys.argv[1:] in (['-h'], ['--help']):
        cached = HELP_DIR / f'{command}.txt'
        if cached.is_file():
            sys.stdout.write(cached.read_text(encoding='utf-8'))
            return 0
    module, func = COMMANDS[command].split(':')
    return getattr(importlib.import_module(module), func)()


def cpc_train() -> int:
    return _run('cpc-train')


def cpc_eval() -> int:
    return _run('cpc-eval')


def cpc_extract() -> int:
    return _run('cpc-extract')


def cpc_demo() -> int:
    return _run('cpc-demo')
