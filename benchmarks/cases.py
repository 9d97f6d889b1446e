"""Building one benchmark case: a registered encoder with its cpc-train preset (objective, augmentation, optimizer)
on synthetic images, and the training step and inference call of cpc_models.train: the benchmarks time
``train_step`` / ``build_optimizer`` themselves (patchify -> PatchAugment -> normalize -> encoder.forward_patches ->
CPCObjective -> backward -> grad clip -> AdamW), never a copy."""
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import cpc_models  # noqa: F401  (registers the architectures with timm)
from cpc_models import config as C
from cpc_models.objective import CPCObjective
from cpc_models.patches import patchify
from cpc_models.train import (
    CPCModel,
    TrainConfig,
    build_model,
    build_optimizer,
    build_step_setup,
    compile_model,
    lr_at,
    preset_config,
    train_step,
)

VARIANTS = ('cpcv2_resnet161', 'cpcv2_resnet50', 'cpcv1_resnet101', 'cpcv2_resnet_small', 'cpcv2_resnet_tiny')
# Objective, augmentation and optimizer of each variant: its cpc-train preset (R-101 has none: the ImageNet R-50 one).
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


def train_config(variant: str, rows: int, cols: int, flags: frozenset = frozenset()) -> TrainConfig:
    """The variant's preset as a TrainConfig, with the mode's runtime switches; objective offsets that do not fit a
    (reduced) grid are dropped (or replaced by the largest that fits)."""
    cfg = preset_config(PRESET_OF[variant])
    fit = [k for k in cfg.objective.offsets if k < min(rows, cols)]
    return C.apply(cfg, dict(model=variant, objective=dict(offsets=fit or [min(rows, cols) - 1]),
                             channels_last='cl' in flags, grad_checkpointing='ckpt' in flags,
                             bf16='bf16' in flags, compile='compile' in flags))


@dataclass
class Setup:
    variant: str
    device: torch.device
    batch: int
    geo: Dict
    cfg: TrainConfig  # the preset, with the runtime switches of the last apply_mode
    model: CPCModel
    images: torch.Tensor  # uint8 (B, C, H, W), synthetic
    compiled: bool = False

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def patches_per_image(self) -> int:
        return self.geo['rows'] * self.geo['cols']


def build_setup(variant: str, device: torch.device, batch: int, grid: Optional[int] = None, seed: int = 0) -> Setup:
    geo = geometry(variant, grid)
    cfg = train_config(variant, geo['rows'], geo['cols'])
    torch.manual_seed(seed)
    model = build_model(cfg, device)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (batch, geo['in_chans'], geo['img_size'], geo['img_size']), generator=g,
                           device=device, dtype=torch.uint8)
    return Setup(variant, device, batch, geo, cfg, model, images)


def apply_mode(s: Setup, flags: frozenset) -> None:
    """Switch gradient checkpointing and memory format (reversible) and compile the trunk and the objective
    (one-way: compiled rows run last on a setup) as cpc-train does for the same config values."""
    s.cfg = train_config(s.variant, s.geo['rows'], s.geo['cols'], flags)
    s.encoder.set_grad_checkpointing(s.cfg.grad_checkpointing)
    s.model.to(memory_format=torch.channels_last if s.cfg.channels_last else torch.contiguous_format)
    if s.cfg.compile and not s.compiled:
        torch._dynamo.reset()
        compile_model(s.model)
        s.compiled = True


def _autocast(s: Setup):
    if s.cfg.bf16 and s.device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_train_step(s: Setup, model: Optional[CPCModel] = None) -> Tuple[Callable[[], torch.Tensor],
                                                                         torch.optim.Optimizer]:
    """cpc-train's step (train_step with build_optimizer and the preset's config, lr of the first step) on the
    synthetic images already on the device: no data loading. ``model``: another CPCModel over the same parts."""
    model = model or s.model
    optimizer = build_optimizer(s.cfg, model)
    setup = build_step_setup(s.cfg, s.encoder, s.device)
    lr = lr_at(0, s.cfg, 1)
    model.train()

    def step():
        return train_step(model, s.images, optimizer, setup, lr)[0].loss
    return step, optimizer


def make_inference(s: Setup, encoder: Optional[nn.Module] = None) -> Callable[[], torch.Tensor]:
    """Patch-grid inference: normalized images (B, C, H, W) -> latent grid (B, F, R, W) via forward_features."""
    encoder = encoder or s.encoder
    setup = build_step_setup(s.cfg, s.encoder, s.device)
    x = (s.images.float() / 255 - setup.mean) / setup.std
    if s.cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s.model.eval()

    def infer():
        with torch.inference_mode(), _autocast(s):
            return encoder.forward_features(x)
    return infer


class PatchLoopEncoder(nn.Module):
    """Naive baseline: the same encoder, one trunk call per patch (a Python loop) instead of one batched call."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.patch_size, self.patch_stride = encoder.patch_size, encoder.patch_stride

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        b, rows, cols = patches.shape[:3]
        flat = patches.reshape(b * rows * cols, *patches.shape[3:])
        z = torch.stack([self.encoder.forward_trunk(p.unsqueeze(0)).mean((2, 3))[0] for p in flat])
        return z.reshape(b, rows, cols, -1).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_patches(patchify(x, self.patch_size, self.patch_stride))


def count_flops(variant: str, shapes: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], Dict]:
    """FLOPs (torch.utils.flop_counter: convolutions and matrix products, 2 per multiply-add) of the encoder's
    patch-grid forward and of a training step's forward + backward (encoder + objective; no recomputation,
    no augmentation), for each (batch, grid or 0 = native). Runs on fake tensors: no memory, no compute."""
    out = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        encoder = timm.create_model(variant, num_classes=0)
        for batch, grid in shapes:
            g = geometry(variant, grid or None)
            cfg = train_config(variant, g['rows'], g['cols'])
            objective = CPCObjective(encoder.num_features, **dataclasses.asdict(cfg.objective))
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
