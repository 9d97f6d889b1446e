"""Checks of what a user gives the command lines, made before any work: model names and tags, devices, output files;
and :func:`create_model`, timm's by any name a user may give, with errors that say what to do.

Every check raises :class:`~cpc_models.config.ConfigError`: one line naming the option and what it accepts. The
command lines (``cpc-train``, ``cpc-eval``, ``cpc-extract``, ``cpc-demo``, ``python -m cpc_models.hub``, the
benchmarks) print it and exit with status 2; their exit statuses are 0 (done), 2 (bad input: one line says what to
change), 130 / 143 (stopped by SIGINT / SIGTERM after saving what can be resumed).
"""
import os
from pathlib import Path
from typing import Dict, Optional, Union

import timm
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from . import encoder as _encoder  # noqa: F401  (registers the architectures: names are checked against timm)
from ._weights import hub_unreachable_message
from .config import ConfigError, did_you_mean

__all__ = ['HUB_PREFIXES', 'check_model_name', 'check_device', 'check_out_file', 'check_out_dir', 'create_model',
           'one_line']

HUB_PREFIXES = ('hf-hub:', 'hf_hub:')
LOCAL_PREFIX = 'local-dir:'


def _tags(arch: str):
    return [n.split('.', 1)[1] for n in timm.list_pretrained(f'{arch}.*')]


def check_model_name(name: str, key: str = '--model') -> None:
    """A timm name (``arch`` or ``arch.tag``), ``hf-hub:ORG/NAME`` or ``local-dir:DIR``; unknown architectures and tags
    get the close names and the valid list."""
    if name.startswith(HUB_PREFIXES):
        repo = name.split(':', 1)[1].split('@')[0]
        if repo.count('/') != 1 or not all(repo.split('/')):
            raise ConfigError(f'{key} {name}: a Hub model is written hf-hub:ORG/NAME')
        return
    if name.startswith(LOCAL_PREFIX):
        folder = Path(name[len(LOCAL_PREFIX):]).expanduser()
        if not (folder / 'config.json').is_file():
            what = 'has no config.json' if folder.is_dir() else 'is not a folder'
            raise ConfigError(f'{key} {name}: {folder} {what}; local-dir: takes a published folder (model.safetensors, '
                              f'config.json), e.g. one written by `python -m cpc_models.hub export`')
        return
    arch, tag = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        cpc = timm.list_models('cpc*')
        hint = did_you_mean(arch, cpc, 0.5) or did_you_mean(arch, timm.list_models(), 0.75)
        raise ConfigError(f'{key} {name}: unknown model{hint}; CPC models: {", ".join(cpc)} (add a published tag as '
                          f'NAME.TAG: {", ".join(timm.list_pretrained("cpc*")) or "none"}; or hf-hub:ORG/NAME, '
                          f'local-dir:DIR)')
    if tag and tag not in _tags(arch):
        tags = _tags(arch)
        raise ConfigError(f'{key} {name}: {arch} has no tag "{tag}"{did_you_mean(tag, tags, 0.5)}; its tags: '
                          f'{", ".join(tags) or "none (no published weights)"}')


def check_device(name: str, key: str = '--device') -> torch.device:
    """The device ``name`` means (``auto`` = cuda if available, else cpu), if this machine has it."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f'{key} {name}: not a device; use auto, cpu, cuda, cuda:N or mps') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'{key} {name}: this machine has no usable CUDA GPU (torch.cuda.is_available() is '
                              f'False); use --device cpu (or auto)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f'{key} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), '
                              f'cuda:0 to cuda:{torch.cuda.device_count() - 1}')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError(f'{key} {name}: MPS is not available on this machine; use --device cpu (or auto)')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise ConfigError(f'{key} {name}: not supported here; use auto, cpu, cuda, cuda:N or mps')
    return device


def check_out_file(path: Union[str, os.PathLike], key: str = '--out', suffix: str = '') -> Path:
    """A file to write: not an existing folder, and its folder (created if missing) not a file; named with
    ``suffix`` (the format written) when one is given."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f'{key} {path}: is a folder; give a file name, e.g. {path / ("features" + (suffix or ""))}')
    if suffix and path.suffix != suffix:
        raise ConfigError(f'{key} {path}: the file is written as {suffix[1:]}; name it {suffix}, e.g. '
                          f'{path.with_suffix(suffix) if path.suffix else path.with_name(path.name + suffix)}')
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f'{key} {path}: {parent} is a file, not a folder')
    return path


def check_out_dir(path: Union[str, os.PathLike], key: str = '--out-dir') -> Path:
    """A folder to write into (created if missing): neither it nor a folder above it an existing file."""
    path = Path(path).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        what = 'is a file' if blocker == path else f'is inside {blocker}, a file'
        raise ConfigError(f'{key} {path}: {what}; give a folder (new or existing) for the run')
    return path


def create_model(name: str, pretrained: bool = False, key: str = '--model', cache_dir: Optional[str] = None,
                 **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` after :func:`check_model_name`; an ``hf-hub:`` model whose
    ``config.json`` cannot be had (offline and not cached, no such repo) raises a RuntimeError naming the repo and
    what to do (timm reads it before any code of this package runs, so the model file cannot say it)."""
    check_model_name(name, key)
    if cache_dir is not None:
        kwargs['cache_dir'] = cache_dir
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError) as e:
        if not name.startswith(HUB_PREFIXES):
            raise
        raise RuntimeError(hub_unreachable_message(name, name.split(':', 1)[1], cache_dir, e)) from e


def one_line(err: BaseException, flags: Optional[Dict[str, str]] = None) -> str:
    """An error's message on one line (some messages of torch and timm span several). ``flags`` maps the Python
    arguments a library message names to the command line's flags (``{'overwrite=True': '--overwrite'}``), so that a
    command's errors are phrased in its flags."""
    text = ' '.join(str(err).split()) or type(err).__name__
    for argument, flag in (flags or {}).items():
        text = text.replace(argument, flag)
    return text
