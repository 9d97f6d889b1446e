"""cpc-train on folders whose images cannot be read: it stops at once with one line, or refills the batch and goes on;
under DDP (two real gloo processes started by torchrun) every rank does the same, so none waits for another.

The images are real (the Fashion-MNIST sample bundled with the package, as PNG); the unreadable files are random
bytes named .png, placed where the sampler will look for them.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpc_models import train
from cpc_models.data import StepSampler
from cpc_models.demo import load_sample

pytestmark = pytest.mark.timeout(300)

ARGS = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--objective.context_hidden', '16', '--warmup-steps', '2',
        '--progress', '0', '--num-workers', '0', '--log-every', '1']


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    return env


def _folder(root: Path, n: int, readable) -> Path:
    """``n`` files 000.png ...: real images at the indices in ``readable``, random bytes elsewhere."""
    images = load_sample()[0]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        if i in readable:
            Image.fromarray(images[i, 0].numpy()).save(root / f'{i:03d}.png')
        else:
            (root / f'{i:03d}.png').write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return root


def _first_batch(n, batch, rank, world):
    return next(iter(StepSampler(n, batch, rank, world, seed=0)))


def _log(out):
    return [json.loads(line) for line in (Path(out) / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('n, batch', [(3, 2), (40, 32)], ids=['3-files-batch-2', '40-files-default-batch'])
def test_folder_of_junk_stops_at_once_with_one_line(n, batch, tmp_path, capsys):
    """Was: an endless loop at 0 steps at 100% CPU that ignored SIGTERM (3 files, batch 2), or a misleading
    'fewer than one batch' (3 files, batch 32). Now: status 2, one line naming the folder and why, nothing trained."""
    root = _folder(tmp_path / 'junk', n, readable=())
    t0 = time.monotonic()
    rc = train.main(ARGS + ['--data', str(root), '--batch-size', str(batch), '--out-dir', str(tmp_path / 'run')])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 60
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f'cpc-train: error: no readable images under {root} ('), err
    assert 'skipped: first reasons 000.png: UnidentifiedImageError' in lines[0]
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_batch_without_readable_image_is_refilled(tmp_path, capsys):
    """One process: the first batch is all unreadable; it is refilled with a whole batch from the files that follow,
    every step trains and the skipped files are counted."""
    n, batch = 16, 4
    junk = set(_first_batch(n, batch, 0, 1))
    root = _folder(tmp_path / 'data', n, readable=set(range(n)) - junk)
    out = tmp_path / 'run'
    rc = train.main(ARGS + ['--data', str(root), '--batch-size', str(batch), '--max-steps', '3', '--out-dir', str(out)])
    assert rc == 0, capsys.readouterr().err
    misses, found, i = 0, 0, max(junk) + 1  # the refill reads on until it has a whole batch
    while found < batch:
        misses, found, i = misses + (i % n in junk), found + (i % n not in junk), i + 1
    log = _log(out)
    assert [m['step'] for m in log] == [1, 2, 3]
    assert log[-1]['skipped_images'] == len(junk) + misses
    assert all(np.isfinite(m['loss']) for m in log)


def test_refill_gives_up_after_max_unreadable(tmp_path, capsys):
    """One process: one readable file, far from the first batch; with --max-unreadable 2 the run stops at step 0."""
    n, batch = 16, 4
    first = _first_batch(n, batch, 0, 1)
    window = {(max(first) + k) % n for k in range(1, 3)}
    keep = next(i for i in range(n) if i not in set(first) | window)
    root = _folder(tmp_path / 'data', n, readable={keep})
    rc = train.main(ARGS + ['--data', str(root), '--batch-size', str(batch), '--max-unreadable', '2',
                            '--out-dir', str(tmp_path / 'run')])
    err = capsys.readouterr().err
    assert rc == 2 and f'no readable images under {root} ({batch + 2} skipped' in err
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def _torchrun(args, timeout=240):
    return subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
         'cpc_models.train', *args], env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ddp_rank_without_readable_image_refills_and_no_rank_waits(tmp_path):
    """Two gloo processes: rank 1's whole first local batch is unreadable. Before, it skipped the step while rank 0
    waited for it in the step's collectives (a hang); now it refills and both ranks train every step."""
    n, batch = 16, 4
    junk = set(_first_batch(n, batch, 1, 2))
    root = _folder(tmp_path / 'data', n, readable=set(range(n)) - junk)
    out = tmp_path / 'run'
    res = _torchrun(ARGS + ['--data', str(root), '--batch-size', str(batch), '--max-steps', '3', '--out-dir', str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    log = _log(out)
    assert [m['step'] for m in log] == [1, 2, 3] and log[-1]['skipped_images'] >= len(junk)
    assert (out / 'checkpoints' / 'step_00000003').is_dir()


@pytest.mark.slow
def test_ddp_ranks_stop_together_when_a_rank_finds_no_readable_image(tmp_path):
    """Two gloo processes: rank 1 finds no readable image in its batch nor in the 2 files after it. Both ranks stop
    at the next read with the one error line (printed once), nothing is saved, and no rank is left waiting."""
    n, batch = 16, 4
    first = _first_batch(n, batch, 1, 2)
    window = {(max(first) + k) % n for k in range(1, 3)}
    keep = next(i for i in range(n) if i not in set(first) | window)
    root = _folder(tmp_path / 'data', n, readable={keep})
    out = tmp_path / 'run'
    t0 = time.monotonic()
    res = _torchrun(ARGS + ['--data', str(root), '--batch-size', str(batch), '--max-steps', '3', '--max-unreadable',
                            '2', '--out-dir', str(out)])
    assert res.returncode != 0 and time.monotonic() - t0 < 240
    assert res.stderr.count(f'cpc-train: error: no readable images under {root} (') == 1, res.stderr[-3000:]
    assert not (out / 'checkpoints').exists() and (out / 'metrics.jsonl').read_text() == ''
