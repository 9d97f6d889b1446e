"""Where the labelled images of an evaluation come from (``--data``): Fashion-MNIST, an ImageFolder tree, or a Hugging
Face ``datasets`` dataset; and the splits every protocol uses (pool, the two halves of val, the eval split).

* ``fashion-mnist``: the IDX files (``--data-dir``), as before.
* a folder: one subfolder per class (``cat/``, ``dog/``, ...), or ``train/``, ``val/``, ``test/`` each holding the
  same class subfolders. Without ``test/`` a seeded class-stratified ``test_fraction`` of every class is held out
  as the test split first; without ``val/`` the validation split is carved from the rest (``val_fraction`` of it,
  class-balanced, seed ``val_seed``). A folder written by ``datasets.Dataset.save_to_disk`` is read as a dataset.
* ``hf:NAME`` (or ``hf:NAME:CONFIG``): a dataset of the Hugging Face Hub (optional extra ``datasets``); its
  ``train`` / ``validation`` / ``test`` splits are used as the folder's.

Images are read with :mod:`cpc_models.images` (EXIF orientation, any mode and bit depth), brought to the model's
channels and input size with the model's own data config (timm's eval transform: resize, center crop), and kept as
uint8 (N, C, H, W). Unreadable files are skipped and listed. Samples are ordered by file name (then class), so a
folder written from an indexed dataset (``00012.png``) keeps the dataset's order and its seeded draws.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
from PIL import Image
from torchvision.transforms import v2

from ..config import ConfigError
from ..data import fashion_mnist_dir
from ..images import IMAGE_EXTENSIONS, convert_image, open_image
from .data import EvalData, balanced_count, split_halves, split_train_val

__all__ = ['FASHION_MNIST', 'SPLITS', 'ImageList', 'LabelledImages', 'source_kind', 'check_source', 'list_image_folder',
           'check_listing', 'image_transform', 'load_images', 'load_source', 'stratified_holdout', 'eval_splits',
           'mode_channels']

FASHION_MNIST = 'fashion-mnist'
SPLITS = ('train', 'val', 'test')
_HF_SPLITS = {'train': ('train',), 'val': ('validation', 'val', 'valid'), 'test': ('test',)}


@dataclass
class ImageList:
    """A listing before any image is decoded: per split, (item, class index) pairs; ``item`` is a path (folder)
    or a row index (dataset)."""
    classes: List[str]
    splits: Dict[str, List[Tuple[object, int]]]
    kind: str  # 'folder' | 'datasets'
    where: str  # the --data value, for messages
    dataset: object = None  # the datasets.DatasetDict of a 'datasets' source
    image_column: str = 'image'
    label_column: str = 'label'


@dataclass
class LabelledImages:
    """Decoded images of every split: uint8 (N, C, H, W) of the model's input size, int64 labels (N,)."""
    images: Dict[str, torch.Tensor]
    labels: Dict[str, torch.Tensor]
    classes: List[str]
    name: str
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (file or row, error)
    note: str = ''  # how the splits were made (printed, and written into results.json)


# ============ which source ============

def check_source(data: str, data_dir: str = '') -> str:
    """:func:`source_kind` of ``--data``, and for Fashion-MNIST that its IDX folder (``--data-dir``, else the default
    places) exists; ConfigError naming the flag otherwise."""
    if data == FASHION_MNIST:
        try:
            fashion_mnist_dir(data_dir or None)
        except FileNotFoundError as e:
            raise ConfigError(f'--data-dir: {e}') from None
    return source_kind(data)


def source_kind(data: str) -> str:
    """'fashion-mnist', 'folder', 'saved' (a datasets.save_to_disk folder) or 'hub'; ConfigError naming --data if it
    is none of them."""
    if data == FASHION_MNIST:
        return FASHION_MNIST
    if data.startswith('hf:'):
        if len(data) <= 3:
            raise ConfigError('--data hf:NAME: give the Hub dataset after "hf:", e.g. hf:ylecun/mnist')
        return 'hub'
    path = Path(data).expanduser()
    if path.is_dir():
        if (path / 'dataset_dict.json').is_file() or (path / 'dataset_info.json').is_file():
            return 'saved'
        return 'folder'
    if path.exists():
        raise ConfigError(f'--data {data}: is a file; give a folder with one subfolder per class, "fashion-mnist" '
                          f'or hf:NAME')
    raise ConfigError(f'--data {data}: no such folder; give a folder with one subfolder per class (or train/, val/, '
                      f'test/ of them), "fashion-mnist", or hf:NAME for a Hugging Face dataset')


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError('--data: reading a Hugging Face dataset needs the optional extra: pip install '
                          '"cpc-models[datasets]"') from None
    return datasets


