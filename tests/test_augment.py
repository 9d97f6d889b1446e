"""Tests of cpc_models.augment (per-patch augmentation, Hénaff et al. 2020 Sec. 4.1).

Every random draw is checked per patch: copies of ONE patch in one batch must get their own AutoAugment op,
apply flag, magnitude and sign, flip, shift, elastic field, colour-jitter factors and kept channel. Every op is
checked for values on single images against a reference: timm's own AutoAugment op on PIL images (with timm's
magnitude mapping), torchvision's functional ops in float, torchvision's ElasticTransform, numpy padding.
"""
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data.auto_augment import _HPARAMS_DEFAULT, LEVEL_TO_ARG, NAME_TO_OP

from cpc_models.augment import COLOR_OPS, GEOMETRIC_OPS, SUPPORTED_OPS, PatchAugment, PatchAugmentConfig, _Rand

ENHANCE = ('Brightness', 'Color', 'Contrast', 'Sharpness')
# torchvision's float counterpart of each enhance op (factor 0 = the degenerate image timm/PIL blends with)
TV_ENHANCE = {'Brightness': TF.adjust_brightness, 'Color': TF.adjust_saturation, 'Contrast': TF.adjust_contrast,
              'Sharpness': TF.adjust_sharpness}
RANDOM_SIGN_OPS = tuple(n + 'Increasing' for n in ENHANCE)  # factor 1 +- level
EXACT_OPS = ('Invert', 'Equalize', 'Posterize', 'PosterizeIncreasing', 'PosterizeOriginal', 'Solarize',
             'SolarizeIncreasing', 'SolarizeAdd')  # 8-bit look-up tables: the same values as PIL


def off() -> PatchAugmentConfig:
    return PatchAugmentConfig.off()


def only(**kw) -> PatchAugmentConfig:
    return dataclasses.replace(PatchAugmentConfig.off(), **kw)


def aa(ops, magnitude, std=0.0, prob=1.0, **kw) -> PatchAugmentConfig:
    """Only AutoAugment: one slot per patch drawing from `ops`."""
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    kw = dict(dict(num_ops=1, auto_augment_prob=prob), **kw)
    return only(auto_augment=True, auto_augment_ops=ops, magnitude=magnitude, magnitude_std=std, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def patches(n=32, c=3, p=16, seed=0):
    return torch.rand(n, c, p, p, generator=gen(seed))


def pixels(n=16, c=3, p=12, seed=0):
    """Patches of 8-bit values k / 255, so that PIL sees exactly the same image."""
    return torch.randint(0, 256, (n, c, p, p), generator=gen(seed)) / 255


def copies(patch: torch.Tensor, n: int) -> torch.Tensor:
    return patch.expand(n, *patch.shape).contiguous()


def smooth_patch(p=16, c=3):
    """Content that interpolation handles gracefully: ramps and their product, on the 8-bit grid."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, p), torch.linspace(0, 1, p), indexing='ij')
    return ((torch.stack([xx, yy, xx * yy])[:c] * 255).round() / 255)


def to_pil(patch: torch.Tensor) -> Image.Image:
    a = (patch * 255).round().to(torch.uint8)
    return Image.fromarray(a[0].numpy(), 'L') if a.shape[0] == 1 else Image.fromarray(a.permute(1, 2, 0).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img).copy()).float() / 255
    return a[None] if a.ndim == 2 else a.permute(2, 0, 1)


def timm_arg(name: str, m: float, sign: int) -> float:
    """timm's argument for op `name` at magnitude m, with its random sign fixed to `sign` (LEVEL_TO_ARG negates at
    random: Rotate/Shear/Translate values, the +- of the 'Increasing' enhance factors 1 +- level)."""
    (v,) = LEVEL_TO_ARG[name](m, _HPARAMS_DEFAULT)
    if name in GEOMETRIC_OPS:
        return sign * abs(v)
    if name.endswith('Increasing') and name.removesuffix('Increasing') in ENHANCE:
        return 1 + sign * abs(v - 1)
    return v


def timm_reference(name: str, patch: torch.Tensor, m: float, sign: int = 1) -> torch.Tensor:
    """timm's AutoAugment op on the PIL image of one patch; geometric ops bilinear with a black fill.

    Shear is taken about the patch centre (docs/augment.md): PIL's affine with timm's coefficients
    (1, f, 0, 0, 1, 0), shifted so that the centre stays put.
    """
    img = to_pil(patch)
    if LEVEL_TO_ARG[name] is None:
        return from_pil(NAME_TO_OP[name](img))
    v = timm_arg(name, m, sign)
    if name not in GEOMETRIC_OPS:
        return from_pil(NAME_TO_OP[name](img, v))
    kw = dict(fillcolor=0, resample=Image.BILINEAR)
    p = patch.shape[-1]
    if name == 'ShearX':
        return from_pil(img.transform(img.size, Image.AFFINE, (1, v, -v * p / 2, 0, 1, 0), **kw))
    if name == 'ShearY':
        return from_pil(img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, -v * p / 2), **kw))
    return from_pil(NAME_TO_OP[name](img, v, **kw))


def geometric_error(out: torch.Tensor, out_ones: torch.Tensor, name: str, patch: torch.Tensor, m: float,
                    sign: int) -> float:
    """Max |out - PIL reference| over the pixels that both sample from inside the patch (no fill involved): where
    the same warp of an all-ones patch (`out_ones`, from the same random draws) and PIL's both stay 1."""
    ref = timm_reference(name, patch, m, sign)
    inside = (timm_reference(name, torch.ones_like(patch), m, sign).amin(0) > 0.999) & (out_ones.amin(0) > 0.999)
    return (out - ref).abs().amax(0)[inside].max().item()


# ---------------------------------------------------------------- basics
def test_default_shapes_dtype_range():
    for c, p, dtype in [(3, 16, torch.float32), (1, 8, torch.float32), (3, 12, torch.float64)]:
        x = patches(24, c, p).to(dtype)
        y = PatchAugment()(x, gen())
        assert y.shape == x.shape and y.dtype == dtype
        assert y.min() >= 0 and y.max() <= 1
        assert not torch.equal(x, y)
    assert torch.equal(x, patches(24, 3, 12).to(torch.float64))  # input untouched


