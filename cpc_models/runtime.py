"""Per-device runtime choices: memory layout, precision and torch.compile (with an eager fallback).

The defaults are what measured faster on each device (docs/benchmarks.md, "Layout, precision and compilation"):

* ``channels_last``: on for CUDA (tensor-core convolutions run NHWC); on the CPU only where measured faster
  (:data:`CPU_CHANNELS_LAST`).
* bf16 autocast: CUDA (``TrainConfig.bf16``); on the CPU only when asked (``bf16_cpu``): it measured 1.5x a58a1bb's
  fp32 step on an AVX512-BF16 CPU but changes the loss curve by bf16 rounding, so fp32 stays the CPU default.
* ``torch.compile``: where its compile time is paid back, i.e. long runs on a device where the compiled code measured
  faster (:data:`COMPILE_DEVICES`): pretraining runs of at least :data:`COMPILE_MIN_STEPS` steps on CUDA (on the CPU
  the compiled training step measured no faster than eager), extractions of at least :data:`COMPILE_MIN_IMAGES`
  images on the CPU and CUDA.

A setting is ``True``/``False`` or ``'auto'`` (:data:`Switch`); :func:`resolve` turns ``'auto'`` into the default.
DataLoader worker counts are capped to the cores this process may use (:func:`cap_workers`): more workers than
cores only compete for them (torch warns, and 2 steps of the stl10_small preset's 4 workers took 2m39s on 2 cores).
"""
import contextlib
import functools
import os
import platform
import warnings
from pathlib import Path
from typing import Callable, Iterator, Literal, Union

import torch
import torch.nn as nn

__all__ = ['Switch', 'AUTO', 'CPU_CHANNELS_LAST', 'COMPILE_MIN_STEPS', 'COMPILE_MIN_IMAGES', 'resolve',
           'channels_last_default', 'compile_default', 'compile_with_fallback', 'compile_method', 'compiled_method',
           'cpu_model', 'available_cores', 'cap_workers', 'tune_cudnn', 'saved_activation_bytes',
           'checkpointing_default', 'MEMORY_HEADROOM']

Kind = Literal['train', 'inference']

Switch = Union[bool, Literal['auto']]
AUTO = 'auto'

# The CPU layout of the measured step: {'train': ..., 'inference': ...} (benchmarks/results/layout_cpu.md).
CPU_CHANNELS_LAST = {'train': True, 'inference': True}
# torch.compile pays back its compile time (tens of seconds to minutes) only over long runs.
COMPILE_MIN_STEPS = 1000
COMPILE_MIN_IMAGES = 20000
# Where the compiled code measured faster (CUDA: expected, not measured on a GPU yet; docs/benchmarks.md).
COMPILE_DEVICES = {'train': ('cuda',), 'inference': ('cpu', 'cuda')}


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cap_workers(num_workers: int) -> int:
    """``num_workers`` DataLoader processes, at most :func:`available_cores` (0 stays 0: load in this process)."""
    return min(num_workers, available_cores())


def resolve(setting: Switch, default: bool) -> bool:
    """``setting`` if it is a bool, else (``'auto'``) ``default``."""
    if isinstance(setting, bool):
        return setting
    if setting != AUTO:
        raise ValueError(f"Expected True, False or 'auto', got {setting!r}.")
    return default


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else platform's answer): what benchmarks and model cards record."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def _device_type(device) -> str:
    return torch.device(device).type


def channels_last_default(device, kind: Kind = 'train') -> bool:
    """channels_last on CUDA; on the CPU as measured (:data:`CPU_CHANNELS_LAST`); off elsewhere."""
    kind_type = _device_type(device)
    if kind_type == 'cuda':
        return True
    return CPU_CHANNELS_LAST[kind] if kind_type == 'cpu' else False


