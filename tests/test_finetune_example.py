"""examples/finetune.py on a tiny ImageFolder of real Fashion-MNIST PNGs (no published weights needed)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import cpc_models  # noqa: F401
from cpc_models.data import FASHION_MNIST_CLASSES, load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
CLASSES = (0, 1, 7)  # T-shirt, Trouser, Sneaker


def _write_folder(root: Path, n_train: int = 16, n_val: int = 6) -> None:
    x, y = load_fashion_mnist('test')  # the subset shipped in tests/data (conftest.py)
    for c in CLASSES:
        idx = torch.nonzero(y == c, as_tuple=True)[0][:n_train + n_val]
        name = FASHION_MNIST_CLASSES[c].replace('/', '_')
        for i, j in enumerate(idx.tolist()):
            split = 'train' if i < n_train else 'val'
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[j, 0].numpy(), mode='L').save(d / f'{j}.png')


def test_finetune_example_runs_and_saves_loadable_weights(tmp_path):
    data = tmp_path / 'data'
    _write_folder(data)
    out = tmp_path / 'ft'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'examples' / 'finetune.py'), str(data), '--model', 'cpcv2_resnet_tiny',
         '--no-pretrained', '--epochs', '2', '--max-steps', '4', '--batch-size', '16', '--workers', '0',
         '--out', str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r'train loss (\S+)', proc.stdout)]
    accs = [float(v) for v in re.findall(r'val acc (\S+)', proc.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), proc.stdout
    assert all(0 <= a <= 1 for a in accs) and len(accs) == 2, proc.stdout
    assert '48 train / 18 val' in proc.stdout

    state = load_file(str(out / 'model.safetensors'))
    model = timm.create_model('cpcv2_resnet_tiny', num_classes=len(CLASSES))
    model.load_state_dict(state)  # strict: every key, right shapes
    # the last conv of every block starts at zero (zero_init_last): non-zero means the encoder was trained
    assert state['stages.0.blocks.0.conv3.weight'].abs().sum() > 0
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_finetune_example_splits_a_flat_folder(tmp_path):
    data = tmp_path / 'data'
    _write_folder(data, n_train=8, n_val=0)
    flat = data / 'train'  # class subfolders only, no train/val split
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'examples' / 'finetune.py'), str(flat), '--model', 'cpcv2_resnet_tiny',
         '--no-pretrained', '--epochs', '1', '--max-steps', '1', '--batch-size', '8', '--workers', '0',
         '--val-frac', '0.25', '--out', str(tmp_path / 'ft')],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '18 train / 6 val' in proc.stdout
    assert (tmp_path / 'ft' / 'model.safetensors').is_file()
