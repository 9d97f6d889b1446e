"""Image sources for pretraining and evaluation: folders of image files and Fashion-MNIST IDX files.

Every dataset yields uint8 image tensors (C, H, W); conversion to float, patching and augmentation happen
batched in the training loop. Unreadable images never crash a run: they come out as ``None`` and
``collate_skip`` drops them and counts them.
"""
import gzip
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = [
    'IMAGE_EXTENSIONS', 'find_images', 'ImageFolderDataset', 'TensorImageDataset', 'read_idx',
    'fashion_mnist_dir', 'load_fashion_mnist', 'collate_skip', 'FASHION_MNIST_CLASSES',
]

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff')
FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FMNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def find_images(root, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """All image files under `root` (recursive), sorted, by extension (case-insensitive)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'Image folder {root} does not exist; pass a folder of JPEG/PNG images.')
    files = sorted(p for p in root.rglob('*') if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f'No images ({", ".join(extensions)}) found under {root}.')
    return files


def load_image(path, channels: int) -> Image.Image:
    """Open an image file and convert it to 'L' (channels=1) or 'RGB' (channels=3), whatever its mode."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
        if img.mode in ('RGBA', 'LA', 'P') and channels == 3:
            img = img.convert('RGBA').convert('RGB')
        return img.convert('L' if channels == 1 else 'RGB')


class ImageFolderDataset(Dataset):
    """Images found recursively under a folder (labels unused), as uint8 tensors (C, size, size).

    Training: resize the short side to ``resize`` then random-crop ``size``; eval: centre crop.
    An unreadable image yields ``None`` (see :func:`collate_skip`).
    """

    def __init__(self, root, size: int, channels: int = 3, resize: Optional[int] = None, train: bool = True):
        self.files = find_images(root)
        self.channels = channels
        crop = v2.RandomCrop(size) if train else v2.CenterCrop(size)
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(resize or size, antialias=True), crop])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Optional[torch.Tensor]:
        try:
            img = load_image(self.files[i], self.channels)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            return None
        return self.transform(img)


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W), optionally with labels."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


def read_idx(path) -> np.ndarray:
    """Read an IDX file (plain or .gz), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte IDX file (bad magic number); re-download it.')
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f'{path} is truncated: {body.size} values for shape {dims}; re-download it.')
    return body.reshape(dims)


def fashion_mnist_dir(root=None) -> Path:
    """The folder holding Fashion-MNIST's IDX files: `root`, $CPC_FASHION_MNIST_DIR, or the Debian package's."""
    candidates = [root] if root else [os.environ.get('CPC_FASHION_MNIST_DIR'), *FASHION_MNIST_DIRS]
    for c in filter(None, candidates):
        c = Path(c)
        for sub in (c, c / 'FashionMNIST' / 'raw', c / 'raw'):
            if any((sub / (_FMNIST_FILES['train'][0] + ext)).is_file() for ext in ('', '.gz')):
                return sub
    raise FileNotFoundError(
        f'Fashion-MNIST IDX files not found in {[str(c) for c in candidates if c]}. Install them with '
        f'`apt-get install dataset-fashion-mnist` (Debian), or download with '
        f'`torchvision.datasets.FashionMNIST(ROOT, download=True)` and pass ROOT (or set CPC_FASHION_MNIST_DIR).')


def load_fashion_mnist(split: str = 'train', root=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as tensors: images uint8 (N, 1, 28, 28) and labels int64 (N,)."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got '{split}'.")
    d = fashion_mnist_dir(root)

    def _find(name):
        for ext in ('', '.gz'):
            if (d / (name + ext)).is_file():
                return d / (name + ext)
        raise FileNotFoundError(f'{name}[.gz] missing in {d}.')

    img_file, lbl_file = _FMNIST_FILES[split]
    images = torch.from_numpy(read_idx(_find(img_file)).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(_find(lbl_file)).astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(f'{d}: {len(images)} images but {len(labels)} labels.')
    return images, labels


def collate_skip(batch):
    """Stack a batch, dropping unreadable samples (None). Returns (images (B, C, H, W) or None, n_skipped)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None, len(batch)
    return torch.stack(kept), len(batch) - len(kept)
