"""Where one training step's time goes: torch.profiler over cpc_models.train.train_step (benchmarks.cases).

train_step and CPCModel label their parts with ``record_function`` (``cpc::augment``, ``cpc::encoder``,
``cpc::objective``, ``cpc::backward``, ``cpc::optimizer``); here forward hooks add ``cpc::context`` around the
context network. Every profiled op is put in one bucket by its enclosing label; backward ops are traced back to the
forward op that created them through the autograd sequence number, so the encoder's backward lands with the
encoder, the logits' backward with the logits. Self time (CPU, or CUDA kernel time on CUDA) is summed per bucket,
so nothing is counted twice.
"""
from typing import Dict, List

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.cases import Setup, make_train_step

BUCKETS = ('augmentation (patchify + PatchAugment + normalize)', 'encoder convolutions',
           'encoder norms, activations, other', 'context network', 'logits matmul + cross-entropy',
           'objective: projections, predictors, other', 'optimizer (zero_grad + grad clip + AdamW)',
           'other / unattributed')
_LABELS = {'cpc::augment': 0, 'cpc::optimizer': 6}
_BWD = 'autograd::engine::evaluate_function: '


def _label_forward(module: nn.Module, name: str) -> List:
    """Forward hooks that put every call of ``module`` inside ``record_function(name)``; returns the handles."""
    open_ranges = []

    def enter(m, args):
        open_ranges.append(record_function(name).__enter__())

    def leave(m, args, out):
        open_ranges.pop().__exit__(None, None, None)
    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def profile_train_step(s: Setup, warmup: int = 2) -> Dict:
    dev = s.device
    step, _ = make_train_step(s)
    context = s.model.objective.context
    handles = [h for m in (context.values() if isinstance(context, nn.ModuleDict) else [context])
               for h in _label_forward(m, 'cpc::context')]
    try:
        for _ in range(warmup):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
        with profile(activities=activities) as prof:
            step()
            if dev.type == 'cuda':
                torch.cuda.synchronize(dev)
    finally:
        for h in handles:
            h.remove()
    return summarize(prof, dev)


def _forward_bucket(chain) -> int:
    """chain: names from the op up to the root (the op first)."""
    names = [e.name for e in chain]
    for label, bucket in _LABELS.items():
        if label in names:
            return bucket
    if 'cpc::context' in names:
        return 3
    for scope, bucket in (('cpc::objective', None), ('cpc::encoder', None)):
        if scope in names:
            i = names.index(scope)
            top = names[i - 1] if i > 0 else ''  # the op directly under the scope
            if scope == 'cpc::encoder':
                return 1 if 'conv' in top else 2
            return 4 if top in ('aten::matmul', 'aten::mm') or 'cross_entropy' in top else 5
    return 7


def summarize(prof, dev: torch.device) -> Dict:
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU and not e.name.startswith('ProfilerStep')]
    cuda = dev.type == 'cuda'

    def chain(e):
        out = []
        while e is not None:
            out.append(e)
            e = e.cpu_parent
        return out

    seq_bucket: Dict = {}
    info = []
    for e in events:
        c = chain(e)
        bwd_node = next((x for x in c if x.name.startswith(_BWD)), None)
        info.append((e, c, bwd_node))
        if bwd_node is None and e.sequence_nr >= 0:
            seq_bucket.setdefault(e.sequence_nr, _forward_bucket(c))
    fwd = [0.0] * len(BUCKETS)
    bwd = [0.0] * len(BUCKETS)
    for e, c, bwd_node in info:
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3  # ms
        if t <= 0:
            continue
        if bwd_node is not None:
            bwd[seq_bucket.get(bwd_node.sequence_nr, 7)] += t
        elif 'cpc::backward' in [x.name for x in c]:
            bwd[7] += t  # engine bookkeeping outside any node, grad accumulation
        else:
            fwd[_forward_bucket(c)] += t
    total = sum(fwd) + sum(bwd)
    rows = [dict(bucket=name, forward_ms=f, backward_ms=b, total_ms=f + b, share=(f + b) / total if total else 0.0)
            for name, f, b in zip(BUCKETS, fwd, bwd)]
    top = prof.key_averages().table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=15)
    return dict(time_kind='CUDA kernel self time' if cuda else 'CPU self time', total_ms=total, buckets=rows,
                top_ops=top)
