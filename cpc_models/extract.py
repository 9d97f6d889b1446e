"""Features of a frozen encoder: of in-memory image tensors (evaluation), and of image files (``cpc-extract``).

* :func:`extract_features`: uint8 images (N, C, H, W) -> pooled features and, optionally, latent grids; normalized
  with the model's mean/std (the images already have the model's input size).
* :func:`extract_files`: image files -> features, preprocessed with the model's own data config; unreadable files
  are skipped and reported. ``cpc-extract`` writes them to a safetensors file:

    cpc-extract --model cpcv2_resnet_tiny.<tag> images/ --out features.safetensors
    cpc-extract --model cpcv2_resnet_tiny --checkpoint encoder.safetensors a.png b.jpg --grid --out grid.safetensors

Every image (JPEG/PNG/..., any PIL mode: L, RGB, RGBA, P, I;16, ...; any size; read by cpc_models.images, EXIF
orientation applied) is converted to the model's channel count and preprocessed with the model's own data config
(``timm.data.resolve_model_data_config`` + ``timm.data.create_transform``), then encoded in batches.

Output (safetensors, written to a temporary file and renamed):

* tensor ``features``: float32, pooled (N, C) or, with ``--grid``, the latent grid (N, C, rows, cols);
* metadata (strings): ``paths`` = JSON list of the N image paths, in the order of the rows of ``features``;
  ``skipped`` = JSON list of ``{"path", "error"}`` for unreadable images; ``model``, ``grid``, ``shape``,
  ``data_config`` (JSON) and ``format`` = ``cpc-extract/1``. Read them with
  ``safetensors.safe_open(path, 'pt').metadata()`` (see :func:`read_features`).
"""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import timm
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import encoder  # noqa: F401  (registers the architectures with timm)
from ._weights import WEIGHTS_NAME, CorruptWeightsError, check_weights_file
from .atomic import atomic_file
from .checkpoint import read_config, resolve_checkpoint
from .checks import check_device, check_model_name, check_out_file, one_line
from .checks import create_model as checked_create_model
from . import config as C
from .config import ConfigError
from .images import ImageFiles, collate_readable, find_images
from .runtime import Switch, cap_workers, channels_last_default, compile_default, compiled_method, resolve, tune_cudnn

__all__ = ['extract_features', 'extract_files', 'normalize', 'read_features', 'main']

FORMAT = 'cpc-extract/1'
# library messages name Python arguments; cpc-extract's errors name its flags
FLAGS = {'create the model with pretrained=False': 'pass --no-pretrained (random weights)'}


def _in_chans(model: torch.nn.Module, data_config: Dict) -> int:
    return int(getattr(model, 'in_chans', None) or data_config['input_size'][0])


