"""The CPC encoders against the timm model protocol, the paper's sizes, and bad input.

Every test that takes ``name`` runs over ``timm.list_models('cpcv[12]*')``, so a new variant is tested for free.
Variants over 5M parameters ("large": R-161, R-50, v1 R-101) are built on the meta device for the shape checks
(no memory, no compute), and run for real only with one 32 px patch; the small variants are checked for values too.
"""
import math
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.optim
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import GroupNorm1Act

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models.encoder import CPCResNetV2, LayerNormAct2d, PatchConv2d
from cpc_models.patches import patchify

ROOT = Path(__file__).resolve().parent.parent
NAMES = timm.list_models('cpcv[12]*')


def _meta_model(name: str, **kwargs) -> CPCResNetV2:
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


PARAMS = {n: sum(p.numel() for p in _meta_model(n).parameters()) for n in NAMES}
LARGE = sorted(n for n in NAMES if PARAMS[n] > 5e6)
SMALL = sorted(n for n in NAMES if n not in LARGE)
# A grid of one 32 px patch: the large variants run for real only at this size.
ONE_PATCH = dict(patch_size=32, patch_stride=32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def create(name: str, **kwargs) -> CPCResNetV2:
    """Eval-mode model: on CPU for the small variants, on the meta device (shapes only) for the large ones."""
    model = _meta_model(name, **kwargs) if name in LARGE else timm.create_model(name, **kwargs)
    return model.eval()


def images(model, size=None, batch: int = 2, chans=None) -> torch.Tensor:
    """Random images at the model's cfg input size (or `size` = (H, W)), on the model's device."""
    _, h, w = model.pretrained_cfg['input_size']
    h, w = size or (h, w)
    device = next(model.parameters()).device
    return torch.randn(batch, chans or model.in_chans, h, w, device=device)


def same(a: torch.Tensor, b: torch.Tensor, **tol) -> None:
    """Same shape always; same values unless on the meta device (large variants: shapes only)."""
    assert a.shape == b.shape
    if a.device.type != 'meta':
        torch.testing.assert_close(a, b, **(tol or dict(rtol=1e-5, atol=1e-5)))


def test_registry_has_every_variant():
    assert set(NAMES) >= {'cpcv2_resnet161', 'cpcv2_resnet50', 'cpcv1_resnet101', 'cpcv2_resnet_small',
                          'cpcv2_resnet_tiny'}
    assert set(LARGE) == {'cpcv2_resnet161', 'cpcv2_resnet50', 'cpcv1_resnet101'}


# ---------------------------------------------------------------- the timm model protocol
@pytest.mark.parametrize('name', NAMES)
def test_model_protocol(name):
    m = create(name)
    pc = m.pretrained_cfg
    c, h, w = pc['input_size']
    assert m.num_classes == pc['num_classes'] == 0 and m.in_chans == c
    assert m.num_features > 0 and m.head_hidden_size > 0
    modules = dict(m.named_modules())
    assert all(info['module'] in modules for info in m.feature_info)
    assert pc['first_conv'] + '.weight' in m.state_dict()
    assert m.grid_size((h, w)) == tuple(pc['pool_size'])

    x = images(m)
    f = m.forward_features(x)
    assert f.shape == (2, m.num_features, *pc['pool_size'])
    pre = m.forward_head(f, pre_logits=True)
    assert pre.shape == (2, m.head_hidden_size)
    assert m(x).shape == pre.shape  # num_classes=0: pooled features

    with x.device:  # the new classifier is built on the model's device
        m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m(x).shape == (2, 7)
    m.reset_classifier(0)
    assert m(x).shape == pre.shape
    m.reset_classifier(0, '')
    assert m(x).shape == f.shape  # no pooling: 4-D grid

    assert create(name, num_classes=0, global_pool='')(x).shape == f.shape
    m5 = create(name, num_classes=5)
    assert m5(x).shape == (2, 5) and pc['classifier'] + '.weight' in m5.state_dict()


@pytest.mark.parametrize('name', NAMES)
def test_in_chans(name):
    m = create(name, in_chans=5)  # neither 3 nor the cfg's (1 for Fashion-MNIST)
    assert m.stem.conv.weight.shape[1] == 5
    assert m.forward_features(images(m)).shape == (2, m.num_features, *m.pretrained_cfg['pool_size'])
    with pytest.raises(ValueError, match='Expected 5 input channels'):
        m(images(m, chans=m.pretrained_cfg['input_size'][0]))


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates(name):
    m = create(name)
    x = images(m)
    pool = m.pretrained_cfg['pool_size']
    f = m.forward_features(x)
    final, inter = m.forward_intermediates(x)
    assert len(inter) == len(m.feature_info)
    assert [t.shape for t in inter] == [(2, info['num_chs'], *pool) for info in m.feature_info]
    same(final, f)
    # norm=True normalizes the last stack's output only: it is then forward_features
    _, inter_norm = m.forward_intermediates(x, norm=True)
    same(inter_norm[-1], f)
    same(inter_norm[0], inter[0])
    final_early, inter_early = m.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert len(inter_early) == 2 and final_early.shape[1] == m.feature_info[1]['num_chs']
    same(inter_early[1], inter[1])
    only = m.forward_intermediates(x, indices=2, intermediates_only=True)  # the last two
    assert isinstance(only, list) and len(only) == 2
    same(only[0], inter[-2])
    same(only[1], inter[-1])
    with pytest.raises(ValueError, match='NCHW'):
        m.forward_intermediates(x, output_fmt='NHWC')


@pytest.mark.parametrize('name', NAMES)
def test_prune_intermediate_layers(name):
    m = create(name, num_classes=5)
    x = images(m)
    full = m.forward_intermediates(x, intermediates_only=True)
    assert m.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(m.stages) == 1 and m.num_classes == 0
    assert m.num_features == m.head_hidden_size == m.feature_info[1]['num_chs']
    kept = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    same(kept[0], full[0])
    same(kept[1], full[1])
    # the pruned model still runs end to end, with features of the last kept level
    assert m(x).shape == m.forward_features(x).shape == (2, m.num_features, *m.pretrained_cfg['pool_size'])

    m = create(name)
    assert m.prune_intermediate_layers(None, prune_norm=True) == list(range(len(m.feature_info)))
    assert isinstance(m.norm, torch.nn.Identity) and len(m.stages) == len(m.feature_info) - 1


@pytest.mark.parametrize('name', NAMES)
def test_features_only_runs_the_whole_image(name):
    m = create(name, features_only=True)
    assert type(m).__name__ == 'FeatureGetterNet'
    _, h, w = m.model.pretrained_cfg['input_size']
    h, w = h + 5, w + 2  # reductions round up
    x = images(m.model, size=(h, w), batch=1)
    feats = m(x)
    assert len(feats) == len(m.feature_info) == len(m.model.feature_info)
    assert [f.shape[1] for f in feats] == m.feature_info.channels()
    reductions = m.feature_info.reduction()
    assert reductions == sorted(reductions) and reductions[0] < reductions[-1]  # multi-scale, not the patch grid
    for f, r in zip(feats, reductions):
        assert f.shape[-2:] == (math.ceil(h / r), math.ceil(w / r))
    if name in LARGE:
        return
    # same weights in the plain (patch-grid) model: its trunk on the full image gives the same maps
    ref = timm.create_model(name).eval()
    missing, unexpected = m.model.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and set(unexpected) == {k for k in ref.state_dict() if k.startswith('norm.')}
    with torch.no_grad():
        feats = m(x)
        same(feats[0], ref.stem(x))
        same(ref.norm(feats[-1]), ref.forward_trunk(x))


@pytest.mark.parametrize('name', NAMES)
def test_dense_forward_features(name):
    m = create(name, dense=True)
    _, h, w = m.pretrained_cfg['input_size']
    r = m.feature_info[-1]['reduction']
    x = images(m)
    f = m.forward_features(x)
    assert f.shape == (2, m.num_features, math.ceil(h / r), math.ceil(w / r))
    if name in LARGE:
        return
    grid = timm.create_model(name).eval()
    grid.load_state_dict(m.state_dict())
    with torch.no_grad():
        same(f, grid.forward_trunk(x))
        # an image of exactly one patch: the grid latent is the mean of the dense map
        one = x[..., :grid.patch_size, :grid.patch_size]
        same(grid.forward_features(one)[..., 0, 0], m.forward_features(one).mean((2, 3)))


@pytest.mark.parametrize('name', SMALL)
def test_batched_patches_equal_loop(name):
    # float64: one batch of B * rows * cols patches and a loop over patches sum in different orders (conv algorithms
    # depend on the batch size), which float32 would let differ by more than a fixed tolerance on some CPUs
    m = timm.create_model(name, dtype=torch.float64).eval()
    x = images(m).double()
    p_, s_ = m.patch_size, m.patch_stride
    rows, cols = m.grid_size(x.shape[-2:])
    patches = patchify(x, p_, s_)
    assert patches.shape == (2, rows, cols, m.in_chans, p_, p_)
    with torch.no_grad():
        z = m.forward_patches(patches)
        assert z.shape == (2, m.num_features, rows, cols)
        for r in range(rows):
            for c in range(cols):
                patch = x[:, :, r * s_:r * s_ + p_, c * s_:c * s_ + p_]
                assert torch.equal(patches[:, r, c], patch)
                same(z[:, :, r, c], m.forward_trunk(patch).mean((2, 3)))
        same(m.forward_features(x), z)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in NAMES])
