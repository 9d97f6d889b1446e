"""Pretraining recipe search on Fashion-MNIST: cpc-train a config, then a val-split linear probe at 1% labels.

    python results/fmnist_search/search.py OUT_ROOT NAME [--steps N] -- <cpc-train overrides>   # train, then probe
    python results/fmnist_search/search.py OUT_ROOT NAME --probe-only CHECKPOINT   # probe a checkpoint (or 'pixels',
                                                                                 # 'random', a timm name with tag)
Appends one JSON line to OUT_ROOT/search.jsonl. Runs from the repository root with the package installed.

Probe: pool = train minus a 5,000-image class-balanced val split (seed 0), 1% class-balanced labelled subset
(seeds 0, 1, 2); the L2 penalty is picked on half A of val, accuracy reported on half B. Pooled (forward_head
pre_logits) and flattened latent grid features, standardized, softmax regression (evaluate.fit_linear_probe).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def probe(encoder_src, seeds=(0, 1, 2), model='cpcv2_resnet_tiny', model_args=None):
    from cpc_models.data import load_fashion_mnist
    from cpc_models.evaluate import (balanced_subset, extract_features, fit_linear_probe, load_encoder,
                                     split_train_val)
    x, y = load_fashion_mnist('train')
    pool, val = split_train_val(y, 5000, 0)
    half = torch.zeros(len(val), dtype=torch.bool)
    half[torch.randperm(len(val), generator=torch.Generator().manual_seed(7))[:len(val) // 2]] = True
    va, vb = val[half], val[~half]
    if encoder_src == 'pixels':
        feats = {'pixels': lambda idx: x[idx].flatten(1).float() / 255}
    else:
        enc, _ = load_encoder(encoder_src, model, model_args or {}, random_seed=0)
        cache = {}

        def get(idx, kind):
            key = (kind, idx[0].item(), len(idx))
            if key not in cache:
                p, g = extract_features(enc, x[idx], keep_grid=True, progress=False)
                cache[('pooled', idx[0].item(), len(idx))] = p
                cache[('grid', idx[0].item(), len(idx))] = g.float().flatten(1)
            return cache[key]
        feats = {'pooled': lambda idx: get(idx, 'pooled'), 'grid': lambda idx: get(idx, 'grid')}
    out = {}
    for name, f in feats.items():
        accs = []
        fa, fb = f(va), f(vb)
        for s in seeds:
            lab = pool[balanced_subset(y[pool], 0.01, s)]
            r = fit_linear_probe(f(lab), y[lab], fa, y[va], wds=(1e-1, 1e-2, 1e-3, 1e-4), num_classes=10)
            accs.append(float((r['predict'](fb).argmax(1) == y[vb]).float().mean()))
        out[name] = dict(mean=sum(accs) / len(accs), per_seed=accs)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('root', type=Path)
    ap.add_argument('name')
    ap.add_argument('--steps', type=int, default=937)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--probe-only', default='')
    ap.add_argument('overrides', nargs='*')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out_dir = a.root / a.name
    rec_file = a.root / 'search.jsonl'
    if a.probe_only:
        t0 = time.time()
        res = probe(a.probe_only)
        rec = dict(name=a.name, source=a.probe_only, probe=res, probe_s=round(time.time() - t0, 1))
    else:
        cmd = [sys.executable, '-m', 'cpc_models.train', '--preset', 'fmnist_tiny', '--out-dir', str(out_dir),
               '--max-steps', str(a.steps), '--save-every', '200', '--log-every', '50', '--progress', 'false',
               *a.overrides]
        t0 = time.time()
        env = dict(__import__('os').environ, OMP_NUM_THREADS=str(a.threads))
        subprocess.run(cmd, check=True, env=env)
        train_s = time.time() - t0
        ckpt = sorted((out_dir / 'checkpoints').glob('step_*[0-9]'))[-1]
        metrics = json.loads((ckpt / 'metrics.json').read_text())
        t0 = time.time()
        res = probe(str(ckpt))
        rec = dict(name=a.name, overrides=a.overrides, steps=a.steps, train_s=round(train_s, 1),
                   wall_time_s=metrics.get('wall_time_s'), loss=metrics.get('loss'), acc=metrics.get('acc'),
                   images_per_s=metrics.get('images_per_s'), probe=res, probe_s=round(time.time() - t0, 1))
    with open(rec_file, 'a') as f:
        f.write(json.dumps(rec) + '\n')
    print(json.dumps(rec))


if __name__ == '__main__':
    main()
