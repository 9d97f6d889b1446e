"""Tests of cpc_models.augment (per-patch augmentation, Hénaff et al. 2020 Sec. 4.1)."""
import dataclasses
import json

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cpc_models.augment import SUPPORTED_OPS, PatchAugment, PatchAugmentConfig

OFF = PatchAugmentConfig.off()


def only(**kw) -> PatchAugmentConfig:
    return dataclasses.replace(OFF, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def patches(n=32, c=3, p=16, seed=0):
    return torch.rand(n, c, p, p, generator=gen(seed))


def test_default_shapes_dtype_range():
    for c, p, dtype in [(3, 16, torch.float32), (1, 8, torch.float32), (3, 12, torch.float64)]:
        x = patches(24, c, p).to(dtype)
        y = PatchAugment()(x, gen())
        assert y.shape == x.shape and y.dtype == dtype
        assert y.min() >= 0 and y.max() <= 1
        assert not torch.equal(x, y)
    assert torch.equal(x, patches(24, 3, 12).to(torch.float64))  # input untouched


def test_off_is_identity():
    x = patches()
    assert torch.equal(PatchAugment(OFF)(x, gen()), x)
    assert OFF.is_identity() and not PatchAugmentConfig().is_identity()


@pytest.mark.parametrize('kw', [
    dict(color_drop=1.0), dict(hflip=1.0), dict(jitter=2), dict(elastic=1.0),
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


def test_patches_get_independent_params():
    x = patches(1).expand(64, -1, -1, -1).contiguous()
    y = PatchAugment()(x, gen())
    distinct = {tuple(v.flatten().tolist()) for v in y}
    assert len(distinct) > 56  # same input, (almost) all outputs different
    yf = PatchAugment(only(hflip=0.5))(x, gen())
    flipped = torch.tensor([torch.allclose(v, x[0].flip(-1), atol=1e-6) for v in yf])
    kept = torch.tensor([torch.equal(v, x[0]) for v in yf])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48


def test_color_drop_zero_keeps_exactly_one_channel():
    x = patches(60) * 0.9 + 0.1  # no zero pixels
    y = PatchAugment(only(color_drop=1.0, color_drop_mode='zero'))(x, gen())
    nonzero = (y.abs().amax(dim=(2, 3)) > 0)  # (N, 3)
    assert torch.equal(nonzero.sum(1), torch.ones(60, dtype=torch.long))
    kept = nonzero.float().argmax(1)
    assert set(kept.tolist()) == {0, 1, 2}
    assert torch.equal(y[torch.arange(60), kept], x[torch.arange(60), kept])


def test_color_drop_replicate_and_prob():
    x = patches(60)
    y = PatchAugment(only(color_drop=1.0, color_drop_mode='replicate'))(x, gen())
    for v, u in zip(y, x):
        assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
        assert any(torch.equal(v[0], u[k]) for k in range(3))
    y = PatchAugment(only(color_drop=0.5))(x, gen())
    untouched = torch.tensor([torch.equal(v, u) for v, u in zip(y, x)])
    assert 10 < int(untouched.sum()) < 50


def test_hflip_exact():
    x = patches()
    y = PatchAugment(only(hflip=1.0))(x, gen())
    torch.testing.assert_close(y, x.flip(-1), atol=1e-6, rtol=0)


def test_jitter_moves_content_by_integer_shift():
    j, p = 3, 16
    x = patches(40, 1, p)
    y = PatchAugment(only(jitter=j))(x, gen())
    seen = set()
    for v, u in zip(y, x):
        found = None
        for dy in range(-j, j + 1):
            for dx in range(-j, j + 1):
                # content moves by (+dy, +dx): out[i, k] = in[i - dy, k - dx] in the valid interior
                a = v[0, j:p - j, j:p - j]
                b = u[0, j - dy:p - j - dy, j - dx:p - j - dx]
                if torch.allclose(a, b, atol=1e-5):
                    found = (dy, dx)
        assert found is not None
        seen.add(found)
    assert max(max(abs(a), abs(b)) for a, b in seen) == j and len(seen) > 10


def test_rotate_matches_torchvision_rotate_up_to_sign():
    x = torch.zeros(8, 1, 32, 32)
    x[:, :, 14:18, 4:28] = 1.0  # a horizontal bar
    cfg = only(auto_augment=True, auto_augment_ops=('Rotate',), num_ops=1, auto_augment_prob=1.0,
               magnitude=10.0, magnitude_std=0.0, padding_mode='zeros')
    y = PatchAugment(cfg)(x, gen())
    for v in y:
        err = min((v - TF.rotate(x[0], a, interpolation=TF.InterpolationMode.BILINEAR)).abs().mean().item()
                  for a in (30.0, -30.0))
        assert err < 0.01  # timm: 30 degrees at magnitude 10


def test_color_primitives_follow_timm_levels():
    x = patches(16)

    def run(name, m):
        return PatchAugment(only(auto_augment=True, auto_augment_ops=(name,), num_ops=1, auto_augment_prob=1.0,
                                 magnitude=m, magnitude_std=0.0))(x, gen())
    torch.testing.assert_close(run('Invert', 5.0), 1 - x)
    assert torch.equal(run('PosterizeIncreasing', 10.0), torch.zeros_like(x))  # keep 0 bits
    torch.testing.assert_close(run('SolarizeIncreasing', 10.0), 1 - x)  # threshold 0 -> all inverted
    torch.testing.assert_close(run('Brightness', 10.0), (x * 1.9).clamp(0, 1))  # timm: factor 0.1 + 1.8 m / 10
    ac = run('AutoContrast', 0.0)
    torch.testing.assert_close(ac.amin(dim=(2, 3)), torch.zeros(16, 3))
    torch.testing.assert_close(ac.amax(dim=(2, 3)), torch.ones(16, 3))


def test_all_supported_ops_run_on_rgb_and_gray():
    for c in (3, 1):
        cfg = PatchAugmentConfig(auto_augment_ops=SUPPORTED_OPS, num_ops=3, auto_augment_prob=1.0)
        y = PatchAugment(cfg)(patches(48, c, 8), gen())
        assert y.shape == (48, c, 8, 8) and y.min() >= 0 and y.max() <= 1


def test_one_channel():
    x = patches(16, 1, 8)
    assert torch.equal(PatchAugment(only(color_drop=1.0))(x, gen()), x)  # colour drop skipped
    cj = only(color_jitter_prob=1.0, color_jitter=(0.0, 0.0, 0.4, 0.1))  # saturation, hue: no-ops
    assert torch.equal(PatchAugment(cj)(x, gen()), x)
    y = PatchAugment(only(color_jitter_prob=1.0))(x, gen())
    assert y.shape == x.shape and not torch.equal(x, y)


def test_elastic_is_small_smooth_and_seeded():
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(8, 1, 32, 32).contiguous()  # horizontal ramp
    aug = PatchAugment(only(elastic=1.0))
    y = aug(x, gen())
    assert torch.equal(y, aug(x, gen()))
    d = (y - x).abs()
    assert d.max() > 1e-3 and d.mean() < 0.05  # displaced by ~1 px on a 1/31-per-px ramp


def test_device_agnostic():
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    for dev in devices:
        x = patches().to(dev)
        y = PatchAugment()(x, torch.Generator(device=dev).manual_seed(0))
        assert y.device == x.device and y.shape == x.shape


def test_config_json_roundtrip():
    cfg = PatchAugmentConfig(magnitude=5.0, color_drop_mode='replicate')
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert PatchAugmentConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match='Unknown'):
        PatchAugmentConfig.from_dict({**d, 'colour_drop': 1.0})


@pytest.mark.parametrize('kw,match', [
    (dict(color_drop=-0.1), 'probability'), (dict(hflip=1.5), 'probability'), (dict(elastic=2), 'probability'),
    (dict(magnitude=11.0), 'magnitude'), (dict(magnitude=-1.0), 'magnitude'), (dict(magnitude_std=-1), 'std'),
    (dict(jitter=-1), 'jitter'), (dict(jitter=1.5), 'jitter'), (dict(num_ops=-1), 'num_ops'),
    (dict(auto_augment_ops=('Rotate', 'Cutout')), 'Unsupported'), (dict(color_drop_mode='gray'), 'color_drop_mode'),
    (dict(color_jitter=(0.4, 0.4, 0.4, 0.6)), 'hue'), (dict(elastic_sigma=0.0), 'elastic'),
    (dict(padding_mode='constant'), 'padding_mode')])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        PatchAugmentConfig(**kw)


def test_bad_input_raises():
    aug = PatchAugment()
    with pytest.raises(ValueError, match='N, C, P, P'):
        aug(torch.rand(3, 8, 8), gen())
    with pytest.raises(ValueError, match='float'):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match='channels'):
        aug(torch.rand(2, 2, 8, 8), gen())
    with pytest.raises(ValueError, match='square'):
        aug(torch.rand(2, 3, 8, 6), gen())


def test_color_jitter_brightness_and_grey_preserving_chroma_ops():
    x = torch.rand(32, 3, 8, 8, generator=gen()) * 0.2 + 0.4  # mid-range: no clamping
    y = PatchAugment(only(color_jitter_prob=1.0, color_jitter=(0.4, 0.0, 0.0, 0.0)))(x, gen())
    ratio = (y / x).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))  # one factor per patch
    assert ratio[:, 0].min() >= 0.6 - 1e-6 and ratio[:, 0].max() <= 1.4 + 1e-6 and ratio[:, 0].std() > 0.05
    y = PatchAugment(only(color_jitter_prob=1.0, color_jitter=(0.0, 0.0, 0.4, 0.1)))(x, gen())
    assert not torch.allclose(x, y, atol=1e-3)
    torch.testing.assert_close(TF.rgb_to_grayscale(y), TF.rgb_to_grayscale(x), atol=2e-3, rtol=0)
