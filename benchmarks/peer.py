"""Our encoder, objective and training step against a lightning-bolts-like CPC v2 built from the same blocks, in the
same process, alternating rounds (the matched configuration of docs/benchmarks.md).

    PYTHONPATH=. python -m benchmarks.peer            # writes benchmarks/results/peer_cpu.{json,md}

lightning-bolts' CPC v2 (``cpc_resnet50``, ``CPCTask``, Adam) is not installed here: its stand-in is our
``CPCResNetV2`` with bolts' widths and bolts' normalization, ``nn.LayerNorm`` over (C, H, W) with an elementwise
affine (:class:`BoltsLayerNormAct`), plain ``nn.Conv2d`` (:func:`plain_convs`) and the contiguous layout, with our
``CPCObjective`` on bolts' task (1 direction, row offsets 2..6, each scored once; bolts' ``CPCTask`` scores offset k
k - 1 times, 15 cross-entropies in all, so the real peer does more objective work than its stand-in) and bolts' Adam.
Ours is the same model as built by cpc-models: ``LayerNormAct2d``, the convolutions of 1x1 maps as the matrix
products they are, and this device's training layout (``runtime.channels_last_default``).

Parts, each timed for both sides in the same rounds (peer time / our time = our speed-up):

* ``norm``: every normalization of one encoder step (the input shapes the matched encoder gives its norms, each
  as often as it occurs), forward and backward timed apart: ours (LayerNormAct2d) vs ``nn.LayerNorm`` + ReLU on
  the same tensor and gradient; GroupNorm(1, C) (timm's ``GroupNorm1Act``, our norm before) beside them.
* ``encoder``: ``forward_patches`` + backward of the matched encoder on the same patches; with two ablations of
  ours beside it: without PatchConv2d (plain convolutions), and with LayerNormAct2d only (plain convolutions,
  contiguous layout), so the table shows where the speed-up comes from.
* ``step``: the full training step (encoder, objective, backward, Adam) on the same pre-normalized patches.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal

import timm
import torch
import torch.nn as nn
from timm.layers import GroupNorm1Act

from benchmarks.common import alternate, cpu_model, markdown_header, save_results, spread
from cpc_models import config as C
from cpc_models.encoder import LayerNormAct2d, PatchConv2d
from cpc_models.objective import CPCObjective
from cpc_models.runtime import channels_last_default
from cpc_models.train import CPCModel

SCHEMA = 'cpc-models-peer/1'
RESULTS = Path(__file__).resolve().parent / 'results'
PROG = 'python -m benchmarks.peer'
PARTS = ('norm', 'encoder', 'step')
TARGETS = {'norm_backward': 1.0, 'encoder': 1.3, 'step': 1.5}  # our speed-up to reach, per part

# bolts' cpc_resnet50 on CIFAR-size images: 32 px RGB, 8 px patches at stride 4 (a 7x7 grid), the ImageNet stem
# (7x7/2 conv + 3x3/2 max-pool), stacks [3, 4, 6, 3] of widths 64->256, 128->512, 512->4096, 512->2048.
MATCHED = dict(
    image_size=32, in_chans=3, patch_size=8, patch_stride=4,
    encoder=dict(layers=(3, 4, 6, 3), channels=(256, 512, 4096, 2048), bottle_widths=(64, 128, 512, 512),
                 stem_chs=64, stem_type=''),
    objective=dict(directions=1, offsets=(2, 3, 4, 5, 6), context_hidden=256, context_blocks=5, target_dim=64),
    adam=dict(lr=1e-4, betas=(0.8, 0.999), eps=1e-7, weight_decay=1e-5),
)


@dataclass
class PeerConfig:
    """One run of the matched comparison."""
    parts: List[Literal[PARTS]] = field(default_factory=lambda: list(PARTS))  # which of norm, encoder, step
    threads: List[int] = field(default_factory=lambda: [1, 2])  # torch threads; each count has its own rounds
    batch: int = 8  # images per step (bolts' CIFAR batch is larger; 8 keeps a round short on 2 cores)
    rounds: int = 5  # rounds per part and thread count; the order of the sides alternates
    reps: int = 2  # calls per side and round (their median is the round's time)
    out: str = str(RESULTS)  # folder for <name>.json and <name>.md
    name: str = 'peer_cpu'  # file stem


class BoltsLayerNormAct(nn.Module):
    """bolts' normalization: ``nn.LayerNorm`` over (C, H, W) with one affine weight per element, then ReLU. The
    (C, H, W) shape is fixed by the first input (bolts builds it from a sample batch)."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.norm = None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            self.norm = nn.LayerNorm(x.shape[1:], eps=self.eps).to(x.device)
        return self.act(self.norm(x))


