"""cpc_models.runtime: the per-device defaults and torch.compile with its eager fallback; the hot path of a training
step (encoder trunk, patch encoding, objective) traces into one graph each, without graph breaks."""
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch._dynamo

import cpc_models  # noqa: F401
from cpc_models import runtime
from cpc_models.objective import CPCObjective
from cpc_models.train import build_model, build_optimizer, build_step_setup, compile_model, preset_config, train_step


def test_resolve_and_device_defaults():
    assert runtime.resolve(True, False) is True and runtime.resolve(False, True) is False
    assert runtime.resolve('auto', True) is True and runtime.resolve('auto', False) is False
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        runtime.resolve('yes', True)
    assert runtime.channels_last_default('cuda') and runtime.channels_last_default('cuda:1', 'inference')
    for kind in ('train', 'inference'):
        assert runtime.channels_last_default(torch.device('cpu'), kind) == runtime.CPU_CHANNELS_LAST[kind]
    assert not runtime.channels_last_default('meta')


def test_compile_default_needs_a_long_run_on_a_device_where_it_pays():
    steps, images = runtime.COMPILE_MIN_STEPS, runtime.COMPILE_MIN_IMAGES
    assert runtime.compile_default('cuda', 'train', steps) and not runtime.compile_default('cuda', 'train', steps - 1)
    assert not runtime.compile_default('cpu', 'train', 10 * steps)  # measured no faster on the CPU
    assert runtime.compile_default('cpu', 'inference', images)
    assert not runtime.compile_default('cpu', 'inference', images - 1)


def test_compile_falls_back_to_eager_when_compiling_fails():
    def double(x):
        return x * 2 + 1

    def failing_backend(gm, example_inputs):
        raise RuntimeError('no C++ compiler here')

    run = runtime.compile_with_fallback(double, 'double', backend=failing_backend)
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match=r'torch.compile of double failed .*no C\+\+ compiler here.*eagerly'):
        torch.testing.assert_close(run(x), double(x))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # warned once: later calls go straight to the function
        torch.testing.assert_close(run(x + 1), double(x + 1))


def test_errors_of_the_function_itself_still_raise():
    def checked(x):
        if x.shape[0] > 3:
            raise ValueError('at most 3 rows')
        return x + 1

    run = runtime.compile_with_fallback(checked, backend='eager')
    torch.testing.assert_close(run(torch.zeros(2)), torch.ones(2))
    with pytest.raises(ValueError, match='at most 3 rows'):
        run(torch.zeros(5))


def test_compiled_method_is_temporary_and_keeps_the_state_dict():
    model = timm.create_model('cpcv2_resnet_tiny', num_classes=0).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model.forward_features(x)
        with runtime.compiled_method(model, 'forward_features', backend='eager'):
            assert 'forward_features' in vars(model)
            torch.testing.assert_close(model.forward_features(x), ref)
            assert list(model.state_dict()) == keys
    assert 'forward_features' not in vars(model)  # the class's method again
    with runtime.compiled_method(model, 'forward_features', enabled=False):
        assert 'forward_features' not in vars(model)


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_hot_path_has_no_graph_breaks(channels_last):
    """torch._dynamo.explain: the encoder trunk, the patch encoding and the objective each trace into one graph."""
    cfg = preset_config('fmnist_tiny')
    model = build_model(cfg, torch.device('cpu'))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    patches = torch.randn(2, 6, 6, 1, 8, 8)
    flat = patches.reshape(-1, 1, 8, 8)
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 6, 6, model.encoder.num_features).permute(0, 3, 1, 2)  # the encoder's grid layout
    for name, fn, args in (('trunk', model.encoder.forward_trunk, (flat,)),
                           ('patches', model.encoder.forward_patches, (flat.view(2, 6, 6, 1, 8, 8),)),
                           ('objective', model.objective, (z,))):
        e = _explain(fn, *args)
        assert (e.graph_count, e.graph_break_count) == (1, 0), (name, [b.reason for b in e.break_reasons])


def test_objective_with_one_direction_and_separate_contexts_has_no_graph_breaks():
    for kwargs in (dict(directions=1, offsets=(2, 3, 4)), dict(directions=2, shared_context=False)):
        obj = CPCObjective(32, context_hidden=8, context_blocks=1, **kwargs)
        e = _explain(obj, torch.randn(2, 32, 6, 5))
        assert (e.graph_count, e.graph_break_count) == (1, 0), [b.reason for b in e.break_reasons]


def test_compiled_training_step_matches_eager():
    """compile_model (here with dynamo's eager backend: the captured graphs run as they were traced; inductor
    changes only the kernels) gives the eager step's losses and parameters, and the state dict keeps its keys."""
    cfg = preset_config('fmnist_tiny')
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, torch.device('cpu'))
        keys = list(model.state_dict())
        if compiled:
            torch._dynamo.reset()
            compile_model(model, backend='eager')
        opt = build_optimizer(cfg, model)
        setup = build_step_setup(cfg, model.encoder, torch.device('cpu'))
        losses = [float(train_step(model, images, opt, setup, 1e-3)[0].loss.detach()) for _ in range(2)]
        assert list(model.state_dict()) == keys  # no _orig_mod. prefixes
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (comp_losses, comp_params) = results
    assert eager_losses == pytest.approx(comp_losses, rel=1e-4)
    for a, b in zip(eager_params, comp_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_cpu_model_names_this_machines_cpu():
    names = [line.split(':', 1)[1].strip() for line in Path('/proc/cpuinfo').read_text().splitlines()
             if line.startswith('model name')] if Path('/proc/cpuinfo').is_file() else []
    name = runtime.cpu_model()
    assert name and (name == names[0] if names else True)


def test_checkpointing_auto_from_the_saved_activations():
    """grad_checkpointing 'auto': the activations a step saves, counted on fake tensors, grow with the batch and
    shrink with the fused norm (it saves x, not the activation's output); on the CPU auto means off."""
    import timm

    from cpc_models import fused_norm
    from cpc_models.runtime import checkpointing_default, saved_activation_bytes
    from cpc_models.train import build_model, preset_config
    enc = timm.create_model('cpcv2_resnet_tiny', num_classes=0).to(memory_format=torch.channels_last)
    x = torch.zeros(8, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    one, two = (saved_activation_bytes(enc.forward_trunk, x[:n]) for n in (4, 8))
    assert one > 0 and 1.5 * one < two <= 2 * one  # linear in the batch, plus what does not grow with it
    with fused_norm.forced(True):
        fused = saved_activation_bytes(enc.forward_trunk, x[:4])
    assert 0 < fused < one
    assert not checkpointing_default('cpu', 10 ** 15, 10 ** 15)
    cfg = preset_config('fmnist_tiny')
    assert cfg.grad_checkpointing == 'auto' and preset_config('imagenet_r161').grad_checkpointing == 'auto'
    assert not build_model(cfg, torch.device('cpu')).encoder.grad_checkpointing
