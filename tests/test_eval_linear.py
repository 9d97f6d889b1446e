"""``cpc-eval linear``: features on disk in chunks (resumed after ``kill -9`` without redoing finished chunks, the same
numbers as in memory), the linear classifier trained from them, top-1 / top-5, and its bad inputs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from cpc_models.data import FASHION_MNIST_CLASSES
from cpc_models.evaluate import main
from cpc_models.evaluate.encoders import load_encoder
from cpc_models.evaluate.feature_store import FeatureStore, chunk_file, create_store, write_chunk
from cpc_models.evaluate.linear import LinearConfig, evaluate_store, fit_from_store
from cpc_models.evaluate.protocols import fit_linear_probe
from cpc_models.extract import extract_features

from conftest import FMNIST_SUBSET

ROOT = Path(__file__).resolve().parents[1]


def _synthetic_store(root, x, y, classes, chunk_rows, skipped=()):
    """A finished store of features x (n, dim) and labels y (n,) written chunk by chunk."""
    spec = create_store(root, [f'img{i}.png' for i in range(len(y))], y, classes, 'synthetic', x.shape[1],
                        dict(input_size=(1, 1, 1)), chunk_rows)
    for k in range(spec.n_chunks):
        rows = spec.rows(k)
        write_chunk(root, k, x[rows.start:rows.stop],
                    [[r, f'img{r}.png', 'OSError: broken'] for r in skipped if r in rows])
    return FeatureStore(root)


def _gaussian_classes(n, dim, classes, seed, spread=1.0, draw_seed=None):
    """Features of Gaussian classes: centers from ``seed``, labels and noise from ``draw_seed`` (default: seed)."""
    centers = np.random.default_rng(seed).normal(size=(classes, dim)) * 0.6
    g = np.random.default_rng(seed if draw_seed is None else draw_seed)
    y = g.integers(0, classes, n)
    return (centers[y] + g.normal(size=(n, dim)) * spread).astype(np.float16), y


def test_top1_and_top5_from_chunks_equal_the_in_memory_numbers(tmp_path):
    x, y = _gaussian_classes(300, 16, 8, 0)
    w = torch.randn(16, 8)
    a = _synthetic_store(tmp_path / 'a', x, y, [str(c) for c in range(8)], chunk_rows=37, skipped=(5, 100))
    b = _synthetic_store(tmp_path / 'b', x, y, [str(c) for c in range(8)], chunk_rows=1000, skipped=(5, 100))
    assert a.spec.n_chunks == 9 and b.spec.n_chunks == 1
    keep = np.ones(300, dtype=bool)
    keep[[5, 100]] = False  # unreadable rows are left out
    logits = torch.from_numpy(x[keep].astype(np.float32)) @ w
    t = torch.from_numpy(y[keep])
    top5 = logits.topk(5, 1).indices
    want = dict(top1=int((top5[:, 0] == t).sum()) / len(t), top5=int((top5 == t[:, None]).any(1).sum()) / len(t))
    for store in (a, b):
        got = evaluate_store(store, [lambda v: v @ w])[0]
        assert got['n'] == 298
        assert got['top1'] == pytest.approx(want['top1'], abs=1e-9) and got['top5'] == pytest.approx(want['top5'],
                                                                                                     abs=1e-9)
    assert 0 < want['top1'] < want['top5'] < 1


def test_the_classifier_trained_from_disk_learns_and_picks_its_penalty_on_the_holdout(tmp_path):
    x, y = _gaussian_classes(2000, 32, 10, 1, spread=1.5)
    store = _synthetic_store(tmp_path / 's', x, y, [str(c) for c in range(10)], chunk_rows=128)
    cfg = LinearConfig(features=str(tmp_path), epochs=8, batch_size=64, lr=0.05, wds=(0.0, 0.5), holdout_fraction=0.1,
                       progress=False)
    fit = fit_from_store(store, cfg, 10)
    assert fit['n_train'] + fit['n_holdout'] == 2000 and 150 < fit['n_holdout'] < 250
    h = fit['holdout_top1_by_wd']
    assert set(h) == {'0.0', '0.5'} and fit['wd'] == max(cfg.wds, key=lambda wd: (h[str(wd)], -cfg.wds.index(wd)))
    assert h['0.0'] > h['0.5']  # a penalty of 0.5 on every weight squashes the classifier: the holdout says so
    x2, y2 = _gaussian_classes(2000, 32, 10, 1, spread=1.5, draw_seed=2)  # the same classes, new images
    acc = float((fit['predict'](torch.from_numpy(x2.astype(np.float32))).argmax(1).numpy() == y2).mean())
    # the same softmax regression fitted in memory by full-batch L-BFGS (the figure1 probe) on the same rows
    train = ~np.random.default_rng(cfg.seed).random(2000).__lt__(cfg.holdout_fraction)
    ref = fit_linear_probe(torch.from_numpy(x[train].astype(np.float32)), torch.from_numpy(y[train]),
                           torch.from_numpy(x[~train].astype(np.float32)), torch.from_numpy(y[~train]), (1e-4,), 10)
    ref_acc = float((ref['predict'](torch.from_numpy(x2.astype(np.float32))).argmax(1).numpy() == y2).mean())
    assert abs(acc - ref_acc) <= 0.02 and acc > 0.5, (acc, ref_acc)  # chance is 0.1


def _fmnist_folder(root: Path, n_train: int, n_val: int) -> Path:
    """train/ and val/ of class subfolders: the first n_train training and n_val test images of the subset."""
    sub = load_file(str(FMNIST_SUBSET))
    for split, src, n in (('train', 'train', n_train), ('val', 'test', n_val)):
        for i, (img, y) in enumerate(zip(sub[f'{src}_images'][:n], sub[f'{src}_labels'][:n], strict=True)):
            d = root / split / re.sub('[^A-Za-z]+', '-', FASHION_MNIST_CLASSES[int(y)])
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(d / f'{i:05d}.png')
    return root


@pytest.mark.slow
def test_extraction_killed_half_way_resumes_without_redoing_finished_chunks(tmp_path):
    data = _fmnist_folder(tmp_path / 'fm', 800, 100)
    feats = tmp_path / 'feats'
    cmd = [sys.executable, '-m', 'cpc_models.evaluate', 'linear', '--checkpoint', 'random', '--data', str(data),
           '--features', str(feats), '--out', str(tmp_path / 'out'), '--chunk-rows', '40', '--workers', '0',
           '--extract-batch', '20', '--epochs', '1', '--threads', '1', '--no-progress']
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    train = feats / 'train'
    deadline = time.time() + 300
    while len(list(train.glob('chunk_*.npy'))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in train.glob('chunk_*.npy')}
    n_chunks = 20  # 800 training images in chunks of 40
    assert 4 <= len(done) < n_chunks, len(done)  # killed half-way
    assert not (feats / 'eval' / 'store.json').exists()

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f'train: {n_chunks - len(done)} chunk(s) extracted, {len(done)} already on disk' in res.stderr
    for name, stamp in done.items():  # the finished chunks were not written again
        p = train / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, name
    assert not list(train.glob('.chunk_*'))  # no temporary file of the killed run is left
    store = FeatureStore(train)
    assert store.n == 800 and store.spec.n_chunks == n_chunks
    out = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert out['n_eval'] == 100 and 0 <= out['top1'] <= out['top5'] <= 1

    # the stored rows are the pooled features of their images, as extract_features computes them in memory
    enc, _ = load_encoder('random', 'cpcv2_resnet_tiny')
    paths = (train / 'paths.txt').read_text().splitlines()
    for k in (0, len(done) - 1, n_chunks - 1):  # a chunk before the kill, the last one before it, one after
        rows = store.spec.rows(k)
        images = torch.stack([torch.from_numpy(np.array(Image.open(paths[r])))[None] for r in rows])
        want, _ = extract_features(enc, images, progress=False)
        got, y, _ = store.chunk(k)
        assert np.allclose(np.asarray(got, dtype=np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
        assert [store.spec.classes[i] for i in y] == [Path(paths[r]).parent.name for r in rows]


def test_bad_linear_inputs_get_one_line_and_exit_2(tmp_path, capsys):
    only_train = tmp_path / 'only-train'
    for c in ('a', 'b'):
        (only_train / 'train' / c).mkdir(parents=True)
    code = main(['linear', '--checkpoint', 'random', '--data', str(only_train), '--features', str(tmp_path / 'f')])
    err = capsys.readouterr().err
    assert code == 2 and 'needs train/ and val/ (or test/)' in err and 'Traceback' not in err
    x, y = _gaussian_classes(50, 4, 2, 0)
    _synthetic_store(tmp_path / 'f' / 'train', x, y, ['a', 'b'], chunk_rows=10)
    _synthetic_store(tmp_path / 'f' / 'eval', x, y, ['a', 'b'], chunk_rows=10)
    chunk_file(tmp_path / 'f' / 'eval', 2).unlink()  # an extraction that did not finish
    code = main(['linear', '--features', str(tmp_path / 'f')])
    err = capsys.readouterr().err
    assert code == 2 and '1 of 5 chunks missing (e.g. chunk_000002.npy)' in err and 'Traceback' not in err
    with pytest.raises(ValueError, match='holds features of other images'):
        create_store(tmp_path / 'f' / 'train', ['other.png'] * 50, y, ['a', 'b'], 'synthetic', 4, {}, 10)


@pytest.mark.slow
def test_every_rank_of_a_torchrun_launch_extracts_its_share_of_the_chunks(tmp_path):
    data = _fmnist_folder(tmp_path / 'fm', 200, 40)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m',
           'cpc_models.evaluate', 'linear', '--checkpoint', 'random', '--data', str(data), '--features',
           str(tmp_path / 'feats'), '--out', str(tmp_path / 'out'), '--chunk-rows', '20', '--workers', '0',
           '--epochs', '1', '--threads', '1', '--no-progress']
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # 10 training chunks and 2 eval chunks: each of the 2 ranks extracts the chunks k % 2 == rank
    for r in (0, 1):
        assert f'rank {r}/2: train: 5 chunk(s) extracted, 0 already on disk, 0 unreadable image(s) skipped; ' \
               f'eval: 1 chunk(s) extracted' in res.stderr, res.stderr[-3000:]
    assert res.stdout.count('linear evaluation of') == 1  # the classifier trains on rank 0 only
    assert FeatureStore(tmp_path / 'feats' / 'train').n == 200
    assert json.loads((tmp_path / 'out' / 'results.json').read_text())['n_eval'] == 40