def test_backward_and_grad_checkpointing(name):
    """Train mode: every parameter gets a (non-zero) gradient; checkpointing gives the same outputs and gradients.

    Large variants run one 32 px patch per image; those over 100M parameters (R-161: a 10 s backward on one CPU
    thread) run on the meta device, which checks that every parameter is reached, not the values.
    """
    kwargs = dict(num_classes=7, zero_init_last=False, **(ONE_PATCH if name in LARGE else {}))
    huge = PARAMS[name] > 1e8
    m = (_meta_model(name, **kwargs) if huge else timm.create_model(name, **kwargs)).train()
    x = images(m, size=(ONE_PATCH['patch_size'],) * 2 if name in LARGE else None)
    weights = torch.randn(2, 7, device=x.device)

    def run():
        m.zero_grad(set_to_none=True)
        out = m(x)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad for n, p in m.named_parameters()}

    out, grads = run()
    assert out.shape == (2, 7) and (huge or torch.isfinite(out).all())
    no_grad = [n for n, g in grads.items() if g is None or not (huge or g.abs().sum() > 0)]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'
    m.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in m.stages)
    out_ckpt, grads_ckpt = run()
    same(out_ckpt, out)
    for n, g in grads.items():
        same(grads_ckpt[n], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_group_matcher_covers_every_parameter(name):
    m = create(name, num_classes=5)
    names = sorted(n for n, _ in m.named_parameters())
    depth = sum(len(s.blocks) for s in m.stages)
    for coarse, n_groups in ((False, depth + 2), (True, len(m.stages) + 2)):
        groups = timm.models.group_parameters(m, m.group_matcher(coarse=coarse))
        assert sorted(n for g in groups.values() for n in g) == names  # each parameter exactly once
        assert len(groups) >= n_groups
    param_groups = timm.optim.param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.75)
    covered = [id(p) for g in param_groups for p in g['params']]
    assert sorted(covered) == sorted(id(p) for p in m.parameters())
    scale = {id(p): g['lr_scale'] for g in param_groups for p in g['params']}
    assert scale[id(m.stem.conv.weight)] < scale[id(m.stages[-1].blocks[-1].conv3.weight)] <= 1.0


