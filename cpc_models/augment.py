"""Batched per-patch augmentation for CPC v2 (Hénaff et al. 2020, Sec. 4.1, "Patch-based augmentation").

CPC v2 augments every patch on its own: colour dropping (+3%), then AutoAugment primitives, elastic
deformations and colour transforms (+4.5%), plus random horizontal flips; CPC v1 already jittered each patch
spatially. Here the whole batch of patches is augmented at once on tensors (CPU or CUDA), with independent
random parameters for every patch:

1. geometry: horizontal flip, integer jitter, AutoAugment Rotate/ShearX/ShearY/TranslateXRel/TranslateYRel are
   composed into one 2x3 affine matrix per patch; an elastic displacement field is added to the same sampling
   grid; one ``F.grid_sample`` call warps every patch that needs it;
2. AutoAugment colour primitives (timm names and magnitude mapping), ``num_ops`` slots per patch;
3. colour jitter (brightness, contrast, saturation, hue), torchvision ``ColorJitter`` ranges;
4. colour dropping, last so that exactly one channel stays informative.

See docs/augment.md for the choices where the paper is silent, and benchmarks/augment_throughput.py.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as TF
from timm.data.auto_augment import _HPARAMS_DEFAULT, _LEVEL_DENOM, LEVEL_TO_ARG, rand_augment_choices
from torch import nn

__all__ = ['COLOR_OPS', 'GEOMETRIC_OPS', 'SUPPORTED_OPS', 'PatchAugment', 'PatchAugmentConfig']

# timm.data.auto_augment op names this module implements on batched tensors.
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
_SIGNED = set(GEOMETRIC_OPS)  # timm draws a random sign for these (_randomly_negate)
_ENHANCE = ('Color', 'Contrast', 'Brightness', 'Sharpness')
# Colour ops with an argument that leaves a patch in [0, 1] exactly as it is (factor 1, a threshold above 1, an addend
# 0): on the masked path they take it where a patch is not drawn instead of a torch.where over the whole batch.
_MASK_BY_ARGUMENT = frozenset({'AutoContrast', 'Invert', 'Solarize', 'SolarizeIncreasing', 'SolarizeAdd'} | set(_ENHANCE)
                              | {n + 'Increasing' for n in _ENHANCE})
COLOR_OPS = (
    'AutoContrast', 'Equalize', 'Invert',
    'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal',
    'Solarize', 'SolarizeIncreasing', 'SolarizeAdd',
) + _ENHANCE + tuple(n + 'Increasing' for n in _ENHANCE)
SUPPORTED_OPS = GEOMETRIC_OPS + COLOR_OPS
# timm's RandAugment "inc1" list (rand-m9-mstd0.5-inc1 is its common ImageNet recipe).
_DEFAULT_AA_OPS = tuple(rand_augment_choices('rand', increasing=True))
_TABLE_SIZE = 1001  # magnitudes tabulated on [0, magnitude_max] for per-patch magnitudes
_PADDING_MODES = ('zeros', 'border', 'reflection')


@dataclass
class PatchAugmentConfig:
    """Per-patch augmentation settings (paper Sec. 4.1). All probabilities are per patch.

    JSON-serialisable with ``dataclasses.asdict``; rebuild with ``PatchAugmentConfig.from_dict``.
    """
    # colour dropping: keep one of the three channels at random
    color_drop: float = 1.0
    color_drop_mode: str = 'zero'  # 'zero': other two channels set to 0; 'replicate': kept channel copied to all 3
    # horizontal flip
    hflip: float = 0.5  # probability of a horizontal flip
    # spatial jitter: integer translation in [-jitter, jitter] px per axis, uniform, every patch
    jitter: int = 4
    # AutoAugment primitives, RandAugment style: num_ops slots per patch, each a uniformly drawn op from
    # `auto_augment_ops` applied with prob `auto_augment_prob`; magnitude on timm's 0.._LEVEL_DENOM scale
    auto_augment: bool = True  # AutoAugment primitives on
    auto_augment_ops: tuple[str, ...] = _DEFAULT_AA_OPS  # timm op names a slot draws from
    num_ops: int = 2  # AutoAugment slots per patch
    magnitude: float = 9.0  # op strength on timm's scale (0 .. magnitude_max)
    magnitude_std: float = 0.5  # per-patch magnitude ~ N(magnitude, std) clipped to [0, magnitude_max]; 0 = fixed
    magnitude_max: float = _LEVEL_DENOM  # full strength (timm's _LEVEL_DENOM)
    auto_augment_prob: float = 0.5  # probability that a slot applies its op
    # elastic deformation (torchvision ElasticTransform convention: displacement = alpha * blur(U(-1,1), sigma) / P)
    elastic: float = 0.5  # probability of an elastic deformation
    elastic_alpha: float = 50.0  # displacement scale alpha
    elastic_sigma: float = 5.0  # smoothing of the displacement field (Gaussian sigma, px)
    # colour jitter (torchvision ColorJitter ranges): (brightness, contrast, saturation, hue)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.8  # probability of colour jitter
    # warp resampling
    interpolation: str = 'bilinear'  # bilinear, nearest or bicubic
    padding_mode: str = 'reflection'  # zeros, border or reflection

    def __post_init__(self):
        self.auto_augment_ops = tuple(self.auto_augment_ops)
        self.color_jitter = tuple(float(v) for v in self.color_jitter)
        for name in ('color_drop', 'hflip', 'auto_augment_prob', 'elastic', 'color_jitter_prob'):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f'PatchAugmentConfig.{name} is a probability and must be in [0, 1], got {p!r}.')
        if self.color_drop_mode not in ('zero', 'replicate'):
            raise ValueError(f"color_drop_mode must be 'zero' or 'replicate', got {self.color_drop_mode!r}.")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise ValueError(f'jitter is a max shift in whole pixels (int >= 0), got {self.jitter!r}.')
        if not isinstance(self.num_ops, int) or self.num_ops < 0:
            raise ValueError(f'num_ops must be an int >= 0, got {self.num_ops!r}.')
        if not 0.0 < self.magnitude_max:
            raise ValueError(f'magnitude_max must be > 0, got {self.magnitude_max!r}.')
        if not 0.0 <= self.magnitude <= self.magnitude_max:
            raise ValueError(f'magnitude must be in [0, magnitude_max={self.magnitude_max}] (timm scale, '
                             f'_LEVEL_DENOM={_LEVEL_DENOM:g} is full strength), got {self.magnitude!r}.')
        if self.magnitude_std < 0:
            raise ValueError(f'magnitude_std must be >= 0, got {self.magnitude_std!r}.')
        bad = [n for n in self.auto_augment_ops if n not in SUPPORTED_OPS]
        if bad:
            raise ValueError(f'Unsupported auto_augment_ops {bad}; supported (timm names): {list(SUPPORTED_OPS)}.')
        if self.auto_augment and self.num_ops > 0 and not self.auto_augment_ops:
            raise ValueError('auto_augment is on with num_ops > 0 but auto_augment_ops is empty.')
        if self.elastic_alpha < 0 or self.elastic_sigma <= 0:
            raise ValueError(f'elastic_alpha must be >= 0 and elastic_sigma > 0, got '
                             f'{self.elastic_alpha!r}, {self.elastic_sigma!r}.')
        if len(self.color_jitter) != 4:
            raise ValueError(f'color_jitter is (brightness, contrast, saturation, hue), got {self.color_jitter!r}.')
        b, c, s, h = self.color_jitter
        if min(b, c, s) < 0 or not 0.0 <= h <= 0.5:
            raise ValueError(f'color_jitter needs brightness/contrast/saturation >= 0 and hue in [0, 0.5] '
                             f'(torchvision ColorJitter ranges), got {self.color_jitter!r}.')
        if self.interpolation not in ('bilinear', 'nearest', 'bicubic'):
            raise ValueError(f"interpolation must be 'bilinear', 'nearest' or 'bicubic', got {self.interpolation!r}.")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f'padding_mode must be one of {_PADDING_MODES}, got {self.padding_mode!r}.')

    @classmethod
    def off(cls) -> PatchAugmentConfig:
        """Identity: every op switched off."""
        return cls(color_drop=0.0, hflip=0.0, jitter=0, auto_augment=False, elastic=0.0, color_jitter_prob=0.0)

    @classmethod
    def from_dict(cls, d: dict) -> PatchAugmentConfig:
        """Inverse of ``dataclasses.asdict`` (after a JSON round trip lists become tuples again)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f'Unknown PatchAugmentConfig keys {sorted(unknown)}.')
        return cls(**d)

    def is_identity(self) -> bool:
        return (self.color_drop == 0 and self.hflip == 0 and self.jitter == 0 and self.elastic == 0
                and self.color_jitter_prob == 0
                and not (self.auto_augment and self.num_ops > 0 and self.auto_augment_prob > 0))


