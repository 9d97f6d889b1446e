"""The naive baselines, timed side by side with the batched code in the same run (benchmarks/run.py):

1. encoder: a Python loop over patches (one trunk call per patch) vs one batched trunk call (forward_patches);
2. augmentation: per-patch PIL (benchmarks/augment_throughput.py's pipeline, always on the CPU) vs
   PatchAugment on batched tensors (on the benchmark device; off the CPU also its indexed way, beside the
   masked default);
3. negatives: 16 sampled negatives per anchor gathered one anchor at a time (as public CPC v2 reimplementations
   score them) vs one logits matmul against every target of the batch (CPCObjective), plus the same 16 sampled
   negatives in one batched gather; each is the loss's forward + backward on the same predictions and targets.
"""
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from benchmarks.augment_throughput import pil_baseline
from benchmarks.cases import PatchLoopEncoder, apply_mode, build_setup, make_inference, make_train_step
from benchmarks.common import measure
from cpc_models.augment import PatchAugment, PatchAugmentConfig
from cpc_models.train import CPCModel


def _row(group: str, case: str, method: str, items: int, unit: str, m: Dict, baseline: bool) -> Dict:
    return dict(group=group, case=case, method=method, naive=baseline, items=items, unit=unit,
                items_per_s=items / m['median_s'], **m)


def _ratios(rows: List[Dict]) -> None:
    for r in rows:
        fast = [q for q in rows if q['group'] == r['group'] and q['case'] == r['case'] and not q['naive']]
        r['ours_speedup_vs_this'] = (r['median_s'] / fast[0]['median_s']) if fast else None


def encoder_loop(variant: str, batch: int, grid, train: bool, ctx) -> List[Dict]:
    s = build_setup(variant, ctx.device, batch, grid)
    apply_mode(s, frozenset())
    n = batch * s.patches_per_image
    case = (f"{variant} {'training step' if train else 'inference'}, {batch} img x {s.geo['rows']}x{s.geo['cols']} "
            f"patches of {s.geo['patch']}px")
    loop = PatchLoopEncoder(s.encoder)
    rows = []
    for method, encoder in (('one batched trunk call (forward_patches)', s.encoder),
                            ('Python loop over patches (one trunk call each)', loop)):
        naive = encoder is loop
        if train:
            fn = make_train_step(s, CPCModel(encoder, s.model.objective) if naive else None)[0]
        else:
            fn = make_inference(s, encoder)
        m = measure(fn, ctx.device, ctx.threads, ctx.min_run_time, ctx.repeats, label=case)
        rows.append(_row('encoder: batched vs per-patch loop', case, method, n, 'patches', m, naive))
    del s
    return rows


def augmentation(images: int, patches: int, chans: int, p: int, cfg: PatchAugmentConfig, ctx) -> List[Dict]:
    n = images * patches
    case = f'{images} img x {patches} patches, {chans}x{p}x{p}'
    x = torch.rand(n, chans, p, p, generator=torch.Generator().manual_seed(0))
    xd = x.to(ctx.device)
    aug, gen = PatchAugment(cfg), torch.Generator(device=ctx.device).manual_seed(0)
    pil = pil_baseline(chans)
    rows = []
    methods = [(f'PatchAugment, batched tensors on {ctx.device.type}', lambda: aug(xd, gen), False)]
    if ctx.device.type != 'cpu':  # the device default is masked (no host sync); the indexed way beside it
        indexed = PatchAugment(cfg, masked=False)
        methods.append((f'PatchAugment indexed (one sync per op group) on {ctx.device.type}',
                        lambda: indexed(xd, gen), True))
    methods.append(('per-patch PIL on the CPU (timm RandAugment + torchvision)', lambda: pil(x), True))
    for method, fn, naive in methods:
        m = measure(fn, ctx.device, ctx.threads, ctx.min_run_time, ctx.repeats, label=case)
        rows.append(_row('augmentation: batched tensors vs per-patch PIL', case, method, n, 'patches', m, naive))
    return rows


def _anchor_count(rows: int, cols: int, directions: int, offsets) -> int:
    per_image = 0
    for d in range(directions):
        length, width = (rows, cols) if d < 2 else (cols, rows)
        per_image += sum((length - k) * width for k in offsets)
    return per_image


def negatives(label: str, batch: int, rows: int, cols: int, directions: int, offsets, dim: int, k_neg: int,
              ctx) -> List[Dict]:
    """Loss forward + backward from predictions (A, D) and targets (N, D) with three ways of scoring negatives."""
    dev = ctx.device
    a = batch * _anchor_count(rows, cols, directions, offsets)
    n = batch * rows * cols
    g = torch.Generator(device=dev).manual_seed(0)
    preds = (0.1 * torch.randn(a, dim, generator=g, device=dev)).requires_grad_()
    targets = torch.randn(n, dim, generator=g, device=dev).requires_grad_()
    labels = torch.randint(n, (a,), generator=g, device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    case = f'{label}: {a} anchors, {n} targets, D={dim}'

    def all_targets():  # CPCObjective: one (anchors x candidates) matmul, every target of the batch a candidate
        preds.grad = targets.grad = None
        F.cross_entropy(preds @ targets.t(), labels).backward()

    def sampled_batched():  # k_neg random negatives per anchor, one gather for all anchors
        preds.grad = targets.grad = None
        idx = torch.cat([labels[:, None], torch.randint(n, (a, k_neg), generator=g, device=dev)], 1)
        logits = torch.einsum('ad,akd->ak', preds, targets[idx])
        F.cross_entropy(logits, torch.zeros(a, dtype=torch.long, device=dev)).backward()

    def sampled_per_anchor():  # as public reimplementations do: gather and score one anchor at a time
        preds.grad = targets.grad = None
        neg = torch.randint(n, (a, k_neg), generator=g, device=dev)
        losses = []
        for i in range(a):
            cand = targets[torch.cat([labels[i:i + 1], neg[i]])]
            losses.append(F.cross_entropy((cand @ preds[i]).unsqueeze(0), zero))
        torch.stack(losses).mean().backward()

    rows = []
    for method, fn, naive in ((f'all {n} targets, one logits matmul (ours)', all_targets, False),
                              (f'{k_neg} sampled negatives, one batched gather', sampled_batched, True),
                              (f'{k_neg} sampled negatives, per-anchor gathers', sampled_per_anchor, True)):
        m = measure(fn, dev, ctx.threads, ctx.min_run_time, ctx.repeats, label=case)
        rows.append(_row('negatives: one logits matmul vs sampled per-anchor gathers', case, method, a, 'anchors',
                         m, naive))
    return rows


def run_all(plan: List[Callable[[], List[Dict]]], ctx, deadline: float, log) -> List[Dict]:
    rows: List[Dict] = []
    for job in plan:
        if time.monotonic() > deadline:
            log(f'  skipped baseline {job.__name__}: time budget spent')
            continue
        try:
            new = job()
        except Exception as e:  # noqa: BLE001  (recorded, the suite goes on)
            log(f'  baseline {getattr(job, "__name__", job)} failed: {type(e).__name__}: {e}')
            continue
        _ratios(new)
        for r in new:
            log(f"  {r['case']} | {r['method']}: {r['median_s'] * 1e3:.1f} ms, {r['items_per_s']:,.0f} {r['unit']}/s"
                f" (ours is {r['ours_speedup_vs_this']:.1f}x faster)" if r['naive'] else
                f"  {r['case']} | {r['method']}: {r['median_s'] * 1e3:.1f} ms, {r['items_per_s']:,.0f} {r['unit']}/s")
        rows.extend(new)
    return rows