def test_off_is_the_identity_and_returns_the_input():
    cfg = off()
    assert cfg == PatchAugmentConfig(color_drop=0.0, hflip=0.0, jitter=0, auto_augment=False, elastic=0.0,
                                     color_jitter_prob=0.0)
    assert cfg.is_identity() and not PatchAugmentConfig().is_identity()
    x = patches()
    assert PatchAugment(cfg)(x, gen()) is x
    # AutoAugment with no slot or probability 0 is the identity too
    for kw in (dict(num_ops=0), dict(auto_augment_prob=0.0)):
        assert aa('Invert', 5.0, **kw).is_identity()
        assert PatchAugment(aa('Invert', 5.0, **kw))(x, gen()) is x
    assert not aa('Invert', 5.0).is_identity() and not only(jitter=1).is_identity()


def test_output_is_a_new_tensor_even_when_nothing_changes():
    x = patches(8, 1, 8)
    y = PatchAugment(only(color_drop=1.0))(x, gen())  # colour dropping skips 1-channel patches
    assert torch.equal(y, x) and y is not x and y.data_ptr() != x.data_ptr()


def test_single_patch_and_empty_batch():
    x = patches(1)
    for seed in range(6):
        y = PatchAugment()(x, gen(seed))
        assert y.shape == x.shape and not torch.equal(y, x)
    x = pixels(1)
    for seed in range(8):  # one patch: a group of one for its op, while the other op's group is empty
        y = PatchAugment(aa(('Invert', 'SolarizeIncreasing'), 10.0))(x, gen(seed))  # both give 1 - x at m = 10
        torch.testing.assert_close(y, 1 - x)
        y = PatchAugment(only(color_drop=1.0))(x, gen(seed))
        assert int((y.amax((2, 3)) > 0).sum()) == 1
    empty = torch.zeros(0, 3, 8, 8)
    assert PatchAugment()(empty, gen()).shape == (0, 3, 8, 8)


@pytest.mark.parametrize('kw', [
    dict(color_drop=1.0), dict(hflip=1.0), dict(jitter=2), dict(jitter=1), dict(elastic=1.0),
    dict(elastic=1.0, elastic_alpha=1.0, elastic_sigma=1.0),
    dict(auto_augment=True, num_ops=1, auto_augment_prob=1.0), dict(color_jitter_prob=1.0)])
def test_each_op_switches_on_alone(kw):
    x = patches()
    cfg = only(**kw)
    assert not cfg.is_identity()
    y = PatchAugment(cfg)(x, gen())
    assert not torch.allclose(x, y)
    assert y.min() >= 0 and y.max() <= 1


def test_reproducible_and_seed_dependent():
    x = patches()
    aug = PatchAugment()
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(0)
    assert aug(x, None).shape == x.shape  # default generator works