@pytest.mark.parametrize('name', NAMES)
def test_eval_preprocessing_from_cfg(name):
    m = create(name)
    pc = m.pretrained_cfg
    c, h, w = pc['input_size']
    cfg = timm.data.resolve_model_data_config(m)
    assert cfg['input_size'] == (c, h, w) and cfg['crop_pct'] == pc['crop_pct']
    transform = timm.data.create_transform(**cfg, is_training=False)
    assert transform.transforms[0].size == math.floor(h / pc['crop_pct'])  # resize the short side, then crop
    mode = {3: 'RGB', 1: 'L'}[c]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (h + 37, 2 * w + 13, c), dtype=np.uint8)
    noise = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode)  # odd size, wider than tall
    y = transform(noise)
    assert y.shape == (c, h, w) and y.dtype == torch.float32
    assert m.forward_features(y[None].to(next(m.parameters()).device)).shape == (1, m.num_features, *pc['pool_size'])
    # a uniform grey image comes out as (v - mean) / std per channel
    grey = transform(Image.new(mode, (w + 51, h + 3), color=(200,) * c if c > 1 else 200))
    expected = (200 / 255 - torch.tensor(pc['mean'])) / torch.tensor(pc['std'])
    torch.testing.assert_close(grey, expected[:, None, None].expand(c, h, w), rtol=0, atol=1e-3)


