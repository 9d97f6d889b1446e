"""Image sources for pretraining and evaluation: folders of image files and Fashion-MNIST IDX files, and the
sampler that gives every rank its part of each global batch.

Every dataset yields ``(uint8 image (C, H, W) or None, index, error or None)``; conversion to float, patching and
augmentation happen batched in the training step. Unreadable images never crash a run: ``collate_readable``
(cpc_models.images) drops them and reports them.
"""
import gzip
import os
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from .file_index import FileIndex
from .images import ImageFiles, convert_image

__all__ = [
    'ImageFolderDataset', 'HFImageDataset', 'load_hf_dataset', 'HF_PREFIX', 'TensorImageDataset', 'StepSampler', 'DataPosition', 'epoch_permutation', 'NoReadableImagesError', 'check_readable', 'refill',
    'read_idx', 'fashion_mnist_dir', 'load_fashion_mnist', 'FASHION_MNIST_CLASSES',
]

FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FMNIST_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


class ImageFolderDataset(ImageFiles):
    """Images found recursively under a folder, as uint8 tensors (C, size, size), listed by a
    :class:`~cpc_models.file_index.FileIndex` (``index``; default: the folder scanned now, in memory).

    Training: resize the short side to ``resize`` then random-crop ``size``; eval: centre crop. Items are
    ``(image or None, index, error or None)`` (see :class:`~cpc_models.images.ImageFiles`); ``labels`` and
    ``classes`` are the ImageFolder classes of the files (``root/<class>/...``; -1 for files in the root itself).
    """

    def __init__(self, root, size: int, channels: int = 3, resize: Optional[int] = None, train: bool = True,
                 index: Optional[FileIndex] = None):
        crop = v2.RandomCrop(size) if train else v2.CenterCrop(size)
        self.root = root
        self.index = index if index is not None else FileIndex.scan(root)
        super().__init__([], channels, v2.Compose([v2.PILToTensor(), v2.Resize(resize or size, antialias=True), crop]))
        self.paths = self.index.paths  # a sequence over the index's arrays: no Path per file is kept

    @property
    def labels(self) -> np.ndarray:
        return self.index.labels

    @property
    def classes(self) -> List[str]:
        return self.index.classes


HF_PREFIX = 'hf:'


