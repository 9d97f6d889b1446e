"""The input side at ImageNet scale, on the CPU: the sampler's cost per step, the file index of 1.28M files, and the
end-to-end input rate (read + decode + resize + crop) per core.

Usage (from the repository root):

    PYTHONPATH=. python -m benchmarks.data_scale [--parts sampler,index,input] [--files 1281167] [--update-results]

* ``sampler``: CPU time per step of StepSampler (1,281,167 images, global batch 512 on 64 ranks, rank 0) over 3,000
  steps that cross an epoch boundary, against the earlier sampler's cost (one permutation drawn per step).
* ``index``: ``--files`` empty files in 1,000 class folders (ImageNet's train/ layout, created in a scratch folder
  and removed afterwards); the index built once (wall and CPU time), then read in a fresh process (time to open and
  to touch every path, and the process's resident memory before and after).
* ``input``: a synthetic ImageNet (cpc_models.tools.fake_imagenet: 20 classes x 50 images) read by
  ImageFolderDataset as cpc-train reads it (resize 300, random crop 260) through a DataLoader of one worker process
  (one core decoding; torch threads 1), images per second; and in the main process, to separate the loader's cost.

Writes data_scale.json and .md into a new runs/benchmarks/data_scale-<UTC time>/ folder, or into benchmarks/results/
(the committed tables) with --update-results.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
from torch.utils.data import DataLoader

from benchmarks.common import RESULTS, RUNS, machine_info, markdown_header, save_results
from cpc_models.data import ImageFolderDataset, StepSampler, epoch_permutation
from cpc_models.file_index import FileIndex
from cpc_models.images import collate_readable

IMAGENET_TRAIN = 1_281_167


def bench_sampler(n: int = IMAGENET_TRAIN, batch: int = 512, world: int = 64, steps: int = 3000) -> Dict:
    sampler = StepSampler(n, batch, 0, world, seed=0, start_step=n // batch - 1000)  # the epoch ends after 1,000
    it = iter(sampler)
    per_step = []
    for _ in range(steps):
        t = time.process_time()
        next(it)
        per_step.append(time.process_time() - t)
    old = []
    for step in range(20):  # the earlier sampler: one permutation per step
        t = time.process_time()
        perm = epoch_permutation(n, 0, 0)
        perm[step * batch:step * batch + batch // world].tolist()
        old.append(time.process_time() - t)
    per_step_sorted = sorted(per_step)
    return dict(images=n, global_batch=batch, world=world, steps=steps,
                mean_ms=1e3 * sum(per_step) / steps, median_ms=1e3 * per_step_sorted[steps // 2],
                max_ms=1e3 * per_step_sorted[-1], per_step_permutation_ms=1e3 * sum(old) / len(old))


_READ = r'''
import json, os, sys, time
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
sys.path.insert(0, os.getcwd())
from cpc_models.file_index import FileIndex
before = rss()
t = time.perf_counter()
index = FileIndex.read(sys.argv[1], sys.argv[2])
opened = time.perf_counter() - t
t = time.perf_counter()
total = sum(len(index.relpath(i)) for i in range(0, len(index), 1)) + int(index.labels.sum())
touched = time.perf_counter() - t
print(json.dumps(dict(open_s=opened, touch_all_s=touched, rss_before_mb=before, rss_after_mb=rss(), files=len(index))))
'''


def bench_index(files: int, classes: int = 1000, scratch: str = '') -> Dict:
    parent = Path(tempfile.mkdtemp(prefix='cpc_index_bench_', dir=scratch or None))
    root = parent / 'train'
    try:
        t = time.perf_counter()
        per_class = -(-files // classes)
        made = 0
        for k in range(classes):
            folder = root / f'n{k:08d}'
            folder.mkdir(parents=True)
            for i in range(min(per_class, files - made)):
                os.close(os.open(folder / f'n{k:08d}_{i}.JPEG', os.O_CREAT | os.O_WRONLY, 0o644))
            made += min(per_class, files - made)
        make_s = time.perf_counter() - t
        os.sync()
        t, c = time.perf_counter(), time.process_time()
        index = FileIndex.build(root, parent / 'index')
        build = dict(wall_s=time.perf_counter() - t, cpu_s=time.process_time() - c)
        assert len(index) == files and len(index.classes) == classes
        res = subprocess.run([sys.executable, '-c', _READ, str(parent / 'index'), str(root)], capture_output=True,
                             text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
        read = json.loads(res.stdout)
        size_mb = sum(f.stat().st_size for f in (parent / 'index').iterdir()) / 2 ** 20
        return dict(files=files, classes=classes, make_files_s=make_s, build=build, read=read, index_mb=size_mb)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def bench_input(classes: int = 20, per_class: int = 50, batches: int = 12, batch: int = 32) -> Dict:
    from cpc_models.tools.fake_imagenet import write_tree
    torch.set_num_threads(1)
    parent = Path(tempfile.mkdtemp(prefix='cpc_input_bench_'))
    try:
        write_tree(parent, classes, per_class, val_per_class=0, seed=0)
        ds = ImageFolderDataset(parent / 'train', 260, 3, resize=300, train=True)
        out = {}
        for workers in (0, 1):
            sampler = StepSampler(len(ds), batch, 0, 1, seed=0)
            loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_readable, num_workers=workers)
            it = iter(loader)
            next(it)  # start-up (worker process) not counted
            t = time.perf_counter()
            images = sum(next(it)[0].shape[0] for _ in range(batches))
            out[f'workers_{workers}'] = dict(images=images, seconds=time.perf_counter() - t,
                                             images_per_s=images / (time.perf_counter() - t))
            del it, loader
        return dict(images_in_tree=len(ds), crop=260, resize=300, batch=batch, **out)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def render(doc: Dict) -> str:
    lines = markdown_header(doc, 'The input side at ImageNet scale (CPU)')
    if 'sampler' in doc:
        s = doc['sampler']
        lines += ['## Sampler', '', f"{s['images']:,} images, global batch {s['global_batch']} on {s['world']} ranks "
                  f"(rank 0), {s['steps']:,} steps crossing an epoch boundary: mean {s['mean_ms']:.3f} ms, median "
                  f"{s['median_ms']:.3f} ms, max {s['max_ms']:.1f} ms of CPU per step (the max: the step that draws "
                  f"the next epoch's permutation). The earlier sampler drew the permutation every step: "
                  f"{s['per_step_permutation_ms']:.1f} ms per step.", '']
    if 'index' in doc:
        x = doc['index']
        r = x['read']
        lines += ['## File index', '', f"{x['files']:,} empty files in {x['classes']:,} class folders (made in "
                  f"{x['make_files_s']:.0f} s). Build (walk + save): {x['build']['wall_s']:.1f} s wall, "
                  f"{x['build']['cpu_s']:.1f} s CPU, one process; on disk {x['index_mb']:.0f} MB. Read in a fresh "
                  f"process: open {r['open_s'] * 1e3:.0f} ms; touching every path and label "
                  f"{r['touch_all_s']:.1f} s; resident memory {r['rss_before_mb']:.0f} MB before opening, "
                  f"{r['rss_after_mb']:.0f} MB after touching everything (+{r['rss_after_mb'] - r['rss_before_mb']:.0f}"
                  f" MB, file-backed pages shared by the processes of a machine).", '']
    if 'input' in doc:
        i = doc['input']
        w0, w1 = i['workers_0'], i['workers_1']
        lines += ['## End-to-end input rate per core', '', f"Synthetic ImageNet ({i['images_in_tree']} JPEGs, "
                  f"cpc_models.tools.fake_imagenet), resize {i['resize']}, random crop {i['crop']}, batch "
                  f"{i['batch']}, torch threads 1: **{w1['images_per_s']:.0f} images/s** through a DataLoader with "
                  f"one worker process (one core decoding), {w0['images_per_s']:.0f} images/s in the main process "
                  f"({w1['images']} images each).", '']
    return '\n'.join(lines) + '\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--parts', default='sampler,index,input')
    parser.add_argument('--files', type=int, default=IMAGENET_TRAIN, help='files of the index benchmark')
    parser.add_argument('--scratch', default='', help='where to create the files (default: the temp folder)')
    parser.add_argument('--update-results', action='store_true')
    args = parser.parse_args()
    t0 = time.monotonic()
    parts = args.parts.split(',')
    cmd = 'PYTHONPATH=. python -m benchmarks.data_scale' + ''.join(
        f' {a}' for a in sys.argv[1:] if a != '--update-results')
    doc = dict(command=cmd, machine=machine_info(torch.device('cpu'), 1))
    if 'sampler' in parts:
        doc['sampler'] = bench_sampler()
        print('sampler', json.dumps(doc['sampler']), flush=True)
    if 'index' in parts:
        doc['index'] = bench_index(args.files, scratch=args.scratch)
        print('index', json.dumps(doc['index']), flush=True)
    if 'input' in parts:
        doc['input'] = bench_input()
        print('input', json.dumps(doc['input']), flush=True)
    out = RESULTS if args.update_results else RUNS / f'data_scale-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}'
    save_results(doc, out, 'data_scale', render, t0)
    print(render(doc))


if __name__ == '__main__':
    main()