def compile_default(device, kind: Kind, work: int) -> bool:
    """torch.compile by default for ``kind`` on a device where it measured faster, when the run is long: ``work``
    training steps >= COMPILE_MIN_STEPS, or images to encode >= COMPILE_MIN_IMAGES."""
    least = COMPILE_MIN_STEPS if kind == 'train' else COMPILE_MIN_IMAGES
    return _device_type(device) in COMPILE_DEVICES[kind] and work >= least


def tune_cudnn(device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest
    (``torch.backends.cudnn.benchmark``): training steps and extraction batches repeat the same shapes."""
    if _device_type(device) == 'cuda':
        torch.backends.cudnn.benchmark = True


# Checkpointing is switched on when the step's estimated peak would exceed this share of the free device memory.
MEMORY_HEADROOM = 0.85


def saved_activation_bytes(fn: Callable, *args, autocast_dtype=None) -> int:
    """Bytes of the tensors autograd saves for backward when ``fn(*args)`` runs (the activations a training step
    holds at its peak), counted on fake tensors: no memory, no arithmetic. Parameters saved as they are do not
    count (they are resident anyway); their autocast copies do."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    total = [0]

    def pack(t):
        if not isinstance(t, nn.Parameter):
            total[0] += t.numel() * t.element_size()
        return t

    kind = args[0].device.type
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.autocast(kind, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            fn(*fake)
    return total[0]


def checkpointing_default(device, activation_bytes: int, resident_bytes: int) -> bool:
    """Gradient checkpointing for ``auto``: on CUDA when the step's saved activations plus what stays resident
    (parameters, gradients, optimizer state) exceed :data:`MEMORY_HEADROOM` of the device's free memory; never on
    other devices (host memory is not measured)."""
    if _device_type(device) != 'cuda':
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return activation_bytes + resident_bytes > MEMORY_HEADROOM * free


# Raised by torch.compile when it cannot compile (no C++ compiler, unsupported op, backend failure).
_COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException,)


def _summary(e: Exception) -> str:
    """The first line of an error, and the next one when the first only announces it ("backend='x' raised:")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = ' '.join(lines[:2]) if lines and lines[0].endswith(':') else (lines[0] if lines else '')
    return text[:300]


def compile_with_fallback(fn: Callable, name: str = '', **compile_kwargs) -> Callable:
    """``torch.compile(fn, **compile_kwargs)`` that falls back to ``fn`` itself, with one warning, if compiling fails.

    Compilation happens at the first call (and again for new input shapes); an error of torch.compile there (e.g.
    no working C++ compiler for the inductor backend) switches this wrapper to ``fn`` for good. Errors of ``fn``
    itself still raise: the eager call raises them again.
    """
    compiled = torch.compile(fn, **compile_kwargs)
    current = [compiled]

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if current[0] is fn:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except _COMPILE_ERRORS as e:
            current[0] = fn
            warnings.warn(f'torch.compile of {name or getattr(fn, "__qualname__", fn)} failed ({type(e).__name__}: '
                          f'{_summary(e)}); running it eagerly. Set compile off to skip compiling.', RuntimeWarning,
                          stacklevel=2)
            return fn(*args, **kwargs)
    run.compiled = compiled
    return run


def compile_method(module: nn.Module, name: str, **compile_kwargs) -> None:
    """Compile ``module.<name>`` in place (an instance attribute over the class's method) with the eager fallback;
    parameters and state-dict keys are unchanged. ``del module.<name>`` undoes it."""
    setattr(module, name, compile_with_fallback(getattr(module, name), f'{type(module).__name__}.{name}',
                                                **compile_kwargs))


@contextlib.contextmanager
def compiled_method(module: nn.Module, name: str, enabled: bool = True, **compile_kwargs) -> Iterator[nn.Module]:
    """Within the block, ``module.<name>`` is compiled (:func:`compile_method`); afterwards it is what it was."""
    if not enabled:
        yield module
        return
    missing = object()
    before = module.__dict__.get(name, missing)
    compile_method(module, name, **compile_kwargs)
    try:
        yield module
    finally:
        if before is missing:
            delattr(module, name)
        else:
            setattr(module, name, before)