def test_output_depends_only_on_the_torch_generator():
    """timm draws its random signs from Python's `random`; the tables built from it must not depend on that state."""
    cfg = PatchAugmentConfig(auto_augment_ops=SUPPORTED_OPS, num_ops=2, auto_augment_prob=1.0)
    x = patches(64)
    outs = []
    for seed in (0, 1, 2):
        random.seed(seed)
        outs.append(PatchAugment(cfg)(x, gen(5)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_every_tensor_is_made_on_the_patches_device():
    """With another default device (here 'meta'), CPU patches still give the same CPU result."""
    x = patches(48, 3, 12)
    configs = [PatchAugmentConfig(), PatchAugmentConfig(color_drop_mode='replicate', magnitude_std=0.0),
               PatchAugmentConfig(auto_augment_ops=SUPPORTED_OPS, num_ops=3, auto_augment_prob=1.0,
                                  magnitude_std=float('inf'), interpolation='bicubic'),
               only(elastic=1.0, elastic_sigma=1.5)]
    for cfg in configs:
        aug = PatchAugment(cfg)
        ref = aug(x, gen(3))
        with torch.device('meta'):
            y = aug(x, gen(3))
        assert y.device.type == 'cpu' and torch.equal(y, ref)


def test_device_agnostic():
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    for dev in devices:
        x = patches().to(dev)
        y = PatchAugment()(x, torch.Generator(device=dev).manual_seed(0))
        assert y.device == x.device and y.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a second device type')
def test_generator_on_another_device_raises():
    with pytest.raises(ValueError, match=r'generator is on cuda.* but patches are on cpu; create it with '
                                         r'torch.Generator\(device=patches.device\)\.'):
        PatchAugment()(patches(), torch.Generator(device='cuda'))


# ---------------------------------------------------------------- every random draw is per patch
def test_op_choice_is_per_patch():
    """Copies of one patch: each gets one of the listed ops (geometric and colour alike), uniformly."""
    ops = ('Invert', 'Rotate', 'Equalize', 'SolarizeAdd')  # colour ops before and after a geometric one
    m, n = 7.3, 200
    x = smooth_patch(16) * 0.5 + pixels(1, 3, 16)[0] * 0.5
    x = (x * 255).round() / 255
    aug = PatchAugment(aa(ops, m, padding_mode='zeros'))
    y, y_ones = aug(copies(x, n), gen()), aug(torch.ones(n, 3, 16, 16), gen())
    refs = {name: timm_reference(name, x, m) for name in ops if name != 'Rotate'}
    chosen = []
    for out, out_ones in zip(y, y_ones):
        match = [name for name, ref in refs.items() if (out - ref).abs().max() < 1e-5]
        if not match and min(geometric_error(out, out_ones, 'Rotate', x, m, s) for s in (1, -1)) < 1.5 / 255:
            match = ['Rotate']
        assert len(match) == 1, match
        chosen += match
    for name in ops:
        assert 0.15 < chosen.count(name) / n < 0.35, (name, chosen.count(name))


@pytest.mark.parametrize('masked', [False, True])
def test_op_choice_is_per_patch_on_distinct_patches(masked):
    """A second, independent check of the per-patch op choice: distinct random patches (not copies), ops told apart
    by arithmetic alone (Invert is exactly 1 - x; Equalize is not), both code paths (masked and indexed), several
    seeds. Each patch draws its own op, so about half the patches of every batch are inverted; an op drawn once per
    batch would invert all or none."""
    n = 256
    aug = PatchAugment(aa(('Invert', 'Equalize'), 5.0), masked=masked)
    for seed in range(4):
        x = pixels(n, 3, 8, seed=seed + 1)
        y = aug(x, gen(seed))
        inverted = ((y - (1 - x)).flatten(1).abs().amax(1) < 1e-6).float()
        assert 0.35 < inverted.mean().item() < 0.65, (seed, inverted.mean().item())
        assert not torch.equal(y[inverted == 0], (1 - x)[inverted == 0])  # the others got Equalize, not Invert


@pytest.mark.parametrize('name', ['Invert', 'Rotate'])
def test_apply_flag_is_per_patch(name):
    x = smooth_patch(16)
    y = PatchAugment(aa(name, 7.3, prob=0.5))(copies(x, 200), gen())
    untouched = torch.tensor([torch.equal(out, x) for out in y])
    assert 70 < int(untouched.sum()) < 130
    if name == 'Invert':
        assert all(torch.equal(out, x) or torch.allclose(out, 1 - x) for out in y)


def brightness_magnitudes(cfg: PatchAugmentConfig, n=400) -> torch.Tensor:
    """Per-patch magnitudes of the Brightness op, read back from y = f x with timm's f = 0.1 + 1.8 m / 10."""
    x = torch.full((3, 8, 8), 0.5)
    y = PatchAugment(cfg)(copies(x, n), gen())
    f = (y / x).flatten(1)
    assert torch.allclose(f, f[:, :1].expand_as(f), atol=1e-6)  # one factor per patch
    return (f[:, 0] - 0.1) / 1.8 * 10


def test_magnitude_is_per_patch_and_normal():
    m = brightness_magnitudes(aa('Brightness', 5.0, std=0.5))
    assert len(set(torch.round(m, decimals=2).tolist())) > 100  # tabulated on a 0.01 grid
    assert abs(m.mean() - 5.0) < 0.1 and abs(m.std() - 0.5) < 0.08
    m = brightness_magnitudes(aa('Brightness', 5.0, std=1.0))
    assert abs(m.std() - 1.0) < 0.12
    m = brightness_magnitudes(aa('Brightness', 7.3, std=0.0))
    torch.testing.assert_close(m, torch.full_like(m, 7.3), atol=1e-5, rtol=0)


def test_magnitude_is_clipped_to_its_range():
    m = brightness_magnitudes(aa('Brightness', 0.5, std=1.0))
    assert m.min() > -1e-5 and 0.2 < (m.abs() < 1e-5).float().mean() < 0.42  # P(N(0.5, 1) < 0) = 0.31
    m = brightness_magnitudes(aa('Brightness', 9.5, std=1.0))
    assert m.max() < 10 + 1e-5 and 0.2 < ((m - 10).abs() < 1e-5).float().mean() < 0.42


def test_infinite_std_draws_uniform_magnitudes():
    m = brightness_magnitudes(aa('Brightness', 8.0, std=float('inf')))
    assert m.min() > -1e-5 and m.max() < 8 + 1e-5 and m.min() < 0.3 and m.max() > 7.7
    assert abs(m.mean() - 4.0) < 0.35 and abs(m.std() - 8 / math.sqrt(12)) < 0.25


def test_hflip_is_per_patch():
    x = patches(1)[0]
    yf = PatchAugment(only(hflip=0.5))(copies(x, 64), gen())
    flipped = torch.tensor([torch.allclose(v, x.flip(-1), atol=1e-6) for v in yf])
    kept = torch.tensor([torch.equal(v, x) for v in yf])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48


def test_hflip_exact():
    x = patches()
    y = PatchAugment(only(hflip=1.0))(x, gen())
    torch.testing.assert_close(y, x.flip(-1), atol=1e-6, rtol=0)


def test_flip_survives_every_other_warp():
    """A patch that is flipped stays flipped whatever else warps it (jitter, AA geometry, elastic)."""
    x = torch.linspace(0, 1, 16).view(1, 1, 16).expand(3, 16, 16).contiguous()  # left-to-right ramp
    cfg = only(hflip=1.0, jitter=1, elastic=0.5, auto_augment=True, auto_augment_ops=('Rotate',), num_ops=1,
               auto_augment_prob=0.5, magnitude=0.0, magnitude_std=0.0)
    y = PatchAugment(cfg)(copies(x, 64), gen())
    slope = (y[..., 8:].mean((1, 2, 3)) - y[..., :8].mean((1, 2, 3)))
    assert bool((slope < -0.3).all()), slope  # every patch now runs right-to-left


JITTER_PAD = {'zeros': 'constant', 'border': 'edge', 'reflection': 'symmetric'}  # grid_sample -> numpy.pad


@pytest.mark.parametrize('padding_mode', ['zeros', 'border', 'reflection'])
@pytest.mark.parametrize('j', [1, 3])
def test_jitter_shifts_each_patch_by_whole_pixels(padding_mode, j):
    """Content moves by (+dy, +dx), each uniform in [-j, j] per patch; the uncovered border follows padding_mode."""
    p, n = 12, 300
    x = pixels(1, 1, p, seed=j)[0]
    y = PatchAugment(only(jitter=j, padding_mode=padding_mode))(copies(x, n), gen())
    padded = torch.from_numpy(np.pad(x[0].numpy(), j, mode=JITTER_PAD[padding_mode]))
    shifted = {(dy, dx): padded[j - dy:j - dy + p, j - dx:j - dx + p]
               for dy in range(-j, j + 1) for dx in range(-j, j + 1)}
    seen = []
    for out in y:
        match = [s for s, ref in shifted.items() if torch.allclose(out[0], ref, atol=1e-5)]
        assert len(match) == 1, match
        seen += match
    for axis in (0, 1):  # each of dy, dx takes every value in [-j, j], about uniformly
        counts = torch.tensor([[s[axis] for s in seen].count(v) for v in range(-j, j + 1)], dtype=torch.float)
        assert counts.min() > n / (2 * j + 1) / 2 and counts.max() < n / (2 * j + 1) * 1.6, counts
    if j == 1:  # and every (dy, dx) pair
        counts = torch.tensor([seen.count(s) for s in shifted], dtype=torch.float)
        assert counts.min() > n / 9 / 3, counts


def shifted(x: torch.Tensor, dy: int, dx: int, mode: str = 'constant') -> torch.Tensor:
    """(C, P, P) content moved by (+dy, +dx) whole pixels, the uncovered border padded like numpy.pad(mode)."""
    c, p, _ = x.shape
    j = max(abs(dy), abs(dx))
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (j, j), (j, j)), mode=mode))
    return padded[:, j - dy:j - dy + p, j - dx:j - dx + p]


