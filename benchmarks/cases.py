"""Building one benchmark case: a registered encoder + its preset's objective and augmentation, synthetic images,
and the training step / inference call exactly as cpc_models/train.py runs them (patchify -> PatchAugment ->
normalize -> encoder.forward_patches -> CPCObjective -> backward -> grad clip -> AdamW)."""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import cpc_models  # noqa: F401  (registers the architectures with timm)
from cpc_models.augment import PatchAugment, PatchAugmentConfig
from cpc_models.encoder import CPCResNetV2
from cpc_models.objective import CPCObjective
from cpc_models.patches import patchify
from cpc_models.train import PRESETS, CPCModel

VARIANTS = ('cpcv2_resnet161', 'cpcv2_resnet50', 'cpcv1_resnet101', 'cpcv2_resnet_small', 'cpcv2_resnet_tiny')
# Objective and augmentation of each variant: its cpc-train preset (R-101 has none: the ImageNet R-50 recipe).
PRESET_OF = {'cpcv2_resnet161': 'imagenet_r161', 'cpcv2_resnet50': 'imagenet_r50', 'cpcv1_resnet101': 'imagenet_r50',
             'cpcv2_resnet_small': 'stl10_small', 'cpcv2_resnet_tiny': 'fmnist_tiny'}
FLAGS = ('cl', 'ckpt', 'bf16', 'compile')  # channels_last, gradient checkpointing, bf16 autocast, torch.compile


def parse_mode(mode: str) -> frozenset:
    flags = frozenset() if mode == 'base' else frozenset(mode.split('+'))
    bad = flags - set(FLAGS)
    if bad:
        raise ValueError(f'Unknown mode flags {sorted(bad)} in {mode!r}; use "base" or a "+"-joined subset of {FLAGS}.')
    return flags


def native_geometry(variant: str) -> Dict:
    cfg = timm.models.get_pretrained_cfg(variant).to_dict()
    with torch.device('meta'):
        m = timm.create_model(variant, num_classes=0)
    img = cfg['input_size'][-1]
    rows, cols = m.grid_size(img)
    return dict(in_chans=cfg['input_size'][0], img_size=img, rows=rows, cols=cols, patch=m.patch_size,
                stride=m.patch_stride, mean=cfg['mean'], std=cfg['std'])


def geometry(variant: str, grid: Optional[int] = None) -> Dict:
    """Native geometry, or a reduced square grid of the same patches (image side = P + (grid - 1) * S)."""
    g = native_geometry(variant)
    g['reduced'] = False
    if grid and grid < min(g['rows'], g['cols']):
        g.update(rows=grid, cols=grid, img_size=g['patch'] + (grid - 1) * g['stride'], reduced=True)
    return g


def objective_kwargs(variant: str, rows: int, cols: int) -> Dict:
    """The preset's objective; offsets that do not fit a (reduced) grid are dropped (or replaced by the largest)."""
    kw = dict(PRESETS[PRESET_OF[variant]].get('objective', {}))
    offsets = kw.get('offsets', (3,))
    offsets = [offsets] if isinstance(offsets, int) else list(offsets)
    fit = [k for k in offsets if k < min(rows, cols)]
    kw['offsets'] = tuple(fit or [min(rows, cols) - 1])
    return kw


def augment_kwargs(variant: str) -> Dict:
    return dict(PRESETS[PRESET_OF[variant]].get('augment', {}))


@dataclass
class Setup:
    variant: str
    device: torch.device
    batch: int
    geo: Dict
    encoder: CPCResNetV2
    objective: CPCObjective
    model: CPCModel
    augment: PatchAugment
    images: torch.Tensor  # uint8 (B, C, H, W), synthetic
    mean: torch.Tensor
    std: torch.Tensor
    gen: torch.Generator
    extra: Dict = field(default_factory=dict)

    @property
    def patches_per_image(self) -> int:
        return self.geo['rows'] * self.geo['cols']


def build_setup(variant: str, device: torch.device, batch: int, grid: Optional[int] = None, seed: int = 0) -> Setup:
    geo = geometry(variant, grid)
    torch.manual_seed(seed)
    encoder = timm.create_model(variant, num_classes=0)
    objective = CPCObjective(encoder.num_features, **objective_kwargs(variant, geo['rows'], geo['cols']))
    model = CPCModel(encoder, objective).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (batch, geo['in_chans'], geo['img_size'], geo['img_size']), generator=g,
                           device=device, dtype=torch.uint8)
    return Setup(variant, device, batch, geo, encoder, objective, model,
                 PatchAugment(PatchAugmentConfig(**augment_kwargs(variant))), images,
                 torch.tensor(geo['mean'], device=device).view(1, -1, 1, 1),
                 torch.tensor(geo['std'], device=device).view(1, -1, 1, 1), g)


