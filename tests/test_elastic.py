"""Elastic resume: a run checkpointed on W processes continues on W' at the same place of the same image stream.

The sampler's arithmetic is checked in process (fast); the real thing runs cpc-train under torchrun with W = 1, 2
and 3 real gloo processes on the CPU, resuming one run through the chain 1 -> 2 -> 3 -> 1 (and one segment with
gradient accumulation), and compares the image indices every rank loaded with those of an uninterrupted run. Four
processes (2 -> 1 -> 3 -> 4 on two "nodes" -> 2) run in tests/test_journey.py, each step checked against the stream.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpc_models import train
from cpc_models.data import DataPosition, StepSampler, epoch_permutation, load_fashion_mnist
from conftest import worker_env

pytestmark = pytest.mark.timeout(600)


def _stream(sampler, steps):
    """The images of the next ``steps`` steps, in stream order: all ranks' micro-batches merged."""
    return [sampler.global_batch_at(sampler.advance(sampler.position, s)) for s in range(steps)]


def _rank_steps(n, batch, world, seed, position, steps, accum=1):
    """What the ranks of a world of ``world`` take in ``steps`` steps from ``position``, merged back into stream
    order (micro-batch j of every rank, then j + 1)."""
    its = [iter(StepSampler(n, batch, r, world, seed, position=position, accum_steps=accum)) for r in range(world)]
    out = []
    for _ in range(steps):
        per_rank = [[next(it) for _ in range(accum)] for it in its]
        out.append([i for j in range(accum) for r in range(world) for i in per_rank[r][j]])
    return out


def test_sampler_position_is_the_same_stream_on_any_world_size():
    n, batch, seed = 103, 12, 4  # 8 steps per epoch; 7 images left over at each epoch's end
    fresh = StepSampler(n, batch, 0, 1, seed)
    reference = _rank_steps(n, batch, 1, seed, fresh.position, 30)
    # the epochs: consecutive slices of one permutation per epoch, the leftover tail unused
    for e in range(3):
        perm = epoch_permutation(n, seed, e).tolist()
        assert [i for b in reference[8 * e:8 * e + 8] for i in b] == perm[:96]
    # resumed after s steps on W ranks (and with micro-batches): the same images in the same order
    for world, accum, s in [(2, 1, 5), (3, 1, 7), (4, 1, 8), (2, 2, 13), (3, 4, 21), (4, 3, 3)]:
        position = fresh.advance(fresh.position, s)
        assert position == DataPosition(s // 8, (s % 8) * batch) or s % 8 == 0
        assert _rank_steps(n, batch, world, seed, position, 30 - s, accum) == reference[s:], (world, accum, s)
    assert _stream(fresh, 30) == reference
    # a position from another global batch (e.g. 8 GPUs x 16 -> 16 GPUs x 16): the stream continues at that image
    position = DataPosition(1, 40)
    bigger = _rank_steps(n, 24, 2, seed, position, 3)
    perm1, perm2 = epoch_permutation(n, seed, 1).tolist(), epoch_permutation(n, seed, 2).tolist()
    assert bigger[:2] == [perm1[40:64], perm1[64:88]] and bigger[2] == perm2[:24]  # 88 + 24 > 103: next epoch
    # a checkpoint without a position: the step, in steps of this batch, as before
    assert StepSampler(n, batch, 0, 1, seed, start_step=13).position == DataPosition(1, 5 * batch)
    with pytest.raises(ValueError, match='divisible by the number of processes 2 x --accum-steps 4'):
        StepSampler(n, 12, 0, 2, seed, accum_steps=4)


def test_sampler_draws_one_permutation_per_epoch():
    """The permutation is drawn at the first step of an epoch and reused until the next (was: every step)."""
    sampler = StepSampler(1000, 10, 1, 2, seed=0)
    it = iter(sampler)
    next(it)
    first = sampler._perm[1]
    for _ in range(99):
        next(it)
        assert sampler._perm[1] is first
    next(it)  # step 100: epoch 1
    assert sampler._perm[0] == 1 and sampler._perm[1] is not first


# ============ real runs: torchrun with gloo ============

# batch 12 splits over 1, 2, 3 and 4 processes (and 2 x 2 micro-batches)
ELASTIC = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--batch-size', '12', '--objective.context_hidden', '16',
           '--warmup-steps', '2', '--progress', '0', '--num-workers', '0', '--log-every', '1', '--save-every', '2',
           '--keep-last', '0', '--log-image-ids', '--lr', '5e-3']