def test_flip_and_jitter_compose_per_patch():
    x = pixels(1, 3, 10, seed=4)[0]
    y = PatchAugment(only(hflip=0.5, jitter=1, padding_mode='border'))(copies(x, 100), gen())
    candidates = {(f, dy, dx): shifted(x.flip(-1) if f else x, dy, dx, 'edge')
                  for f in (0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    seen = []
    for out in y:
        match = [k for k, ref in candidates.items() if torch.allclose(out, ref, atol=1e-5)]
        assert len(match) == 1, match
        seen += match
    assert 25 < sum(f for f, _, _ in seen) < 75 and len(set(seen)) > 12


@pytest.mark.parametrize('name, axis', [('TranslateXRel', 1), ('TranslateYRel', 0)])
def test_jitter_and_translate_compose(name, axis):
    """Full-strength TranslateRel moves a 20 px patch by 9 px (timm: 0.45 P); jitter adds up to 2 px on top."""
    x = pixels(1, 1, 20, seed=5)[0]
    y = PatchAugment(aa(name, 10.0, jitter=2, padding_mode='zeros'))(copies(x, 100), gen())
    shifts = [(dy, dx) for dy in range(-11, 12) for dx in range(-11, 12)]
    candidates = torch.stack([shifted(x, dy, dx) for dy, dx in shifts])  # (529, C, P, P)
    hits = ((y[:, None] - candidates[None]).abs() <= 1e-5).flatten(2).all(-1)  # (100, 529): output i is shift j
    assert (hits.sum(1) == 1).all(), hits.sum(1)
    moves = [shifts[j] for j in hits.int().argmax(1).tolist()]
    along = [m[axis] for m in moves]
    assert all(7 <= abs(a) <= 11 for a in along)
    assert {a for a in along if a > 0} == set(range(7, 12)) and {a for a in along if a < 0} == set(range(-11, -6))
    assert set(m[1 - axis] for m in moves) == set(range(-2, 3))


def test_elastic_flag_and_fields_are_per_patch():
    p, border = 32, 4
    r = (torch.arange(p) + 0.5) / p
    ramp = torch.stack([r.view(1, p).expand(p, p), r.view(p, 1).expand(p, p), torch.zeros(p, p)])
    y = PatchAugment(only(elastic=0.5, padding_mode='border'))(copies(ramp, 200), gen())
    untouched = torch.tensor([torch.equal(out, ramp) for out in y])
    assert 70 < int(untouched.sum()) < 130
    fields = ((y[~untouched, :2] - ramp[:2]) * p)[..., border:-border, border:-border].flatten(1)
    corr = torch.corrcoef(fields)
    off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool)]
    assert off_diagonal.abs().mean() < 0.4 and off_diagonal.max() < 0.99  # a new field for every patch


def jitter_fit(x: torch.Tensor, y: torch.Tensor):
    """Per patch, the colour matrix M (C, C) and offset o (C,) with y = M x + o, fitted on all pixels."""
    n, c = x.shape[:2]
    X = torch.cat([x.flatten(2), torch.ones_like(x[:, :1].flatten(2))], 1).transpose(1, 2)  # (n, P*P, C + 1)
    sol = torch.linalg.lstsq(X, y.flatten(2).transpose(1, 2)).solution  # (n, C + 1, C)
    assert (X @ sol - y.flatten(2).transpose(1, 2)).abs().max() < 1e-9  # exactly affine in colour
    return sol[:, :c].transpose(1, 2), sol[:, c]


GREY = torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64)  # torchvision's rgb_to_grayscale weights


def test_color_jitter_matches_torchvision_with_per_patch_factors():
    """Brightness, contrast, saturation (in that order) as torchvision's functional ops, with factors drawn per patch
    from U[1 - r, 1 + r] independently of each other and of the other patches."""
    r, n = 0.3, 200
    x = torch.rand(3, 10, 10, generator=gen(), dtype=torch.float64) * 0.1 + 0.45  # no clamping anywhere
    y = PatchAugment(only(color_jitter_prob=1.0, color_jitter=(r, r, r, 0.0)))(copies(x, n), gen())
    assert 0 < y.min() and y.max() < 1
    M, o = jitter_fit(copies(x, n), y)
    # M = c b (s I + (1 - s) 1 w^T),  o = (1 - c) b g (s + (1 - s) sum(w)) 1,  g = grey mean of x
    cbs = M[:, 0, 0] - M[:, 1, 0]
    cb = cbs + M[:, 1, 0] / GREY[0]
    s = cbs / cb
    g = (x.mean((1, 2)) * GREY).sum()
    b = cb + o[:, 0] / (g * (s + (1 - s) * GREY.sum()))
    c = cb / b
    for i in range(0, n, 20):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, b[i].item()), c[i].item()), s[i].item())
        torch.testing.assert_close(y[i], ref, atol=1e-9, rtol=0)
    factors = torch.stack([b, c, s])
    assert factors.min() > 1 - r - 1e-9 and factors.max() < 1 + r + 1e-9
    assert (factors.amin(1) < 1 - r + 0.03).all() and (factors.amax(1) > 1 + r - 0.03).all()
    assert ((factors.std(1) - 2 * r / math.sqrt(12)).abs() < 0.03).all()
    corr = torch.corrcoef(factors)
    assert corr[~torch.eye(3, dtype=torch.bool)].abs().max() < 0.25  # three independent draws per patch


def test_color_jitter_factor_range_for_strengths_above_one():
    """torchvision's range U[max(0, 1 - r), 1 + r]: for r = 1.5, uniform on [0, 2.5] (no mass piled up at 0)."""
    x = torch.full((3, 4, 4), 0.2, dtype=torch.float64)
    y = PatchAugment(only(color_jitter_prob=1.0, color_jitter=(1.5, 0.0, 0.0, 0.0)))(copies(x, 600), gen())
    f = y[:, 0, 0, 0] / 0.2  # brightness factor (f <= 2.5: 0.5 at most, no clamping)
    assert f.min() >= 0 and f.max() <= 2.5 + 1e-9
    assert (f < 1e-9).float().mean() < 0.02  # a clamped U[-0.5, 2.5] would put 1/6 of the patches at 0
    assert abs(f.mean() - 1.25) < 0.1 and abs(f.std() - 2.5 / math.sqrt(12)) < 0.06


YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)


