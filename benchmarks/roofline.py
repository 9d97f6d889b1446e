"""Roofline of one cpc-train step, counted on the CPU with fake tensors: kernel-like ops, FLOPs and minimum HBM bytes
per op class, and the step time and MFU they allow on an H100 SXM and an H200 (datasheet peaks).

    PYTHONPATH=. python -m benchmarks.roofline --model cpcv2_resnet161 --batch 32      # -> benchmarks/results/roofline.*

What runs: ``cpc_models.train.train_step`` itself (patchify -> PatchAugment -> normalize -> forward_patches ->
CPCObjective -> backward -> clip -> fused AdamW) with the variant's cpc-train preset, bf16 autocast and channels_last,
on ``FakeTensorMode`` tensors (shapes and dtypes, no memory, no arithmetic), with and without gradient checkpointing.
A ``TorchDispatchMode`` sees every aten op that reaches the kernels. How the CUDA step is modelled on a CPU:

* autocast is the CPU's (bf16 convolutions and matrix products, as CUDA's);
* ``PatchAugment`` runs its device way (``masked=True``, no host syncs), AdamW is ``fused=True``;
* the encoder's norm-act layers take the path they take on CUDA: ``cpc_models.fused_norm`` when Triton is there
  (``--norm fused``, the default), or the eager ``F.layer_norm`` path (``--norm eager``).

Counting rules (one op = one dispatched aten op):

* kernel-like op: any op that is not a view (an op whose schema returns an alias of its input without writing:
  view, permute, expand, ...) and not an allocation without a fill (``empty*``);
* bytes: every kernel-like op reads each tensor argument once and writes each output once, with an expanded
  (stride-0) argument counted at its distinct elements: the minimum HBM traffic if nothing stays in cache between ops;
* FLOPs: ``torch.utils.flop_counter``'s formulas (convolutions and matrix products, 2 per multiply-add): the model
  FLOPs of MFU; everything else counts as 0 FLOPs;
* op class: ``augmentation`` (everything before the model's forward), ``optimizer`` (clip + AdamW), else by name:
  conv, matmul, norm, activation, residual add (an add of two tensors of the same size), cast (dtype copies), other.

Bound on the step time: the sum over ops of max(FLOPs / peak FLOP/s, bytes / peak bandwidth), i.e. each op at the
roofline of its own class, no overlap between ops, no launch cost. MFU bound = model FLOPs (the step without
checkpointing's recomputation) / bound / peak. The ``fused`` rows count the kernels the CUDA step runs today
(norm + ReLU, and each residual add with the norm-act that reads its sum, in ``cpc_models.fused_norm``); the
``eager`` rows the ``F.layer_norm`` path (``CPC_FUSED_NORM=0``, and every revision before it).
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from cpc_models.atomic import write_text

RESULTS = Path(__file__).resolve().parent / 'results'

# Datasheet peaks, dense (the datasheets give bf16 Tensor Core throughput "with sparsity"; dense is half).
PEAKS = {
    'H100 SXM': dict(bf16_tflops=989.4, hbm_tbps=3.35,
                     source='https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: BF16 Tensor Core 1,979 '
                            'TFLOPS with sparsity = 989.4 dense; GPU memory bandwidth 3.35 TB/s)'),
    'H200': dict(bf16_tflops=989.4, hbm_tbps=4.8,
                 source='https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: BF16 Tensor Core 1,979 TFLOPS '
                        'with sparsity = 989.4 dense; GPU memory bandwidth 4.8 TB/s)'),
}
CLASSES = ('conv', 'matmul', 'norm', 'activation', 'residual add', 'cast', 'augmentation', 'optimizer', 'other')
_CONV = {'convolution', 'convolution_backward', '_convolution', 'cudnn_convolution'}
_MATMUL = {'mm', 'addmm', 'bmm', 'baddbmm', '_scaled_mm'}
_NORM = {'native_layer_norm', 'native_layer_norm_backward', 'native_group_norm', 'native_group_norm_backward',
         'layer_norm_act', 'layer_norm_act_backward', 'add_layer_norm_act'}
_ACT = {'relu', 'relu_', 'threshold_backward', 'gelu', 'gelu_backward', 'silu', 'silu_backward'}
_ALLOC = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided'}


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _distinct_bytes(t: torch.Tensor) -> int:
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class OpRecorder(TorchDispatchMode):
    """Every aten op under it: name, class, kernel-like or not, bytes read + written, FLOPs."""

    def __init__(self):
        super().__init__()
        self.phase = 'augmentation'
        self.ops: List[Dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace, name = func._schema.name.split('::')
        outs = _tensors(out)
        kernel = (namespace != 'prim' and (outs or func._schema.is_mutable) and not _is_view(func)
                  and name not in _ALLOC and name not in ('detach', 'lift_fresh', 'alias'))
        rec = dict(op=name, phase=self.phase, kernel=kernel, bytes=0, flops=0)
        if kernel:
            ins = _tensors((args, kwargs))
            rec['bytes'] = sum(_distinct_bytes(t) for t in ins) + sum(_distinct_bytes(t) for t in outs)
            packet = func._overloadpacket
            if packet in flop_registry:
                rec['flops'] = int(flop_registry[packet](*args, **kwargs, out_val=out))
            rec['cls'] = _classify(name, self.phase, ins)
        self.ops.append(rec)
        return out


def _classify(name: str, phase: str, ins: List[torch.Tensor]) -> str:
    if phase in ('augmentation', 'optimizer'):
        return phase
    if name in _CONV:
        return 'conv'
    if name in _MATMUL:
        return 'matmul'
    if name in _NORM:
        return 'norm'
    if name in _ACT:
        return 'activation'
    if name in ('add', 'add_') and len(ins) == 2 and ins[0].numel() == ins[1].numel() and ins[0].numel() > 1:
        return 'residual add'
    if name in ('_to_copy', 'copy_') and len(ins) >= 1 and (len(ins) == 1 or ins[0].dtype != ins[-1].dtype):
        return 'cast'
    return 'other'


@contextlib.contextmanager
def _norm_path(norm: str):
    try:
        from cpc_models import fused_norm
    except ImportError:  # a revision before the fused norm (the baseline of a comparison): its only path is eager
        yield 'eager'
        return
    with fused_norm.forced(norm == 'fused'):
        yield norm


def _fake_model(cfg):
    """train.build_model's CPCModel (encoder + objective, checkpointing switch, channels_last weights), built under
    the active FakeTensorMode: ``Module.to`` cannot swap fake parameters in place, so the 4-D weights are replaced."""
    import timm

    from cpc_models.objective import CPCObjective
    from cpc_models.train import CPCModel
    encoder = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.model_args)
    encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    model = CPCModel(encoder, CPCObjective(encoder.num_features, **dataclasses.asdict(cfg.objective)))
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None and p.ndim == 4:
                m._parameters[k] = torch.nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last))
    return model


def count_step(model_name: str, batch: int, checkpointing: bool, norm: str = 'fused',
               grid: Optional[int] = None) -> Dict:
    """Count one training step of ``model_name`` (its preset, bf16, channels_last) on fake tensors."""
    from cpc_models import config as C
    from cpc_models.train import build_optimizer, build_step_setup, lr_at, train_step

    from .cases import geometry, train_config
    geo = geometry(model_name, grid)
    cfg = train_config(model_name, geo['rows'], geo['cols'], frozenset({'cl', 'bf16'} | ({'ckpt'} if checkpointing
                                                                                              else set())))
    cfg = C.apply(cfg, dict(bf16_cpu=True, channels_last=True))
    device = torch.device('cpu')
    rec = OpRecorder()
    import timm
    with torch.device('meta'):
        meta_encoder = timm.create_model(cfg.model, num_classes=0, **cfg.model_args)
    setup = build_step_setup(cfg, meta_encoder, device)
    setup.augment.masked = True  # the device way (no host syncs), as on CUDA; its tables are real constants
    with FakeTensorMode(allow_non_fake_inputs=True), _norm_path(norm) as norm:
        torch.manual_seed(0)
        model = _fake_model(cfg)
        optimizer = build_optimizer(cfg, model)
        for g in optimizer.param_groups:
            g['fused'] = True  # the CUDA optimizer (build_optimizer picks fused on CUDA)
        optimizer.defaults['fused'] = True
        images = torch.randint(0, 256, (batch, geo['in_chans'], geo['img_size'], geo['img_size']), dtype=torch.uint8)

        def to_phase(name):
            def hook(*_):
                rec.phase = name
            return hook
        hooks = [model.register_forward_pre_hook(to_phase('forward')),
                 model.register_forward_hook(to_phase('backward'))]
        optimizer.register_step_pre_hook(to_phase('optimizer'))
        _clip = torch.nn.utils.clip_grad_norm_

        def clip(*a, **k):
            rec.phase = 'optimizer'
            return _clip(*a, **dict(k, foreach=True))  # the CUDA default (multi-tensor kernels)
        torch.nn.utils.clip_grad_norm_ = clip
        try:
            train_step(model, images, optimizer, setup, lr_at(0, cfg, 1))  # first step: the optimizer's state
            rec.phase = 'augmentation'
            saved = [0]

            def pack(t):  # what autograd keeps for backward: the activations at the step's peak
                if not isinstance(t, torch.nn.Parameter):
                    saved[0] += t.numel() * t.element_size()
                return t
            with rec, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                train_step(model, images, optimizer, setup, lr_at(1, cfg, 2))
        finally:
            torch.nn.utils.clip_grad_norm_ = _clip
            for h in hooks:
                h.remove()
    n_params = sum(p.numel() for p in model.parameters())
    return summarize(rec.ops, dict(model=model_name, batch=batch, checkpointing=checkpointing, norm=norm,
                                   rows=geo['rows'], cols=geo['cols'], patches=batch * geo['rows'] * geo['cols'],
                                   saved_activation_bytes=saved[0], resident_bytes=16 * n_params))


def summarize(ops: List[Dict], meta: Dict, model_flops: Optional[int] = None) -> Dict:
    kernels = [o for o in ops if o['kernel']]
    by_class = {c: dict(ops=0, flops=0, bytes=0) for c in CLASSES}
    for o in kernels:
        d = by_class[o['cls']]
        d['ops'] += 1
        d['flops'] += o['flops']
        d['bytes'] += o['bytes']
    names = collections.Counter(o['op'] for o in kernels)
    return dict(meta, kernel_ops=len(kernels), view_ops=len(ops) - len(kernels),
                flops=sum(o['flops'] for o in kernels), bytes=sum(o['bytes'] for o in kernels),
                by_class=by_class, top_ops=names.most_common(15), bounds=summarize_bounds(kernels, model_flops),
                _ops=kernels)


def summarize_bounds(kernels: List[Dict], model_flops: Optional[int] = None) -> Dict:
    """Per GPU: the step-time bound (each op at its roofline, one after the other) and the MFU it allows."""
    bounds = {}
    model_flops = model_flops or sum(o['flops'] for o in kernels)
    for gpu, pk in PEAKS.items():
        flop_s, byte_s = pk['bf16_tflops'] * 1e12, pk['hbm_tbps'] * 1e12
        t = sum(max(o['flops'] / flop_s, o['bytes'] / byte_s) for o in kernels)
        bounds[gpu] = dict(step_ms=t * 1e3, mfu=model_flops / t / flop_s, model_flops=model_flops,
                           compute_ms=sum(o['flops'] for o in kernels) / flop_s * 1e3,
                           memory_ms=sum(o['bytes'] for o in kernels) / byte_s * 1e3)
    return bounds


def markdown(doc: Dict) -> str:
    g = doc['counts'][0]
    lines = [f"Roofline of one `{doc['model']}` training step, batch {doc['batch']} ({g['rows']}x{g['cols']} "
             f"patches per image, {g['patches']} patches), bf16 autocast + channels_last, "
             f"counted on fake tensors (`{doc['command']}`, {doc['seconds']:.0f} s on {doc['machine']}; "
             'bytes: every op reads its inputs and writes its outputs once):', '']
    lines += ['| norm path | checkpointing | kernel-like ops | GFLOP | min HBM GB | saved activations + resident '
              'state GB | ' + ' | '.join(f'{c} ops / GB' for c in CLASSES) + ' |',
              '|---|---|---:|---:|---:|---:|' + '---|' * len(CLASSES)]
    for r in doc['counts']:
        cells = ' | '.join(f"{r['by_class'][c]['ops']} / {r['by_class'][c]['bytes'] / 1e9:.1f}" for c in CLASSES)
        mem = (f"{r['saved_activation_bytes'] / 1e9:.1f} + {r['resident_bytes'] / 1e9:.1f}"
               if 'saved_activation_bytes' in r else '')
        lines.append(f"| {r['norm']} | {'on' if r['checkpointing'] else 'off'} | {r['kernel_ops']} | "
                     f"{r['flops'] / 1e9:.0f} | {r['bytes'] / 1e9:.1f} | {mem} | {cells} |")
    lines += ['', 'Saved activations: the bytes of the tensors autograd keeps for backward during the step (a tensor '
              'saved by two ops counts twice: an upper estimate of the activation memory; with checkpointing the sum '
              'includes the recomputed stacks, more than the peak); resident state: fp32 '
              'weights, gradients and AdamW\'s two moments (16 bytes per parameter).']
    lines += ['', 'Bounds (sum over ops of max(FLOPs / peak, bytes / bandwidth); datasheet dense bf16 peaks, '
              'no launch cost, no overlap between ops):', '',
              '| GPU | norm path | checkpointing | all FLOPs at peak ms | all bytes at bandwidth ms | bound ms | '
              'img/s bound | MFU bound |',
              '|---|---|---|---:|---:|---:|---:|---:|']
    for gpu in PEAKS:
        for r in doc['counts']:
            b = r['bounds'][gpu]
            lines.append(f"| {gpu} | {r['norm']} | {'on' if r['checkpointing'] else 'off'} | {b['compute_ms']:.1f} | "
                         f"{b['memory_ms']:.1f} | {b['step_ms']:.1f} | {r['batch'] / b['step_ms'] * 1e3:.0f} | "
                         f"**{b['mfu']:.1%}** |")
    if doc.get('against'):
        lines += ['', f"Against `{doc['against']['rev']}` (the same counter run on that revision, whose norm is the "
                  'eager path; targets of issue 26: ops <= 45%, bytes <= 60% of the baseline):', '',
                  '| checkpointing | baseline ops | ours ops (fused) | ops: ours / baseline | baseline GB | ours GB | '
                  'bytes: ours / baseline |', '|---|---:|---:|---:|---:|---:|---:|']
        for b in doc['against']['counts']:
            ours = [r for r in doc['counts'] if r['norm'] == 'fused' and r['checkpointing'] == b['checkpointing']]
            if not ours:
                continue
            o = ours[0]
            lines.append(f"| {'on' if b['checkpointing'] else 'off'} | {b['kernel_ops']} | {o['kernel_ops']} | "
                         f"**{o['kernel_ops'] / b['kernel_ops']:.0%}** | {b['bytes'] / 1e9:.1f} | "
                         f"{o['bytes'] / 1e9:.1f} | **{o['bytes'] / b['bytes']:.0%}** |")
    lines += ['', 'Peaks: ' + '; '.join(f"{g}: {p['bf16_tflops']} TFLOP/s dense bf16, {p['hbm_tbps']} TB/s "
                                        f"({p['source']})" for g, p in PEAKS.items()), '']
    for r in doc['counts']:
        lines.append(f"Most frequent ops ({r['norm']}, checkpointing {'on' if r['checkpointing'] else 'off'}): "
                     + ', '.join(f'{n} {c}' for n, c in r['top_ops']) + '.')
    return '\n'.join(lines) + '\n'


def count_revision(rev: str, model: str, batch: int, grid: int, checkpointing: str) -> List[Dict]:
    """This counter run on revision ``rev`` (a temporary ``git worktree``; this file copied in): its rows."""
    import shutil
    import subprocess
    import tempfile
    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix='roofline-'))
    tree = tmp / 'tree'
    try:
        subprocess.run(['git', 'worktree', 'add', '--detach', str(tree), rev], cwd=root, check=True,
                       capture_output=True, text=True)
        shutil.copy(__file__, tree / 'benchmarks' / 'roofline.py')
        subprocess.run([sys.executable, '-m', 'benchmarks.roofline', '--model', model, '--batch', str(batch),
                        '--grid', str(grid), '--norm', 'eager', '--checkpointing', checkpointing, '--out', str(tmp),
                        '--name', 'base'], cwd=tree, env=dict(__import__('os').environ, PYTHONPATH=str(tree)),
                       check=True, capture_output=True, text=True)
        return json.loads((tmp / 'base.json').read_text())['counts']
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=root, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='cpcv2_resnet161')
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--grid', type=int, default=0, help='reduced square patch grid (0: the native one)')
    p.add_argument('--norm', default='fused,eager', help='norm paths to count: fused, eager or both (fused,eager)')
    p.add_argument('--checkpointing', default='off,on', help='off, on or both (off,on)')
    p.add_argument('--out', default=str(RESULTS), help='folder for roofline.json and roofline.md')
    p.add_argument('--name', default='roofline')
    p.add_argument('--against', default='', help='also count a base revision (its only path: eager) with this '
                   'counter, in a temporary git worktree, and compare (e.g. 062290c)')
    a = p.parse_args(argv)
    norms = a.norm.split(',')
    ckpts = a.checkpointing.split(',')
    if a.batch < 1:
        print(f'roofline: error: --batch must be a positive integer, got {a.batch}', file=sys.stderr)
        return 2
    if not set(norms) <= {'fused', 'eager'} or not set(ckpts) <= {'on', 'off'}:
        print('roofline: error: --norm takes fused and/or eager, --checkpointing off and/or on (comma-separated)',
              file=sys.stderr)
        return 2
    import timm
    if a.model not in timm.list_models('cpcv*'):
        print(f"roofline: error: --model {a.model!r} is not a cpc_models encoder; use one of "
              f"{', '.join(timm.list_models('cpcv*'))}", file=sys.stderr)
        return 2
    import cpc_models  # noqa: F401
    from cpc_models.runtime import cpu_model
    t0 = time.time()
    rows = [count_step(a.model, a.batch, c == 'on', n, a.grid or None) for n in norms for c in ckpts]
    for r in rows:  # MFU counts model FLOPs: checkpointing's recomputation is not useful work
        if r['checkpointing']:
            plain = [q for q in rows if q['norm'] == r['norm'] and not q['checkpointing']]
            flops = plain[0]['flops'] if plain else count_step(a.model, a.batch, False, r['norm'],
                                                               a.grid or None)['flops']
            r['bounds'] = summarize_bounds(r['_ops'], flops)
        r.pop('_ops')
    argv_txt = ' '.join(argv if argv is not None else sys.argv[1:])
    doc = dict(command=f'python -m benchmarks.roofline {argv_txt}'.strip(), model=a.model, batch=a.batch,
               counts=rows, peaks=PEAKS, seconds=time.time() - t0, machine=cpu_model(), torch=torch.__version__)
    if a.against:
        doc['against'] = dict(rev=a.against, counts=count_revision(a.against, a.model, a.batch, a.grid,
                                                                   a.checkpointing))
        doc['seconds'] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(doc)
    write_text(out / f'{a.name}.json', json.dumps(doc, indent=1) + '\n')
    write_text(out / f'{a.name}.md', md)
    print(md)
    return 0


if __name__ == '__main__':
    sys.exit(main())