def _torchrun(world, argv):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(world),
           '-m', 'cpc_models.train', *argv]
    res = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _ids_by_step(out_dir, world, accum=1):
    """{step: image ids of the step in stream order}, from the ranks' image_ids logs of a world of ``world``."""
    per_rank = [{json.loads(line)['step']: json.loads(line)['ids']
                 for line in (Path(out_dir) / 'image_ids' / f'rank{r}.jsonl').read_text().splitlines()}
                for r in range(world)]
    steps = sorted(set.intersection(*(set(p) for p in per_rank)))  # rank 0 also holds earlier segments' steps
    merged = {}
    for s in steps:
        chunks = [torch.tensor(per_rank[r][s]).chunk(accum) for r in range(world)]
        merged[s] = [i for j in range(accum) for r in range(world) for i in chunks[r][j].tolist()]
    return merged


@pytest.mark.slow
def test_resume_on_other_world_sizes_sees_the_same_images(tmp_path, capsys):
    """One run continued through W = 1 -> 2 -> 3 -> 1 processes (the 2-process segment with 2 micro-batches per
    step), 2 steps each, against one uninterrupted 8-step run: every step loads the same images in the same order,
    each rank its slice; the checkpoint records the position; the loss stays finite."""
    reference = tmp_path / 'reference'
    assert train.main(ELASTIC + ['--max-steps', '8', '--out-dir', str(reference)]) == 0
    expected = _ids_by_step(reference, 1)
    assert sorted(expected) == list(range(1, 9)) and all(len(ids) == 12 for ids in expected.values())

    out = tmp_path / 'elastic'
    seen = {}
    segments = [(1, 1), (2, 2), (3, 1), (1, 1)]  # (processes, accum steps)
    for k, (world, accum) in enumerate(segments):
        argv = ELASTIC + ['--max-steps', str(2 * (k + 1)), '--out-dir', str(out), '--accum-steps', str(accum)]
        stdout = _torchrun(world, argv) if k else (train.main(argv), capsys.readouterr().out)[1]  # the last: gloo W=1
        if k:
            before = segments[k - 1][0]
            assert f'resumed from {out / "checkpoints" / f"step_{2 * k:08d}"} at step {2 * k}' in stdout
            assert (f'written by {before} process(es), now {world}' in stdout) == (before != world)
        logs = _ids_by_step(out, world, accum)
        seen.update({s: logs[s] for s in (2 * k + 1, 2 * k + 2)})
        # each rank loaded its own slice: 12 / world images per step
        for r in range(world):
            lines = (out / 'image_ids' / f'rank{r}.jsonl').read_text().splitlines()
            assert all(len(json.loads(line)['ids']) == 12 // world for line in lines[-2:])
        state = torch.load(out / 'checkpoints' / f'step_{2 * k + 2:08d}' / 'state.pt', weights_only=True)
        assert (state['data_epoch'], state['data_offset']) == (0, 12 * (2 * k + 2))  # still in epoch 0
        assert len(state['rng_aug']) == world
    assert seen == expected  # the set and order of images, step by step
    log = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in log] == list(range(1, 9))
    assert all(abs(m['loss']) < 10 for m in log)
    steps_per_epoch = len(load_fashion_mnist('train')[0]) // 12
    assert [m['epoch'] for m in log] == pytest.approx([s / steps_per_epoch for s in range(1, 9)])
