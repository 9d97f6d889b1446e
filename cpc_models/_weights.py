"""Reading weights files safely, and errors that name the file and say what to do.

Used by the model file (``encoder.py``: checks around timm's pretrained loading) and by ``hub.py`` / ``extract.py``.
Imports nothing of the package, so the model file does not depend on the Hub or CLI code.

* :func:`check_weights_file` / :func:`load_weights`: existence and safetensors-header checks; ``torch.load`` only
  with ``weights_only=True``. Nothing is ever unpickled.
* :func:`pretrained_errors`: wraps ``timm.models.build_model_with_cfg`` for ``pretrained=True``: no published
  weights, a missing or corrupt local file, an offline Hub or a corrupt Hub cache become errors that say what to do.
* Strict loading: a missing, renamed or mis-shaped key is a :class:`WeightsMismatchError` naming the key and the file
  (:func:`check_keys`, :func:`load_state_dict_strict`; timm's strict-load error is rewritten the same way). Nothing
  is ever loaded partly.
"""
import contextlib
import os
import pickle
import re
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Union

import safetensors
import safetensors.torch
import timm
import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models._hub import hf_split

__all__ = ['WEIGHTS_NAME', 'CorruptWeightsError', 'WeightsMismatchError', 'check_weights_file', 'weights_kind',
           'load_weights', 'check_keys', 'load_state_dict_strict', 'pretrained_errors', 'hub_unreachable_message']

PathLike = Union[str, os.PathLike]
WEIGHTS_NAME = 'model.safetensors'


class CorruptWeightsError(RuntimeError):
    """A weights file exists but cannot be read (truncated download, interrupted copy, not a safetensors file)."""


class WeightsMismatchError(ValueError):
    """A weights file that reads but does not fit the model: a key missing, unexpected (renamed) or of another shape."""


_FIT_HINT = ('Nothing was loaded. Load the weights into the architecture (and model_args) they were trained with, '
             'see the checkpoint\'s config.json; a renamed key means the file was edited or made by other code.')


def _names(keys: List[str], most: int = 3) -> str:
    shown = ', '.join(f'"{k}"' for k in keys[:most])
    return shown + (f' and {len(keys) - most} more' if len(keys) > most else '')


def mismatch_message(where: str, model: str, missing: List[str], unexpected: List[str]) -> str:
    """One line naming the file, the model and the first missing / unexpected keys."""
    parts = []
    if missing:
        parts.append(f'{len(missing)} key(s) of the model missing from the file: {_names(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} key(s) in the file that the model does not have: {_names(unexpected)}')
    return f'{where} does not fit {model}: {"; ".join(parts)}. {_FIT_HINT}'


def check_keys(state_dict: Iterable[str], expected: Iterable[str], where: str, model: str) -> None:
    """Raise :class:`WeightsMismatchError` unless the keys of ``state_dict`` are exactly ``expected``."""
    have, want = list(state_dict), list(expected)
    have_set, want_set = set(have), set(want)
    missing = [k for k in want if k not in have_set]
    unexpected = [k for k in have if k not in want_set]
    if missing or unexpected:
        raise WeightsMismatchError(mismatch_message(where, model, missing, unexpected))


def load_state_dict_strict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], where: PathLike) -> None:
    """``module.load_state_dict(state_dict)`` that loads all or nothing: a missing, unexpected or mis-shaped key is a
    :class:`WeightsMismatchError` naming the key and ``where`` (the file), raised before any tensor is copied."""
    name = type(module).__name__
    target = module.state_dict()
    check_keys(state_dict, target, str(where), name)
    for k, v in target.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise WeightsMismatchError(
                f'{where} does not fit {name}: key "{k}" has shape {tuple(state_dict[k].shape)} in the file but '
                f'{tuple(v.shape)} in the model. {_FIT_HINT}')
    module.load_state_dict(state_dict, strict=True)


_TORCH_KEYS = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)')


