"""Where a resumed cpc-train run picks up: the same batches at the same steps as the run that never stopped.

A second check of the resume position, independent of test_train's signal and SIGKILL tests (subprocesses,
16 steps): here two short runs in this process, one thread, compared bit for bit. A run resumed from its step-1
checkpoint must reach the same step-3 weights and log the same step-2 and step-3 losses as the uninterrupted run;
a sampler restarted one step early or late feeds other images and changes both.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models import train
from conftest import write_sample_idx

FAST = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--batch-size', '8', '--objective.context_hidden', '16',
        '--warmup-steps', '2', '--progress', '0', '--num-workers', '0', '--objective.directions', '1',
        '--max-steps', '3', '--save-every', '1', '--keep-last', '10', '--log-every', '1', '--lr', '5e-3']
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope='module')
def fmnist_dir(tmp_path_factory):
    """A Fashion-MNIST IDX folder (train and t10k) holding the bundled 1,000-image sample."""
    return write_sample_idx(tmp_path_factory.mktemp('fmnist'))


def _losses(out):
    return {m['step']: m['loss'] for m in map(json.loads, (out / 'metrics.jsonl').read_text().splitlines())}


def test_resumed_run_continues_at_the_next_batch(fmnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = tmp_path / 'whole'
        assert train.main(FAST + ['--out-dir', str(whole)]) == 0
        resumed = tmp_path / 'resumed'
        shutil.copytree(whole / 'checkpoints' / 'step_00000001', resumed / 'checkpoints' / 'step_00000001')
        assert train.main(FAST + ['--out-dir', str(resumed)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert 'resumed from' in capsys.readouterr().out
    assert sorted(_losses(resumed)) == [2, 3]  # it logged the steps after its checkpoint, no more, no fewer
    assert _losses(resumed) == {s: v for s, v in _losses(whole).items() if s > 1}  # exact: the same batches
    for name in ('encoder.safetensors', 'objective.safetensors'):
        a = load_file(whole / 'checkpoints' / 'step_00000003' / name)
        b = load_file(resumed / 'checkpoints' / 'step_00000003' / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # not trivially equal: the steps change the weights
    first = load_file(whole / 'checkpoints' / 'step_00000001' / 'encoder.safetensors')
    last = load_file(whole / 'checkpoints' / 'step_00000003' / 'encoder.safetensors')
    assert any(not torch.equal(first[k], last[k]) for k in first)