def _bolts_norm_act(num_channels: int, eps: float = 1e-5, device=None, dtype=None) -> nn.Module:
    # device/dtype: the factory kwargs timm's blocks pass every norm layer; the LayerNorm is built on the first
    # input's device (bolts' shapes are only known then)
    return BoltsLayerNormAct(num_channels, eps)


def plain_convs(model: nn.Module) -> nn.Module:
    """Every PatchConv2d of ``model`` back to a plain nn.Conv2d (same parameters): the peer computes every tap."""
    for m in model.modules():
        if isinstance(m, PatchConv2d):
            m.__class__ = nn.Conv2d
    return model


ABLATIONS = {'ours_plain_convs': 'ours without PatchConv2d', 'ours_norm_only': 'ours with LayerNormAct2d only'}


def build_encoder(side: str, device: torch.device, seed: int = 0) -> nn.Module:
    """The matched encoder: 'ours' (as cpc-models builds it), 'peer' (bolts' norm, plain convs, contiguous), or an
    ablation of ours: 'ours_plain_convs' (plain convs), 'ours_norm_only' (plain convs, contiguous)."""
    torch.manual_seed(seed)
    kwargs = dict(num_classes=0, in_chans=MATCHED['in_chans'], patch_size=MATCHED['patch_size'],
                  patch_stride=MATCHED['patch_stride'], **MATCHED['encoder'])
    if side == 'peer':
        encoder = plain_convs(timm.create_model('cpcv2_resnet50', norm_layer=_bolts_norm_act, **kwargs)).to(device)
        with torch.no_grad():  # fixes the LayerNorm shapes, as bolts' sample batch does
            encoder.forward_patches(torch.zeros(1, 1, 1, MATCHED['in_chans'], MATCHED['patch_size'],
                                                MATCHED['patch_size'], device=device))
        return encoder
    encoder = timm.create_model('cpcv2_resnet50', **kwargs).to(device)
    if side != 'ours':
        plain_convs(encoder)
    return encoder.to(memory_format=torch.channels_last) if _channels_last(side, device) else encoder


def _channels_last(side: str, device: torch.device) -> bool:
    return side in ('ours', 'ours_plain_convs') and ours_channels_last(device)


def ours_channels_last(device: torch.device) -> bool:
    return channels_last_default(device, 'train')


def patches(batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Pre-normalized patches (B, 7, 7, 3, 8, 8) of 32 px images: bolts augments whole images in its loader."""
    g = torch.Generator(device=device).manual_seed(seed)
    p, s, n = MATCHED['patch_size'], MATCHED['patch_stride'], MATCHED['image_size']
    grid = (n - p) // s + 1
    return torch.randn(batch, grid, grid, MATCHED['in_chans'], p, p, generator=g, device=device)


def _layout(x: torch.Tensor, side: str, device: torch.device) -> torch.Tensor:
    """Patches in the side's layout: as train_step lays them out (ours), contiguous (peer)."""
    if _channels_last(side, device):
        flat = x.reshape(-1, *x.shape[3:]).contiguous(memory_format=torch.channels_last)
        return flat.view(*x.shape[:3], *flat.shape[1:])
    return x


def encoder_fn(side: str, batch: int, device: torch.device) -> Callable[[], None]:
    encoder = build_encoder(side, device).train()
    x = _layout(patches(batch, device), side, device)
    grad = torch.randn(encoder.forward_patches(x).shape, generator=torch.Generator(device=device).manual_seed(1),
                       device=device)

    def run():
        encoder.zero_grad(set_to_none=True)
        (encoder.forward_patches(x) * grad).sum().backward()
    return run


def step_fn(side: str, batch: int, device: torch.device) -> Callable[[], None]:
    encoder = build_encoder(side, device)
    model = CPCModel(encoder, CPCObjective(encoder.num_features, **MATCHED['objective'])).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), **MATCHED['adam'])
    x = _layout(patches(batch, device), side, device)

    def run():
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return run


def norm_inputs(batch: int, device: torch.device) -> List[torch.Size]:
    """The input shape of every norm call in one forward of the matched encoder, in order."""
    encoder = build_encoder('ours', device)
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape))
             for m in encoder.modules() if isinstance(m, LayerNormAct2d)]
    with torch.no_grad():
        encoder.forward_patches(patches(batch, device))
    for h in hooks:
        h.remove()
    return shapes