def test_hue_is_a_rotation_of_the_yiq_chroma_plane_per_patch():
    h, n = 0.1, 200
    x = torch.rand(3, 10, 10, generator=gen(), dtype=torch.float64) * 0.1 + 0.45
    y = PatchAugment(only(color_jitter_prob=1.0, color_jitter=(0.0, 0.0, 0.0, h)))(copies(x, n), gen())
    M, o = jitter_fit(copies(x, n), y)
    assert o.abs().max() < 1e-9
    R = YIQ @ M @ torch.linalg.inv(YIQ)  # the op in YIQ coordinates
    torch.testing.assert_close(R[:, 0], torch.tensor([1.0, 0, 0], dtype=torch.float64).expand(n, 3), atol=1e-9,
                               rtol=0)  # luma kept
    torch.testing.assert_close(R[:, :, 0], R[:, 0].clone(), atol=1e-9, rtol=0)
    chroma = R[:, 1:, 1:]
    eye = torch.eye(2, dtype=torch.float64).expand(n, 2, 2)
    torch.testing.assert_close(chroma @ chroma.transpose(1, 2), eye, atol=1e-9, rtol=0)  # a rotation...
    assert (torch.linalg.det(chroma) > 0).all()  # ...not a reflection
    angle = torch.atan2(chroma[:, 1, 0], chroma[:, 0, 0])
    limit = 2 * math.pi * h  # torchvision's hue factor in [-h, h] is a fraction of the colour circle
    assert angle.abs().max() <= limit + 1e-9 and angle.min() < -0.9 * limit and angle.max() > 0.9 * limit
    assert abs(angle.std() - 2 * limit / math.sqrt(12)) < 0.05


def test_color_jitter_on_one_channel_is_brightness_and_contrast():
    x = torch.rand(1, 10, 10, generator=gen(), dtype=torch.float64) * 0.1 + 0.45
    y = PatchAugment(only(color_jitter_prob=1.0, color_jitter=(0.3, 0.3, 0.3, 0.1)))(copies(x, 50), gen())
    M, o = jitter_fit(copies(x, 50), y)
    b = M[:, 0, 0] + o[:, 0] / x.mean()  # M = c b, o = (1 - c) b mean(x)
    c = M[:, 0, 0] / b
    for i in range(50):
        ref = TF.adjust_contrast(TF.adjust_brightness(x, b[i].item()), c[i].item())
        torch.testing.assert_close(y[i], ref, atol=1e-9, rtol=0)
    assert b.min() > 0.7 - 1e-9 and b.max() < 1.3 + 1e-9 and c.min() > 0.7 - 1e-9 and c.max() < 1.3 + 1e-9
    assert b.std() > 0.1 and c.std() > 0.1
    cj = only(color_jitter_prob=1.0, color_jitter=(0.0, 0.0, 0.4, 0.1))  # saturation, hue: no-ops
    assert torch.equal(PatchAugment(cj)(copies(x, 8), gen()), copies(x, 8))


def test_color_jitter_probability_is_per_patch():
    x = torch.full((3, 4, 4), 0.5)
    y = PatchAugment(only(color_jitter_prob=0.5, color_jitter=(0.4, 0.0, 0.0, 0.0)))(copies(x, 200), gen())
    untouched = torch.tensor([torch.equal(out, x) for out in y])
    assert 70 < int(untouched.sum()) < 130


def test_color_drop_channel_is_per_patch():
    x = torch.rand(3, 6, 6, generator=gen()) * 0.9 + 0.1  # no zero pixels
    y = PatchAugment(only(color_drop=1.0, color_drop_mode='zero'))(copies(x, 300), gen())
    nonzero = y.abs().amax(dim=(2, 3)) > 0  # (N, 3)
    assert torch.equal(nonzero.sum(1), torch.ones(300, dtype=torch.long))
    kept = nonzero.float().argmax(1)
    assert all(70 < int((kept == k).sum()) < 130 for k in range(3))
    assert torch.equal(y[torch.arange(300), kept], x.expand(300, 3, 6, 6)[torch.arange(300), kept])


def test_color_drop_replicate_and_prob():
    x = patches(60)
    y = PatchAugment(only(color_drop=1.0, color_drop_mode='replicate'))(x, gen())
    for v, u in zip(y, x):
        assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
        assert any(torch.equal(v[0], u[k]) for k in range(3))
    kept = [next(k for k in range(3) if torch.equal(v[0], u[k])) for v, u in zip(y, x)]
    assert set(kept) == {0, 1, 2}
    y = PatchAugment(only(color_drop=0.5))(copies(x[0], 200), gen())
    untouched = torch.tensor([torch.equal(v, x[0]) for v in y])
    assert 70 < int(untouched.sum()) < 130


# ---------------------------------------------------------------- every op against a reference, patch by patch
@pytest.mark.parametrize('c', [3, 1])
@pytest.mark.parametrize('name', COLOR_OPS)
def test_color_op_matches_timm_on_each_patch(name, c):
    """The op on every patch equals timm's op on that patch's PIL image (8-bit rounding aside), with the magnitude
    mapped by timm; ops with a random sign take both signs across patches."""
    for m in (2.6, 7.3):
        x = pixels(24, c, 12, seed=int(m * 10))
        y = PatchAugment(aa(name, m))(x, gen())
        tol = 1e-5 if name in EXACT_OPS else (1 / 255 if name == 'AutoContrast' else 1.5 / 255) + 1e-5
        signs = []
        for out, patch in zip(y, x):
            errors = {s: (out - timm_reference(name, patch, m, s)).abs().max().item() for s in (1, -1)}
            sign = min(errors, key=errors.get)
            assert errors[sign] < tol, (name, m, errors)
            signs.append(sign)
        if name in RANDOM_SIGN_OPS and not (c == 1 and name == 'ColorIncreasing'):  # grey: no colour to change
            assert 4 < signs.count(1) < 20  # both signs, per patch


@pytest.mark.parametrize('name', ENHANCE + tuple(n + 'Increasing' for n in ENHANCE))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_enhance_op_matches_torchvision_in_float(name, dtype):
    """Per patch, torchvision's adjust_* with timm's factor (factor 1 +- level for 'Increasing'), to float precision."""
    base = name.removesuffix('Increasing')
    for m in (0.0, 2.6, 7.3, 10.0):
        x = patches(24, 3, 8, seed=int(m * 10)).to(dtype)
        y = PatchAugment(aa(name, m))(x, gen())
        assert y.dtype == dtype
        for out, patch in zip(y, x):
            errors = [(out - TV_ENHANCE[base](patch, max(0.1, timm_arg(name, m, s)))).abs().max().item()
                      for s in (1, -1)]
            assert min(errors) < 1e-6, (name, m, errors)  # magnitudes are tabulated in float32