def _mean_std(model: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    cfg = timm.data.resolve_model_data_config(model)
    return torch.tensor(cfg['mean']).view(1, -1, 1, 1), torch.tensor(cfg['std']).view(1, -1, 1, 1)


def _layout(model: torch.nn.Module) -> torch.memory_format:
    """The memory format of the model's convolution weights (channels_last after model.to(channels_last))."""
    for p in model.parameters():
        if p.ndim == 4:
            return torch.channels_last if p.is_contiguous(memory_format=torch.channels_last) and \
                not p.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


def normalize(images: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float, normalized with the model's mean/std, in the model's memory format."""
    mean, std = _mean_std(model)
    return ((images.float() / 255 - mean) / std).contiguous(memory_format=_layout(model))


@contextlib.contextmanager
def prepare_inference(model: torch.nn.Module, device, n_images: int, channels_last: Switch = 'auto',
                      compile: Switch = 'auto') -> Iterator[torch.nn.Module]:
    """Within the block, ``model`` is in the memory format for inference on ``device`` (``auto``:
    runtime.channels_last_default) and its ``forward_features`` is compiled (``auto``: runs of at least
    runtime.COMPILE_MIN_IMAGES images on a device where it pays; eager if compiling fails). Afterwards the model has
    its own memory format and methods again."""
    before = _layout(model)
    tune_cudnn(device)
    cl = resolve(channels_last, channels_last_default(device, 'inference'))
    model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    try:
        with compiled_method(model, 'forward_features', resolve(compile, compile_default(device, 'inference',
                                                                                         n_images))):
            yield model
    finally:
        model.to(memory_format=before)


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, keep_grid: bool = False,
                     desc: str = 'extract', progress: bool = True, channels_last: Switch = 'auto',
                     compile: Switch = 'auto') -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run a frozen encoder once over uint8 images (N, C, H, W) of the model's input size.

    ``channels_last`` and ``compile`` (True, False or 'auto'): see :func:`prepare_inference`.

    Returns (pooled float32 (N, F), grid float16 (N, F, rows, cols) or None). Pooled = the encoder's own
    ``forward_head(forward_features(x), pre_logits=True)`` (mean over the patch grid).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pooled, grids = [], []
    bar = tqdm(total=len(images), desc=desc, unit='img', disable=not progress, leave=False)
    with prepare_inference(model, device, len(images), channels_last, compile):
        for i in range(0, len(images), batch_size):
            z = model.forward_features(normalize(images[i:i + batch_size], model).to(device))
            pooled.append(model.forward_head(z, pre_logits=True).float().cpu())
            if keep_grid:
                grids.append(z.to(torch.float16).contiguous().cpu())
            bar.update(min(batch_size, len(images) - i))
    bar.close()
    model.train(was_training)
    return torch.cat(pooled), (torch.cat(grids) if keep_grid else None)


@torch.inference_mode()
def extract_files(
        model: torch.nn.Module,
        paths: Sequence[Union[str, os.PathLike]],
        batch_size: int = 64,
        grid: bool = False,
        device: Union[str, torch.device] = 'cpu',
        num_workers: int = 0,
        progress: bool = True,
        channels_last: Switch = 'auto',
        compile: Switch = 'auto',
) -> Tuple[torch.Tensor, List[str], List[Tuple[str, str]]]:
    """Encode image files with a timm model, preprocessed with the model's own data config.

    Args:
        model: a timm model (e.g. ``timm.create_model('cpcv2_resnet_tiny', pretrained=True)``); put in eval mode.
        paths: image files (see :func:`find_images` for folders).
        batch_size: images per forward pass.
        grid: return ``forward_features`` (B, C, rows, cols) instead of the pooled ``forward_head(pre_logits=True)``
            features (B, C).
        device: where the model runs.
        num_workers: DataLoader workers decoding images (0: in this process).
        progress: show a tqdm progress bar (on stderr).
        channels_last, compile: True, False or 'auto' (see :func:`prepare_inference`).

    Returns:
        ``(features, kept, skipped)``: float32 features on the CPU, (N, C) or (N, C, rows, cols), one row per path in
        ``kept`` (str, input order); ``skipped`` lists ``(path, error)`` for files that could not be read.
    """
    data_config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    paths = [Path(p) for p in paths]
    loader = DataLoader(
        ImageFiles(paths, _in_chans(model, data_config), transform), batch_size=batch_size, shuffle=False,
        num_workers=cap_workers(num_workers), collate_fn=collate_readable, pin_memory=torch.device(device).type == 'cuda')
    model = model.eval().to(device)
    feats, kept, skipped = [], [], []
    bar = tqdm(total=len(paths), desc='cpc-extract', unit='img', disable=not progress, file=sys.stderr)
    with prepare_inference(model, device, len(paths), channels_last, compile):
        layout = _layout(model)  # the images follow the model's format
        for images, idx, bad in loader:
            bar.update(len(idx) + len(bad))
            skipped.extend((str(paths[i]), err) for i, err in bad)
            if images is None:
                continue
            out = model.forward_features(images.to(device, non_blocking=True).contiguous(memory_format=layout))
            if grid:
                if out.ndim != 4:
                    raise ValueError(f'--grid needs 4-D features (B, C, rows, cols); {type(model).__name__} gives '
                                     f'shape {tuple(out.shape)}. Extract pooled features instead.')
            else:
                out = model.forward_head(out, pre_logits=True)
            feats.append(out.float().cpu())
            kept.extend(str(paths[i]) for i in idx)
    bar.close()
    if feats:
        features = torch.cat(feats)
    else:
        features = torch.zeros((0, getattr(model, 'num_features', 0)))
    return features, kept, skipped


def read_features(path: Union[str, os.PathLike]) -> Tuple[torch.Tensor, List[str], Dict]:
    """Read a ``cpc-extract`` file: ``(features, paths, metadata)`` (metadata JSON fields decoded)."""
    with safetensors.safe_open(str(path), framework='pt') as f:
        meta = dict(f.metadata() or {})
        features = f.get_tensor('features')
    for k in ('paths', 'skipped', 'shape', 'data_config', 'grid'):
        if k in meta:
            meta[k] = json.loads(meta[k])
    return features, meta['paths'], meta


def _save(out: Path, features: torch.Tensor, kept: List[str], skipped: List[Tuple[str, str]], meta: Dict) -> None:
    metadata = dict(
        format=FORMAT, paths=json.dumps(kept), skipped=json.dumps([dict(path=p, error=e) for p, e in skipped]),
        shape=json.dumps(list(features.shape)),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    with atomic_file(out) as tmp:
        safetensors.torch.save_file({'features': features.contiguous()}, str(tmp), metadata=metadata)


def checkpoint_weights(checkpoint: str) -> Tuple[Path, Dict]:
    """The weights file ``checkpoint`` means and the model_args it was saved with: a .safetensors file ({}), a
    published folder (model.safetensors, config.json), or a cpc-train step folder or run folder (its newest step:
    encoder.safetensors, config.json), as cpc-eval and cpc-train --resume take them.

    Raises:
        FileNotFoundError, CorruptWeightsError, ValueError: saying what was expected.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
        folder = resolve_checkpoint(path)
        return check_weights_file(folder / 'encoder.safetensors'), dict(read_config(folder).get('model_args') or {})
    weights = check_weights_file(path)
    config = path / 'config.json'
    model_args = json.loads(config.read_text()).get('model_args') or {} if path.is_dir() and config.is_file() else {}
    return weights, {k: v for k, v in model_args.items() if k != 'num_classes'}


def create_model(name: str, pretrained: bool = True, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """The model for ``cpc-extract``: ``timm.create_model(name, pretrained)``, or the weights of ``checkpoint`` (see
    :func:`checkpoint_weights`; loaded strictly through the model's checkpoint filter)."""
    if checkpoint:
        check_model_name(name)
        weights, model_args = checkpoint_weights(checkpoint)
        return checked_create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                    **model_args)
    return checked_create_model(name, pretrained=pretrained)


def _parser() -> argparse.ArgumentParser:
    parser = C.ArgumentParser(
        prog='cpc-extract', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Extract features of image files with a CPC (or any timm) model.\n\n'
                    '  cpc-extract --model cpcv2_resnet_tiny.fmnist images/ --out features.safetensors',
        epilog='Output: safetensors with tensor "features" and metadata "paths"/"skipped" (JSON lists). Exit status: '
               '0 written, 2 bad input (one line says what to change).')
    data = parser.add_argument_group('data')
    data.add_argument('inputs', nargs='+', help='image files and/or folders (searched recursively)')
    data.add_argument('--batch-size', type=int, default=64, metavar='N', help='images per forward pass (default: 64)')
    data.add_argument('--workers', type=int, default=0, metavar='N',
                      help='DataLoader processes decoding images, at most the cores available; 0 = in this '
                           'process (default: 0)')
    model = parser.add_argument_group('model')
    model.add_argument('--model', required=True, metavar='NAME',
                       help='timm name with a published tag (cpcv2_resnet_tiny.fmnist), hf-hub:ORG/NAME or '
                            'local-dir:DIR (required)')
    model.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                       help='load the published weights of --model (default: yes)')
    model.add_argument('--checkpoint', default=None, metavar='PATH',
                       help='weights to load instead: a .safetensors file, a published folder, or a cpc-train '
                            'checkpoint (step folder, or run folder: its newest step) (default: none)')
    out = parser.add_argument_group('output')
    out.add_argument('--out', required=True, metavar='FILE',
                     help='the .safetensors file to write; a missing folder is created (required)')
    out.add_argument('--grid', action='store_true',
                     help='save the latent grid (N, C, rows, cols) instead of pooled (N, C) features (default: off)')
    runtime = parser.add_argument_group('runtime')
    runtime.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, mps or auto (default: cpu)')
    runtime.add_argument('--no-progress', action='store_true', help='no progress bar (default: a bar on stderr)')
    for flag, what in (('--compile', 'torch.compile forward_features; auto = for long runs where it measured faster'),
                       ('--channels-last', 'NHWC model and images; auto = the measured default of --device')):
        runtime.add_argument(flag, choices=('auto', 'on', 'off'), default='auto', help=f'{what} (default: auto)')
    return parser


def _check_args(args) -> None:
    """Everything that can be checked before any work; raises ConfigError naming the option."""
    if args.batch_size < 1:
        raise ConfigError(f'--batch-size {args.batch_size}: must be >= 1')
    if args.workers < 0:
        raise ConfigError(f'--workers {args.workers}: must be >= 0')
    check_device(args.device)
    check_out_file(args.out, suffix='.safetensors')
    check_model_name(args.model)
    if args.checkpoint:
        try:
            checkpoint_weights(args.checkpoint)
        except (FileNotFoundError, CorruptWeightsError, ValueError) as e:
            raise ConfigError(f'--checkpoint: {e}') from None


def _switch(text: str) -> Switch:
    return text == 'on' if text in ('on', 'off') else text


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        paths = find_images(args.inputs)
        model = create_model(args.model, args.pretrained, args.checkpoint)
    except (ConfigError, ValueError, FileNotFoundError, CorruptWeightsError, RuntimeError) as e:
        print(f'cpc-extract: error: {one_line(e, FLAGS)}', file=sys.stderr)
        return 2
    try:
        features, kept, skipped = extract_files(
            model, paths, batch_size=args.batch_size, grid=args.grid, device=check_device(args.device),
            num_workers=args.workers, progress=not args.no_progress,
            channels_last=_switch(args.channels_last), compile=_switch(args.compile))
    except ValueError as e:  # --grid for a model without a feature grid
        print(f'cpc-extract: error: {one_line(e)}', file=sys.stderr)
        return 2
    if skipped:
        print(f'cpc-extract: skipped {len(skipped)} unreadable image(s):', file=sys.stderr)
        for p, err in skipped:
            print(f'  {p}: {err}', file=sys.stderr)
    if not kept:
        print(f'cpc-extract: error: none of the {len(paths)} image(s) could be read; nothing written.', file=sys.stderr)
        return 2
    created = next((p for p in reversed(Path(args.out).parents) if not p.exists()), None)
    _save(Path(args.out), features, kept, skipped, dict(
        model=args.model, checkpoint=args.checkpoint or '', grid=args.grid,
        data_config=timm.data.resolve_model_data_config(model)))
    print(f'cpc-extract: wrote features {tuple(features.shape)} of {len(kept)} image(s) to {args.out}'
          + (f' (created the folder {created})' if created else ''), file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
