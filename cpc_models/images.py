"""Reading image files, the same way everywhere: pretraining folders, ``cpc-extract`` and the examples.

* :func:`find_images`: image files of folders (recursive, sorted) and single files.
* :func:`open_image`: open any PIL mode and size, apply the EXIF orientation, convert to 1 (L), 3 (RGB) or 4 (RGBA)
  channels. 16-bit samples become 8-bit by one rule, ``round(v / 257)`` (0 -> 0, 65535 -> 255); palette images go
  through RGBA so that transparency is handled.
* :class:`ImageFiles` + :func:`collate_readable`: a Dataset that never raises on a bad file; unreadable files are
  skipped and reported (index and error), never fatal.
"""
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = ['IMAGE_EXTENSIONS', 'find_images', 'open_image', 'convert_image', 'ImageFiles', 'collate_readable']

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
_MODE = {1: 'L', 3: 'RGB', 4: 'RGBA'}


def find_images(inputs: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    """Image files of ``inputs`` (a folder, a file, or a list of them): folders are searched recursively for
    :data:`IMAGE_EXTENSIONS` (case-insensitive, sorted), files are kept as given.

    Raises:
        FileNotFoundError: an input does not exist, or nothing was found.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: List[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f'No such image file or folder: {item}')
    if not paths:
        raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) found in {", ".join(map(str, items))}.')
    return paths


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) and float (F) images as 8-bit L: values above 255 mean a 16-bit range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith('I;16') or arr.max(initial=0) > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode='L')


def _check_channels(channels: int) -> None:
    if channels not in _MODE:
        raise ValueError(f'Cannot convert images to {channels} channels; supported: {sorted(_MODE)}.')


def open_image(path: PathLike, channels: int) -> Image.Image:
    """Open an image file of any PIL mode, upright (EXIF orientation applied), with ``channels`` channels.

    Raises:
        ValueError: ``channels`` is not 1, 3 or 4.
        PIL.UnidentifiedImageError, OSError, ...: the file is not a readable image.
    """
    _check_channels(channels)
    with Image.open(path) as img:
        img.load()
    return convert_image(img, channels)


def convert_image(img: Image.Image, channels: int) -> Image.Image:
    """An opened PIL image upright (EXIF orientation applied) with ``channels`` channels, by :func:`open_image`'s
    rules (also for images that come decoded, e.g. from a Hugging Face dataset)."""
    _check_channels(channels)
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith('I') or img.mode == 'F':
        img = _to_8bit(img)
    elif img.mode == 'P':
        img = img.convert('RGBA')
    return img.convert(_MODE[channels])


class ImageFiles(Dataset):
    """Image files as ``(image or None, index, error or None)``; never raises on a bad file.

    Args:
        paths: image files (see :func:`find_images`).
        channels: channels of every image (1, 3 or 4).
        transform: applied to the PIL image (e.g. to a uint8 tensor, or timm's eval transform).
    """

    def __init__(self, paths: Sequence[PathLike], channels: int, transform: Optional[Callable] = None):
        _check_channels(channels)
        self.paths, self.channels, self.transform = [Path(p) for p in paths], channels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = open_image(self.paths[i], self.channels)
        except Exception as e:  # decoders of untrusted files raise many types: truncated, corrupt, bombs ...
            return None, i, f'{type(e).__name__}: {e}'
        return (self.transform(img) if self.transform else img), i, None


def collate_readable(items) -> Tuple[Optional[torch.Tensor], List[int], List[Tuple[int, str]]]:
    """Stack the readable images of a batch of ``(image, index, error)``.

    Returns:
        ``(images (B, C, H, W) or None if none was readable, their indices, [(index, error)] of the others)``.
    """
    good = [(x, i) for x, i, err in items if err is None]
    bad = [(i, err) for _, i, err in items if err is not None]
    return (torch.stack([x for x, _ in good]) if good else None), [i for _, i in good], bad