# ============ listing (nothing decoded) ============

def _class_folders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _images_of(folder: Path) -> List[Path]:
    return [p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def list_image_folder(root: os.PathLike, where: str = '') -> ImageList:
    """The classes (sorted subfolder names) and, per split present, the image files with their class index, ordered
    by path within the class folder, then class. Raises ConfigError (naming --data) for a folder without class
    subfolders or with splits whose classes differ."""
    root = Path(root)
    where = where or str(root)
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and 'train' not in split_dirs and 'test' not in split_dirs:
        split_dirs = {}  # a lone val/ folder is a class
    tops = {'all': root} if not split_dirs else split_dirs
    listing: Dict[str, List[Tuple[object, int]]] = {}
    classes: Optional[List[str]] = None
    for split, folder in tops.items():
        sub = _class_folders(folder)
        loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not sub:
            what = f'{len(loose)} image(s) but no class subfolders' if loose else 'no class subfolders'
            raise ConfigError(f'--data {where}: {folder} has {what}; put the images of each class in a subfolder '
                              f'named after it (cat/, dog/, ...)')
        names = [p.name for p in sub]
        if classes is None:
            classes = names
        elif names != classes:
            diff = sorted(set(names) ^ set(classes))
            raise ConfigError(f'--data {where}: {folder} has other class subfolders than the first split '
                              f'({", ".join(diff[:5])}); give every split the same classes')
        items = []
        for c, d in enumerate(sub):
            items += [(p.relative_to(d).as_posix(), c, p) for p in _images_of(d)]
        listing[split] = [(p, c) for _, c, p in sorted(items, key=lambda t: (t[0], t[1]))]
    return ImageList(classes, listing, 'folder', where)


def _list_dataset(data: str, kind: str) -> ImageList:
    datasets = _import_datasets()
    try:
        if kind == 'saved':
            ds = datasets.load_from_disk(str(Path(data).expanduser()))
        else:
            name, _, config = data[3:].partition(':')
            ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # the library raises many types for a missing or broken dataset
        raise ConfigError(f'--data {data}: could not load the dataset ({type(e).__name__}: {e})') from None
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict(train=ds)
    found = {s: next((n for n in names if n in ds), None) for s, names in _HF_SPLITS.items()}
    found = {s: n for s, n in found.items() if n}
    if not found:
        raise ConfigError(f'--data {data}: no train, validation or test split (it has {", ".join(ds)}); give a '
                          f'dataset with a "train" split')
    first = ds[next(iter(found.values()))]
    image_col = next((c for c, f in first.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c, f in first.features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        raise ConfigError(f'--data {data}: needs an Image column and a ClassLabel column (it has '
                          f'{dict(first.features)}); cast them with datasets\' cast_column')
    classes = list(first.features[label_col].names)
    splits = {s: [(i, int(y)) for i, y in enumerate(ds[n][label_col])] for s, n in found.items()}
    tables = {s: ds[n] for s, n in found.items()}
    if 'train' not in splits and 'test' not in splits:  # a lone validation split: split as a folder of classes
        splits, tables = {'all': splits['val']}, {'all': tables['val']}
    return ImageList(classes, splits, 'datasets', data, tables, image_col, label_col)


def check_listing(listing: ImageList, need_per_class: Callable[[int], int], what: str) -> None:
    """Refuse (ConfigError) a single class, or a class with fewer labelled images than ``need_per_class(n_c)``
    (n_c: the class's images in the labelled split) says the requested label amounts take."""
    where = listing.where
    if len(listing.classes) < 2:
        raise ConfigError(f'--data {where}: only one class ({", ".join(listing.classes) or "none"}); a classifier '
                          f'needs at least two class subfolders')
    split = 'train' if 'train' in listing.splits else 'all'
    counts = torch.bincount(torch.tensor([c for _, c in listing.splits[split]] or [0], dtype=torch.long),
                            minlength=len(listing.classes)).tolist()
    if not listing.splits[split]:
        counts = [0] * len(listing.classes)
    for name, n in zip(listing.classes, counts, strict=True):
        need = need_per_class(n)
        if n < need:
            raise ConfigError(f'--data {where}: class "{name}" has {n} image(s) in {split}, fewer than the {need} '
                              f'{what}; add images or lower the label amounts')


def mode_channels(mode: str) -> int:
    """The channels a PIL mode carries (colour counts as 3, whatever the alpha)."""
    if mode in ('1', 'L', 'LA', 'La', 'I', 'F') or mode.startswith('I;'):
        return 1
    return 3


# ============ decoding ============

def image_transform(data_config: Dict) -> Callable:
    """PIL image -> uint8 tensor (C, H, W) of the model's input size: timm's eval transform of ``data_config``
    (resize, center crop) without its float conversion and normalization."""
    full = timm.data.create_transform(**data_config, is_training=False)
    keep = []
    for t in full.transforms:
        if type(t).__name__ in ('ToTensor', 'MaybeToTensor', 'Normalize', 'ToDtype', 'MaybePILToTensor'):
            break
        keep.append(t)
    return v2.Compose([*keep, v2.PILToTensor()])


def _open(item, listing: ImageList, split: str, channels: int):
    """(PIL image of ``channels`` channels, the source's own channels) of one item."""
    if listing.kind == 'folder':
        with Image.open(item) as img:
            mode = img.mode
        return open_image(item, channels), mode_channels(mode)
    img = listing.dataset[split][item][listing.image_column]
    return convert_image(img, channels), mode_channels(img.mode)


def load_images(listing: ImageList, data_config: Dict, convert_colour: bool = False,
                progress: bool = False) -> LabelledImages:
    """Decode every listed image to uint8 (C, H, W) of ``data_config['input_size']``. Unreadable files are skipped
    (listed in ``skipped``). Colour images for a 1-channel model are refused (ConfigError) unless
    ``convert_colour``."""
    from tqdm.auto import tqdm
    channels = int(data_config['input_size'][0])
    prep = image_transform(data_config)
    images, labels, skipped, colour = {}, {}, [], []
    total = sum(len(v) for v in listing.splits.values())
    bar = tqdm(total=total, desc='read images', unit='img', disable=not progress, leave=False)
    for split, items in listing.splits.items():
        xs, ys = [], []
        for item, c in items:
            bar.update()
            name = str(item) if listing.kind == 'folder' else f'{split}[{item}]'
            try:
                img, src_channels = _open(item, listing, split, channels)
            except Exception as e:  # decoders of untrusted files raise many types
                skipped.append((name, f'{type(e).__name__}: {e}'))
                continue
            if src_channels > channels and not convert_colour:
                colour.append(name)
            xs.append(prep(img))
            ys.append(c)
        images[split] = torch.stack(xs) if xs else torch.zeros((0, channels, *data_config['input_size'][1:]),
                                                               dtype=torch.uint8)
        labels[split] = torch.tensor(ys, dtype=torch.long)
    bar.close()
    if colour:
        raise ConfigError(f'--data {listing.where}: {len(colour)} colour image(s) (e.g. {colour[0]}) for a model '
                          f'with {channels} channel(s); evaluate a {3}-channel model, or pass --convert-colour to '
                          f'read them as greyscale')
    if not sum(len(v) for v in labels.values()):
        raise ConfigError(f'--data {listing.where}: none of the {total} image(s) could be read')
    return LabelledImages(images, labels, list(listing.classes), listing.where, skipped)


# ============ splits ============

def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): sorted indices; the held-out part takes round(fraction * n_c) images of every class c (at
    least 1, and at least 1 left), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    held = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    held = torch.sort(torch.cat(held)).values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask, as_tuple=True)[0], held


def _hold_out_test(data: LabelledImages, test_fraction: float, seed: int) -> None:
    x, y = data.images.pop('train'), data.labels.pop('train')
    keep, test = stratified_holdout(y, test_fraction, seed + 3)
    data.images.update(train=x[keep], test=x[test])
    data.labels.update(train=y[keep], test=y[test])
    data.note = (f'no test split given: a seeded class-stratified {test_fraction:.0%} of every class held out as '
                 f'the test split ({len(test)} images, seed {seed + 3})')


def eval_splits(data: LabelledImages, cfg) -> Tuple[torch.Tensor, ...]:
    """(x, y, pool, tune, select, test_x, test_y) of a decoded source, as the Fashion-MNIST splits: x, y hold the
    training images (then the val/ images, if given); pool, tune, select index them. ``cfg`` gives val_fraction,
    test_fraction, val_seed and train_subset. The val split is carved from the training images when there is no
    val split: ``val_fraction`` of them, class-balanced; its halves tune and select."""
    if 'all' in data.images:
        data.images['train'], data.labels['train'] = data.images.pop('all'), data.labels.pop('all')
    if 'train' not in data.images:
        raise ConfigError(f'--data {data.name}: no train split (found {", ".join(data.images)}); give a train/ '
                          f'folder or a folder of class subfolders')
    if 'test' not in data.images:
        _hold_out_test(data, cfg.test_fraction, cfg.val_seed)
    x, y = data.images['train'], data.labels['train']
    notes = [data.note] if data.note else []
    if 'val' in data.images:
        pool = torch.arange(len(y))
        val = torch.arange(len(y), len(y) + len(data.labels['val']))
        x, y = torch.cat([x, data.images['val']]), torch.cat([y, data.labels['val']])
        notes.append(f'val split as given ({len(val)} images)')
    else:
        k = len(torch.unique(y))
        n_val = max(round(cfg.val_fraction * len(y)), 2 * k)  # at least two per class: one for each half
        if n_val > len(y) - k:
            raise ConfigError(f'--data {data.name}: {len(y)} training images of {k} classes cannot give a val split '
                              f'of {n_val} (two per class at least) and a labelled pool; add images or a val/ split')
        pool, val = split_train_val(y, n_val, cfg.val_seed)
        notes.append(f'val: a class-balanced {cfg.val_fraction:.0%} of train ({len(val)} images, seed '
                     f'{cfg.val_seed})')
    if getattr(cfg, 'train_subset', 0):
        pool = pool[balanced_count(y[pool], min(cfg.train_subset, len(pool)), cfg.val_seed + 1)]
    tune, select = split_halves(len(val), cfg.val_seed + 7)
    data.note = '; '.join(notes)
    return (x, y, pool, val[tune], val[select], data.images.get('test'), data.labels.get('test'))


def load_source(cfg, data_config: Dict, need_per_class: Callable[[int], int] = lambda n: 1,
                what: str = 'labels asked for', progress: bool = False) -> LabelledImages:
    """List, check (before decoding anything) and decode the images of ``cfg.data`` (a folder or a dataset)."""
    kind = source_kind(cfg.data)
    listing = (list_image_folder(Path(cfg.data).expanduser(), cfg.data) if kind == 'folder'
               else _list_dataset(cfg.data, kind))
    check_listing(listing, need_per_class, what)
    return load_images(listing, data_config, getattr(cfg, 'convert_colour', False), progress)


# ============ the EvalData of a source ============

def check_label_amounts(pool_y: torch.Tensor, classes: List[str], where: str, fractions=(), shots=(),
                        fraction_flag: str = '--fractions') -> None:
    """Refuse (ConfigError) a class whose labelled pool holds fewer images than the largest shot count asks for, or
    so few that the smallest fraction rounds to no image of it."""
    counts = torch.bincount(pool_y, minlength=len(classes)).tolist()
    for name, n in zip(classes, counts, strict=True):
        if shots and n < max(shots):
            raise ConfigError(f'--shots {max(shots)}: class "{name}" of {where} has {n} labelled image(s) (after '
                              f'the val and test splits); give at most --shots {n} or add images')
        if fractions and round(min(fractions) * n) < 1:
            raise ConfigError(f'{fraction_flag} {min(fractions):g}: class "{name}" of {where} has {n} labelled '
                              f'image(s) (after the val and test splits), {min(fractions):g} of them is no image; '
                              f'give fractions >= {0.5 / max(n, 1):.2g} or use --shots')


def load_eval_source(cfg, data_config: Dict, progress: bool = False):
    """The EvalData of a folder or dataset source (``cfg.data``): pool, val (tuning half), select, eval (the select
    half with split 'val', the test split with 'test'), with class names, the skipped files and how the splits were
    made."""
    data = load_source(cfg, data_config, progress=progress)
    x, y, pool, tune, select, tx, ty = eval_splits(data, cfg)
    check_label_amounts(y[pool], data.classes, cfg.data, () if cfg.shots else cfg.fractions, cfg.shots)
    if cfg.split == 'val':
        ex, ey = x[select], y[select]
    else:
        ex, ey = tx, ty
        if cfg.eval_limit:
            keep = balanced_count(ey, min(cfg.eval_limit, len(ey)), cfg.val_seed + 2)
            ex, ey = ex[keep], ey[keep]
    return EvalData(x[pool], y[pool], x[tune], y[tune], ex, ey, cfg.split, len(data.classes), pool, tune,
                    x[select], y[select], select, classes=data.classes, name=data.name, note=data.note,
                    skipped=[dict(path=p, error=e) for p, e in data.skipped])
