"""Gradients of every registered CPC encoder, the large ones (R-161: 305M parameters) included, for real.

Each variant runs in train mode on ONE image holding a 2x2 grid of its native patch size (the smallest grid the
CPC objective accepts with offset 1 in four directions), through the CPC objective, as in pretraining. Every
parameter must receive a finite, non-zero gradient. Models are built with ``zero_init_last=False``: timm's
default zero-initialises the last conv of every residual branch, so at step 0 the layers before it in the branch
get no gradient by design. The small variants are also checked against finite differences in float64.
"""
import gc
import warnings

import pytest
import timm
import torch

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models.objective import CPCObjective

NAMES = timm.list_models('cpcv[12]*')


def _params(name: str) -> int:
    with torch.device('meta'):
        return sum(p.numel() for p in timm.create_model(name).parameters())


PARAMS = {n: _params(n) for n in NAMES}
SMALL = sorted(n for n in NAMES if PARAMS[n] < 5e6)
# over ~10 s on 2 shared cores: every variant but the small ones
VARIANTS = [pytest.param(n, marks=pytest.mark.slow) if n not in SMALL else n for n in NAMES]


def one_image_2x2(model) -> torch.Tensor:
    """One image whose patch grid is 2x2 at the model's own patch size and stride."""
    side = model.patch_size + model.patch_stride
    return torch.randn(1, model.in_chans, side, side, dtype=next(model.parameters()).dtype)


def cpc_loss(model, objective, x) -> torch.Tensor:
    z = model.forward_features(x)
    assert z.shape == (1, model.num_features, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the single-image warning: intended here
        return objective(z).loss


def build(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = timm.create_model(name, zero_init_last=False).train().to(dtype)
    objective = CPCObjective(model.num_features, context_hidden=16, context_blocks=1, target_dim=16, offsets=(1,),
                             directions=4).to(dtype)
    return model, objective


def test_registry_is_covered():
    assert set(NAMES) >= {'cpcv2_resnet161', 'cpcv2_resnet50', 'cpcv1_resnet101', 'cpcv2_resnet_small',
                          'cpcv2_resnet_tiny'}
    assert set(SMALL) == {'cpcv2_resnet_small', 'cpcv2_resnet_tiny', 'cpcv2_resnet_tiny_wide'}


@pytest.mark.parametrize('name', VARIANTS)
def test_every_parameter_gets_a_finite_nonzero_gradient(name):
    model, objective = build(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    loss = cpc_loss(model, objective, one_image_2x2(model))
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing and not not_finite and not zero, (missing[:5], not_finite[:5], zero[:5])
    del model, objective, loss
    gc.collect()


@pytest.mark.parametrize('name', SMALL)
def test_gradient_matches_finite_differences(name):
    """Along a direction d over all parameters, (L(w + e d) - L(w - e d)) / 2e equals <grad L, d>; d is the
    gradient's own direction plus a random one (a purely random direction is nearly orthogonal to it)."""
    model, objective = build(name, torch.float64)
    x = one_image_2x2(model)
    params = list(model.parameters())
    grads = torch.autograd.grad(cpc_loss(model, objective, x), params)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    def unit(vectors):
        norm = torch.sqrt(sum((v ** 2).sum() for v in vectors))
        return [v / norm for v in vectors]

    direction = unit([g + r for g, r in zip(unit(grads), unit(noise))])
    expected = sum((g * d).sum() for g, d in zip(grads, direction)).item()

    def loss_at(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=step)
            value = cpc_loss(model, objective, x).item()
            for p, d in zip(params, direction):
                p.sub_(d, alpha=step)
            return value

    eps = 1e-5
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(expected) > 1e-4  # a direction the loss actually changes along
    assert numeric == pytest.approx(expected, rel=1e-5, abs=1e-9)