# ---------------------------------------------------------------- the paper's sizes and timm's key names
def test_parameter_counts_match_the_paper():
    assert abs(PARAMS['cpcv2_resnet161'] / 305e6 - 1) < 0.01  # Table 1: 305M
    assert round(PARAMS['cpcv2_resnet50'] / 1e6) == 24  # Sec. 5: 24M (to the nearest million)


def test_param_count_table_script(capsys):
    runpy.run_path(str(ROOT / 'benchmarks' / 'param_counts.py'), run_name='__main__')
    out = capsys.readouterr().out
    assert '| cpcv2_resnet161 |' in out and f'{PARAMS["cpcv2_resnet161"] / 1e6:.2f}M' in out and '305M' in out
    assert all(f'| {n} |' in out for n in NAMES)


_BN_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')


def test_state_dict_keys_match_timm_resnetv2():
    ref = _meta_model('resnetv2_50').state_dict()
    ours_bn = _meta_model('cpcv2_resnet50', num_classes=1000, norm_layer='batchnorm').state_dict()
    assert set(ours_bn) == set(ref)
    assert all(ours_bn[k].shape == ref[k].shape for k in ref if k != 'head.fc.weight')
    assert ours_bn['head.fc.weight'].shape == ref['head.fc.weight'].flatten(1).shape  # Linear vs timm's 1x1 conv
    ours_ln = _meta_model('cpcv2_resnet50', num_classes=1000).state_dict()
    assert set(ours_ln) == {k for k in ref if not k.endswith(_BN_BUFFERS)}
    # the same stage/block names, only deeper and wider
    pattern = r'^(stem\.conv|stages\.\d+\.blocks\.\d+\.(norm[123]|conv[123]|downsample\.conv)|norm)\.(weight|bias)$'
    keys_161 = _meta_model('cpcv2_resnet161').state_dict()
    assert all(re.match(pattern, k) for k in keys_161)
    assert 'stages.2.blocks.45.conv3.weight' in keys_161 and 'stages.3.blocks.0.conv1.weight' not in keys_161


def test_same_function_as_timm_resnetv2_50():
    """With batch norm and dense=True, cpcv2_resnet50 is timm's resnetv2_50 (pre-activation ResNet-v2)."""
    ref = timm.create_model('resnetv2_50', num_classes=0).eval()
    sd = {}
    for k, v in ref.state_dict().items():
        if k.endswith('num_batches_tracked'):
            sd[k] = v
        elif k.endswith('running_var'):
            sd[k] = torch.rand_like(v) + 0.5
        elif v.ndim > 1:
            sd[k] = torch.randn_like(v) / v[0].numel() ** 0.5
        else:
            sd[k] = (1.0 if k.endswith('weight') else 0.0) + 0.1 * torch.randn_like(v)
    ref.load_state_dict(sd)
    ours = timm.create_model('cpcv2_resnet50', norm_layer='batchnorm', dense=True).eval()
    ours.load_state_dict(sd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)


def test_layer_norm_is_groupnorm_with_one_group():
    m = timm.create_model('cpcv2_resnet_tiny')
    norm = m.stages[0].blocks[0].norm1
    assert isinstance(norm, LayerNormAct2d) and isinstance(norm, GroupNorm1Act)
    assert norm.num_groups == 1 and norm.weight.shape == norm.bias.shape == (norm.num_channels,)
    v1 = _meta_model('cpcv1_resnet101')
    assert isinstance(v1.stages[0].blocks[0].norm1, torch.nn.BatchNorm2d)