def _level_table(name: str, mmax: float) -> torch.Tensor:
    """timm's magnitude -> argument mapping for `name`, tabulated on [0, mmax] (unsigned; sign drawn per patch).

    Calls ``timm.data.auto_augment.LEVEL_TO_ARG`` itself so the ranges are timm's, e.g. Rotate 30 deg and
    ShearX 0.3 at magnitude _LEVEL_DENOM. Python's global `random` (used by timm for signs) is restored.
    """
    fn = LEVEL_TO_ARG[name]
    if fn is None:
        return torch.zeros(_TABLE_SIZE)
    state = random.getstate()
    try:
        vals = []
        for m in torch.linspace(0, mmax, _TABLE_SIZE).tolist():
            v = float(fn(m, _HPARAMS_DEFAULT)[0])
            if name in _SIGNED:
                v = abs(v)
            elif name.endswith('Increasing') and name[:-len('Increasing')] in _ENHANCE:
                v = abs(v - 1.0)  # timm: factor = max(0.1, 1 +- v)
            vals.append(v)
    finally:
        random.setstate(state)
    return torch.tensor(vals, dtype=torch.float64)


def _gauss1d(sigma: float, max_size: int, device, dtype) -> torch.Tensor:
    k = int(8 * sigma + 1)  # torchvision ElasticTransform kernel size
    k += 1 - k % 2
    k = min(k, 2 * max_size - 1)
    x = torch.arange(k, device=device, dtype=dtype) - (k - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with one factor per patch: clamp(f * x + (1 - f) * degenerate), factor (n,)."""
    return torch.lerp(degenerate, x, factor.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0, 1)


def _autocontrast(x: torch.Tensor, on: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's autocontrast of float images in [0, 1], same arithmetic, with torch.where where torchvision
    assigns through a boolean mask (a host sync on CUDA). ``on`` (n,) bool: patches where False are left as they
    are ((x - 0) / 1, as for a flat channel)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    if on is not None:
        flat = flat | ~on.view(-1, 1, 1, 1)
    scale = torch.where(flat, torch.ones_like(hi), hi - lo)
    return (x - torch.where(flat, torch.zeros_like(lo), lo)).div_(scale).clamp_(0, 1)


# RGB <-> YIQ (NTSC); hue rotation = rotating the (I, Q) plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                        dtype=torch.float64)


class PatchAugment(nn.Module):
    """Per-patch augmentation of CPC v2 (Hénaff et al. 2020, Sec. 4.1), batched on tensors.

    ``PatchAugment(cfg)(patches (N, C, P, P) float in [0, 1], generator) -> (N, C, P, P) float in [0, 1]``;
    C is 1 or 3, every patch gets its own random parameters, `generator` (optional) must be on the patches'
    device. Same generator state -> same output (on one device). No learnable state.

    ``masked``: how a random subset of patches gets an op. True: every op runs on every patch and ``torch.where``
    keeps it where drawn, so no step waits for the device (no ``nonzero``, ``.item()`` or data-dependent shape);
    ops with an argument that leaves a patch unchanged (``_MASK_BY_ARGUMENT``) take it instead of the where.
    False: each op runs only on its own patches (``index_select`` / ``index_copy_``), less arithmetic but one host
    sync per op group. None (default): False on the CPU (a sync costs nothing there), True on other devices.
    Both give the same pixels for the same draws; the draws differ only with elastic deformations: the masked way
    draws a displacement field for every patch, the indexed way only for the patches that are deformed.
    """

    def __init__(self, cfg: PatchAugmentConfig | None = None, *, masked: bool | None = None):
        super().__init__()
        self.masked = masked
        self.cfg = cfg if cfg is not None else PatchAugmentConfig()
        if not isinstance(self.cfg, PatchAugmentConfig):
            raise TypeError(f'cfg must be a PatchAugmentConfig, got {type(self.cfg).__name__}.')
        ops = self.cfg.auto_augment_ops if self.cfg.auto_augment else ()
        self._ops = tuple(ops)
        self._tables = {n: _level_table(n, self.cfg.magnitude_max) for n in set(ops)}
        self._on_device: dict = {}  # constants copied to a device once, not per call

    def _const(self, key, make, device, dtype=None) -> torch.Tensor:
        """A constant (built on the CPU by ``make()``) on ``device`` / ``dtype``, cached."""
        k = (key, str(device), dtype)
        if k not in self._on_device:
            t = make()
            self._on_device[k] = t.to(device=device, dtype=dtype or t.dtype)
        return self._on_device[k]

    def _masked(self, x: torch.Tensor) -> bool:
        return self.masked if self.masked is not None else x.device.type != 'cpu'

    def extra_repr(self) -> str:
        return repr(self.cfg)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check(patches: torch.Tensor, generator: torch.Generator | None) -> None:
        if not isinstance(patches, torch.Tensor):
            raise TypeError(f'Expected a tensor of patches (N, C, P, P), got {type(patches).__name__}.')
        if patches.ndim != 4:
            raise ValueError(f'Expected patches of shape (N, C, P, P), got {tuple(patches.shape)}. Flatten the '
                             f'patch grid first, e.g. patchify(x, P, S).flatten(0, 2).')
        if not patches.is_floating_point():
            raise ValueError(f'Expected float patches in [0, 1], got dtype {patches.dtype}; use x.float() / 255.')
        if patches.shape[1] not in (1, 3):
            raise ValueError(f'Expected 1 or 3 channels, got {patches.shape[1]} (shape {tuple(patches.shape)}).')
        if patches.shape[-1] != patches.shape[-2]:
            raise ValueError(f'Expected square patches (N, C, P, P), got {tuple(patches.shape)}.')
        if generator is not None and torch.device(generator.device).type != patches.device.type:
            raise ValueError(f'generator is on {generator.device} but patches are on {patches.device}; create it '
                             f'with torch.Generator(device=patches.device).')

    def _magnitudes(self, n: int, rand) -> torch.Tensor:
        cfg = self.cfg
        if cfg.magnitude_std == 0:
            return torch.full((n,), cfg.magnitude, device=rand.device)
        if math.isinf(cfg.magnitude_std):  # timm: inf std = uniform in [0, magnitude]
            return rand((n,)) * cfg.magnitude
        m = cfg.magnitude + cfg.magnitude_std * rand.normal((n,))
        return m.clamp(0, cfg.magnitude_max)

    def _slot(self, op: torch.Tensor, on: torch.Tensor, mag: torch.Tensor, neg: torch.Tensor):
        """One AutoAugment slot's draws -> (sel (n, K) bool: patch i applies op k, levels (K, n): the argument of
        every op at each patch's magnitude (timm's mapping, tabulated), neg (n,)): every op's mask and level in a
        few ops for the whole batch rather than a few per op."""
        dev = op.device
        ids = self._const('op_ids', lambda: torch.arange(len(self._ops)), dev)
        table = self._const('levels', lambda: torch.stack([self._tables[n] for n in self._ops]), dev)
        idx = (mag / self.cfg.magnitude_max * (_TABLE_SIZE - 1)).round().long().clamp_(0, _TABLE_SIZE - 1)
        return (op[:, None] == ids) & on[:, None], table.index_select(1, idx), neg

    # ------------------------------------------------------------------ forward
    def forward(self, patches: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment (N, C, P, P) float patches in [0, 1]; returns a new (N, C, P, P) tensor (or the input when
        the config is the identity)."""
        self._check(patches, generator)
        cfg = self.cfg
        if cfg.is_identity() or patches.shape[0] == 0:
            return patches
        n, c, p, _ = patches.shape
        dev = patches.device
        rand = _Rand(generator, dev)
        x = patches

        # ---- AutoAugment: draw op, apply-flag and magnitude for every (patch, slot)
        slots = []
        if self._ops and cfg.num_ops > 0 and cfg.auto_augment_prob > 0:
            for _ in range(cfg.num_ops):
                op = rand.randint(len(self._ops), (n,))
                on = rand((n,)) < cfg.auto_augment_prob
                slots.append(self._slot(op, on, self._magnitudes(n, rand), rand((n,)) < 0.5))

        # ---- 1. geometry: one affine per patch (inverse map, output px -> input px, centred) + elastic field
        x = self._warp(x, slots, rand)

        # ---- 2. AutoAugment colour primitives, slot by slot (groups of patches sharing an op)
        masked = self._masked(x)
        if slots and x is patches and not masked:
            x = x.clone()
        for sel, levels, neg in slots:
            for k, name in enumerate(self._ops):
                if name in GEOMETRIC_OPS:
                    continue
                if masked and name in _MASK_BY_ARGUMENT:
                    x = self._color_op(name, x, levels[k], neg, on=sel[:, k])
                    continue
                if masked:
                    x = torch.where(sel[:, k].view(n, 1, 1, 1), self._color_op(name, x, levels[k], neg), x)
                    continue
                idx = torch.nonzero(sel[:, k]).squeeze(1)
                if idx.numel() == 0:
                    continue
                x.index_copy_(0, idx, self._color_op(name, x.index_select(0, idx), levels[k][idx], neg[idx]))

        # ---- 3. colour jitter (torchvision ColorJitter ranges, fixed order b, c, s, h)
        if cfg.color_jitter_prob > 0 and any(v > 0 for v in cfg.color_jitter):
            x = self._color_jitter(x, rand)

        # ---- 4. colour dropping (Sec. 4.1), last so that one channel stays informative
        if cfg.color_drop > 0 and c == 3:
            keep = rand.randint(3, (n,))
            drop = rand((n,)) < cfg.color_drop
            if cfg.color_drop_mode == 'zero':
                mask = nnf.one_hot(keep, 3).to(x.dtype).view(n, 3, 1, 1)
                mask = torch.where(drop.view(n, 1, 1, 1), mask, torch.ones_like(mask))
                x = x * mask
            else:
                kept = x.gather(1, keep.view(n, 1, 1, 1).expand(n, 1, p, p)).expand(n, 3, p, p)
                x = torch.where(drop.view(n, 1, 1, 1), kept, x)
        if x is patches:
            x = x.clone()
        return x

    def _warp(self, x: torch.Tensor, slots, rand) -> torch.Tensor:
        cfg = self.cfg
        n, c, p, _ = x.shape
        dev, dt = x.device, x.dtype
        a = torch.eye(2, device=dev, dtype=dt).expand(n, 2, 2).clone()  # linear part (inverse map)
        t = torch.zeros(n, 2, device=dev, dtype=dt)  # translation in px (inverse map)
        warp = torch.zeros(n, dtype=torch.bool, device=dev)
        if cfg.hflip > 0:
            flip = rand((n,)) < cfg.hflip
            a[:, 0, 0] = torch.where(flip, -1.0, 1.0).to(dt)
            warp |= flip
        if cfg.jitter > 0:
            shift = rand.randint(2 * cfg.jitter + 1, (n, 2)).to(dt) - cfg.jitter  # content moves by +shift
            t -= shift
            warp |= (shift != 0).any(1)
        geo = [k for k, name in enumerate(self._ops) if name in GEOMETRIC_OPS]
        for sel, levels, neg in (slots if geo else ()):
            # A patch draws one op per slot, so of the slot's geometric ops at most one is not the identity: their
            # product is that one matrix, built for every patch at once (v = 0 where an op is not drawn)
            sign = torch.where(neg, -1.0, 1.0).to(dt)
            ks = self._const(('geo', tuple(geo)), lambda: torch.tensor(geo), dev)
            picked = sel.index_select(1, ks).t()  # (G, n)
            v = torch.where(picked, levels.index_select(0, ks).to(dt) * sign, torch.zeros((), device=dev, dtype=dt))
            arg = {self._ops[k]: v[i] for i, k in enumerate(geo)}
            zero = torch.zeros((), device=dev, dtype=dt)
            r = torch.deg2rad(arg['Rotate']) if 'Rotate' in arg else zero.expand(n)
            cos, sin = r.cos(), r.sin()
            # PIL affines about the patch centre: ShearX (1, f, 0, 0, 1, 0), ShearY (1, 0, 0, f, 1, 0)
            m = torch.stack([cos, -sin + arg.get('ShearX', zero), sin + arg.get('ShearY', zero), cos], 1)
            a = a @ m.view(n, 2, 2)
            if 'TranslateXRel' in arg or 'TranslateYRel' in arg:  # PIL: x_in = x_out + pct * width
                t = t + torch.stack([arg.get('TranslateXRel', zero).expand(n), arg.get('TranslateYRel', zero).expand(n)],
                                    1) * p
            warp |= picked.any(0)
        el = None
        if cfg.elastic > 0 and cfg.elastic_alpha > 0:
            el = rand((n,)) < cfg.elastic
            warp |= el
        if self._masked(x):  # every patch is resampled; the unwarped ones keep their own pixels
            theta = torch.cat([a, (t * (2.0 / p)).unsqueeze(-1)], dim=2)
            grid = nnf.affine_grid(theta, [n, c, p, p], align_corners=False)
            if el is not None:  # a field for every patch (the draws of the indexed path differ here)
                field = self._elastic_field(n, p, rand, dt).permute(0, 2, 3, 1)
                grid = grid + field * el.to(dt).view(n, 1, 1, 1)
            out = nnf.grid_sample(x, grid, mode=cfg.interpolation, padding_mode=cfg.padding_mode,
                                  align_corners=False)
            if cfg.interpolation == 'bicubic':
                out = out.clamp_(0, 1)
            return torch.where(warp.view(n, 1, 1, 1), out, x)
        idx = torch.nonzero(warp).squeeze(1)
        if idx.numel() == 0:
            return x
        theta = torch.cat([a[idx], (t[idx] * (2.0 / p)).unsqueeze(-1)], dim=2)  # px -> normalized (square P)
        grid = nnf.affine_grid(theta, [idx.numel(), c, p, p], align_corners=False)  # (m, P, P, 2), (x, y)
        if el is not None:
            sub = torch.nonzero(el[idx]).squeeze(1)  # positions in the warped group that also get elastic
            if sub.numel():
                field = self._elastic_field(sub.numel(), p, rand, dt)
                grid.index_add_(0, sub, field.permute(0, 2, 3, 1))
        out = nnf.grid_sample(x.index_select(0, idx), grid, mode=cfg.interpolation,
                              padding_mode=cfg.padding_mode, align_corners=False)
        if cfg.interpolation == 'bicubic':
            out = out.clamp_(0, 1)
        return x.index_copy(0, idx, out)

    def _elastic_field(self, n: int, p: int, rand, dt) -> torch.Tensor:
        """(n, 2, P, P) displacement in normalized grid units: alpha * blur(U(-1, 1), sigma) / P, as torchvision's
        ElasticTransform. The blur is separable and, for sigma >= 2, runs on an s = floor(sigma) times coarser
        grid (std rescaled by 1/s, bilinear upsampling) to keep it cheap."""
        cfg = self.cfg
        s = max(1, int(cfg.elastic_sigma))
        q = max(2, math.ceil(p / s))
        noise = rand((n, 2, q, q)).to(dt) * 2 - 1
        g = _gauss1d(cfg.elastic_sigma / s, q, noise.device, dt)
        k = g.numel()
        w = g.view(1, 1, k, 1).expand(2, 1, k, 1)
        f = nnf.conv2d(nnf.pad(noise, (0, 0, k // 2, k // 2), mode='reflect'), w, groups=2)
        f = nnf.conv2d(nnf.pad(f, (k // 2, k // 2, 0, 0), mode='reflect'), w.transpose(2, 3), groups=2)
        if q != p:
            f = nnf.interpolate(f / s, size=(p, p), mode='bilinear', align_corners=False)
        return f * (cfg.elastic_alpha / p)

    def _color_op(self, name: str, x: torch.Tensor, level: torch.Tensor, neg: torch.Tensor,
                  on: torch.Tensor | None = None) -> torch.Tensor:
        """One timm AutoAugment colour primitive on a group of patches (n, C, P, P) with per-patch arguments
        ``level`` (n,) (timm's mapping of each patch's magnitude; :meth:`_slot`). ``on`` (n,) bool, for the ops in
        ``_MASK_BY_ARGUMENT``: patches where it is False get the argument that returns them unchanged, bit for bit."""
        if name == 'AutoContrast':
            return _autocontrast(x, on)
        if name == 'Equalize':
            return TF.equalize(x)
        if name == 'Invert':
            if on is None:
                return 1.0 - x
            # o + x * s: 1 + x * -1 = 1 - x exactly where drawn, 0 + x * 1 = x elsewhere, in one pass
            sign = torch.where(on, -1.0, 1.0).to(x.dtype).view(-1, 1, 1, 1)
            return torch.addcmul(torch.where(on, 1.0, 0.0).to(x.dtype).view(-1, 1, 1, 1), x, sign)
        v = level.to(x.dtype)
        if name.startswith('Posterize'):  # PIL posterize on 8-bit values: keep `bits` MSBs
            bits = v.round().clamp(0, 8).view(-1, 1, 1, 1)
            step = 2.0 ** (8 - bits)
            return torch.floor(torch.floor(x * 255 + 0.5) / step) * step / 255
        if name in ('Solarize', 'SolarizeIncreasing'):  # invert pixels >= threshold (8-bit scale)
            thr = v / 255
            if on is not None:  # above every pixel: nothing inverted
                thr = torch.where(on, thr, 2.0)
            return torch.where(x >= thr.view(-1, 1, 1, 1), 1.0 - x, x)
        if name == 'SolarizeAdd':  # add to pixels < 128
            add = v / 255
            if on is not None:  # x + 0, clamped at 1
                add = torch.where(on, add, 0.0)
            return torch.where(x < 128 / 255, (x + add.view(-1, 1, 1, 1)).clamp(max=1), x)
        base = name.removesuffix('Increasing')
        if name != base:
            v = (1.0 + torch.where(neg, -v, v)).clamp(min=0.1)
        if on is not None:  # lerp(d, x, 1) is x exactly (torch's lerp computes x - (x - d) * 0 for weights >= 0.5)
            v = torch.where(on, v, 1.0)
        # degenerate images as torchvision computes them (factor 0), blended per patch. Brightness, Contrast and Color
        # pass theirs unexpanded: torchvision's factor-0 blend, clamp(0 * x + d), is d itself for x in [0, 1] (a
        # zero, the grayscale mean, the grayscale map), the same values without writing or reading a full-size image
        if base == 'Brightness':
            deg = x.new_zeros((1, 1, 1, 1))
        elif base == 'Contrast':
            deg = TF.rgb_to_grayscale(x).mean((-3, -2, -1), keepdim=True)
        elif base == 'Color':
            if x.shape[1] == 1:
                return x
            deg = TF.rgb_to_grayscale(x)
        else:  # Sharpness
            if x.shape[-1] <= 2:
                return x
            deg = TF.adjust_sharpness(x, 0.0)
        return _blend(x, deg, v)

    def _color_jitter(self, x: torch.Tensor, rand) -> torch.Tensor:
        """torchvision ColorJitter per patch, fixed order brightness, contrast, saturation, hue.

        All four are affine in the pixel values, so they are composed into one colour matrix M (n, C, C) and
        offset o (n, C) per patch, y = clamp(M x + o), clamped once at the end (torchvision clamps after each op).
        Degenerates as torchvision: black (brightness), mean grey level (contrast), grey image (saturation, with
        rgb_to_grayscale's weights); hue is a rotation of the YIQ chroma plane instead of an HSV shift.
        """
        cfg = self.cfg
        n, c = x.shape[:2]
        dev, dt = x.device, torch.float32 if x.dtype != torch.float64 else x.dtype
        on = (rand((n,)) < cfg.color_jitter_prob).view(n, 1, 1, 1)
        b, ct, s, h = cfg.color_jitter
        w = self._const(f'grey{c}', lambda: torch.tensor([0.2989, 0.587, 0.114] if c == 3 else [1.0],
                                                          dtype=torch.float64), dev, dt)  # exact in float64 patches
        m = torch.eye(c, device=dev, dtype=dt).expand(n, c, c).clone()
        o = torch.zeros(n, c, device=dev, dtype=dt)

        def factor(r):  # U[max(0, 1 - r), 1 + r]
            u = rand((n,))
            return (1 - r + 2 * r * u if r <= 1 else (1 + r) * u).to(dt).view(n, 1, 1)

        if b > 0:
            m = m * factor(b)
        if ct > 0:
            f = factor(ct)
            grey_mean = (m @ x.mean(dim=(2, 3)).to(dt).unsqueeze(-1)).squeeze(-1) @ w + o @ w  # (n,)
            m, o = m * f, o * f[:, 0] + (1 - f[:, 0]) * grey_mean.unsqueeze(1)
        if c == 3 and s > 0:
            f = factor(s)
            sat = f * torch.eye(3, device=dev, dtype=dt) + (1 - f) * w.view(1, 1, 3)  # rows: f e_i + (1-f) w
            m, o = sat @ m, (sat @ o.unsqueeze(-1)).squeeze(-1)
        if c == 3 and h > 0:
            ang = ((rand((n,)) * 2 - 1) * h * 2 * math.pi).to(dt)
            rot = torch.zeros(n, 3, 3, device=dev, dtype=dt)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = ang.cos(), -ang.sin(), ang.sin(), ang.cos()
            yiq = self._const('yiq', lambda: _RGB2YIQ, dev, dt)
            # the inverse on the CPU, in dt as before (linalg.inv on CUDA checks for singularity: a host sync)
            yiq_inv = self._const('yiq_inv', lambda: torch.linalg.inv(_RGB2YIQ.to(dt)), dev, dt)
            hue = yiq_inv @ rot @ yiq
            m, o = hue @ m, (hue @ o.unsqueeze(-1)).squeeze(-1)
        m, o = m.to(x.dtype), o.to(x.dtype)
        y = torch.baddbmm(o.unsqueeze(-1), m, x.flatten(2)).view_as(x).clamp_(0, 1)
        return torch.where(on, y, x)


class _Rand:
    """Draws from one generator (or the device default) on one device."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.g, self.device = generator, device

    def __call__(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, device=self.device)

    def normal(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, device=self.device)

    def randint(self, high: int, shape) -> torch.Tensor:
        return torch.randint(high, shape, generator=self.g, device=self.device)
