"""CPC v2's per-sample layer norm + ReLU as one op for channels_last maps: a Triton kernel on CUDA, forward and backward.

The norm of :class:`cpc_models.encoder.LayerNormAct2d` (each sample over (C, H, W), per-channel affine, then the
activation) on an NHWC sample viewed as (L = H * W, C):

    y = act((x - mean) * rstd * weight[c] + bias[c])          mean, rstd over the whole sample, fp32

Forward: one kernel per step, one program per sample: a pass for the mean, one for the variance of (x - mean) (the
sample stays in L2 between the passes), one that writes y; it saves x, mean and rstd (not y). Backward: one kernel,
one program per sample, that recomputes the ReLU mask from x, writes dx and the sample's per-channel partial sums of
dweight and dbias (fp32), which one ``sum`` over the samples reduces: the per-channel parameters are read as they are
(fp32, shape (C,)) and their gradients come back in that dtype: no expand, no cast, no (C, H, W)-sized weight.

Registered as the custom ops ``cpc_models::layer_norm_act`` / ``cpc_models::layer_norm_act_backward``
(torch.library, with fake implementations, so torch.compile and fake-tensor counting see one op each). Their
implementation: the Triton kernels on CUDA (and on CPU tensors when ``TRITON_INTERPRET=1``, Triton's interpreter,
which the tests use), else a reference in plain torch ops (same arithmetic, fp32 statistics).

:func:`use_fused` decides per call: CUDA, a channels_last input, Triton importable, ReLU or no activation, no
dropout, affine; :func:`forced` overrides it (tests, and ``benchmarks.roofline`` counting the CUDA step on the CPU).
``CPC_FUSED_NORM=0`` in the environment (read at import) turns it off (the eager ``F.layer_norm`` path).
"""
import contextlib
import functools
import os
from typing import Iterator, Optional, Tuple

import torch

__all__ = ['add_layer_norm_act_nhwc', 'cast_all', 'forced', 'layer_norm_act_nhwc', 'triton_available', 'use_fused']

_FORCE: list = [None]  # None: decide per call; True / False: forced
_ENABLED = os.environ.get('CPC_FUSED_NORM', '1') != '0'  # read once: torch.compile traces use_fused without a break
_TRITON: list = [None]  # whether Triton imports, found out once


def triton_available() -> bool:
    """Whether Triton imports (it ships with torch's CUDA wheels)."""
    if _TRITON[0] is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON[0] = True
        except Exception:  # ImportError, or a broken install: the eager path works without it
            _TRITON[0] = False
    return _TRITON[0]


def _interpret() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


@contextlib.contextmanager
def forced(enabled: Optional[bool]) -> Iterator[None]:
    """Within the block, :func:`use_fused` answers ``enabled`` whatever the device (None: decide per call)."""
    before = _FORCE[0]
    _FORCE[0] = enabled
    try:
        yield
    finally:
        _FORCE[0] = before


def use_fused(x: torch.Tensor, act: torch.nn.Module, drop: torch.nn.Module, affine: bool) -> bool:
    """The fused op for this call of a norm-act layer: channels_last 4-D input, ReLU or identity, no dropout, affine;
    and CUDA with Triton (unless :func:`forced` or ``CPC_FUSED_NORM=0`` says otherwise)."""
    if not (affine and isinstance(drop, torch.nn.Identity) and type(act) in (torch.nn.ReLU, torch.nn.Identity)):
        return False
    if not (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)):  # (1x1 maps: both layouts)
        return False
    if _FORCE[0] is not None:
        return _FORCE[0]
    return _ENABLED and x.device.type == 'cuda' and triton_available()


def layer_norm_act_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        relu: bool) -> torch.Tensor:
    """x (N, C, H, W) channels_last -> act(layer_norm over (C, H, W), per-channel affine), same shape, dtype and
    memory format. ``weight``, ``bias``: (C,), any float dtype (read as they are)."""
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: (N, L, C), contiguous
    y = torch.ops.cpc_models.layer_norm_act(flat, weight, bias, eps, relu)[0]
    return y.view(n, h, w, c).permute(0, 3, 1, 2)