def norm_fns(batch: int, device: torch.device) -> Dict[str, Callable[[], None]]:
    """Forward and backward of every norm call of one encoder step, for ours, nn.LayerNorm and GroupNorm(1, C).
    Each side normalizes the same tensors with the same gradients; forward and backward are timed apart."""
    g = torch.Generator(device=device).manual_seed(0)
    cases = [(torch.randn(s, generator=g, device=device), torch.randn(s, generator=g, device=device))
             for s in norm_inputs(batch, device)]
    layers = {
        'ours': [LayerNormAct2d(x.shape[1]).to(device) for x, _ in cases],
        'peer': [nn.Sequential(nn.LayerNorm(x.shape[1:]), nn.ReLU(inplace=True)).to(device) for x, _ in cases],
        'groupnorm1': [GroupNorm1Act(x.shape[1]).to(device) for x, _ in cases],
    }
    fns = {}
    for side, mods in layers.items():
        outputs = []

        def forward(mods=mods, outputs=outputs):
            outputs.clear()
            outputs.extend(m(x.requires_grad_()) for m, (x, _) in zip(mods, cases))

        def backward(outputs=outputs):
            for y, (_, dy) in zip(outputs, cases):
                y.backward(dy)
        fns[side] = (forward, backward)
    return fns


def run_norm(cfg: PeerConfig, device: torch.device, log) -> Dict:
    """Rounds of forward + backward; the forward and the backward of each call are timed apart."""
    fns = norm_fns(cfg.batch, device)
    times = {f'{side}/{phase}': [] for side in fns for phase in ('forward', 'backward')}
    for r in range(cfg.rounds):
        load = os.getloadavg()[0]
        for side in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            forward, backward = fns[side]
            per = {'forward': [], 'backward': []}
            for _ in range(cfg.reps):
                for phase, fn in (('forward', forward), ('backward', backward)):
                    t, c = time.perf_counter(), time.process_time()
                    fn()
                    per[phase].append((time.perf_counter() - t, time.process_time() - c))
            for phase, vals in per.items():
                vals.sort()
                times[f'{side}/{phase}'].append(dict(wall_s=vals[len(vals) // 2][0], cpu_s=sorted(
                    v[1] for v in vals)[len(vals) // 2], load_before=load))
        log(f"  round {r + 1}/{cfg.rounds}: backward ours {times['ours/backward'][-1]['wall_s'] * 1e3:.1f} ms, "
            f"nn.LayerNorm {times['peer/backward'][-1]['wall_s'] * 1e3:.1f} ms, GroupNorm(1, C) "
            f"{times['groupnorm1/backward'][-1]['wall_s'] * 1e3:.1f} ms (load {load:.1f})")
    return times


def ratios(times: Dict[str, List[Dict]], peer: str, ours: str) -> Dict:
    rounds = list(zip(times[peer], times[ours]))
    return dict(ratio=spread([p['wall_s'] / o['wall_s'] for p, o in rounds]),
                cpu_ratio=spread([p['cpu_s'] / o['cpu_s'] for p, o in rounds]),
                peer_ms=spread([p['wall_s'] * 1e3 for p, _ in rounds]),
                ours_ms=spread([o['wall_s'] * 1e3 for _, o in rounds]),
                load=spread([p['load_before'] for p, _ in rounds]))


def run(cfg: PeerConfig, command: str) -> Dict:
    device = torch.device('cpu')
    t0 = time.monotonic()

    def log(msg):
        print(f'[{time.monotonic() - t0:6.0f}s] {msg}', flush=True)

    doc = dict(schema=SCHEMA, command=command, config=C.to_dict(cfg), matched=MATCHED,
               machine=dict(cpu=cpu_model(), logical_cores=os.cpu_count(), torch=torch.__version__,
                            load_average_at_start=list(os.getloadavg())),
               ours_channels_last=ours_channels_last(device), rows=[])
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        for part in cfg.parts:
            log(f'{part}, {threads} thread(s)')
            if part == 'norm':
                times = run_norm(cfg, device, log)
                compared = [('norm_backward', 'peer/backward', 'ours/backward', 'nn.LayerNorm + ReLU'),
                            ('norm_forward', 'peer/forward', 'ours/forward', 'nn.LayerNorm + ReLU'),
                            ('norm_backward_vs_groupnorm', 'groupnorm1/backward', 'ours/backward',
                             'GroupNorm(1, C) + ReLU')]
            else:
                make = encoder_fn if part == 'encoder' else step_fn
                sides = ['peer', 'ours'] + (list(ABLATIONS) if part == 'encoder' else [])
                fns = {side: make(side, cfg.batch, device) for side in sides}
                for fn in fns.values():
                    fn()  # warm-up (allocator, oneDNN primitives)
                times = alternate(fns, cfg.rounds, cfg.reps, device, log)
                compared = [(part, 'peer', 'ours', 'bolts-like')] + [
                    (f'{part}_{side}', 'peer', side, 'bolts-like') for side in sides[2:]]
            for name, peer, ours, against in compared:
                row = dict(part=name, threads=threads, against=against, **ratios(times, peer, ours))
                if name in TARGETS:
                    row.update(target=TARGETS[name], passed=row['ratio']['median'] >= TARGETS[name])
                doc['rows'].append(row)
                log(f"  {name}: {row['ratio']['median']:.2f}x ({row['ratio']['min']:.2f}-{row['ratio']['max']:.2f})")
            save_results(doc, Path(cfg.out), cfg.name, render_markdown, t0)
    return doc


PART_TEXT = {
    'norm_backward': 'layer-norm backward, every norm of one encoder step',
    'norm_forward': 'layer-norm forward, same tensors',
    'norm_backward_vs_groupnorm': 'layer-norm backward vs GroupNorm(1, C)',
    'encoder': 'encoder forward + backward',
    'encoder_ours_plain_convs': 'encoder forward + backward, ours without PatchConv2d',
    'encoder_ours_norm_only': 'encoder forward + backward, ours with LayerNormAct2d only (plain convs, NCHW)',
    'step': 'full training step (encoder, objective, Adam)',
}


def results_table(doc: Dict) -> List[str]:
    lines = ['| part | torch threads | rounds | peer ms | ours ms | speed-up: median (min-max; quartiles) | '
             'CPU-time ratio: median (min-max) | load | target |', '|---|---:|---:|---:|---:|---|---|---|---|']
    for r in doc['rows']:
        q, c = r['ratio'], r['cpu_ratio']
        target = f">= {r['target']:g}x: **{'PASS' if r['passed'] else 'MISS'}**" if 'target' in r else ''
        lines.append(f"| {PART_TEXT.get(r['part'], r['part'])} (vs {r['against']}) | {r['threads']} | {q['n']} | "
                     f"{r['peer_ms']['median']:,.1f} | {r['ours_ms']['median']:,.1f} | **{q['median']:.2f}x** "
                     f"({q['min']:.2f}-{q['max']:.2f}; {q['q1']:.2f}-{q['q3']:.2f}) | {c['median']:.2f}x "
                     f"({c['min']:.2f}-{c['max']:.2f}) | {r['load']['median']:.1f} | {target} |")
    return lines


def render_markdown(doc: Dict) -> str:
    cfg = doc['config']
    enc, obj = doc['matched']['encoder'], doc['matched']['objective']
    lines = markdown_header(doc, 'Matched configuration: ours vs a lightning-bolts-like CPC v2 (same process, '
                                 'alternating rounds)') + [
             f"Matched config: batch {cfg['batch']}, {doc['matched']['image_size']} px RGB, "
             f"{doc['matched']['patch_size']} px patches at stride {doc['matched']['patch_stride']} (7x7 grid); "
             f"encoder stacks {list(enc['layers'])}, widths {list(enc['bottle_widths'])} -> {list(enc['channels'])}, "
             f"7x7/2 stem + max-pool; objective: {obj['directions']} direction, offsets {list(obj['offsets'])}, "
             f"context {obj['context_blocks']} blocks x {obj['context_hidden']}; Adam "
             f"{doc['matched']['adam']}. Peer: bolts' nn.LayerNorm over (C, H, W), plain convolutions, contiguous "
             f"layout; ours: LayerNormAct2d, PatchConv2d, channels_last {doc['ours_channels_last']}.", '',
             'Speed-up = peer time / our time per round (median of the rounds; min-max and quartiles); CPU-time '
             'ratio: the same with process CPU time.', '']
    return '\n'.join(lines + results_table(doc)) + '\n'


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = C.parse_args(PeerConfig(), argv, prog=PROG, description=__doc__.splitlines()[0])
    run(cfg, f'{PROG} ' + ' '.join(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
