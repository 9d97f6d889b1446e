"""Published-checkpoint folders and the Hugging Face Hub.

A *published folder* is what a Hub repo ``cpc-models/<arch>.<tag>`` holds, and what ``local-dir:`` reads:

* ``model.safetensors``: the timm encoder's state dict (never a pickle);
* ``config.json``: timm's format (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``), written by
  ``timm.models.save_for_hf`` so that ``timm.create_model('hf-hub:ORG/NAME')`` and ``'local-dir:DIR'`` rebuild the
  model (after ``import cpc_models``);
* ``README.md``: the model card (HF YAML front matter, description, usage, training command/config/metrics).

API:

* :func:`export_pretrained` (a timm model -> folder), :func:`export_checkpoint` (a ``cpc-train`` checkpoint folder ->
  folder), :func:`push_to_hub` (folder -> Hub repo).
* :func:`add_to_hf_cache` writes a folder into a Hugging Face cache, so that ``pretrained=True`` and ``hf-hub:`` work
  on a machine without internet (``HF_HUB_OFFLINE=1``).
* :func:`check_weights_file` / :func:`load_weights` (from ``cpc_models._weights``): safe loading with errors that
  name the file and say what to do.

CLI: ``python -m cpc_models.hub export --checkpoint DIR --out DIR --tag T [--push ORG/NAME]``,
``python -m cpc_models.hub push FOLDER ORG/NAME`` and
``python -m cpc_models.hub cache FOLDER ORG/NAME [--cache-dir D]``.
"""
import hashlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.file_download import repo_folder_name
from timm.models import save_for_hf
from timm.models._hub import generate_readme

from . import encoder  # noqa: F401  (registers the architectures)
from ._weights import WEIGHTS_NAME, CorruptWeightsError, check_weights_file, load_weights
from .atomic import atomic_dir, atomic_file, write_text
from .checkpoint import read_config, resolve_checkpoint
from . import config as C
from .checks import one_line

__all__ = [
    'export_pretrained', 'export_checkpoint', 'push_to_hub', 'add_to_hf_cache', 'check_weights_file',
    'load_weights', 'CorruptWeightsError', 'main',
]

PathLike = Union[str, os.PathLike]
CITATION = """@inproceedings{henaff2020data,
  title={Data-Efficient Image Recognition with Contrastive Predictive Coding},
  author={H{\\'e}naff, Olivier J. and Srinivas, Aravind and De Fauw, Jeffrey and Razavi, Ali and Doersch, Carl and
          Eslami, S. M. Ali and van den Oord, Aaron},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2020}
}"""
DEFAULT_TAGS = ('image-feature-extraction', 'timm', 'cpc', 'self-supervised', 'contrastive-predictive-coding')
_WALL_TIME_KEYS = ('wall_time_s', 'wall_time', 'train_time_s', 'elapsed_s')


# ----------------------------------------------------------------------------------------------------------------
# Exporting
# ----------------------------------------------------------------------------------------------------------------

def _fmt_duration(seconds: float) -> str:
    seconds = int(round(float(seconds)))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} (h:mm:ss, {seconds} s)'