def apply_mode(s: Setup, flags: frozenset) -> None:
    """Switch gradient checkpointing, memory format and compilation of the trunk (as train.py does) in place."""
    s.encoder.set_grad_checkpointing('ckpt' in flags)
    s.model.to(memory_format=torch.channels_last if 'cl' in flags else torch.contiguous_format)
    s.encoder.__dict__.pop('forward_trunk', None)
    s.encoder.__dict__.pop('forward_patches', None)
    if 'compile' in flags:
        torch._dynamo.reset()
        s.encoder.forward_trunk = torch.compile(CPCResNetV2.forward_trunk.__get__(s.encoder))


def _autocast(s: Setup, flags: frozenset):
    if 'bf16' in flags and s.device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(s: Setup) -> torch.optim.Optimizer:
    decay = [p for p in s.model.parameters() if p.ndim > 1]
    no_decay = [p for p in s.model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([dict(params=decay, weight_decay=1e-4), dict(params=no_decay, weight_decay=0.0)],
                             lr=1e-5, fused=s.device.type == 'cuda')


def make_train_step(s: Setup, flags: frozenset) -> Tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    """One training step as in train.py (synthetic uint8 images already on the device: no data loading)."""
    optimizer = make_optimizer(s)
    cl = 'cl' in flags
    p_size, stride = s.encoder.patch_size, s.encoder.patch_stride
    s.model.train()

    def step():
        x = s.images.float().div_(255)
        b = x.shape[0]
        p = patchify(x, p_size, stride)
        flat = s.augment(p.reshape(-1, *p.shape[3:]), s.gen)
        flat = (flat - s.mean) / s.std
        if cl:
            flat = flat.contiguous(memory_format=torch.channels_last)
        with _autocast(s, flags):
            out = s.model(flat.view(b, *p.shape[1:3], *flat.shape[1:]))
        loss = out.loss
        if not torch.isfinite(loss):  # train.py checks every step (a host sync on CUDA)
            raise FloatingPointError(f'non-finite loss {loss.item()}')
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
        optimizer.step()
        return loss
    return step, optimizer


def make_inference(s: Setup, flags: frozenset) -> Callable[[], torch.Tensor]:
    """Patch-grid inference: normalized images (B, C, H, W) -> latent grid (B, F, R, W) via forward_features."""
    x = (s.images.float() / 255 - s.mean) / s.std
    if 'cl' in flags:
        x = x.contiguous(memory_format=torch.channels_last)
    s.model.eval()

    def infer():
        with torch.inference_mode(), _autocast(s, flags):
            return s.encoder.forward_features(x)
    return infer


def loop_forward_patches(encoder: CPCResNetV2) -> Callable[[torch.Tensor], torch.Tensor]:
    """Naive baseline: one trunk call per patch (a Python loop) instead of one batched call."""
    def forward_patches(patches: torch.Tensor) -> torch.Tensor:
        b, rows, cols = patches.shape[:3]
        flat = patches.reshape(b * rows * cols, *patches.shape[3:])
        z = torch.stack([encoder.forward_trunk(p.unsqueeze(0)).mean((2, 3))[0] for p in flat])
        return z.reshape(b, rows, cols, -1).permute(0, 3, 1, 2)
    return forward_patches


def count_flops(variant: str, shapes: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], Dict]:
    """FLOPs (torch.utils.flop_counter: convolutions and matrix products, 2 per multiply-add) of the encoder's
    patch-grid forward and of a training step's forward + backward (encoder + objective; no recomputation,
    no augmentation), for each (batch, grid or 0 = native). Runs on fake tensors: no memory, no compute."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    out = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        encoder = timm.create_model(variant, num_classes=0)
        for batch, grid in shapes:
            g = geometry(variant, grid or None)
            objective = CPCObjective(encoder.num_features, **objective_kwargs(variant, g['rows'], g['cols']))
            x = torch.randn(batch, g['rows'], g['cols'], g['in_chans'], g['patch'], g['patch'])
            with FlopCounterMode(display=False) as fc:
                encoder.forward_patches(x)
            fwd = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                objective(encoder.forward_patches(x)).loss.backward()
            train = fc.get_total_flops()
            encoder.zero_grad(set_to_none=True)
            out[(batch, grid)] = dict(batch=batch, rows=g['rows'], cols=g['cols'], img_size=g['img_size'],
                                      fwd_flops=fwd, train_flops=train,
                                      fwd_flops_per_image=fwd / batch, train_flops_per_image=train / batch)
    return out