@pytest.mark.parametrize('c', [3, 1])
def test_unexpanded_degenerate_images_blend_bit_for_bit_like_torchvisions(c):
    """Brightness, Contrast and Color blend with a broadcast degenerate (a zero, the grayscale mean, the grayscale
    map), not torchvision's full-size factor-0 image: the same pixels exactly, for patches in [0, 1] (edges too)."""
    x = patches(32, c, 8)
    x[0], x[1], x[2, :, :4] = 0.0, 1.0, 1.0
    f = torch.rand(32, generator=gen()) * 1.9 + 0.1
    aug = PatchAugment(aa('Brightness', 5.0))
    for name, tv in (('Brightness', TF.adjust_brightness), ('Contrast', TF.adjust_contrast),
                     ('Color', TF.adjust_saturation)):
        ref = torch.lerp(tv(x, 0.0), x, f.view(-1, 1, 1, 1)).clamp_(0, 1)  # the full-size degenerate image
        assert torch.equal(aug._color_op(name, x, f, torch.zeros(32, dtype=torch.bool)), ref), (name, c)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('c', [3, 1])
def test_ops_masked_by_their_argument_equal_the_where_bit_for_bit(c, dtype):
    """On the masked path Solarize, SolarizeAdd and the enhance ops leave undrawn patches alone through their argument
    (threshold above 1, addend 0, factor 1), not a torch.where over the batch: the same pixels exactly."""
    from cpc_models.augment import _MASK_BY_ARGUMENT
    x = patches(48, c, 8).to(dtype)
    x[0], x[1], x[2, :, :4] = 0.0, 1.0, 1.0
    on = torch.rand(48, generator=gen(1)) < 0.5
    neg = torch.rand(48, generator=gen(2)) < 0.5
    aug = PatchAugment(aa('Brightness', 5.0))
    assert {'AutoContrast', 'Invert', 'SolarizeIncreasing', 'SolarizeAdd', 'SharpnessIncreasing', 'Contrast'} <= _MASK_BY_ARGUMENT
    for name in sorted(_MASK_BY_ARGUMENT):
        level = torch.rand(48, generator=gen(3)) * (255 if name.startswith('Solarize') else 0.9)
        where = torch.where(on.view(-1, 1, 1, 1), aug._color_op(name, x, level, neg), x)
        folded = aug._color_op(name, x, level, neg, on=on)
        assert torch.equal(folded, where), name
        assert not torch.equal(folded, x) or (c == 1 and name.startswith('Color')), name  # the op did something


def test_enhance_ops_on_tiny_and_one_channel_patches():
    for p in (2, 3):
        x = patches(8, 3, p)
        y = PatchAugment(aa('Sharpness', 7.3))(x, gen())
        for out, patch in zip(y, x):  # PIL leaves the 1-pixel border alone: a 2x2 patch is unchanged
            torch.testing.assert_close(out, TF.adjust_sharpness(patch, timm_arg('Sharpness', 7.3, 1)))
        assert torch.equal(y, x) == (p == 2)
    x = patches(8, 1, 8)
    assert torch.equal(PatchAugment(aa('Color', 7.3))(x, gen()), x)  # no colour to change in a grey patch


def test_color_primitives_at_full_strength():
    x = patches(16)

    def run(name, m):
        return PatchAugment(aa(name, m))(x, gen())
    torch.testing.assert_close(run('Invert', 5.0), 1 - x)
    assert torch.equal(run('PosterizeIncreasing', 10.0), torch.zeros_like(x))  # keep 0 bits
    torch.testing.assert_close(run('SolarizeIncreasing', 10.0), 1 - x)  # threshold 0 -> all inverted
    torch.testing.assert_close(run('Brightness', 10.0), (x * 1.9).clamp(0, 1))  # timm: factor 0.1 + 1.8 m / 10
    torch.testing.assert_close(run('Brightness', 0.0), x * 0.1)
    ac = run('AutoContrast', 0.0)
    torch.testing.assert_close(ac.amin(dim=(2, 3)), torch.zeros(16, 3))
    torch.testing.assert_close(ac.amax(dim=(2, 3)), torch.ones(16, 3))


@pytest.mark.parametrize('name', GEOMETRIC_OPS)
def test_geometric_op_matches_pil_on_each_patch_with_a_random_sign(name):
    """Rotate, Shear and Translate equal PIL's affine transform (timm's op) on every patch, with a sign drawn per
    patch: copies of one patch get both signs, about half each."""
    n = 48
    for m, p in ((2.6, 16), (7.3, 12)):
        x = smooth_patch(p) * 0.6 + pixels(1, 3, p, seed=p)[0] * 0.4
        x = (x * 255).round() / 255
        aug = PatchAugment(aa(name, m, padding_mode='zeros'))
        y, y_ones = aug(copies(x, n), gen()), aug(torch.ones(n, 3, p, p), gen())
        signs = []
        for out, out_ones in zip(y, y_ones):
            errors = {s: geometric_error(out, out_ones, name, x, m, s) for s in (1, -1)}
            sign = min(errors, key=errors.get)
            assert errors[sign] < 1.2 / 255 and errors[-sign] > 10 / 255, (name, m, errors)
            signs.append(sign)
        assert 12 < signs.count(1) < 36, signs


@pytest.mark.parametrize('interpolation', ['nearest', 'bicubic'])
def test_warp_interpolation(interpolation):
    x = torch.zeros(3, 16, 16)
    x[:, 4:12, 4:12] = 1.0  # a sharp square: bicubic rings, nearest keeps the two levels
    cfg = aa('Rotate', 5.0, interpolation=interpolation, padding_mode='zeros')
    y = PatchAugment(cfg)(copies(x, 8), gen())
    bilinear = PatchAugment(aa('Rotate', 5.0, padding_mode='zeros'))(copies(x, 8), gen())
    assert y.min() >= 0 and y.max() <= 1 and not torch.allclose(y, bilinear, atol=1e-3)
    if interpolation == 'nearest':
        assert set(y.unique().tolist()) == {0.0, 1.0}
    else:  # bicubic overshoots near the edges; those values are clamped
        raw = F.grid_sample(copies(x, 1), F.affine_grid(torch.tensor([[[math.cos(0.26), -math.sin(0.26), 0.0],
                                                                          [math.sin(0.26), math.cos(0.26), 0.0]]]),
                                                       [1, 3, 16, 16], align_corners=False),
                            mode='bicubic', align_corners=False)
        assert raw.max() > 1 and (y - bilinear).abs().mean() < 0.05


def test_all_supported_ops_run_on_rgb_and_gray():
    for c in (3, 1):
        cfg = PatchAugmentConfig(auto_augment_ops=SUPPORTED_OPS, num_ops=3, auto_augment_prob=1.0)
        y = PatchAugment(cfg)(patches(48, c, 8), gen())
        assert y.shape == (48, c, 8, 8) and y.min() >= 0 and y.max() <= 1