def add_layer_norm_act_nhwc(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                            relu: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm-act in one op: channels_last a, b (N, C, H, W) -> (s = a + b,
    act(layer_norm(s))), both channels_last; in backward the gradient of s from its other uses is summed in the norm's
    kernel (no separate add)."""
    n, c, h, w = a.shape
    if b.dtype != a.dtype:  # eager's add promotes (autocast: bf16 branches on a bf16 stream, so rarely)
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    fa = a.permute(0, 2, 3, 1).reshape(n, h * w, c)
    fb = b.permute(0, 2, 3, 1).reshape(n, h * w, c)
    s, y = torch.ops.cpc_models.add_layer_norm_act(fa, fb, weight, bias, eps, relu)[:2]
    return s.view(n, h, w, c).permute(0, 3, 1, 2), y.view(n, h, w, c).permute(0, 3, 1, 2)


# ---------------------------------------------------------------- reference (plain torch, fp32 statistics)

def _stats_ref(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    mean = xf.mean((1, 2))
    var = (xf - mean[:, None, None]).square().mean((1, 2))
    return mean, torch.rsqrt(var + eps)


def _forward_ref(x, weight, bias, eps, relu):
    mean, rstd = _stats_ref(x, eps)
    y = (x.float() - mean[:, None, None]) * rstd[:, None, None] * weight.float() + bias.float()
    return (y.clamp_min(0) if relu else y).to(x.dtype), mean, rstd


def _backward_ref(dy, x, weight, bias, mean, rstd, relu):
    xhat = (x.float() - mean[:, None, None]) * rstd[:, None, None]
    g = dy.float()
    if relu:
        g = g * ((xhat * weight.float() + bias.float()) > 0)
    dxhat = g * weight.float()
    count = x.shape[1] * x.shape[2]
    s1 = dxhat.sum((1, 2), keepdim=True) / count
    s2 = (dxhat * xhat).sum((1, 2), keepdim=True) / count
    dx = (dxhat - s1 - xhat * s2) * rstd[:, None, None]
    partial = torch.cat([(g * xhat).sum(1), g.sum(1)], 1)  # per sample: dweight, dbias (N, 2C)
    return dx.to(x.dtype), partial


# ---------------------------------------------------------------- Triton kernels

def _blocks(length: int, channels: int) -> Tuple[int, int]:
    import triton
    block_c = min(triton.next_power_of_2(channels), 256)
    block_l = max(1, min(triton.next_power_of_2(length), 4096 // block_c))
    return block_l, block_c


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile-on-first-use Triton kernels (importing this module never imports Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(X, X2, S, W, B, Y, Mean, Rstd, L, C, eps, RELU: tl.constexpr, ADD: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        base = n.to(tl.int64) * L * C
        offs_l = tl.arange(0, BLOCK_L)
        offs_c = tl.arange(0, BLOCK_C)
        count = (L * C).to(tl.float32)
        acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            for c0 in range(0, C, BLOCK_C):
                ls, cs = l0 + offs_l, c0 + offs_c
                m = (ls[:, None] < L) & (cs[None, :] < C)
                x = tl.load(X + base + ls[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
                if ADD:  # the residual sum, rounded to the stream's dtype as the eager add rounds it
                    x2 = tl.load(X2 + base + ls[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
                    x = (x + x2).to(S.dtype.element_ty).to(tl.float32)
                acc += x
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            for c0 in range(0, C, BLOCK_C):
                ls, cs = l0 + offs_l, c0 + offs_c
                m = (ls[:, None] < L) & (cs[None, :] < C)
                x = tl.load(X + base + ls[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
                if ADD:  # the residual sum, rounded to the stream's dtype as the eager add rounds it
                    x2 = tl.load(X2 + base + ls[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
                    x = (x + x2).to(S.dtype.element_ty).to(tl.float32)
                d = tl.where(m, x - mean, 0.0)
                acc += d * d
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(Mean + n, mean)
        tl.store(Rstd + n, rstd)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + offs_c
            w = tl.load(W + cs, mask=cs < C, other=0.0).to(tl.float32)
            b = tl.load(B + cs, mask=cs < C, other=0.0).to(tl.float32)
            for l0 in range(0, L, BLOCK_L):
                ls = l0 + offs_l
                m = (ls[:, None] < L) & (cs[None, :] < C)
                ptr = base + ls[:, None] * C + cs[None, :]
                x = tl.load(X + ptr, mask=m, other=0.0).to(tl.float32)
                if ADD:
                    x = (x + tl.load(X2 + ptr, mask=m, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
                    tl.store(S + ptr, x, mask=m)
                    x = x.to(tl.float32)
                y = (x - mean) * rstd * w[None, :] + b[None, :]
                if RELU:
                    y = tl.maximum(y, 0.0)
                tl.store(Y + ptr, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def backward_kernel(DY, X, W, B, Mean, Rstd, DS, DX, DWB, L, C, RELU: tl.constexpr, HAS_DS: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0)
        base = n.to(tl.int64) * L * C
        offs_l = tl.arange(0, BLOCK_L)
        offs_c = tl.arange(0, BLOCK_C)
        count = (L * C).to(tl.float32)
        mean = tl.load(Mean + n)
        rstd = tl.load(Rstd + n)
        s1 = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):  # pass 1: the sample's two sums, and its per-channel dweight, dbias
            cs = c0 + offs_c
            w = tl.load(W + cs, mask=cs < C, other=0.0).to(tl.float32)
            b = tl.load(B + cs, mask=cs < C, other=0.0).to(tl.float32)
            dw = tl.zeros([BLOCK_C], dtype=tl.float32)
            db = tl.zeros([BLOCK_C], dtype=tl.float32)
            for l0 in range(0, L, BLOCK_L):
                ls = l0 + offs_l
                m = (ls[:, None] < L) & (cs[None, :] < C)
                ptr = base + ls[:, None] * C + cs[None, :]
                xhat = (tl.load(X + ptr, mask=m, other=0.0).to(tl.float32) - mean) * rstd
                g = tl.load(DY + ptr, mask=m, other=0.0).to(tl.float32)
                if RELU:
                    g = tl.where(xhat * w[None, :] + b[None, :] > 0, g, 0.0)
                g = tl.where(m, g, 0.0)
                xhat = tl.where(m, xhat, 0.0)
                dxhat = g * w[None, :]
                s1 += dxhat
                s2 += dxhat * xhat
                dw += tl.sum(g * xhat, axis=0)
                db += tl.sum(g, axis=0)
            row = DWB + n.to(tl.int64) * 2 * C
            tl.store(row + cs, dw, mask=cs < C)
            tl.store(row + C + cs, db, mask=cs < C)
        mean_dxhat = tl.sum(tl.sum(s1, axis=1), axis=0) / count
        mean_dxhat_xhat = tl.sum(tl.sum(s2, axis=1), axis=0) / count
        for c0 in range(0, C, BLOCK_C):  # pass 2: dx
            cs = c0 + offs_c
            w = tl.load(W + cs, mask=cs < C, other=0.0).to(tl.float32)
            b = tl.load(B + cs, mask=cs < C, other=0.0).to(tl.float32)
            for l0 in range(0, L, BLOCK_L):
                ls = l0 + offs_l
                m = (ls[:, None] < L) & (cs[None, :] < C)
                ptr = base + ls[:, None] * C + cs[None, :]
                xhat = (tl.load(X + ptr, mask=m, other=0.0).to(tl.float32) - mean) * rstd
                g = tl.load(DY + ptr, mask=m, other=0.0).to(tl.float32)
                if RELU:
                    g = tl.where(xhat * w[None, :] + b[None, :] > 0, g, 0.0)
                dx = (g * w[None, :] - mean_dxhat - xhat * mean_dxhat_xhat) * rstd
                if HAS_DS:  # the residual stream's gradient from its other uses, summed here (no separate add)
                    dx += tl.load(DS + ptr, mask=m, other=0.0).to(tl.float32)
                tl.store(DX + ptr, dx.to(DX.dtype.element_ty), mask=m)

    return forward_kernel, backward_kernel


def _use_triton(x: torch.Tensor) -> bool:
    return triton_available() and (x.device.type == 'cuda' or (_interpret() and x.device.type == 'cpu'))


# ---------------------------------------------------------------- the custom ops

def _forward(x, x2, weight, bias, eps, relu):
    """(s or None, y, mean, rstd) of x (+ x2), each (N, L, C) contiguous."""
    if not _use_triton(x):
        s = x + x2 if x2 is not None else None
        return (s, *_forward_ref(s if s is not None else x, weight, bias, eps, relu))
    n, length, c = x.shape
    x = x.contiguous()
    x2 = x2.contiguous() if x2 is not None else None
    y = torch.empty_like(x)
    s = torch.empty_like(x) if x2 is not None else None
    mean = torch.empty(n, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n, device=x.device, dtype=torch.float32)
    block_l, block_c = _blocks(length, c)
    _kernels()[0][(n,)](x, x2 if x2 is not None else x, s if s is not None else y, weight.contiguous(),
                        bias.contiguous(), y, mean, rstd, length, c, eps, RELU=relu, ADD=x2 is not None,
                        BLOCK_L=block_l, BLOCK_C=block_c)
    return s, y, mean, rstd


@torch.library.custom_op('cpc_models::layer_norm_act', mutates_args=())
def _layer_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    relu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, L, C) contiguous -> (y (N, L, C) in x's dtype, mean (N,) fp32, rstd (N,) fp32)."""
    return _forward(x, None, weight, bias, eps, relu)[1:]


@_layer_norm_act.register_fake
def _(x, weight, bias, eps, relu):
    n = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op('cpc_models::add_layer_norm_act', mutates_args=())
def _add_layer_norm_act(x: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        relu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual sum and its norm-act in one pass: x, x2 (N, L, C) -> (s = x + x2, y = act(norm(s)), mean, rstd)."""
    return _forward(x, x2, weight, bias, eps, relu)


@_add_layer_norm_act.register_fake
def _(x, x2, weight, bias, eps, relu):
    n = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(n, dtype=torch.float32),
            x.new_empty(n, dtype=torch.float32))


@torch.library.custom_op('cpc_models::layer_norm_act_backward', mutates_args=())
def _layer_norm_act_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor, relu: bool,
                             ds: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of y (+ ``ds``, the normalized tensor's gradient from its other uses): (dx (N, L, C) in x's dtype,
    per-sample partial sums of dweight and dbias (N, 2C) fp32, which the autograd formula reduces over the samples)."""
    if not _use_triton(x):
        dx, partial = _backward_ref(dy, x, weight, bias, mean, rstd, relu)
        return (dx + ds if ds is not None else dx), partial
    n, length, c = x.shape
    dy, x = dy.contiguous(), x.contiguous()
    ds = ds.contiguous() if ds is not None else None
    dx = torch.empty_like(x)
    partial = torch.empty(n, 2 * c, device=x.device, dtype=torch.float32)  # per sample: dweight, dbias
    block_l, block_c = _blocks(length, c)
    _kernels()[1][(n,)](dy, x, weight.contiguous(), bias.contiguous(), mean, rstd, ds if ds is not None else dy,
                        dx, partial, length, c, RELU=relu, HAS_DS=ds is not None, BLOCK_L=block_l,
                        BLOCK_C=block_c)
    return dx, partial


@_layer_norm_act_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, relu, ds):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[0], 2 * x.shape[2], dtype=torch.float32))