def _readme(model, name: str, repo_id: str, card: Dict[str, Any]) -> str:
    """Model card: timm's ``generate_readme`` (front matter, description, details, usage, citation) + training."""
    cfg = model.pretrained_cfg
    arch = cfg.get('architecture', name)
    n_params = sum(p.numel() for p in model.parameters())
    details = {
        'Model Type': 'Image feature backbone (self-supervised, Contrastive Predictive Coding v2)',
        'Architecture': f'`{arch}`',
        'Params (M)': f'{n_params / 1e6:.2f}',
        'Input size': 'x'.join(str(s) for s in cfg.get('input_size', ())),
        'Papers': {'Data-Efficient Image Recognition with Contrastive Predictive Coding':
                   'https://arxiv.org/abs/1905.09272'},
        **card.get('details', {}),
    }
    if card.get('dataset'):
        details['Dataset'] = card['dataset']
    description = card.get('description') or (
        'A CPC v2 encoder (Hénaff et al., ICML 2020) pretrained with Contrastive Predictive Coding: the image is cut '
        'into a grid of overlapping patches, each patch is encoded on its own, and the latents form a grid '
        '(B, C, rows, cols). `forward` returns the mean-pooled (B, C) feature, `forward_features` the grid.')
    usage = (
        '```python\n'
        'import timm\n'
        'import torch\n'
        'from PIL import Image\n'
        'import cpc_models  # registers the CPC architectures with timm\n\n'
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()\n"
        'cfg = timm.data.resolve_model_data_config(model)\n'
        'transform = timm.data.create_transform(**cfg)\n'
        f"img = Image.open('image.png').convert('{'L' if cfg.get('input_size', (3,))[0] == 1 else 'RGB'}')\n"
        'with torch.no_grad():\n'
        '    pooled = model(transform(img).unsqueeze(0))                 # (1, C)\n'
        '    grid = model.forward_features(transform(img).unsqueeze(0))  # (1, C, rows, cols)\n'
        '```\n\n'
        f'Features of a folder of images: `cpc-extract --model hf-hub:{repo_id} images/ --out features.safetensors`.\n')
    text = generate_readme(dict(
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *card.get('tags', [])])),
        license=card.get('license', cfg.get('license') or 'apache-2.0'),
        library_name='timm',
        description=description, details=details, usage=usage, citation=card.get('citation', CITATION),
    ), name, task_name='image-feature-extraction')

    train = []
    if card.get('training_command'):
        train.append(f'Command:\n\n```bash\n{card["training_command"]}\n```\n')
    if card.get('wall_time_s') is not None:
        train.append(f'Wall time: {_fmt_duration(card["wall_time_s"])}'
                     + (f' on {card["hardware"]}' if card.get('hardware') else '') + '.\n')
    if card.get('metrics'):
        rows = '\n'.join(f'| {k} | {v if isinstance(v, (int, float, str)) else json.dumps(v)} |'
                         for k, v in card['metrics'].items())
        train.append(f'Metrics:\n\n| metric | value |\n|---|---|\n{rows}\n')
    if card.get('training_config'):
        train.append('Configuration:\n\n```json\n' + json.dumps(card['training_config'], indent=2, default=str)
                     + '\n```\n')
    if train:
        text += '\n## Training\n\n' + '\n'.join(train)
    if card.get('evaluation'):
        text += '\n## Evaluation\n\n' + card['evaluation'].strip() + '\n'
    return text