def test_one_channel():
    x = patches(16, 1, 8)
    assert torch.equal(PatchAugment(only(color_drop=1.0))(x, gen()), x)  # colour drop skipped
    y = PatchAugment(only(color_jitter_prob=1.0))(x, gen())
    assert y.shape == x.shape and not torch.equal(x, y)


# ---------------------------------------------------------------- elastic deformation
@pytest.mark.parametrize('sigma, p', [(1.5, 16), (1.2, 16), (5.0, 32), (5.0, 8), (3.0, 12)])
def test_elastic_field_is_a_gaussian_blur_of_uniform_noise(sigma, p):
    """alpha * blur(U(-1, 1), sigma) / P with torchvision's gaussian_blur (ElasticTransform's kernel size
    int(8 sigma + 1), odd, capped to the grid); for sigma >= 2 on a floor(sigma) times coarser grid with the blur
    scaled to match, upsampled bilinearly (docs/augment.md)."""
    alpha, n = 40.0, 6
    aug = PatchAugment(only(elastic=1.0, elastic_alpha=alpha, elastic_sigma=sigma))
    field = aug._elastic_field(n, p, _Rand(gen(3), torch.device('cpu')), torch.float64)
    s = max(1, int(sigma))
    q = max(2, math.ceil(p / s))
    noise = torch.rand(n, 2, q, q, generator=gen(3)).double() * 2 - 1
    k = int(8 * sigma / s + 1)
    k = min(k + 1 - k % 2, 2 * q - 1)
    ref = TF.gaussian_blur(noise, [k, k], [sigma / s, sigma / s])
    if q != p:
        ref = F.interpolate(ref / s, size=(p, p), mode='bilinear', align_corners=False)
    assert field.shape == (n, 2, p, p)
    torch.testing.assert_close(field, ref * alpha / p, atol=1e-12, rtol=0)


def displacement_px(out: torch.Tensor, ramp: torch.Tensor, border: int = 4) -> torch.Tensor:
    """Displacement in px, read back from warped x/y ramps away from the border: (n, 2, P - 2b, P - 2b)."""
    p = ramp.shape[-1]
    return ((out[:, :2] - ramp[:2]) * p)[..., border:-border, border:-border]


def field_stats(f: torch.Tensor):
    """(std in px, correlation with the neighbour 1 px and 4 px to the right)."""
    c = f - f.mean()
    return f.std().item(), ((c[..., 1:] * c[..., :-1]).mean() / c.var()).item(), \
        ((c[..., 4:] * c[..., :-4]).mean() / c.var()).item()


@pytest.mark.parametrize('sigma, alpha', [(5.0, 50.0), (1.5, 20.0)])
def test_elastic_displacement_is_smooth_like_torchvision(sigma, alpha):
    """The warp moves pixels as torchvision's ElasticTransform does: same size (std in px) and smoothness
    (correlation between neighbours) of the displacement, measured on warped ramps."""
    p, n = 32, 128
    r = (torch.arange(p) + 0.5) / p
    ramp = torch.stack([r.view(1, p).expand(p, p), r.view(p, 1).expand(p, p), torch.zeros(p, p)])
    cfg = only(elastic=1.0, elastic_alpha=alpha, elastic_sigma=sigma, padding_mode='border')
    ours = field_stats(displacement_px(PatchAugment(cfg)(copies(ramp, n), gen()), ramp))
    torch.manual_seed(0)
    elastic = T.ElasticTransform(alpha=alpha, sigma=sigma)
    theirs = field_stats(displacement_px(torch.stack([elastic(ramp) for _ in range(n)]), ramp))
    assert 0.8 < ours[0] / theirs[0] < 1.25, (ours, theirs)
    assert abs(ours[1] - theirs[1]) < 0.03 and abs(ours[2] - theirs[2]) < 0.1, (ours, theirs)
    assert ours[1] > 0.85  # smooth: white noise would give ~0


def test_elastic_is_seeded_and_zero_alpha_is_off():
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).contiguous()
    aug = PatchAugment(only(elastic=1.0))
    assert torch.equal(aug(x, gen()), aug(x, gen()))
    assert torch.equal(PatchAugment(only(elastic=1.0, elastic_alpha=0.0))(x, gen()), x)


# ---------------------------------------------------------------- configuration and errors
def test_config_json_roundtrip_and_repr():
    cfg = PatchAugmentConfig(magnitude=5.0, color_drop_mode='replicate')
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert PatchAugmentConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match=r"Unknown PatchAugmentConfig keys \['colour_drop'\]"):
        PatchAugmentConfig.from_dict({**d, 'colour_drop': 1.0})
    assert repr(PatchAugment(cfg)) == f'PatchAugment({cfg!r})'


@pytest.mark.parametrize('kw', [
    dict(num_ops=0), dict(magnitude_max=0.5, magnitude=0.5), dict(auto_augment_ops=(), num_ops=0),
    dict(auto_augment=False, auto_augment_ops=()), dict(elastic_alpha=0.0), dict(elastic_sigma=0.5),
    dict(color_jitter=(0.0, 0.0, 0.0, 0.5)), dict(interpolation='nearest'), dict(interpolation='bicubic'),
    dict(padding_mode='zeros'), dict(padding_mode='border'), dict(jitter=0), dict(magnitude=10.0),
    dict(magnitude_std=float('inf'))])
def test_boundary_configs_are_valid(kw):
    cfg = PatchAugmentConfig(**kw)
    assert PatchAugment(cfg)(patches(4, 3, 8), gen()).shape == (4, 3, 8, 8)