def load_hf_dataset(source: str, split: str = 'train'):
    """A Hugging Face ``datasets`` dataset: ``source`` is a folder written by ``save_to_disk`` (a Dataset, or a
    DatasetDict of which ``split`` is taken) or a Hub name (``load_dataset(source, split=split)``, cached in the
    Hugging Face cache). Needs the optional extra: ``pip install 'cpc-models[datasets]'``.

    Raises:
        ImportError: ``datasets`` is not installed (the message says how to install it).
        FileNotFoundError, ValueError: no such dataset or split.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face datasets are read with the `datasets` package: pip install "
                          "'cpc-models[datasets]'") from None
    if Path(source).is_dir():
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f'{source} has the splits {", ".join(ds)}, not {split!r}; pass --data-split.')
            ds = ds[split]
        return ds
    return datasets.load_dataset(source, split=split)


class HFImageDataset(Dataset):
    """The images of a Hugging Face ``datasets`` dataset (e.g. ``ILSVRC/imagenet-1k``, or one saved with
    ``save_to_disk``), as uint8 tensors (C, size, size) like :class:`ImageFolderDataset`: resize the short side to
    ``resize``, random crop ``size`` (centre crop when not ``train``). Items are ``(image or None, index, error or
    None)``; an image that does not decode is reported, never raised.

    ``image_column``: the column of images ('' = the first column of the ``datasets.Image`` feature type).
    ``labels`` / ``classes``: a ``ClassLabel`` column named ``label`` (or ``labels``), if there is one.
    """

    def __init__(self, dataset, size: int, channels: int = 3, resize: Optional[int] = None, train: bool = True,
                 image_column: str = '', root: str = ''):
        import datasets
        features = dataset.features
        if not image_column:
            image_column = next((k for k, f in features.items() if isinstance(f, datasets.Image)), '')
            if not image_column:
                raise ValueError(f'{root or "the dataset"} has no image column (columns: {", ".join(features)}); '
                                 f'pass --image-column.')
        elif image_column not in features:
            raise ValueError(f'{root or "the dataset"} has no column {image_column!r} (columns: '
                             f'{", ".join(features)}); pass --image-column.')
        self.root, self.image_column, self.channels = root or 'the dataset', image_column, channels
        label = next((k for k in ('label', 'labels') if isinstance(features.get(k), datasets.ClassLabel)), None)
        self.classes: List[str] = features[label].names if label else []
        self._label_column = label
        self._labels: Optional[np.ndarray] = None
        self.dataset = dataset.select_columns([image_column])
        crop = v2.RandomCrop(size) if train else v2.CenterCrop(size)
        self.transform = v2.Compose([v2.PILToTensor(), v2.Resize(resize or size, antialias=True), crop])
        self._full = dataset

    @property
    def labels(self) -> Optional[np.ndarray]:
        if self._label_column and self._labels is None:
            self._labels = np.asarray(self._full[self._label_column], dtype=np.int64)
        return self._labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            img = convert_image(self.dataset[int(i)][self.image_column], self.channels)
        except Exception as e:  # a record that does not decode: reported like an unreadable file
            return None, i, f'{type(e).__name__}: {e}'
        return self.transform(img), i, None


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W), as ``(image, index, None)`` items like :class:`ImageFolderDataset`."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i, None


class DataPosition(NamedTuple):
    """Where a run is in the global image stream: ``epoch`` and the images of that epoch's order already taken."""
    epoch: int
    offset: int


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (int64, (n,)) in which epoch ``epoch`` visits ``n`` images; the same on every rank and world size."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class StepSampler(Sampler):
    """Global batches from a seeded per-epoch permutation of the images: one global image stream, whatever the
    number of processes.

    Epoch e visits the images in the order ``epoch_permutation(n, seed, e)``; a step takes the next ``global_batch``
    images of it (an epoch ends when fewer than ``global_batch`` are left: its last ``n % global_batch`` images are
    not used in that epoch). With ``accum_steps`` k a step is k micro-batches of ``global_batch / k`` consecutive
    images; rank r of ``world`` takes the contiguous slice r of every micro-batch. Iterating yields rank r's
    micro-batches (lists of image indices), k per step.

    The run's place in the stream is a :class:`DataPosition` (epoch, images of it taken), written into every
    checkpoint: a run resumed at that position takes the images an uninterrupted run would have taken next, on any
    number of processes and with any split into micro-batches. ``start_step`` alone (checkpoints without a
    position) means ``start_step`` steps of ``global_batch`` from the start. The permutation is drawn once per
    epoch, not per step.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int = 0,
                 position: Optional[DataPosition] = None, accum_steps: int = 1):
        if global_batch % (world * accum_steps):
            what = f'the number of processes {world}' + (f' x --accum-steps {accum_steps}' if accum_steps > 1 else '')
            raise ValueError(f'batch_size {global_batch} must be divisible by {what}.')
        if n < global_batch:
            raise ValueError(f'The dataset has {n} images, fewer than one batch of {global_batch}; lower --batch-size.')
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.accum_steps = accum_steps
        self.steps_per_epoch = n // global_batch
        self.start_step = start_step
        if position is None:
            epoch, i = divmod(start_step, self.steps_per_epoch)
            position = DataPosition(epoch, i * global_batch)
        self.position = DataPosition(*position)
        self._perm: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def advance(self, position: DataPosition, steps: int = 1) -> DataPosition:
        """The position ``steps`` steps after ``position``."""
        epoch, offset = position
        for _ in range(steps):
            if offset + self.global_batch > self.n:
                epoch, offset = epoch + 1, 0
            offset += self.global_batch
        return DataPosition(epoch, offset)

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order, drawn once and kept until the next epoch."""
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self._perm[1]

    def global_batch_at(self, position: DataPosition) -> List[int]:
        """The image indices of the step starting at ``position``, all ranks, in stream order."""
        epoch, offset = position
        if offset + self.global_batch > self.n:
            epoch, offset = epoch + 1, 0
        return self.permutation(epoch)[offset:offset + self.global_batch].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        epoch, offset = self.position
        micro = self.global_batch // self.accum_steps
        local = micro // self.world
        while True:
            if offset + self.global_batch > self.n:
                epoch, offset = epoch + 1, 0
            perm = self.permutation(epoch)
            for j in range(self.accum_steps):
                start = offset + j * micro + self.rank * local
                yield perm[start:start + local].tolist()
            offset += self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch


class NoReadableImagesError(ValueError):
    """The data gave no readable image where the run needed one."""

    def __init__(self, dataset, skipped: int, errors: List[Tuple[int, str]]):
        where = getattr(dataset, 'root', 'the data')
        paths = getattr(dataset, 'paths', None)
        reasons = '; '.join(f'{paths[i].name if paths else i}: {err}' for i, err in errors[:3])
        super().__init__(f'no readable images under {where} ({skipped} skipped: first reasons {reasons}). Check that '
                         f'the folder holds images PIL can open (JPEG, PNG, ...), or pass another --data.')


def check_readable(dataset, sample: int = 32) -> None:
    """Read up to ``sample`` items spread evenly over ``dataset`` until one is readable; raise NoReadableImagesError
    when none is (a folder of junk stops here, before any step). Deterministic: every rank decides the same."""
    n = len(dataset)
    errors = []
    for i in sorted({i * n // min(n, sample) for i in range(min(n, sample))}):
        _, _, err = dataset[i]
        if err is None:
            return
        errors.append((i, err))
    raise NoReadableImagesError(dataset, len(errors), errors)


def refill(dataset, failed: List[int], want: int, tries: int
           ) -> Tuple[Optional[torch.Tensor], List[Tuple[int, str]]]:
    """For a batch none of whose items ``failed`` was readable: up to ``want`` readable images from the items after
    the last of them (file order, wrapping around), read until ``tries`` in a row were unreadable. Returns the images
    (B, C, H, W), or None if none was readable, and the errors of the others. Deterministic, so a resumed run reads
    the same images."""
    start = max(failed) + 1 if failed else 0
    images, errors, in_a_row = [], [], 0
    for k in range(len(dataset)):
        if len(images) == want or in_a_row >= tries:
            break
        i = (start + k) % len(dataset)
        image, _, err = dataset[i]
        if err is None:
            images.append(image)
            in_a_row = 0
        else:
            errors.append((i, err))
            in_a_row += 1
    return (torch.stack(images) if images else None), errors


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