def _torch_strict_error(err: Exception) -> Optional[Dict[str, List[str]]]:
    """The missing / unexpected keys of torch's strict ``load_state_dict`` error (None: another error)."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not text.startswith('Error(s) in loading state_dict'):
        return None
    found = {'Missing': [], 'Unexpected': []}
    for kind, keys in _TORCH_KEYS.findall(text):
        found[kind] = re.findall(r'"([^"]+)"', keys)
    return found if (found['Missing'] or found['Unexpected']) else None


def check_weights_file(path: PathLike) -> Path:
    """Check that a weights file (or a published folder holding ``model.safetensors``) exists and can be read.

    Safetensors files are validated from their header (cheap: no tensor is read), which catches truncated and
    corrupt files. Returns the weights file.

    Raises:
        FileNotFoundError: the file (or the folder's ``model.safetensors``) does not exist.
        CorruptWeightsError: the safetensors file is truncated or corrupt.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        folder, path = path, path / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f'No {WEIGHTS_NAME} in the folder {folder}. A published folder holds model.safetensors, config.json '
                f'and README.md: create one with `python -m cpc_models.hub export --checkpoint {folder} --out '
                f'NEW_FOLDER --tag TAG` if {folder} is a cpc-train checkpoint.')
    if not path.is_file():
        raise FileNotFoundError(
            f'Weights file not found: {path}. Check the path; a cpc-train checkpoint keeps the encoder in '
            f'<out_dir>/checkpoints/step_*/encoder.safetensors, a published folder in model.safetensors.')
    kind = weights_kind(path)
    if path.suffix == '.safetensors' or kind == 'safetensors':
        try:
            with safetensors.safe_open(str(path), framework='pt') as f:
                f.keys()
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise CorruptWeightsError(_corrupt_message(path, e)) from e
        if path.suffix != '.safetensors':  # the loaders (timm's too) pick the format by the suffix
            raise CorruptWeightsError(f'{path} is a safetensors file named {path.suffix or "without a suffix"}; '
                                      f'rename it to {path.with_suffix(".safetensors").name} and pass that.')
    elif kind is None:
        head = path.open('rb').read(8)
        raise CorruptWeightsError(
            f'{path} is not a weights file: neither safetensors nor a torch.save checkpoint (it starts with '
            f'{head!r}, {path.stat().st_size} bytes). Pass the encoder.safetensors of a cpc-train checkpoint or the '
            f'model.safetensors of a published folder.')
    return path


def weights_kind(path: PathLike) -> Optional[str]:
    """What a file holds, from its first bytes: 'safetensors' (an 8-byte header length, then a JSON object),
    'torch' (a torch.save zip archive or a pickle), or None (neither)."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') > 1:
        return 'safetensors'
    if head.startswith(b'PK\x03\x04') or head[:1] == b'\x80':  # zip archive; pickle protocol >= 2
        return 'torch'
    return None


def _corrupt_message(path: PathLike, err: Exception) -> str:
    size = Path(path).stat().st_size if Path(path).exists() else 0
    return (f'Weights file {path} ({size} bytes) is truncated or corrupt ({err}). Delete it and copy or download it '
            f'again (for a Hub download: remove it from the Hugging Face cache and load with network access), or '
            f're-export it with `python -m cpc_models.hub export`.')


def load_weights(path: PathLike, device: Union[str, torch.device] = 'cpu') -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file (or a published folder); other files only with
    ``torch.load(weights_only=True)``. Nothing is ever unpickled.

    Raises:
        FileNotFoundError, CorruptWeightsError: with the file named and what to do.
    """
    path = check_weights_file(path)
    if path.suffix == '.safetensors':
        try:
            return safetensors.torch.load_file(str(path), device=str(device))
        except (safetensors.SafetensorError, OSError) as e:
            raise CorruptWeightsError(_corrupt_message(path, e)) from e
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (zip), EOFError ...
        raise CorruptWeightsError(_unpickle_message(path, e)) from e