@pytest.mark.parametrize('kw, message', [
    (dict(color_drop=-0.1), 'PatchAugmentConfig.color_drop is a probability and must be in [0, 1], got -0.1.'),
    (dict(hflip=1.5), 'PatchAugmentConfig.hflip is a probability and must be in [0, 1], got 1.5.'),
    (dict(elastic=2), 'PatchAugmentConfig.elastic is a probability and must be in [0, 1], got 2.'),
    (dict(auto_augment_prob='0.5'), "PatchAugmentConfig.auto_augment_prob is a probability and must be in [0, 1], "
                                    "got '0.5'."),
    (dict(color_jitter_prob=-1.0), 'PatchAugmentConfig.color_jitter_prob is a probability'),
    (dict(color_drop_mode='gray'), "color_drop_mode must be 'zero' or 'replicate', got 'gray'."),
    (dict(jitter=-1), 'jitter is a max shift in whole pixels (int >= 0), got -1.'),
    (dict(jitter=1.5), 'jitter is a max shift in whole pixels (int >= 0), got 1.5.'),
    (dict(jitter=True), 'jitter is a max shift in whole pixels (int >= 0), got True.'),
    (dict(num_ops=-1), 'num_ops must be an int >= 0, got -1.'),
    (dict(num_ops=1.0), 'num_ops must be an int >= 0, got 1.0.'),
    (dict(magnitude_max=0.0, magnitude=0.0), 'magnitude_max must be > 0, got 0.0.'),
    (dict(magnitude=11.0), 'magnitude must be in [0, magnitude_max=10.0] (timm scale, _LEVEL_DENOM=10 is full '
                           'strength), got 11.0.'),
    (dict(magnitude=-1.0), 'magnitude must be in [0, magnitude_max=10.0]'),
    (dict(magnitude_std=-1), 'magnitude_std must be >= 0, got -1.'),
    (dict(auto_augment_ops=('Rotate', 'Cutout')), "Unsupported auto_augment_ops ['Cutout']; supported (timm names): "),
    (dict(auto_augment_ops=()), 'auto_augment is on with num_ops > 0 but auto_augment_ops is empty.'),
    (dict(auto_augment_ops=(), num_ops=1), 'auto_augment is on with num_ops > 0 but auto_augment_ops is empty.'),
    (dict(elastic_alpha=-1.0), 'elastic_alpha must be >= 0 and elastic_sigma > 0, got -1.0, 5.0.'),
    (dict(elastic_sigma=0.0), 'elastic_alpha must be >= 0 and elastic_sigma > 0, got 50.0, 0.0.'),
    (dict(color_jitter=(0.4, 0.4, 0.4)), 'color_jitter is (brightness, contrast, saturation, hue), got (0.4, 0.4, '
                                         '0.4).'),
    (dict(color_jitter=(-0.1, 0.4, 0.4, 0.1)), 'color_jitter needs brightness/contrast/saturation >= 0 and hue in '
                                               '[0, 0.5] (torchvision ColorJitter ranges), got (-0.1, 0.4, 0.4, 0.1).'),
    (dict(color_jitter=(0.4, -0.1, 0.4, 0.1)), 'color_jitter needs brightness/contrast/saturation >= 0'),
    (dict(color_jitter=(0.4, 0.4, -0.1, 0.1)), 'color_jitter needs brightness/contrast/saturation >= 0'),
    (dict(color_jitter=(0.4, 0.4, 0.4, 0.6)), 'color_jitter needs brightness/contrast/saturation >= 0'),
    (dict(color_jitter=(0.4, 0.4, 0.4, -0.1)), 'color_jitter needs brightness/contrast/saturation >= 0'),
    (dict(interpolation='area'), "interpolation must be 'bilinear', 'nearest' or 'bicubic', got 'area'."),
    (dict(padding_mode='constant'), "padding_mode must be one of ('zeros', 'border', 'reflection'), got "
                                    "'constant'."),
])
def test_bad_config_raises(kw, message):
    with pytest.raises(ValueError) as e:
        PatchAugmentConfig(**kw)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize('x, error, message', [
    (np.zeros((2, 3, 8, 8)), TypeError, 'Expected a tensor of patches (N, C, P, P), got ndarray.'),
    (torch.rand(3, 8, 8), ValueError, 'Expected patches of shape (N, C, P, P), got (3, 8, 8). Flatten the patch '
                                      'grid first, e.g. patchify(x, P, S).flatten(0, 2).'),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ValueError, 'Expected float patches in [0, 1], got dtype '
                                                             'torch.uint8; use x.float() / 255.'),
    (torch.rand(2, 2, 8, 8), ValueError, 'Expected 1 or 3 channels, got 2 (shape (2, 2, 8, 8)).'),
    (torch.rand(2, 3, 8, 6), ValueError, 'Expected square patches (N, C, P, P), got (2, 3, 8, 6).'),
    (torch.rand(2, 3, 6, 8), ValueError, 'Expected square patches (N, C, P, P), got (2, 3, 6, 8).'),
], ids=['numpy', '3-D', 'uint8', 'channels', 'wide', 'tall'])
def test_bad_input_raises(x, error, message):
    with pytest.raises(error) as e:
        PatchAugment()(x, gen())
    assert str(e.value) == message


def test_bad_cfg_type_raises():
    with pytest.raises(TypeError) as e:
        PatchAugment(dict(hflip=0.5))
    assert str(e.value) == 'cfg must be a PatchAugmentConfig, got dict.'


@pytest.mark.parametrize('c', [1, 3])
@pytest.mark.parametrize('warp', [dict(elastic=1.0), dict(elastic=0.0, jitter=0, hflip=0.5)])
def test_masked_equals_indexed(c, warp):
    # every op on some patches; elastic on all (both ways then draw the same fields) or on none (some unwarped)
    cfg = PatchAugmentConfig(auto_augment_ops=SUPPORTED_OPS, num_ops=3, auto_augment_prob=0.7, color_drop=0.5,
                             **warp)
    x = patches(96, c, 8)
    indexed = PatchAugment(cfg, masked=False)(x, gen(3))
    masked = PatchAugment(cfg, masked=True)(x, gen(3))
    torch.testing.assert_close(masked, indexed, rtol=0, atol=1e-5)  # per-patch ops on batches of other sizes
    assert PatchAugment(cfg)._masked(x) is False  # the CPU default: the indexed way


def test_masked_path_needs_no_values_on_the_host():
    # The meta device holds no data: nonzero, .item(), .tolist(), bool(t) and boolean indexing all raise there, so
    # a forward that runs on it waits for the device nowhere (what a CUDA step needs).
    cfg = PatchAugmentConfig(auto_augment_ops=SUPPORTED_OPS, num_ops=2)
    for c in (1, 3):
        y = PatchAugment(cfg)(torch.empty(64, c, 8, 8, device='meta'))
        assert y.device.type == 'meta' and y.shape == (64, c, 8, 8)
    with pytest.raises((NotImplementedError, RuntimeError)):  # the indexed way does read values
        PatchAugment(cfg, masked=False)(torch.empty(64, 3, 8, 8, device='meta'))


def test_autocontrast_is_torchvisions():
    from cpc_models.augment import _autocontrast
    x = patches(16, 3, 8)
    x[3] = 0.25  # a flat patch: left as is
    assert torch.equal(_autocontrast(x), TF.autocontrast(x))
