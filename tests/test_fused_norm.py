"""The fused per-sample layer norm + ReLU (cpc_models.fused_norm) against the eager LayerNormAct2d: forward and
gradients, fp32 and bf16, through the plain-torch reference and through the Triton kernels themselves (Triton's
interpreter, TRITON_INTERPRET=1, runs them on CPU tensors)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cpc_models import fused_norm
from cpc_models.encoder import LayerNormAct2d

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh process: Triton reads TRITON_INTERPRET when a kernel is first built.
_COMPARE = textwrap.dedent('''
    import json, sys, torch
    from cpc_models import fused_norm
    from cpc_models.encoder import LayerNormAct2d
    torch.manual_seed(0)
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for c, h, act in ((8, 3, True), (300, 5, True), (16, 1, True), (12, 4, False)):
            m = LayerNormAct2d(c, apply_act=act)
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()
            x = (torch.randn(3, c, h, h) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
            dy = torch.randn(3, c, h, h).to(dtype).contiguous(memory_format=torch.channels_last)
            res = []
            for force in (False, True):
                m.zero_grad()
                xx = x.clone().requires_grad_()
                with fused_norm.forced(force):
                    y = m(xx)
                y.backward(dy)
                res.append([y.float(), xx.grad.float(), m.weight.grad.clone(), m.bias.grad.clone()])
                assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            for name, a, b in zip(('y', 'dx', 'dweight', 'dbias'), *res):
                err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-6)).item()
                key = f'{str(dtype)[6:]}/{name}'
                worst[key] = max(worst.get(key, 0.0), err)
    import timm  # a whole trunk: every residual add fused into the next norm-act (stage boundaries included)
    enc = timm.create_model('cpcv2_resnet_tiny', num_classes=0, layers=(2, 1, 2), zero_init_last=False)
    enc = enc.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n.endswith('.bias') or n.endswith('weight') and p.ndim == 1:
                p.normal_(0.5, 0.3)
    x = torch.randn(3, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    res = []
    for force in (False, True):
        enc.zero_grad()
        with fused_norm.forced(force):
            assert enc._fuse_residuals(enc.stem(x)) == force
            y = enc.forward_trunk(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        res.append([y.detach().clone()] + [p.grad.clone() for p in enc.parameters()])
    worst['trunk/fp32'] = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-6)).item() for a, b in zip(*res))
    print(json.dumps(dict(worst=worst, triton=fused_norm._use_triton(torch.empty(1)))))
''')

TOL = {'float32': 1e-5, 'bfloat16': 2e-2, 'trunk': 1e-4}  # relative to the largest value; bf16: one rounding of y and dx


def _compare(env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, '-c', _COMPARE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(worst):
    assert len(worst) == 9
    for key, err in worst.items():
        assert err < TOL[key.split('/')[0]], (key, err)


def test_reference_path_matches_eager_forward_and_gradients():
    doc = _compare({'TRITON_INTERPRET': '0'})
    assert doc['triton'] is False
    _check(doc['worst'])


@pytest.mark.skipif(not fused_norm.triton_available(), reason='triton cannot be imported')
def test_triton_kernels_match_eager_under_the_interpreter():
    doc = _compare({'TRITON_INTERPRET': '1'})
    assert doc['triton'] is True  # the kernels ran (interpreted), not the reference
    _check(doc['worst'])


# Compile (not run) both kernels for a Hopper GPU with the installed Triton, no GPU needed: what the interpreter does
# not check (Triton's type checks, layouts, its specialization of an int argument equal to 1 as a constant: 1x1 maps).
_COMPILE = textwrap.dedent('''
    import json, os
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cpc_models import fused_norm
    ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    if 'nvidia' not in backends or not os.path.exists(ptxas):
        print(json.dumps(dict(skip='no nvidia backend or ptxas in this Triton'))); raise SystemExit
    fwd, bwd = fused_norm._kernels()
    done = []
    for dt, length, c, flag in (('bf16', 25, 4096, True), ('fp32', 1, 512, False)):
        bl, bc = fused_norm._blocks(length, c)
        shared = dict(L='i32', C='i32', BLOCK_L='constexpr', BLOCK_C='constexpr', RELU='constexpr')
        const = dict(RELU=flag, BLOCK_L=bl, BLOCK_C=bc)
        if length == 1:  # what Triton's launcher does with an int argument equal to 1
            shared['L'], const['L'] = 'constexpr', 1
        sig = dict(X='*' + dt, X2='*' + dt, S='*' + dt, W='*fp32', B='*fp32', Y='*' + dt, Mean='*fp32',
                   Rstd='*fp32', eps='fp32', ADD='constexpr', **shared)
        for fn, sig, extra in ((fwd, sig, dict(ADD=flag)),
                               (bwd, dict(DY='*' + dt, X='*' + dt, W='*fp32', B='*fp32', Mean='*fp32', Rstd='*fp32',
                                          DS='*' + dt, DX='*' + dt, DWB='*fp32', HAS_DS='constexpr', **shared),
                                dict(HAS_DS=flag))):
            sig = {k: sig[k] for k in fn.arg_names}
            kernel = triton.compile(ASTSource(fn, sig, dict(const, **extra)), target=GPUTarget('cuda', 90, 32))
            done.append(len(kernel.asm['cubin']))
    print(json.dumps(dict(triton=triton.__version__, cubin_bytes=done)))
''')


@pytest.mark.skipif(not fused_norm.triton_available(), reason='triton cannot be imported')
def test_triton_kernels_compile_for_hopper():
    """The device's compiler path, on the CPU: forward and backward, bf16 with the residual add and ReLU, and fp32 on a
    1x1 map (L specialized to 1) without them, each to an sm_90 cubin."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET='0')
    out = subprocess.run([sys.executable, '-c', _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    if 'skip' in doc:
        pytest.skip(doc['skip'])
    assert len(doc['cubin_bytes']) == 4 and min(doc['cubin_bytes']) > 0, doc


def test_fused_step_has_no_per_channel_expand_cast_or_sum():
    """Forward + backward of one norm-act under autocast: the fused op, its backward and the one reduction over the
    samples; nothing expands, casts or sums the (C,) weight and bias (the eager path does, every call)."""
    from benchmarks.roofline import OpRecorder
    m = LayerNormAct2d(16)
    x = torch.randn(4, 16, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    counts = {}
    for force in (True, False):
        rec = OpRecorder()
        rec.phase = 'forward'
        with fused_norm.forced(force), rec, torch.autocast('cpu', dtype=torch.bfloat16):
            y = m(x.to(torch.bfloat16))
            y.float().sum().backward()
        counts[force] = [o['op'] for o in rec.ops if o['kernel']]
    fused = counts[True]
    assert fused.count('layer_norm_act') == 1 and fused.count('layer_norm_act_backward') == 1
    assert fused.count('sum') == 2  # the loss's sum and the one reduction of dweight/dbias over the samples
    assert m.weight.grad.dtype == torch.float32 and m.weight.grad.shape == (16,)
    assert '_to_copy' in counts[False] and counts[False].count('sum') > 2  # what the fused path removes
    assert len(fused) < len(counts[False])


def test_state_dict_and_choice_of_path():
    m = LayerNormAct2d(8)
    assert sorted(m.state_dict()) == ['bias', 'weight']  # timm GroupNorm1Act's keys: checkpoints load unchanged
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert not fused_norm.use_fused(x, m.act, m.drop, True)  # CPU: eager by default
    with fused_norm.forced(True):
        assert fused_norm.use_fused(x, m.act, m.drop, True)
        assert not fused_norm.use_fused(x.contiguous(), m.act, m.drop, True)  # NCHW stays eager
        assert not fused_norm.use_fused(x, torch.nn.GELU(), m.drop, True)  # only ReLU / identity are fused


def test_fused_encoder_traces_without_graph_breaks():
    import timm
    enc = timm.create_model('cpcv2_resnet_tiny', num_classes=0).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with fused_norm.forced(True):
        explain = torch._dynamo.explain(enc.forward_trunk)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_fused_trunk_under_autocast_casts_weights_once_and_matches_eager():
    """bf16 autocast: the fused trunk casts every convolution weight in one multi-tensor copy (and the gradients back
    in one), with the same output and fp32 gradients as the eager trunk within bf16 rounding."""
    import timm

    from benchmarks.roofline import OpRecorder
    torch.manual_seed(0)
    enc = timm.create_model('cpcv2_resnet_tiny', num_classes=0, layers=(2, 1, 1), zero_init_last=False)
    enc = enc.to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    res, ops = [], []
    for force in (False, True):
        enc.zero_grad()
        rec = OpRecorder()
        rec.phase = 'forward'
        with fused_norm.forced(force), rec, torch.autocast('cpu', dtype=torch.bfloat16):
            y = enc.forward_trunk(x)
            y.float().square().mean().backward()
        ops.append([o['op'] for o in rec.ops if o['kernel']])
        res.append([y.float()] + [p.grad for p in enc.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in enc.parameters())
    for a, b in zip(*res):
        assert ((a - b).abs().max() / a.abs().max().clamp_min(1e-6)).item() < 5e-2
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in enc.stages.modules())
    assert ops[1].count('_foreach_copy_') == 2  # the weights to bf16, their gradients back to fp32
    assert ops[0].count('_to_copy') >= 2 * convs > ops[1].count('_to_copy')
