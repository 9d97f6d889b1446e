"""Peak RAM of ``cpc-eval linear`` at scale: the linear classifier trained from features on disk.

Writes a synthetic feature store (``--rows`` x ``--dim`` float16 rows of Gaussian classes, chunk by chunk, so the
writer's RAM is bounded too), then runs ``python -m cpc_models.evaluate linear --features STORE`` in a subprocess
and reports its peak resident set size (``ru_maxrss`` of the child, which includes torch's own import) and wall
time. The in-memory alternative would hold rows x dim x 4 bytes.

Usage (from the repository root):

    python -m benchmarks.linear_from_disk --rows 200000 --dim 4096 --store /tmp/linear-store \\
        --out benchmarks/results/linear_from_disk_cpu.md
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cpc_models.atomic import write_text
from cpc_models.evaluate.feature_store import FeatureStore, create_store, write_chunk


def write_synthetic(root: Path, rows: int, dim: int, classes: int, chunk_rows: int, seed: int) -> None:
    """A finished store of Gaussian classes (centers shared by its train and eval stores through ``seed``)."""
    g = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(size=(classes, dim)).astype(np.float32) * 0.05
    labels = g.integers(0, classes, rows)
    spec = create_store(root, [f'synthetic/{i}' for i in range(rows)], labels, [str(c) for c in range(classes)],
                        'synthetic', dim, dict(input_size=(dim,)), chunk_rows)
    for k in range(spec.n_chunks):
        if (root / f'chunk_{k:06d}.npy').is_file():
            continue
        r = spec.rows(k)
        x = centers[labels[r.start:r.stop]] + g.normal(size=(len(r), dim)).astype(np.float32)
        write_chunk(root, k, x.astype(np.float16))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rows', type=int, default=200_000)
    p.add_argument('--eval-rows', type=int, default=10_000)
    p.add_argument('--dim', type=int, default=4096)
    p.add_argument('--classes', type=int, default=100)
    p.add_argument('--chunk-rows', type=int, default=4096)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--store', default='/tmp/cpc-linear-benchmark-store')
    p.add_argument('--out', default='')
    args = p.parse_args()
    store = Path(args.store)
    t0 = time.time()
    write_synthetic(store / 'train', args.rows, args.dim, args.classes, args.chunk_rows, 1)
    write_synthetic(store / 'eval', args.eval_rows, args.dim, args.classes, args.chunk_rows, 2)
    t_write = time.time() - t0
    on_disk = sum(f.stat().st_size for f in store.rglob('chunk_*.npy'))
    cmd = [sys.executable, '-m', 'cpc_models.evaluate', 'linear', '--features', str(store), '--out', str(store / 'out'),
           '--epochs', str(args.epochs), '--threads', str(args.threads), '--no-progress']
    t1 = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - t1
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res = json.loads((store / 'out' / 'results.json').read_text())
    n = FeatureStore(store / 'train').n
    in_memory_gb = n * args.dim * 4 / 1e9
    lines = [
        '# cpc-eval linear from disk: peak RAM', '',
        f'`python -m benchmarks.linear_from_disk --rows {args.rows} --dim {args.dim} --classes {args.classes} '
        f'--chunk-rows {args.chunk_rows} --epochs {args.epochs} --threads {args.threads}`', '',
        '| rows | dim | classes | on disk (fp16) | fp32 in memory would be | peak RSS of the training process | '
        'wall | top-1 / top-5 (synthetic) |', '|---|---|---|---|---|---|---|---|',
        f'| {n:,} | {args.dim} | {args.classes} | {on_disk / 1e9:.2f} GB | {in_memory_gb:.2f} GB | '
        f'{child_peak_mb:,.0f} MB | {wall:.0f} s | {100 * res["top1"]:.1f}% / {100 * res["top5"]:.1f}% |', '',
        f'{args.epochs} epochs x {len(res["config"]["wds"])} L2 penalties trained at once, batch '
        f'{res["config"]["batch_size"]}; writing the synthetic store took {t_write:.0f} s. Host: '
        f'{platform.processor() or platform.machine()}, {args.threads} torch threads.', '']
    text = '\n'.join(lines)
    print(text)
    if args.out:
        write_text(args.out, text)
        write_text(Path(args.out).with_suffix('.json'), json.dumps(dict(
            rows=n, dim=args.dim, classes=args.classes, on_disk_bytes=on_disk, peak_rss_mb=round(child_peak_mb, 1),
            wall_s=round(wall, 1), write_s=round(t_write, 1), result=res), indent=1))


if __name__ == '__main__':
    main()