def _unpickle_message(path: PathLike, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ''
    return (f'Could not read {path} with torch.load(weights_only=True) ({type(err).__name__}: {first}). Only plain '
            f'tensor checkpoints are read (nothing is unpickled): the file is corrupt, or holds Python objects; '
            f'convert its state dict to safetensors (safetensors.torch.save_file(state_dict, ...)).')


def _published_tags(variant: str) -> List[str]:
    return [n.split('.', 1)[1] for n in timm.list_pretrained(f'{variant}.*')]


def _check_source(variant: str, cfg) -> None:
    """Fail early, naming the file, when the weights cannot come from anywhere or a local file is bad."""
    if not (cfg.url or cfg.file or cfg.hf_hub_id or cfg.state_dict):
        raise RuntimeError(
            f'No pretrained weights are published for "{variant}" yet (tags with weights: '
            f'{_published_tags(variant) or "none"}). Train them on a folder of images with `cpc-train --model '
            f'{variant} --data FOLDER --out-dir runs/{variant}` and load the result with timm.create_model('
            f'"{variant}", pretrained=True, pretrained_cfg_overlay=dict(file="runs/{variant}/checkpoints/step_N/'
            f'encoder.safetensors")), or create the model with pretrained=False.')
    # timm raises a bare FileNotFoundError for a missing local file and safetensors a header error without a path
    if cfg.state_dict is None and getattr(cfg, 'source', '') != 'hf-hub' and cfg.file:
        check_weights_file(cfg.file)


def _explain(variant: str, cfg, err: Exception, cache_dir: Optional[PathLike]) -> Optional[Exception]:
    """An error raised while timm loads pretrained weights, as one that says what to do (None: keep ``err``)."""
    hub_id = cfg.hf_hub_id
    from_hub = bool(hub_id) and (getattr(cfg, 'source', '') == 'hf-hub' or not cfg.file)
    if isinstance(err, WeightsMismatchError):  # from checkpoint_filter_fn, which does not know the file
        where, msg = _weights_location(cfg, cache_dir), str(err)
        return WeightsMismatchError(where + msg[len('the weights'):] if msg.startswith('the weights ') else
                                    f'{where}: {msg}')
    keys = _torch_strict_error(err)
    if keys is not None:  # timm's strict load_state_dict
        return WeightsMismatchError(mismatch_message(_weights_location(cfg, cache_dir), variant, keys['Missing'],
                                                     keys['Unexpected']))
    if isinstance(err, safetensors.SafetensorError):
        where = cfg.file or '?'
        if from_hub:
            repo, rev = hf_split(hub_id)
            cached = try_to_load_from_cache(repo, WEIGHTS_NAME, cache_dir=cache_dir, revision=rev)
            where = cached if isinstance(cached, str) else f'{WEIGHTS_NAME} of the Hub repo {hub_id}'
        elif Path(where).is_dir():
            where = str(Path(where) / WEIGHTS_NAME)
        return CorruptWeightsError(_corrupt_message(where, err))
    # torch.load(weights_only=True) of a local .pt/.pth file: corrupt, or a pickle of Python objects
    if cfg.file and not from_hub and (isinstance(err, (pickle.UnpicklingError, EOFError, IndexError, KeyError)) or (
            isinstance(err, RuntimeError) and ('weights_only' in str(err) or 'PytorchStreamReader' in str(err)))):
        return CorruptWeightsError(_unpickle_message(cfg.file, err))
    if from_hub and isinstance(err, (RepositoryNotFoundError, LocalEntryNotFoundError, FileNotFoundError,
                                     ConnectionError)):
        return RuntimeError(hub_unreachable_message(variant, hub_id, cache_dir, err))
    return None


def _weights_location(cfg, cache_dir: Optional[PathLike]) -> str:
    """The file timm reads the weights of ``cfg`` from (timm's own resolution): a local file, a local-dir folder's
    or a Hub cache's ``model.safetensors``."""
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from == 'state_dict':
        return 'the state_dict passed in pretrained_cfg'
    if load_from in ('file', 'local-dir'):
        return str(Path(loc) / WEIGHTS_NAME) if Path(loc).is_dir() else str(loc)
    if load_from == 'hf-hub':
        repo_id, name = loc if isinstance(loc, (list, tuple)) else (loc, WEIGHTS_NAME)
        repo, rev = hf_split(repo_id)
        cached = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=rev)
        return cached if isinstance(cached, str) else f'{name} of the Hub repo {repo_id}'
    return str(loc or '?')


def hub_unreachable_message(name: str, hub_id: str, cache_dir: Optional[PathLike], err: Exception) -> str:
    """What to do when the files of the Hub repo ``hub_id`` (of the model ``name``) cannot be had."""
    repo = hf_split(hub_id)[0]
    if isinstance(err, RepositoryNotFoundError):
        return (f'The Hugging Face Hub repo "{repo}" of "{name}" does not exist (or is private: log in with '
                f'`hf auth login`). Load a local copy with local-dir:FOLDER or '
                f'pretrained_cfg_overlay=dict(file="/path/to/model.safetensors").')
    return (f'Could not get "{name}" from the Hugging Face Hub repo "{repo}": the machine is offline (or '
            f'HF_HUB_OFFLINE=1) and the repo is not in the cache ({cache_dir or "HF_HUB_CACHE"}). Either connect once '
            f'to download it, or copy the published folder onto this machine and add it to the cache with '
            f'`python -m cpc_models.hub cache FOLDER {repo}` (cpc_models.hub.add_to_hf_cache), or load the folder with '
            f'local-dir:FOLDER or the file with pretrained_cfg_overlay=dict(file="/path/to/model.safetensors"). '
            f'({type(err).__name__})')


@contextlib.contextmanager
def pretrained_errors(variant: str, pretrained: bool, kwargs: Dict) -> Iterator[None]:
    """Around ``build_model_with_cfg(..., pretrained, **kwargs)``: with ``pretrained=True``, check where the weights
    come from before timm reads them, and turn loading errors into ones that say what to do."""
    if not pretrained:
        yield
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    _check_source(variant, cfg)
    try:
        yield
    except Exception as e:
        err = _explain(variant, cfg, e, kwargs.get('cache_dir'))
        if err is None:
            raise
        raise err from e
