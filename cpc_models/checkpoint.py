"""``cpc-train`` checkpoints: the folder format, writing it atomically, and finding one.

``<out_dir>/checkpoints/step_00000123/`` holds

* ``encoder.safetensors``: the timm encoder's state dict (loads with ``pretrained_cfg_overlay=dict(file=...)``);
* ``objective.safetensors``: context network, target projection, predictors;
* ``state.pt``: step, optimizer, RNG states, wall time (plain tensors and dicts: ``torch.load(weights_only=True)``);
* ``config.json``: the resolved training config (``model`` = timm architecture, ``model_args`` = its kwargs);
* ``metrics.json``: the last logged metrics.

A folder is written as ``checkpoints/.tmp_step_<step>_<pid>/`` and renamed, so a ``step_*`` folder that exists is
complete; a temporary folder left by a killed process is never taken for a checkpoint and is removed by
:func:`remove_partial`. :func:`resolve_checkpoint` is the one place that turns what a user passes (a step folder or
a run folder) into a checkpoint folder: for resuming, evaluating and exporting.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ._weights import load_state_dict_strict
from .atomic import atomic_dir

__all__ = ['latest_checkpoint', 'resolve_checkpoint', 'remove_partial', 'save_checkpoint', 'load_checkpoint',
           'read_config']

PathLike = Union[str, os.PathLike]
_PARTIAL = '.tmp_step_'


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """Newest complete checkpoint folder in ``out_dir/checkpoints`` (None if there is none)."""
    ckpts = sorted((Path(out_dir) / 'checkpoints').glob('step_*[0-9]'))
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint folder meant by ``path``: a step folder itself, or the newest one of a run folder.

    Raises:
        FileNotFoundError: saying what was expected.
    """
    path = Path(path).expanduser()
    if path.is_dir() and not (path / 'encoder.safetensors').is_file() and (path / 'checkpoints').is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f'{path}/checkpoints holds no complete checkpoint folder.')
        return latest
    if not (path / 'encoder.safetensors').is_file():
        raise FileNotFoundError(
            f'{path} is not a cpc-train checkpoint: expected a step folder (encoder.safetensors, config.json, '
            f'state.pt), e.g. <out_dir>/checkpoints/step_00000123, or a run folder holding checkpoints/.')
    return path


def remove_partial(out_dir: PathLike) -> None:
    """Delete the temporary folders of saves that a killed process did not finish."""
    for partial in (Path(out_dir) / 'checkpoints').glob(f'{_PARTIAL}*'):
        shutil.rmtree(partial, ignore_errors=True)


def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(out_dir: PathLike, step: int, encoder: nn.Module, objective: nn.Module, state: Dict[str, Any],
                    config: Dict[str, Any], metrics: Dict[str, Any], keep_last: int = 0) -> Path:
    """Write ``out_dir/checkpoints/step_<step>`` atomically; keep the newest ``keep_last`` (0 keeps all).

    ``state`` is what :func:`load_checkpoint` returns: plain tensors, numbers and dicts (optimizer state, RNG).
    """
    root = Path(out_dir) / 'checkpoints'
    final = root / f'step_{step:08d}'
    with atomic_dir(final, tmp_name=f'{_PARTIAL}{step:08d}_{os.getpid()}') as tmp:
        save_file(_tensors(encoder), tmp / 'encoder.safetensors')
        save_file(_tensors(objective), tmp / 'objective.safetensors')
        torch.save(state, tmp / 'state.pt')
        (tmp / 'config.json').write_text(json.dumps(config, indent=2))
        (tmp / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    if keep_last > 0:
        for old in sorted(root.glob('step_*[0-9]'))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: PathLike, encoder: nn.Module, objective: nn.Module,
                    device: Union[str, torch.device] = 'cpu') -> Dict[str, Any]:
    """Load the weights of a checkpoint folder into ``encoder`` and ``objective``; return its ``state.pt``.

    Loads all or nothing: a missing, renamed or mis-shaped key is a ``WeightsMismatchError`` naming the key and file.

    Raises:
        FileNotFoundError: the folder has no ``state.pt`` (not a training checkpoint).
        WeightsMismatchError: the weights do not fit the models.
    """
    folder = Path(folder)
    if not (folder / 'state.pt').is_file():
        raise FileNotFoundError(f'{folder}: not a training checkpoint folder (no state.pt); pass a '
                                f'<out_dir>/checkpoints/step_* folder, auto or none.')
    for module, name in ((encoder, 'encoder.safetensors'), (objective, 'objective.safetensors')):
        load_state_dict_strict(module, load_file(folder / name, device=str(device)), folder / name)
    return torch.load(folder / 'state.pt', map_location='cpu', weights_only=True)


def read_config(folder: PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, as saved (any version of the format).

    Raises:
        FileNotFoundError, ValueError: missing or unreadable, saying what to do.
    """
    path = Path(folder) / 'config.json'
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise FileNotFoundError(f'{path} not found: a cpc-train checkpoint folder holds encoder.safetensors and '
                                f'config.json (e.g. <out_dir>/checkpoints/step_00000123/).') from None
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); the checkpoint is incomplete or was edited.') from e