def export_pretrained(
        model: torch.nn.Module,
        out_dir: PathLike,
        *,
        tag: Optional[str] = None,
        model_card: Optional[Dict[str, Any]] = None,
        push_to: Optional[str] = None,
        token: Optional[str] = None,
        overwrite: bool = False,
) -> Path:
    """Write a timm model as a published folder (``model.safetensors``, timm ``config.json``, ``README.md``).

    Args:
        model: a model from ``timm.create_model`` (its ``pretrained_cfg`` and factory args go into config.json).
        out_dir: the folder to create. Written to a temporary sibling and renamed, so it exists only complete.
        tag: pretrained tag (``cpcv2_resnet161.<tag>``), stored in ``pretrained_cfg.tag`` and used in names; None
            stores no tag (not the one the model was created with: these are other weights).
        model_card: optional card fields: ``description``, ``tags`` (extra), ``dataset``, ``details`` (dict),
            ``training_command``, ``training_config`` (dict), ``metrics`` (dict), ``wall_time_s``, ``hardware``,
            ``license``, ``citation``.
        push_to: Hub repo ``ORG/NAME`` to upload the folder to afterwards (see :func:`push_to_hub`).
        token: Hugging Face token for ``push_to`` (default: the logged-in one / ``HF_TOKEN``).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir).expanduser()
    if not hasattr(model, 'pretrained_cfg'):
        raise TypeError(f'Expected a model made by timm.create_model (with a pretrained_cfg), got '
                        f'{type(model).__name__}.')
    arch = model.pretrained_cfg.get('architecture') or type(model).__name__
    name = f'{arch}.{tag}' if tag else arch
    repo_id = push_to or f'cpc-models/{name}'
    model_config = {'pretrained_cfg': {'tag': tag}} if tag else None
    with atomic_dir(out_dir, overwrite) as tmp:
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True)
        if not tag:  # timm copies the creating cfg's tag (e.g. the registered default); it names other weights
            config = json.loads((tmp / 'config.json').read_text())
            config.get('pretrained_cfg', {}).pop('tag', None)
            (tmp / 'config.json').write_text(json.dumps(config, indent=4))
        (tmp / 'README.md').write_text(_readme(model, name, repo_id, model_card or {}), encoding='utf-8')
        check_weights_file(tmp / WEIGHTS_NAME)
    if push_to:
        push_to_hub(out_dir, push_to, token=token)
    return out_dir


def _train_command(config: Dict[str, Any]) -> str:
    """A ``cpc-train`` command reproducing a resolved training config (every field as ``--key value``, groups as
    JSON), for checkpoints that did not record their command line."""
    skip = {'resume', 'command', 'argv'} | set(_WALL_TIME_KEYS)
    parts = ['cpc-train']
    for k, v in config.items():
        if k not in skip:
            parts += [f'--{k}', shlex.quote(v if isinstance(v, str) else json.dumps(v))]
    return ' '.join(parts)


def export_checkpoint(ckpt_dir: PathLike, out_dir: PathLike, **kwargs) -> Path:
    """Turn a ``cpc-train`` checkpoint folder into a published folder (via :func:`export_pretrained`).

    The checkpoint holds ``encoder.safetensors`` and ``config.json`` (``model``: timm architecture name,
    ``model_args``: extra kwargs, plus the rest of the training config), optionally ``metrics.json``. The model is
    rebuilt with ``timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)``
    (strict load through ``checkpoint_filter_fn``), and the training command/config/metrics/wall time go into the card.

    Args:
        ckpt_dir: the checkpoint folder (or a run folder: its newest checkpoint).
        out_dir: the published folder to write.
        **kwargs: ``tag``, ``model_card`` (merged over the generated fields), ``push_to``, ``token``, ``overwrite``.
    """
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    config = read_config(ckpt_dir)
    if not config.get('model'):
        raise ValueError(f'{ckpt_dir / "config.json"} has no "model" (timm architecture name).')
    metrics = json.loads((ckpt_dir / 'metrics.json').read_text()) if (ckpt_dir / 'metrics.json').is_file() else {}
    weights = check_weights_file(ckpt_dir / 'encoder.safetensors')
    model = timm.create_model(
        config['model'], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
        **config.get('model_args', {}))

    card = dict(training_config=config)
    command = config.get('command') or config.get('argv') or _train_command(config)
    card['training_command'] = command if isinstance(command, str) else ' '.join(map(str, command))
    if metrics:
        card['metrics'] = {k: v for k, v in metrics.items() if k not in _WALL_TIME_KEYS}
    for src in (metrics, config):
        wall = next((src[k] for k in _WALL_TIME_KEYS if src.get(k) is not None), None)
        if wall is not None:
            card['wall_time_s'] = wall
            break
    dataset = config.get('dataset') or config.get('data')
    if dataset and isinstance(dataset, str) and '/' not in dataset:  # a name, not a local folder
        card['dataset'] = dataset
    card.update(kwargs.pop('model_card', None) or {})
    return export_pretrained(model, out_dir, model_card=card, **kwargs)


def push_to_hub(folder: PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = 'Upload CPC v2 weights') -> str:
    """Upload a published folder to the Hub repo ``repo_id`` (``create_repo(exist_ok=True)`` + ``upload_folder``).

    Returns:
        the URL of the commit.

    Raises:
        RuntimeError: no token (log in with ``hf auth login`` or set ``HF_TOKEN``), or the Hub cannot be reached.
    """
    folder = Path(folder)
    check_weights_file(folder)
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(f'{folder} has no config.json; create the folder with export_pretrained().')
    token = token or get_token()
    if not token:
        raise RuntimeError(
            f'No Hugging Face token to push {folder} to {repo_id}: log in with `hf auth login`, set HF_TOKEN, or pass '
            f'token=... (a token with write access to the "{repo_id.split("/")[0]}" namespace).')
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except Exception as e:  # OfflineModeIsEnabled, httpx connection errors, HfHubHTTPError (401/403) ...
        raise RuntimeError(
            f'Could not push {folder} to the Hugging Face Hub repo {repo_id} ({type(e).__name__}: {e}). Check the '
            f'network (and that HF_HUB_OFFLINE is not set) and that the token can write to that namespace; the folder '
            f'is complete and can be pushed later with `python -m cpc_models.hub push {folder} {repo_id}`.') from e
    return getattr(info, 'commit_url', str(info))


# ----------------------------------------------------------------------------------------------------------------
# Offline Hugging Face cache
# ----------------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def add_to_hf_cache(folder: PathLike, repo_id: str, cache_dir: Optional[PathLike] = None,
                    revision: str = 'main') -> str:
    """Put a published folder into a Hugging Face cache as if ``repo_id`` had been downloaded.

    Writes the real cache layout ``<cache>/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file>, refs/<rev>}``
    (snapshot entries are relative symlinks to the blobs, or copies where symlinks are not allowed). Then, with
    ``HF_HUB_OFFLINE=1`` (or no network), ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` and the
    ``pretrained=True`` of a tag whose ``hf_hub_id`` is ``ORG/NAME`` load from it through huggingface_hub.

    Args:
        folder: a published folder (model.safetensors, config.json, README.md).
        repo_id: ``ORG/NAME``.
        cache_dir: the cache root (default: ``huggingface_hub.constants.HF_HUB_CACHE``, i.e. ``HF_HUB_CACHE`` or
            ``$HF_HOME/hub``); pass the same one as ``cache_dir=`` to ``create_model`` if not the default.
        revision: the ref to point at the snapshot (``main``, what loads without ``@revision``).

    Returns:
        the 40-hex commit id of the snapshot (also usable as ``ORG/NAME@<commit>``).
    """
    folder = Path(folder)
    check_weights_file(folder)
    files = sorted(p for p in folder.rglob('*') if p.is_file() and not p.name.startswith('.'))
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type='model')
    hashes = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    commit = hashlib.sha1(json.dumps(sorted(hashes.items())).encode()).hexdigest()
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    snapshot = repo / 'snapshots' / commit
    for (rel, digest), src in zip(hashes.items(), files):
        blob = repo / 'blobs' / digest
        if not blob.is_file():
            with atomic_file(blob) as tmp:
                shutil.copyfile(src, tmp)
        dst = snapshot / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        try:
            dst.symlink_to(os.path.relpath(blob, dst.parent))
        except OSError:  # e.g. Windows without developer mode: huggingface_hub accepts plain files in snapshots
            shutil.copyfile(blob, dst)
    write_text(repo / 'refs' / revision, commit)  # no trailing newline: huggingface_hub reads it with f.read()
    return commit


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

# library messages name Python arguments; the command's errors name its flags
FLAGS = {'overwrite=True': '--overwrite', 'token=...': '--token TOKEN', 'export_pretrained()': 'export'}


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.ArgumentParser(prog='python -m cpc_models.hub', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('export', help='cpc-train checkpoint folder -> published folder (optionally pushed)')
    p.add_argument('--checkpoint', required=True, help='checkpoint folder (encoder.safetensors + config.json)')
    p.add_argument('--out', required=True, help='published folder to create')
    p.add_argument('--tag', required=True, help='pretrained tag naming these weights, <arch>.<tag>: e.g. fmnist, in1k '
                                                '(required)')
    p.add_argument('--push', default=None, metavar='ORG/NAME', help='also upload to this Hub repo')
    p.add_argument('--token', default=None, help='Hugging Face token (default: logged-in / HF_TOKEN)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --out folder')
    p = sub.add_parser('push', help='upload a published folder to the Hub')
    p.add_argument('folder')
    p.add_argument('repo_id', metavar='ORG/NAME')
    p.add_argument('--token', default=None)
    p.add_argument('--private', action='store_true')
    p = sub.add_parser('cache', help='add a published folder to a Hugging Face cache (offline machines)')
    p.add_argument('folder')
    p.add_argument('repo_id', metavar='ORG/NAME')
    p.add_argument('--cache-dir', default=None, help='default: HF_HUB_CACHE or $HF_HOME/hub')
    args = parser.parse_args(argv)
    try:
        if args.cmd == 'export' and Path(args.out).exists() and not args.overwrite:  # before loading anything
            raise FileExistsError(f'--out {args.out}: already exists; choose another --out or pass --overwrite')
        if args.cmd == 'export':
            out = export_checkpoint(args.checkpoint, args.out, tag=args.tag, push_to=args.push, token=args.token,
                                    overwrite=args.overwrite)
            print(f'Wrote {out}' + (f' and pushed it to {args.push}' if args.push else ''))
        elif args.cmd == 'push':
            print(push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private))
        else:
            commit = add_to_hf_cache(args.folder, args.repo_id, cache_dir=args.cache_dir)
            print(f'Added {args.folder} to the Hugging Face cache as {args.repo_id}@{commit}')
    except (FileNotFoundError, FileExistsError, CorruptWeightsError, RuntimeError, ValueError) as e:
        print(f'python -m cpc_models.hub: error: {one_line(e, FLAGS)}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
