"""The package as a user gets it: an sdist and a wheel built from the repository, the wheel installed outside the
checkout, every bundled checkpoint loaded from it through timm with the Hub offline, and the demo run from it."""
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BUNDLED = sorted(p.parent.name for p in (ROOT / 'weights').glob('*/model.safetensors')
                 if p.stat().st_size <= 10 * 2 ** 20)  # setup.py's BUNDLE_MAX_MB

LOAD_EVERY_TAG = r'''
import json, sys
from pathlib import Path
import timm, torch
from safetensors.torch import save_file
import cpc_models
site, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
assert Path(cpc_models.__file__).is_relative_to(site), cpc_models.__file__  # the installed copy, not the checkout
out = {}
for name in json.loads(sys.argv[3]):
    model = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    with torch.no_grad():
        out[name] = dict(file=model.pretrained_cfg['file'], grid=list(model.forward_features(x).shape))
    save_file(model.state_dict(), str(out_dir / f'{name}.safetensors'))
print(json.dumps(out))
'''


def _run(cmd, cwd, env, timeout=300):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f'{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}'
    return res.stdout


def test_wheel_carries_weights_and_runs_outside_the_checkout(tmp_path):
    assert BUNDLED, 'no published checkpoint in weights/'
    build_env = dict(os.environ, PIP_NO_INDEX='1')  # offline: the build uses this environment's setuptools
    # sdist (what a source release ships), then the wheel built from it, as pip would from PyPI
    sdist = Path(_run([sys.executable, '-c', 'import sys; from setuptools import build_meta as b; '
                       'print(b.build_sdist(sys.argv[1]))', tmp_path / 'sdist'], ROOT, build_env).split()[-1])
    with tarfile.open(tmp_path / 'sdist' / sdist) as tar:
        names = tar.getnames()
    assert all(f'cpc_models-0.1.0/weights/{n}/model.safetensors' in names for n in BUNDLED)
    _run([sys.executable, '-m', 'pip', 'wheel', tmp_path / 'sdist' / sdist, '--no-deps', '--no-build-isolation',
          '-q', '-w', tmp_path / 'wheel'], tmp_path, build_env)
    (wheel,) = (tmp_path / 'wheel').glob('cpc_models-*.whl')
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
    bundled = sorted({f.split('/')[2] for f in files if f.startswith('cpc_models/weights/')})
    assert bundled == BUNDLED
    for name in BUNDLED:
        for f in ('model.safetensors', 'config.json', 'README.md'):
            assert f'cpc_models/weights/{name}/{f}' in files
    assert 'cpc_models/assets/fashion_mnist_sample.safetensors' in files
    assert wheel.stat().st_size < 5 * 2 ** 20  # small checkpoints only
    # the size docs/hub.md publishes is this wheel's, within 10% (code changes move it a little)
    published = float(re.search(r'The\s+wheel is ([\d.]+) MB', (ROOT / 'docs' / 'hub.md').read_text()).group(1))
    assert abs(wheel.stat().st_size / 1e6 - published) <= 0.1 * published, (wheel.stat().st_size, published)

    site = tmp_path / 'site'
    _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', '--target', site, wheel],
         tmp_path, build_env)
    work = tmp_path / 'elsewhere'  # no weights/ folder here or above, nothing cached, no network
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(('CPC_', 'HF_'))}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), OMP_NUM_THREADS='1')

    loaded = json.loads(_run([sys.executable, '-c', LOAD_EVERY_TAG, site, work, json.dumps(BUNDLED)], work, env))
    for name in BUNDLED:
        assert Path(loaded[name]['file']) == site / 'cpc_models' / 'weights' / name / 'model.safetensors'
        assert len(loaded[name]['grid']) == 4
        expected = load_file(ROOT / 'weights' / name / 'model.safetensors')
        state = load_file(work / f'{name}.safetensors')  # what timm loaded from the wheel's copy
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], v) for k, v in expected.items())

    demo = _run([site / 'bin' / 'cpc-demo', '--shots', '1', '--repeats', '1'], work, env)
    assert f'weights: {site / "cpc_models" / "weights"}' in demo, demo
    assert 'CPC grid' in demo and '%' in demo
    # the installed scripts answer a bare --help from the help cached in the wheel (no torch import)
    assert '_cpc_models_cli.py' in files and 'cpc_models/help/cpc-train.txt' in files
    for command in ('cpc-train', 'cpc-eval', 'cpc-extract', 'cpc-demo'):
        cached = (site / 'cpc_models' / 'help' / f'{command}.txt').read_text(encoding='utf-8')
        assert _run([site / 'bin' / command, '--help'], work, env) == cached == (
            ROOT / 'cpc_models' / 'help' / f'{command}.txt').read_text(encoding='utf-8')
