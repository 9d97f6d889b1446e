"""What timm's own model tests ask of every model, kept in this suite (timm's suite itself: tests/timm_suite.sh):
timm's factory kwargs (device, dtype), TorchScript, torch.fx tracing, and fx-based feature extraction, in the grid and
the dense mode. The eager-mode input errors are in test_encoder.py; scripted and traced graphs carry no checks."""
import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureGetterNet
from timm.models._features_fx import FeatureGraphNet
from torchvision.models.feature_extraction import create_feature_extractor

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models.encoder import LayerNormAct2d

NAMES = timm.list_models('cpcv[12]*')
TINY = 'cpcv2_resnet_tiny'  # every variant shares the code; timm's suite runs them all
MODES = pytest.mark.parametrize('dense', [False, True], ids=['grid', 'dense'])
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')


def _model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


def _input(model, batch=2):
    return torch.randn(batch, *model.pretrained_cfg['input_size'], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('name', NAMES)
def test_factory_device_and_dtype(name):
    """timm.create_model forwards device= and dtype= to the model: every tensor is created there, in that dtype."""
    model = timm.create_model(name, device='meta', dtype=torch.bfloat16, num_classes=10)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert tensors and all(t.device.type == 'meta' for _, t in tensors)
    assert all(t.dtype == torch.bfloat16 for _, t in tensors if t.is_floating_point())  # BN's counters stay int64
    model.eval().reset_classifier(0)
    model.reset_classifier(3)  # a new head follows the model's device, dtype and mode
    assert model.head.fc.weight.device.type == 'meta' and model.head.fc.weight.dtype == torch.bfloat16
    assert not any(m.training for m in model.modules())
    with pytest.raises(TypeError):
        timm.create_model(name, device='meta', not_a_model_arg=1)


def test_float64_model_runs_in_float64():
    model = _model(TINY, dtype=torch.float64)
    assert model(_input(model).double()).dtype == torch.float64


@MODES
def test_torchscript_matches_eager(dense):
    model = _model(TINY, dense=dense, num_classes=5)
    x = _input(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x))


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_scripted_layer_norm_is_eager_and_groupnorm(channels_last):
    """LayerNormAct2d's TorchScript branch (F.layer_norm without asking autocast) computes the eager output and
    GroupNorm(1, C) + ReLU, with a non-default eps and affine parameters that are not the identity."""
    norm = LayerNormAct2d(8, eps=0.5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 8, 2, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scripted = torch.jit.script(norm)
    ref = torch.relu(torch.nn.functional.group_norm(x, 1, norm.weight, norm.bias, 0.5))
    torch.testing.assert_close(scripted(x), ref)
    torch.testing.assert_close(scripted(x), norm(x))


@MODES
def test_torchscript_feature_getter(dense):
    """features_only=True (timm's FeatureGetterNet over forward_intermediates) scripts in both modes."""
    model = _model(TINY, features_only=True, dense=dense)
    assert isinstance(model, FeatureGetterNet)
    x = _input(model)
    with torch.no_grad():
        eager, scripted = model(x), torch.jit.script(model)(x)
    assert len(eager) == 4 and all(f.shape[-2:] == (6, 6) for f in eager) != dense
    for a, b in zip(scripted, eager):
        torch.testing.assert_close(a, b)


def _fx(model, return_nodes):
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    return create_feature_extractor(model, return_nodes=return_nodes, tracer_kwargs=tracer_kwargs)


@MODES
def test_fx_trace_matches_eager(dense):
    """torchvision's create_feature_extractor (as timm's fx tests call it), forward and backward."""
    model = _model(TINY, dense=dense, num_classes=5)
    x = _input(model)
    traced = _fx(model, {'stages.1': 'stage1', 'head': 'logits'})
    with torch.no_grad():
        out = traced(x)
        torch.testing.assert_close(out['logits'], model(x))
    assert out['logits'].shape == (2, 5)
    traced.train()(x)['logits'].sum().backward()
    assert all(p.grad is not None for p in traced.parameters())
    scripted = torch.jit.script(_fx(model, {'head': 'logits'}))  # timm also scripts the traced graph
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)['logits'], model(x))


def test_fx_features_only_matches_getter():
    """features_only=True, feature_cls='fx' (module outputs of the dense trunk) = the default getter's maps."""
    fx = _model(TINY, features_only=True, feature_cls='fx')
    getter = _model(TINY, features_only=True)
    assert isinstance(fx, FeatureGraphNet) and fx.feature_info.channels() == getter.feature_info.channels()
    x = _input(fx)
    with torch.no_grad():
        a, b = fx(x), getter(x)
        assert len(a) == len(b) == 4
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb)
        for fa, fb in zip(torch.jit.script(fx)(x), b):
            torch.testing.assert_close(fa, fb)
    timm_fx = timm.models.create_feature_extractor(_model(TINY, dense=True), return_nodes=['stages.2'])
    with torch.no_grad():
        torch.testing.assert_close(timm_fx(x)['stages.2'], b[3])


def test_fx_features_only_needs_the_dense_mode():
    with pytest.raises(ValueError, match="feature_cls='getter'.*dense=True"):
        timm.create_model(TINY, features_only=True, dense=False, feature_cls='fx')
