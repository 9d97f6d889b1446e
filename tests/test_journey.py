"""The "Reproduce the paper" journey (docs/reproduce.md) on a synthetic ImageNet, each step through the documented
command, with the sizes swapped for a CPU: the tiny encoder on 28 px crops, a few steps per segment. The torchrun
commands run as they are written; the one-process tools (fake_imagenet, file_index, hub export, cpc-eval) run
their ``main`` with the documented arguments in this process (a Python start less each).

fake ImageNet -> file index -> torchrun, 2 processes -> one rank killed -> resumed on 1 process -> on 3 -> on 2
"nodes" x 2 processes (torchrun --nnodes 2, c10d rendezvous on localhost) -> SIGTERM to one node -> resumed on 2
nodes x 1 process to the end -> export with cpc_models.hub -> timm.create_model(..., pretrained=True) from the export
-> ``cpc-eval linear`` of the export on the same folder (features to disk, top-1 / top-5 on its val/).
Every step of the run is checked to have loaded the images the global image stream gives it (each segment's ranks
merged), whatever the number of processes that ran it.
"""
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models.data import StepSampler
from cpc_models.file_index import FileIndex
from conftest import wait_for, worker_env

pytestmark = pytest.mark.timeout(900)
DOCS = Path(__file__).resolve().parent.parent / 'docs' / 'reproduce.md'

# The documented commands (docs/reproduce.md), as templates; the test fills in its folders and process counts.
FAKE = 'python -m cpc_models.tools.fake_imagenet {root} --classes {classes} --per-class {per_class}'
INDEX = 'python -m cpc_models.file_index build {root}/train'
TRAIN = ('torchrun --standalone --nproc_per_node {nproc} -m cpc_models.train --preset imagenet_r161 '
         '--data {root}/train --out-dir {run}')
NODES = ('torchrun --nnodes {nnodes} --nproc_per_node {nproc} --rdzv_backend c10d --rdzv_endpoint {endpoint} '
         '--rdzv_id {job} -m cpc_models.train --preset imagenet_r161 --data {root}/train --out-dir {run}')
EXPORT = 'python -m cpc_models.hub export --checkpoint {run} --out {out} --tag {tag}'
LINEAR = 'cpc-eval linear --checkpoint {out} --data {root} --features {features} --out {results}'
# What the docs show them with: 8 GPUs on a node, 64 on 8 nodes.
DOC_VALUES = dict(root='/data/imagenet', run='/ckpt/cpcv2_r161', nproc=8, nnodes=8, endpoint='$HEAD_NODE:29500',
                  job='cpcv2_r161', out='weights/cpcv2_resnet161.in1k', tag='in1k', classes=20, per_class=30,
                  features='/scratch/cpcv2_r161_features', results='results/linear_r161')
# The sizes swapped for the CPU: a tiny encoder on 28 px crops, batch 12 (splits over 1, 2, 3 and 4 processes).
SMALL = ['--model', 'cpcv2_resnet_tiny', '--image-size', '28', '--resize', '32', '--objective.context_hidden', '32',
         '--batch-size', '12', '--grad-checkpointing', '0', '--device', 'cpu', '--num-workers', '0', '--save-every',
         '2', '--log-every', '1', '--warmup-steps', '2', '--progress', '0', '--log-image-ids']
# ... and for the linear evaluation: small chunks (several on disk), a few classifier epochs, no worker processes.
SMALL_LINEAR = ['--chunk-rows', '64', '--extract-batch', '64', '--workers', '0', '--device', 'cpu', '--epochs', '10',
                '--batch-size', '32', '--wds', '0,1e-4', '--holdout-fraction', '0.1', '--progress', '0']


def test_the_documented_commands_are_the_ones_run_here():
    text = DOCS.read_text()
    for template in (FAKE, INDEX, TRAIN, NODES, EXPORT, LINEAR):
        assert template.format(**DOC_VALUES) in text, template
    assert TRAIN.format(**{**DOC_VALUES, 'nproc': 4}) in text  # the resume on fewer processes
    readme = (DOCS.parent.parent / 'README.md').read_text()  # its "Reproduce the paper" lines
    for template in (INDEX, TRAIN, NODES, EXPORT, LINEAR):
        assert template.format(**DOC_VALUES) in readme, template


def _argv(template, **values):
    """The command as a list, ``python`` and ``torchrun`` as this interpreter (torchrun = -m torch.distributed.run)."""
    words = template.format(**values).split()
    head = [sys.executable] + (['-m', 'torch.distributed.run'] if words[0] == 'torchrun' else [])
    return head + words[1:]