def _random_affine(norm):
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@pytest.mark.parametrize('shape', [(3, 8, 5, 7), (4, 16, 2, 2), (5, 32, 1, 1), (2, 6, 9, 9)])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_layer_norm_equals_groupnorm_forward_and_backward(shape, channels_last):
    """LayerNormAct2d (F.layer_norm over C, H, W) computes GroupNorm(1, C) + ReLU: outputs and all gradients
    within float tolerance, with the same state dict, in either memory format (which the output keeps)."""
    ours = _random_affine(LayerNormAct2d(shape[1]))
    ref = GroupNorm1Act(shape[1])
    ref.load_state_dict(ours.state_dict())  # same keys and shapes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1
    dy = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [ours(xs[0]), ref(xs[1])]
    for y in ys:
        y.backward(dy)
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    assert ys[0].stride() == ys[1].stride()


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA'))])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_layer_norm_under_autocast_stays_in_bf16_without_copies(device, channels_last):
    """Under bf16 autocast (the CUDA training default) the norm takes and returns bf16 in the input's layout, with
    no full-size copy (dtype cast, contiguous, clone) of the activations, and still computes GroupNorm(1, C) + ReLU
    within bf16 rounding; gradients reach the fp32 parameters. CUDA's autocast lists layer_norm as an fp32 op (the
    copies LayerNormAct2d avoids); the CPU's does not, so on the CPU this checks the layout part only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSizeCopies(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.found = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ('_to_copy', 'clone', 'copy_', 'contiguous') and isinstance(out, torch.Tensor) \
                    and out.numel() == self.numel:
                self.found.append(name)
            return out

    ours = _random_affine(LayerNormAct2d(16))
    ref = GroupNorm1Act(16)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(device), ref.to(device)
    x = (torch.randn(6, 16, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1).bfloat16().to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16), FullSizeCopies(x.numel()) as mode:
        y = ours(x)
        y.backward(torch.ones_like(y))
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    assert mode.found == []
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x.detach().float()), rtol=0.02, atol=0.05)


def test_layer_norm_in_float64_is_groupnorm():
    ours = _random_affine(LayerNormAct2d(8, act_layer=torch.nn.Identity)).double()
    ref = torch.nn.GroupNorm(1, 8).double()
    ref.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_models_with_timm_groupnorm_load_the_same_weights():
    """A model built with timm's GroupNorm1Act (the norm before LayerNormAct2d) has the same state-dict keys and
    computes the same latent grid from the same weights."""
    torch.manual_seed(0)
    ours = timm.create_model('cpcv2_resnet_tiny', num_classes=0).eval()
    ref = timm.create_model('cpcv2_resnet_tiny', num_classes=0, norm_layer='groupnorm1').eval()
    assert not any(isinstance(m, LayerNormAct2d) for m in ref.modules())
    sd = {k: v + 0.1 * torch.randn_like(v) for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kernel, stride', [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_patch_conv_of_a_1x1_map_is_the_convolution(kernel, stride, channels_last):
    """PatchConv2d computes a 1x1 map with the centre taps only, forward and backward, and every other map with the
    convolution itself; it keeps nn.Conv2d's parameters."""
    conv = torch.nn.Conv2d(6, 5, kernel, stride=stride, padding=kernel // 2, bias=kernel == 3)
    ours = PatchConv2d.convert(torch.nn.Sequential(conv))[0]
    assert type(ours) is PatchConv2d and ours.centre_only and list(ours.state_dict()) == ['weight'] + (
        ['bias'] if kernel == 3 else [])
    for size in (1, 4):
        x = torch.randn(3, 6, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [ours(xs[0]), torch.nn.functional.conv2d(xs[1], conv.weight, conv.bias, stride, kernel // 2)]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
        dy = torch.randn_like(ys[1])
        grads = [torch.autograd.grad(y, (xi, conv.weight), dy) for y, xi in zip(ys, xs)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _aten_ops(fn, *args):
    """The aten overload packets ``fn(*args)`` dispatches, and its output."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func._overloadpacket)
            return func(*args, **(kwargs or {}))
    rec = Record()
    with rec:
        out = fn(*args)
    return rec.ops, out


@pytest.mark.parametrize('kernel, padding', [((3, 3), (1, 1)), ((3, 1), (1, 0)), ((1, 5), (0, 2))])
def test_patch_conv_takes_the_matrix_product_only_on_1x1_maps(kernel, padding):
    """The 1x1 map of a 4-D input runs as a matrix product (no convolution op: the speed-up of the deep stacks);
    maps of one row or one column, 2x2 maps and non-square kernels get the convolution's numbers either way."""
    ours = PatchConv2d.convert(torch.nn.Sequential(torch.nn.Conv2d(6, 5, kernel, padding=padding)))[0]
    with torch.no_grad():
        ours.weight.normal_()  # every tap differs: the wrong centre tap would show
    for h, w in ((1, 1), (3, 1), (1, 3), (2, 2)):
        x = torch.randn(2, 6, h, w)
        ops, y = _aten_ops(ours, x)
        torch.testing.assert_close(y, torch.nn.functional.conv2d(x, ours.weight, ours.bias, padding=padding))
        assert (torch.ops.aten.convolution in ops) == ((h, w) != (1, 1)), ((h, w), ops)


def test_patch_conv_leaves_other_convolutions_alone():
    odd = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
                              torch.nn.Conv2d(4, 4, 2, padding=1), torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    PatchConv2d.convert(odd)
    assert not any(m.centre_only for m in odd)  # valid, grouped, even, dilated: the convolution every time
    x = torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(odd[1](x), torch.nn.functional.conv2d(x, odd[1].weight, odd[1].bias, padding=1,
                                                                     groups=2))
    m = timm.create_model('cpcv2_resnet_tiny')
    assert not any(type(c) is torch.nn.Conv2d for c in m.modules())  # every model conv is a PatchConv2d


# ---------------------------------------------------------------- bad input: clear errors
@pytest.fixture(scope='module')
def tiny():
    return timm.create_model('cpcv2_resnet_tiny').eval()


@pytest.mark.parametrize('x, error, match', [
    (torch.randn(1, 3, 28, 28), ValueError, 'Expected 1 input channels, got 3.*in_chans=3'),
    (torch.randn(1, 1, 7, 28), ValueError, 'smaller than one 8x8 patch'),
    (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), TypeError, 'floating-point.*uint8'),
    (torch.randn(1, 28, 28), ValueError, '4-D.*unsqueeze'),
    (torch.randn(1, 1, 1, 28, 28), ValueError, '4-D'),
    (np.zeros((1, 1, 28, 28), dtype=np.float32), TypeError, 'torch.Tensor'),
], ids=['channels', 'too-small', 'uint8', '3-D', '5-D', 'numpy'])
def test_bad_images_raise_clear_errors(tiny, x, error, match):
    for forward in (tiny, tiny.forward_features, tiny.forward_intermediates):
        with pytest.raises(error, match=match):
            forward(x)


def test_bad_input_dense_and_features_only():
    dense = timm.create_model('cpcv2_resnet_tiny', dense=True)
    feats = timm.create_model('cpcv2_resnet_tiny', features_only=True)
    for m in (dense, feats):
        with pytest.raises(ValueError, match='Expected 1 input channels'):
            m(torch.randn(1, 3, 28, 28))
        with pytest.raises(TypeError, match='floating-point'):
            m(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_bad_patches_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match=r'patches \(B, rows, cols, C, P, P\).*patchify'):
        tiny.forward_patches(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match='rows, cols >= 1'):
        tiny.forward_patches(torch.randn(2, 0, 6, 1, 8, 8))
    with pytest.raises(ValueError, match='Expected 1 input channels'):
        tiny.forward_patches(torch.randn(2, 6, 6, 3, 8, 8))


def test_unknown_model_name():
    with pytest.raises(RuntimeError, match=r'Unknown model \(cpcv2_resnet_tinyy\)'):
        timm.create_model('cpcv2_resnet_tinyy')


@pytest.mark.parametrize('name', [n for n in NAMES if not timm.get_pretrained_cfg(n).has_weights])
def test_pretrained_without_weights(name):
    with pytest.raises(RuntimeError, match=f'No pretrained weights are published for "{name}".*pretrained_cfg_overlay'):
        timm.create_model(name, pretrained=True)


def test_checkpoint_of_another_shape_names_the_key(tmp_path):
    other = timm.create_model('cpcv2_resnet_tiny', channels=(64, 128, 192))
    save_file(other.state_dict(), tmp_path / 'other.safetensors')
    with pytest.raises(ValueError, match=r'first mismatching key "stages\.2\.[^"]+" has shape \(192.*\(256'):
        timm.create_model('cpcv2_resnet_tiny', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'other.safetensors')))


def test_training_checkpoint_loads(tmp_path):
    src = timm.create_model('cpcv2_resnet_tiny')
    save_file({f'encoder.{k}': v.contiguous() for k, v in src.state_dict().items()}, tmp_path / 'enc.safetensors')
    m = timm.create_model('cpcv2_resnet_tiny', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'enc.safetensors')))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize('channels_last', [False, True])
def test_spatial_mean_is_the_mean_and_its_gradient_keeps_the_layout(channels_last):
    """spatial_mean == x.mean((2, 3)); the gradient it hands back has the input's memory format (the norm-act
    backward before it is ~10x slower on mismatched layouts)."""
    from cpc_models.encoder import spatial_mean
    x = torch.randn(6, 8, 2, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grads = []
    x.register_hook(grads.append)
    out = spatial_mean(x)
    torch.testing.assert_close(out, x.detach().mean((2, 3)))
    out.backward(torch.randn_like(out))
    (g,) = grads
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert g.is_contiguous(memory_format=fmt)
