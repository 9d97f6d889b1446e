"""The data of one evaluation: class-balanced label subsets, the Fashion-MNIST splits, features extracted once."""
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist
from ..extract import extract_features
from .eval_config import EvalConfig

__all__ = ['balanced_subset', 'shots_subset', 'balanced_count', 'split_train_val', 'split_halves', 'EvalData', 'load_eval_splits',
           'load_eval_data', 'Features', 'features_for']


# ============ label subsets ============

def _per_class_sample(labels: torch.Tensor, counts: Dict[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c in sorted(counts):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        out.append(idx[torch.randperm(len(idx), generator=g)[:counts[c]]])
    return torch.sort(torch.cat(out)).values


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a class-balanced, seeded subset: round(fraction * n_c) images of each class c (at least 1).

    The same (labels, fraction, seed) always gives the same indices; fraction 1 gives every index.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}.')
    labels = torch.as_tensor(labels)
    classes, n_c = torch.unique(labels, return_counts=True)
    counts = {int(c): max(1, int(round(fraction * int(n)))) for c, n in zip(classes, n_c, strict=True)}
    return _per_class_sample(labels, counts, seed)


def shots_subset(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of ``shots`` seeded images of every class (all of a class that has fewer)."""
    labels = torch.as_tensor(labels)
    classes, n_c = torch.unique(labels, return_counts=True)
    return _per_class_sample(labels, {int(c): min(int(shots), int(n)) for c, n in zip(classes, n_c, strict=True)},
                             seed)


def balanced_count(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of about n images, each class in proportion to its frequency (at least 1 per class), seeded."""
    labels = torch.as_tensor(labels)
    if not 0 < n <= len(labels):
        raise ValueError(f'Cannot take {n} of {len(labels)} images.')
    classes, n_c = torch.unique(labels, return_counts=True)
    counts = {int(c): max(1, int(round(n * int(k) / len(labels)))) for c, k in zip(classes, n_c, strict=True)}
    return _per_class_sample(labels, counts, seed)


def split_train_val(labels: torch.Tensor, val_size: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pool, val): disjoint sorted indices; val is class-balanced with about val_size images."""
    val = balanced_count(labels, val_size, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask, as_tuple=True)[0], val


def split_halves(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first, second): disjoint sorted positions of a seeded random half of range(n) (n // 2 of them) and of the
    rest."""
    first = torch.zeros(n, dtype=torch.bool)
    first[torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:n // 2]] = True
    return torch.nonzero(first, as_tuple=True)[0], torch.nonzero(~first, as_tuple=True)[0]


# ============ the splits ============

@dataclass
class EvalData:
    """Images and labels of the labelled pool, the two halves of the validation split and the eval split.

    ``val``: the tuning half (every choice within an arm: L2 penalty, early stopping). ``select``: the selection
    half (choices between arms, e.g. the best CPC arm of a fraction). ``eval``: the selection half itself with
    split 'val', the official test set with split 'test'.
    """
    pool_x: torch.Tensor
    pool_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    split: str
    num_classes: int = 10
    pool_index: Optional[torch.Tensor] = None  # indices into the official training set
    val_index: Optional[torch.Tensor] = None
    select_x: Optional[torch.Tensor] = None  # None: the eval split is the selection half
    select_y: Optional[torch.Tensor] = None
    select_index: Optional[torch.Tensor] = None
    classes: List[str] = field(default_factory=lambda: list(FASHION_MNIST_CLASSES))
    name: str = 'Fashion-MNIST'  # the source, for titles
    note: str = ''  # how the splits were made
    skipped: List[Dict] = field(default_factory=list)  # unreadable files: dict(path, error)

    def __post_init__(self):
        if self.select_x is None:
            self.select_x, self.select_y = self.eval_x, self.eval_y

    @property
    def eval_is_val(self) -> bool:
        return self.split == 'val'


def load_eval_splits(cfg) -> Tuple[torch.Tensor, ...]:
    """Fashion-MNIST train as (images, labels, pool, val_tune, val_select) indices; ``cfg`` gives data_dir,
    val_size, val_seed and train_subset (EvalConfig or ProbeConfig)."""
    x, y = load_fashion_mnist('train', cfg.data_dir or None)
    if cfg.val_size >= len(y):
        raise ValueError(f'val_size {cfg.val_size} leaves no training images (the training set has {len(y)}).')
    pool, val = split_train_val(y, cfg.val_size, cfg.val_seed)
    if getattr(cfg, 'train_subset', 0):
        pool = pool[balanced_count(y[pool], min(cfg.train_subset, len(pool)), cfg.val_seed + 1)]
    tune, select = split_halves(len(val), cfg.val_seed + 7)  # with val_seed 0: the halves of results/fmnist_search
    return x, y, pool, val[tune], val[select]


def load_eval_data(cfg: EvalConfig) -> EvalData:
    """Fashion-MNIST: pool = train minus val (optionally limited); val = half of the validation split (tuning);
    select = the other half; eval = select (split 'val') or the (limited) test set."""
    x, y, pool, val, select = load_eval_splits(cfg)
    if cfg.split == 'val':
        ex, ey = x[select], y[select]
    else:
        ex, ey = load_fashion_mnist('test', cfg.data_dir or None)
        if cfg.eval_limit:
            keep = balanced_count(ey, min(cfg.eval_limit, len(ey)), cfg.val_seed + 2)
            ex, ey = ex[keep], ey[keep]
    return EvalData(x[pool], y[pool], x[val], y[val], ex, ey, cfg.split, len(FASHION_MNIST_CLASSES), pool, val,
                    x[select], y[select], select)


# ============ features, extracted once per encoder ============

@dataclass
class Features:
    """Pooled features (N, F) of pool, val (tuning half), eval and select images; latent grids (float16
    (N, F, rows, cols)) too when kept. ``select`` defaults to ``eval`` (split 'val')."""
    pool: torch.Tensor
    val: torch.Tensor
    eval: torch.Tensor
    pool_grid: Optional[torch.Tensor] = None
    eval_grid: Optional[torch.Tensor] = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    select: Optional[torch.Tensor] = None
    val_grid: Optional[torch.Tensor] = None
    select_grid: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.select is None:
            self.select, self.select_grid = self.eval, self.eval_grid


def features_for(enc: nn.Module, data: EvalData, keep_grid: bool, desc: str, cfg: EvalConfig) -> Features:
    """Extract pooled (and optionally grid) features of pool, val, select and eval images once."""
    t0, c0 = time.time(), time.process_time()
    parts = [data.pool_x, data.val_x, data.select_x] + ([] if data.eval_is_val else [data.eval_x])
    pooled, grid = extract_features(enc, torch.cat(parts), cfg.extract_batch, keep_grid, desc, cfg.progress)
    ends = torch.tensor([len(p) for p in parts]).cumsum(0).tolist()
    cut = [slice(a, b) for a, b in zip([0] + ends[:-1], ends, strict=True)]
    if data.eval_is_val:
        cut.append(cut[2])
    pool, val, select, ev = cut
    g = (lambda s: grid[s]) if keep_grid else (lambda s: None)
    return Features(pooled[pool], pooled[val], pooled[ev], g(pool), g(ev), time.time() - t0,
                    time.process_time() - c0, pooled[select], g(val), g(select))