def _run(argv, timeout=300):
    res = subprocess.run(argv, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


def _main(capsys, template, *extra, **values):
    """A documented ``python -m MODULE ARGS`` (or ``cpc-eval ARGS``) command, as ``MODULE.main(ARGS + extra)`` in
    this process; its stdout."""
    words = template.format(**values).split()
    if words[0] == 'cpc-eval':  # the console script's entry point (pyproject.toml)
        words = ['python', '-m', 'cpc_models.evaluate.cli'] + words[1:]
    assert words[:2] == ['python', '-m']
    capsys.readouterr()
    assert importlib.import_module(words[2]).main(words[3:] + list(extra)) == 0
    return capsys.readouterr().out


def _popen(argv, log, **kw):
    """Start a command with its output in the file ``log`` (a pipe nobody reads while the test waits could fill
    up and block it)."""
    with open(log, 'w') as f:
        return subprocess.Popen(argv, env=worker_env(), stdout=f, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(procs, timeout=240, preempted=False):
    """Wait for torchrun agents to end. ``preempted``: a node was SIGTERMed, and once it has ended, a survivor whose
    workers have all exited waits in torchrun's exit barrier for the agent that is gone (up to 300 s when it hosts the
    rendezvous store): it gets a SIGTERM too, as a scheduler ends the rest of a preempted job."""
    t0, had_workers = time.time(), set()
    while any(p.poll() is None for p in procs):
        assert time.time() - t0 < timeout, 'timed out'
        for p in procs:
            if p.poll() is None and _children(p.pid):
                had_workers.add(p.pid)
            elif (preempted and p.poll() is None and p.pid in had_workers
                  and any(q.poll() is not None for q in procs)):
                p.send_signal(signal.SIGTERM)
        time.sleep(0.2)


def _latest_step(run):
    ckpts = sorted((run / 'checkpoints').glob('step_*[0-9]'))
    return int(ckpts[-1].name.split('_')[1]) if ckpts else 0


def _children(pid):
    try:
        return [int(c) for c in Path(f'/proc/{pid}/task/{pid}/children').read_text().split()]
    except FileNotFoundError:  # it has just ended
        return []


def _logged_steps(run):
    """The steps in metrics.jsonl so far (a line still being written, without its newline, is left out)."""
    text = (run / 'metrics.jsonl').read_text() if (run / 'metrics.jsonl').is_file() else ''
    return [json.loads(line)['step'] for line in text.split('\n')[:-1]]


def _segment_ids(run, world, first, last):
    """{step: ids in stream order} for steps first..last from the image_ids logs of a world of ``world``."""
    logs = [{json.loads(line)['step']: json.loads(line)['ids']
             for line in (run / 'image_ids' / f'rank{r}.jsonl').read_text().splitlines()} for r in range(world)]
    return {s: [i for r in range(world) for i in logs[r][s]] for s in range(first, last + 1)}


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_reproduce_journey_on_a_synthetic_imagenet(tmp_path, capsys):
    root, run = tmp_path / 'imagenet', tmp_path / 'run'
    values = dict(root=root, run=run)
    out = _main(capsys, FAKE + ' --val-per-class 2', root=root, classes=10, per_class=20)
    assert 'wrote 220 JPEGs' in out
    out = _main(capsys, INDEX, **values)
    assert out.startswith(f'built {root}/train.cpc_file_index: 200 files, 10 classes')
    index = FileIndex.open(root / 'train', build=False)  # fresh: the run reuses it
    sampler = StepSampler(len(index), 12, 0, 1, seed=0)
    expected = {s: sampler.global_batch_at(sampler.advance(sampler.position, s - 1)) for s in range(1, 15)}
    seen = {}

    # 2 processes; one rank is killed after the checkpoint of step 2
    proc = _popen(_argv(TRAIN, nproc=2, **values) + SMALL + ['--max-steps', '40'], tmp_path / 'killed.log')
    wait_for(proc, lambda: _latest_step(run) >= 2 and len(_children(proc.pid)) == 2, timeout=180)
    os.kill(_children(proc.pid)[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    stopped = _latest_step(run)
    seen.update(_segment_ids(run, 2, 1, stopped))

    # resumed on 1 process, then on 3: the same command, another process count
    for world, steps in ((1, 2), (3, 2)):
        start = _latest_step(run)
        out = _run(_argv(TRAIN, nproc=world, **values) + SMALL + ['--max-steps', str(start + steps)])
        assert f'resumed from {run}/checkpoints/step_{start:08d} at step {start}' in out
        assert 'process(es), now ' + str(world) in out  # another world size than the checkpoint's
        seen.update(_segment_ids(run, world, start + 1, start + steps))

    # two "nodes" of 2 processes (c10d rendezvous on localhost); SIGTERM to one node's torchrun
    start = _latest_step(run)
    nodes_argv = _argv(NODES, nnodes=2, nproc=2, endpoint=f'localhost:{_free_port()}', job='journey', **values)
    logs = [tmp_path / f'sigterm_node{k}.log' for k in range(2)]
    nodes = [_popen(nodes_argv + SMALL + ['--max-steps', '40'], log, start_new_session=True) for log in logs]
    wait_for(nodes[0], lambda: max(_logged_steps(run), default=0) >= start + 2, timeout=180)
    nodes[1].send_signal(signal.SIGTERM)
    _finish(nodes, preempted=True)
    outs = [log.read_text() for log in logs]
    stopped = _latest_step(run)
    assert stopped > start and any(f'stopped by SIGTERM at step {stopped}' in o for o in outs), outs
    seen.update(_segment_ids(run, 4, start + 1, stopped))

    # resumed on two nodes of one process each (4 -> 2), to the end
    end = 14
    nodes_argv = _argv(NODES, nnodes=2, nproc=1, endpoint=f'localhost:{_free_port()}', job='journey', **values)
    logs = [tmp_path / f'end_node{k}.log' for k in range(2)]
    nodes = [_popen(nodes_argv + SMALL + ['--max-steps', str(end)], log) for log in logs]
    _finish(nodes)
    outs = [log.read_text() for log in logs]
    assert all(n.returncode == 0 for n in nodes), [o[-3000:] for o in outs]
    assert any(f'resumed from {run}/checkpoints/step_{stopped:08d} at step {stopped}' in o for o in outs)
    seen.update(_segment_ids(run, 2, stopped + 1, end))

    # every step loaded the images of the global stream, in order, whatever ran it
    assert seen == expected
    log = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in log] == list(range(1, end + 1))
    assert all(abs(m['loss']) < 20 for m in log)

    # export, then timm loads the export
    pub = tmp_path / 'weights' / 'cpcv2_resnet_tiny.fake'
    _main(capsys, EXPORT, run=run, out=pub, tag='fake')
    model = timm.create_model('cpcv2_resnet_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(pub / 'model.safetensors')))
    expected_weights = load_file(run / 'checkpoints' / f'step_{end:08d}' / 'encoder.safetensors')
    state = model.state_dict()
    assert state.keys() == expected_weights.keys()
    assert all(torch.equal(state[k], v) for k, v in expected_weights.items())
    assert re.search(r'"batch_size": 12', (pub / 'README.md').read_text())

    # linear evaluation of the export on the same folder: features to disk, the classifier from disk, top-1 / top-5
    features, results = tmp_path / 'features', tmp_path / 'results' / 'linear'
    t0 = time.time()
    out = _main(capsys, LINEAR, *SMALL_LINEAR, out=pub, root=root, features=features, results=results)
    res = json.loads((results / 'results.json').read_text())
    print(f'{out.strip()} ({time.time() - t0:.1f} s in this test)')
    assert re.search(r'top-1 \d+\.\d\d%, top-5 \d+\.\d\d% on 20 eval images', out), out
    assert res['n_eval'] == 20 and res['classes'] == 10 and res['n_train_rows'] == 200  # val/: 2 per class
    assert 0 <= res['top1'] <= res['top5'] <= 1
    assert f"top-1 {100 * res['top1']:.2f}%, top-5 {100 * res['top5']:.2f}%" in out
    assert res['fit']['steps'] > 0 and res['skipped'] == dict(train=0, eval=0)
    for split, n in (('train', 200), ('eval', 20)):  # float16 chunks of 64 rows on disk
        chunks = sorted((features / split).glob('chunk_*.npy'))
        assert len(chunks) == -(-n // 64), (split, chunks)
        assert sum(np.load(c).shape[0] for c in chunks) == n
        assert all(np.load(c).dtype == np.float16 for c in chunks)


def test_every_preset_value_has_a_source():
    """Each value a preset sets says where it comes from: the paper (a section) or ours (with the reason)."""
    from cpc_models import train
    assert train.PRESET_SOURCES.keys() == train.PRESETS.keys()
    for name, preset in train.PRESETS.items():
        sources = train.PRESET_SOURCES[name]
        assert sources.keys() == preset.keys(), (name, set(preset) ^ set(sources))
        for key, text in sources.items():
            assert text.startswith(('the paper', 'ours')), (name, key)
            assert 'Sec.' in text or not text.startswith('the paper:') or key == 'data', (name, key)
