"""Throughput of the batched per-patch augmentation against per-patch PIL augmentation.

PatchAugment (cpc_models/augment.py) augments a whole batch of patches on tensors. The baseline is the way of a
public CPC v2 reimplementation (rschwarz15/CPCV2-PyTorch): each patch converted to PIL, augmented with PIL ops one patch at a time (here
torchvision's RandomHorizontalFlip, timm's RandAugment 'rand-n2-m9-inc1', torchvision's ColorJitter
with p=0.8 and RandomGrayscale p=0.25), then converted back and stacked. The baseline has no elastic deformation
or jitter, so it does less work than PatchAugment's default config. PatchAugment runs twice: the CPU default
(each op on its own patches) and `masked=True` (every op on every patch, kept by torch.where; the default off the CPU).

Usage (from the repository root): OMP_NUM_THREADS=1 python -m benchmarks.augment_throughput [--threads 1] [--min-run-time 3]
Writes augment_cpu.json and .md into a new runs/benchmarks/augment-<UTC time>/ folder, or into benchmarks/results/
(the committed tables) with --update-results.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import PIL
import timm
import torch
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import rand_augment_transform
from torch.utils import benchmark

from benchmarks.common import RESULTS, RUNS, cpu_model
from cpc_models.atomic import write_text
from cpc_models.augment import PatchAugment, PatchAugmentConfig

CASES = [
    # name, images, patches per image, channels, P, config
    ('Fashion-MNIST-like: 64 img x 36 patches, 1x8x8', 64, 36, 1, 8, PatchAugmentConfig(jitter=1)),
    ('ImageNet CPC v2: 16 img x 36 patches, 3x80x80, all paper ops', 16, 36, 3, 80, PatchAugmentConfig()),
]


def pil_baseline(channels: int):
    """Per-patch PIL pipeline in the style of rschwarz15's PatchAugment."""
    fill = 128 if channels == 1 else (128, 128, 128)
    ra = rand_augment_transform('rand-n2-m9-inc1', dict(translate_const=8, img_mean=fill))
    pipe = T.Compose([T.RandomHorizontalFlip(), ra, T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                      T.RandomGrayscale(p=0.25 if channels == 3 else 0.0)])

    def run(patches: torch.Tensor) -> torch.Tensor:
        out = []
        for p in patches:
            img = pipe(TF.to_pil_image(p))
            out.append(TF.to_dtype(TF.pil_to_tensor(img), torch.float32, scale=True))
        return torch.stack(out)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=1, help='torch threads (default: 1)')
    ap.add_argument('--min-run-time', type=float, default=3.0, help='seconds per measurement (default: 3)')
    ap.add_argument('--out', default=None, help='path stem of the .json/.md files (default: a new '
                                                'runs/benchmarks/augment-<UTC time>/augment_cpu)')
    ap.add_argument('--update-results', action='store_true',
                    help='write benchmarks/results/augment_cpu.{json,md}, the committed tables, instead')
    args = ap.parse_args(argv)
    if args.threads < 1 or args.min_run_time <= 0:
        ap.error('--threads must be >= 1 and --min-run-time > 0')
    if args.update_results and args.out:
        ap.error('--update-results writes benchmarks/results/; leave out --out')
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    out = Path(args.out or (RESULTS if args.update_results else RUNS / f'augment-{stamp}') / 'augment_cpu')
    torch.set_num_threads(args.threads)
    machine = dict(cpu=cpu_model(), logical_cores=os.cpu_count(), threads=args.threads,
                   torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
                   pillow=PIL.__version__, python=platform.python_version(),
                   load_average_1min=os.getloadavg()[0])
    rows = []
    for name, b, r, c, p, cfg in CASES:
        n = b * r
        x = torch.rand(n, c, p, p, generator=torch.Generator().manual_seed(0))
        aug, gen, pil = PatchAugment(cfg), torch.Generator().manual_seed(0), pil_baseline(c)
        masked = PatchAugment(cfg, masked=True)  # the way of non-CPU devices: no host sync, more arithmetic
        for label, fn in (('PatchAugment (batched tensors)', lambda aug=aug, x=x, gen=gen: aug(x, gen)),
                          ('PatchAugment, masked (the CUDA default)', lambda a=masked, x=x, gen=gen: a(x, gen)),
                          ('per-patch PIL (timm RandAugment + torchvision)', lambda pil=pil, x=x: pil(x))):
            fn()  # warm-up
            m = benchmark.Timer(stmt='fn()', globals=dict(fn=fn), num_threads=args.threads,
                                label=name, description=label).blocked_autorange(min_run_time=args.min_run_time)
            rows.append(dict(case=name, method=label, patches_per_batch=n, ms_per_batch=m.median * 1e3,
                             patches_per_s=n / m.median, runs=len(m.times)))
            print(f'{name} | {label}: {m.median * 1e3:.1f} ms/batch, {n / m.median:,.0f} patches/s', flush=True)
    for row in rows:
        base = next(q for q in rows if q['case'] == row['case'] and q['method'].startswith('per-patch'))
        row['speedup_vs_pil'] = base['ms_per_batch'] / row['ms_per_batch']
    head = (f"CPU: {machine['cpu']} ({machine['logical_cores']} logical cores, shared), {args.threads} thread(s); "
            f"torch {machine['torch']}, torchvision {machine['torchvision']}, timm {machine['timm']}, "
            f"Pillow {machine['pillow']}; median of torch.utils.benchmark blocked_autorange "
            f"(min_run_time={args.min_run_time:g} s); 1-min load average at start {machine['load_average_1min']:.1f} "
            f"(wall-clock times grow when other processes share the cores).\n\n")
    table = ['| case | method | ms / batch | patches / s | speed-up |', '|---|---|---:|---:|---:|']
    table += [f"| {q['case']} | {q['method']} | {q['ms_per_batch']:.1f} | {q['patches_per_s']:,.0f} | "
              f"{q['speedup_vs_pil']:.1f}x |" for q in rows]
    md = head + '\n'.join(table) + '\n'
    print('\n' + md)
    write_text(out.with_suffix('.json'), json.dumps(dict(machine=machine, results=rows), indent=2) + '\n')
    write_text(out.with_suffix('.md'), md)
    print(f'wrote {out}.json and .md')


if __name__ == '__main__':
    main()
