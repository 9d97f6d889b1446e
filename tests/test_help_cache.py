"""The console scripts' cached ``--help`` (cpc_models/help/, printed by _cpc_models_cli without importing torch) is
what the live parsers print; a stale cache fails here: regenerate it with ``python tools/help_cache.py``."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _cpc_models_cli

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('help_cache', ROOT / 'tools' / 'help_cache.py')
help_cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(help_cache)


@pytest.mark.parametrize('command', list(_cpc_models_cli.COMMANDS))
def test_cached_help_is_the_live_help(command):
    cached = (_cpc_models_cli.HELP_DIR / f'{command}.txt').read_text(encoding='utf-8')
    assert cached == help_cache.live_help(command), f'stale: run python tools/help_cache.py ({command})'


def test_installed_scripts_enter_through_the_light_module():
    import tomllib
    scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
    assert {name: target.split(':')[0] for name, target in scripts.items()} == dict.fromkeys(
        _cpc_models_cli.COMMANDS, '_cpc_models_cli')
    for name, target in scripts.items():  # each entry runs its own command
        assert getattr(_cpc_models_cli, target.split(':')[1]).__name__ == name.replace('-', '_')


@pytest.mark.parametrize('argv, cached', [(['--help'], True), (['-h'], True), (['--preset', 'stl10_small', '--help'],
                                                                               False)])
def test_help_imports_no_torch_unless_it_needs_the_config(argv, cached):
    """A bare --help is answered from the cache without importing torch; --help with options (a preset changes the
    defaults shown) goes to the live parser."""
    code = ('import sys, _cpc_models_cli as c\n'
            f'sys.argv = ["cpc-train", *{argv!r}]\n'
            'rc = c.cpc_train()\n'
            'print("TORCH" if "torch" in sys.modules else "NO TORCH", file=sys.stderr)\n'
            'sys.exit(rc)\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), COLUMNS='100')
    res = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().splitlines()[-1] == ('NO TORCH' if cached else 'TORCH')
    if cached:
        assert res.stdout == (_cpc_models_cli.HELP_DIR / 'cpc-train.txt').read_text(encoding='utf-8')
    else:
        assert '--preset' in res.stdout
