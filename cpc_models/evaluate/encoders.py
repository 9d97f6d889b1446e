"""The encoder an evaluation measures: from a published tag, a weights file, a cpc-train checkpoint, or random."""
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn

from .. import encoder as _encoder  # noqa: F401  (registers the cpc models with timm)
from .._weights import CorruptWeightsError, check_weights_file
from ..checkpoint import read_config, resolve_checkpoint
from ..checks import check_model_name
from ..config import ConfigError

__all__ = ['create_encoder', 'check_checkpoint', 'load_encoder']

KINDS = 'a timm name.tag, a .safetensors file, a checkpoint (or run) folder, a published folder, or "random"'


def create_encoder(name: str, model_args: Dict, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained, num_classes=0, **model_args, **kwargs)``: an encoder without head."""
    return timm.create_model(name, pretrained=pretrained, **{**model_args, **kwargs, 'num_classes': 0})


def check_checkpoint(checkpoint: str) -> None:
    """What :func:`load_encoder` would load exists and is of a kind it reads; else ConfigError naming --checkpoint."""
    path = Path(checkpoint).expanduser()
    try:
        if checkpoint == 'random':
            return
        if path.is_dir():
            if not (path / 'model.safetensors').is_file():
                resolve_checkpoint(path)
            return
        if path.is_file() or path.suffix == '.safetensors':
            check_weights_file(path)
            return
    except (FileNotFoundError, CorruptWeightsError) as e:
        raise ConfigError(f'--checkpoint: {e}') from None
    if '.' in checkpoint and '/' not in checkpoint:
        check_model_name(checkpoint, '--checkpoint')
        return
    raise ConfigError(f'--checkpoint {checkpoint}: no such file or folder; give {KINDS}')


def load_encoder(checkpoint: str, model: str = 'cpcv2_resnet_tiny', model_args: Optional[Dict] = None,
                 random_seed: int = 0) -> Tuple[nn.Module, Dict]:
    """The CPC encoder to evaluate (num_classes=0) and a description of where it came from.

    ``checkpoint`` is one of: a timm name with tag (``cpcv2_resnet_tiny.fmnist``, pretrained=True); a
    ``.safetensors`` file (loaded into ``model``); a ``cpc-train`` checkpoint folder (``encoder.safetensors`` +
    ``config.json`` with ``model`` / ``model_args``) or its run folder (latest checkpoint); a published folder
    (``model.safetensors`` + timm ``config.json``); or ``random`` (no pretraining, for tests and floors).
    """
    model_args = dict(model_args or {})
    if not checkpoint:
        raise ValueError('Give --checkpoint: a timm name.tag, a .safetensors file, a checkpoint folder, or "random".')
    path = Path(checkpoint).expanduser()
    if checkpoint == 'random':
        torch.manual_seed(random_seed)
        return create_encoder(model, model_args), dict(kind='random', model=model, model_args=model_args)
    if path.is_dir():
        if (path / 'model.safetensors').is_file():  # a published folder (timm config.json)
            weights, cfg = path / 'model.safetensors', json.loads((path / 'config.json').read_text())
        else:
            path = resolve_checkpoint(path)
            weights, cfg = path / 'encoder.safetensors', read_config(path)
        arch = cfg.get('model') or cfg.get('architecture') or model
        model_args = {**cfg.get('model_args', {}), **model_args}
        enc = create_encoder(arch, model_args, True, pretrained_cfg_overlay=dict(file=str(weights)))
        return enc, dict(kind='folder', path=str(path), model=arch, model_args=model_args)
    if path.suffix == '.safetensors' or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f'Checkpoint file {path} does not exist.')
        enc = create_encoder(model, model_args, True, pretrained_cfg_overlay=dict(file=str(path)))
        return enc, dict(kind='file', path=str(path), model=model, model_args=model_args)
    if '.' in checkpoint and '/' not in checkpoint:
        arch = checkpoint.split('.')[0]
        try:
            enc = create_encoder(checkpoint, model_args, True)
        except RuntimeError as e:
            raise RuntimeError(
                f'Could not load the published checkpoint "{checkpoint}" ({e}). Tags with weights: '
                f'{timm.list_pretrained(arch + ".*") or "none"}. Pass a .safetensors file or a cpc-train '
                f'checkpoint folder instead.') from e
        return enc, dict(kind='timm', name=checkpoint, model=arch, model_args=model_args)
    raise FileNotFoundError(
        f'Checkpoint "{checkpoint}" is neither a file, a folder, a timm "name.tag" nor "random".')