def _param_grads(partial, weight, bias):
    c = weight.shape[0]
    dwb = partial.sum(0)  # one reduction over the samples, fp32; the slices are views
    dw, db = dwb[:c], dwb[c:]
    return dw if weight.dtype == dw.dtype else dw.to(weight.dtype), db if bias.dtype == db.dtype else db.to(bias.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, relu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
    ctx.relu = relu


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, partial = torch.ops.cpc_models.layer_norm_act_backward(dy, x, weight, bias, mean, rstd, ctx.relu, None)
    return dx, *_param_grads(partial, weight, bias), None, None


def _add_setup_context(ctx, inputs, output):
    _, _, weight, bias, eps, relu = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.relu = relu


def _add_backward(ctx, ds, dy, _dmean, _drstd):
    s, weight, bias, mean, rstd = ctx.saved_tensors
    if dy is None:  # only the sum was used
        return ds, ds, None, None, None, None
    dx, partial = torch.ops.cpc_models.layer_norm_act_backward(dy, s, weight, bias, mean, rstd, ctx.relu, ds)
    return dx, dx, *_param_grads(partial, weight, bias), None, None


_layer_norm_act.register_autograd(_backward, setup_context=_setup_context)
_add_layer_norm_act.register_autograd(_add_backward, setup_context=_add_setup_context)


class _CastAll(torch.autograd.Function):
    """Many tensors to one dtype in one multi-tensor copy (``torch._foreach_copy_``), the gradients back the same way:
    what autocast does with one cast kernel per weight and forward, and one per gradient in backward."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor):
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.set_materialize_grads(False)
        out = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(out, list(tensors))
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        idx = [i for i, g in enumerate(grads) if g is not None]
        out = [None] * len(grads)
        if idx:
            dst = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in idx]
            torch._foreach_copy_(dst, [grads[i] for i in idx])
            for i, d in zip(idx, dst):
                out[i] = d
        return (None, *out)


def cast_all(tensors, dtype: torch.dtype):
    """``[t.to(dtype) for t in tensors]`` (differentiable) as one multi-tensor copy each way."""
    return _CastAll.apply(dtype, *tensors)
