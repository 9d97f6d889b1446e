"""``cpc-eval``: the paper's evaluation protocols on Fashion-MNIST, and its Figure 1 (accuracy against labels).

Hénaff et al. 2020 evaluate CPC features (a) with a linear classifier on the mean-pooled patch features,
(b) with a ResNet-33-style classifier trained on the CPC feature grid with a fraction of the labels (the
"efficient classification" of the paper's Fig. 1), against (c) the same network trained on pixels from scratch
with supervision. We add (d) a floor: the linear probe on a randomly initialized encoder. See docs/evaluation.md.

Arms (``--arms``):

* ``cpc_linear``: frozen CPC encoder, pooled features extracted once, linear softmax classifier (L-BFGS, weight
  decay picked on the validation split).
* ``cpc_frozen``: frozen CPC encoder, latent grids extracted once, ``GridClassifier`` trained on them.
* ``cpc_finetune``: CPC encoder + ``GridClassifier`` trained end to end (encoder LR scaled down).
* ``scratch``: randomly initialized encoder + ``GridClassifier`` trained end to end with crop/flip augmentation.
* ``random_linear``: randomly initialized encoder, linear probe as in ``cpc_linear``.

Data: the labelled pool is Fashion-MNIST train minus a class-balanced validation split (``--val-size`` images,
fixed seed) used for all tuning; labelled subsets are class-balanced fractions of the pool. The official test set
is only read with ``--split test``.

Usage::

    python -m cpc_models.evaluate figure1 --model cpcv2_resnet_tiny --checkpoint cpcv2_resnet_tiny.fmnist \\
        --out results/fmnist --split test
    python -m cpc_models.evaluate plot results/fmnist        # table + figure again from results.json
"""
import argparse
import copy
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torchvision.transforms import v2
from tqdm.auto import tqdm

from . import encoder as _encoder  # noqa: F401  (registers the cpc models with timm)
from .classifier import GRID_CLASSIFIER_SIZES, GridClassifier, grid_classifier_kwargs
from .data import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = [
    'ARMS', 'DEFAULT_FRACTIONS', 'EvalConfig', 'balanced_subset', 'balanced_count', 'split_train_val',
    'EvalData', 'load_eval_data', 'features_for', 'load_encoder', 'extract_features', 'fit_linear_probe',
    'train_on_grid', 'train_end_to_end', 'run_arm', 'run_figure1', 'check_targets', 'format_table', 'plot_figure1',
    'main',
]

ARMS = ('cpc_linear', 'cpc_frozen', 'cpc_finetune', 'scratch', 'random_linear')
ARM_LABELS = {
    'cpc_linear': 'CPC, linear probe',
    'cpc_frozen': 'CPC (frozen) + GridClassifier',
    'cpc_finetune': 'CPC fine-tuned + GridClassifier',
    'scratch': 'Supervised from scratch',
    'random_linear': 'Random encoder, linear probe',
}
ARM_STYLE = {
    'cpc_linear': dict(color='tab:blue', marker='o', linestyle='--'),
    'cpc_frozen': dict(color='tab:blue', marker='s'),
    'cpc_finetune': dict(color='tab:purple', marker='D'),
    'scratch': dict(color='tab:red', marker='^'),
    'random_linear': dict(color='tab:gray', marker='v', linestyle=':'),
}
DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_ARMS = ('cpc_linear', 'cpc_frozen', 'scratch', 'random_linear')
# The paper's claim (Fig. 1): CPC needs 2-5x fewer labels. (cpc fraction, scratch fraction) pairs of the issue.
TARGET_PAIRS = ((0.01, 0.02), (0.05, 0.1), (0.1, 0.2))


@dataclass
class EvalConfig:
    """Everything a run depends on; written into results.json."""
    model: str = 'cpcv2_resnet_tiny'  # timm architecture (a 'name.tag' checkpoint overrides it)
    checkpoint: str = ''  # timm 'name.tag' | .safetensors file | checkpoint folder | 'random' (no pretraining)
    model_args: Dict = field(default_factory=dict)
    arms: Tuple[str, ...] = DEFAULT_ARMS
    fractions: Tuple[float, ...] = DEFAULT_FRACTIONS
    seeds: Tuple[int, ...] = (0, 1, 2)
    split: str = 'val'  # 'val' (tuning, default) or 'test' (the final table, once)
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = Debian package / $CPC_FASHION_MNIST_DIR)
    val_size: int = 5000  # validation images carved from the training set (class-balanced)
    val_seed: int = 0
    train_subset: int = 0  # >0: limit the labelled pool to this many images (class-balanced; CI)
    eval_limit: int = 0  # >0: evaluate on a class-balanced subset of this many images of the eval split
    random_init_seed: int = 0  # the random encoder of random_linear (and of checkpoint='random')
    extract_batch: int = 64  # larger batches cost more in page faults (sys time) than they save on CPU
    # linear probe
    linear_wds: Tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)  # L2 penalty grid, picked on val
    linear_max_iter: int = 100  # L-BFGS iterations per penalty
    # GridClassifier
    classifier_size: str = 'small'  # tiny | small | paper (11 blocks)
    classifier_drop: float = 0.1
    # cpc_frozen: GridClassifier on pre-extracted grids
    frozen_epochs: float = 30.0
    frozen_max_steps: int = 300
    frozen_batch: int = 128
    frozen_lr: float = 1e-3
    frozen_wd: float = 0.05
    # cpc_finetune and scratch: end to end on images
    e2e_epochs: float = 30.0
    e2e_max_steps: int = 150
    e2e_batch: int = 64
    e2e_lr: float = 5e-3  # picked on val: scratch, 2% labels, 150 steps (docs/evaluation.md)
    e2e_wd: float = 0.05
    finetune_encoder_lr_scale: float = 0.1
    aug_pad: int = 2  # random crop with this padding, plus horizontal flip
    warmup_frac: float = 0.05
    threads: int = 0  # torch.set_num_threads (0 = torch's default)
    progress: bool = True

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise ValueError(f'Unknown arm(s) {bad or "(none given)"}; choose from {", ".join(ARMS)}.')
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ValueError(f'Label fraction {f} is outside (0, 1]; give fractions like 0.01 for 1%.')
        if not self.fractions or not self.seeds:
            raise ValueError('Give at least one fraction and one seed.')
        if self.split not in ('val', 'test'):
            raise ValueError(f"split must be 'val' or 'test', got '{self.split}'.")
        if self.classifier_size not in GRID_CLASSIFIER_SIZES:
            raise ValueError(f"Unknown classifier size '{self.classifier_size}'; "
                             f"choose from {sorted(GRID_CLASSIFIER_SIZES)}.")
        if self.val_size < 10:
            raise ValueError(f'val_size must be >= 10 (one image per class), got {self.val_size}.')
        if not self.linear_wds:
            raise ValueError('linear_wds needs at least one value.')


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


# ============ models ============

def _create(name: str, pretrained: bool, model_args: Dict, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **{**model_args, **kwargs})


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
        return _create(model, False, model_args), dict(kind='random', model=model, model_args=model_args)
    if path.is_dir():
        if not (path / 'encoder.safetensors').is_file() and (path / 'checkpoints').is_dir():
            from .train import latest_checkpoint
            latest = latest_checkpoint(path)
            if latest is None:
                raise FileNotFoundError(f'{path}/checkpoints holds no complete checkpoint folder.')
            path = latest
        cfg_file = path / 'config.json'
        weights = path / 'encoder.safetensors'
        if not weights.is_file():
            weights = path / 'model.safetensors'
        if not weights.is_file() or not cfg_file.is_file():
            raise FileNotFoundError(
                f'{path} is not a checkpoint folder: expected encoder.safetensors (cpc-train) or model.safetensors '
                f'(published) next to config.json.')
        cfg = json.loads(cfg_file.read_text())
        arch = cfg.get('model') or cfg.get('architecture') or model
        model_args = {**cfg.get('model_args', {}), **model_args}
        enc = _create(arch, True, model_args, pretrained_cfg_overlay=dict(file=str(weights)))
        return enc, dict(kind='folder', path=str(path), model=arch, model_args=model_args)
    if path.suffix == '.safetensors' or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f'Checkpoint file {path} does not exist.')
        enc = _create(model, True, model_args, pretrained_cfg_overlay=dict(file=str(path)))
        return enc, dict(kind='file', path=str(path), model=model, model_args=model_args)
    if '.' in checkpoint and '/' not in checkpoint:
        arch = checkpoint.split('.')[0]
        try:
            enc = _create(checkpoint, True, model_args)
        except RuntimeError as e:
            raise RuntimeError(
                f'Could not load the published checkpoint "{checkpoint}" ({e}). Tags with weights: '
                f'{timm.list_pretrained(arch + ".*") or "none"}. Pass a .safetensors file or a cpc-train '
                f'checkpoint folder instead.') from e
        return enc, dict(kind='timm', name=checkpoint, model=checkpoint.split('.')[0], model_args=model_args)
    raise FileNotFoundError(
        f'Checkpoint "{checkpoint}" is neither a file, a folder, a timm "name.tag" nor "random".')


class EncoderClassifier(nn.Module):
    """Images -> encoder latent grid -> GridClassifier logits (the end-to-end arms)."""

    def __init__(self, encoder: nn.Module, classifier: GridClassifier):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder.forward_features(x))


def _normalize(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (x_u8.float() / 255 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def _data_stats(enc: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    cfg = resolve_model_data_config(enc)
    return torch.tensor(cfg['mean']).view(1, -1, 1, 1), torch.tensor(cfg['std']).view(1, -1, 1, 1)


def _make_classifier(enc: nn.Module, cfg: EvalConfig, num_classes: int) -> GridClassifier:
    kw = grid_classifier_kwargs(cfg.classifier_size, enc.num_features)
    return GridClassifier(enc.num_features, num_classes, drop_rate=cfg.classifier_drop, **kw)


# ============ features ============

@torch.no_grad()
def extract_features(enc: nn.Module, images: torch.Tensor, batch_size: int = 64, keep_grid: bool = False,
                     desc: str = 'extract', progress: bool = True):
    """Run the frozen encoder once over uint8 images (N, C, H, W).

    Returns (pooled float32 (N, F), grid float16 (N, F, rows, cols) or None). Pooled = the encoder's own
    ``forward_head(forward_features(x), pre_logits=True)`` (mean over the patch grid).
    """
    mean, std = _data_stats(enc)
    was_training = enc.training
    enc.eval().to(memory_format=torch.channels_last)
    pooled, grids = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        z = enc.forward_features(_normalize(images[i:i + batch_size], mean, std))
        pooled.append(enc.forward_head(z, pre_logits=True).float())
        if keep_grid:
            grids.append(z.to(torch.float16).contiguous())
    enc.train(was_training)
    return torch.cat(pooled), (torch.cat(grids) if keep_grid else None)


# ============ (a), (d): linear probe ============

def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                     wds: Sequence[float], num_classes: int, max_iter: int = 100) -> Dict:
    """Softmax regression on standardized features with an L2 penalty picked on (x_val, y_val).

    Full-batch L-BFGS; the penalties are fitted from the largest down, each warm-started from the previous.
    Returns dict(predict=callable(features) -> logits, wd=best, val_acc=best val accuracy, val_by_wd={...}).
    """
    mu = x_train.mean(0, keepdim=True)
    sd = x_train.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    xt, xv = (x_train - mu) / sd, (x_val - mu) / sd
    lin = nn.Linear(xt.shape[1], num_classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    best, val_by_wd = None, {}
    for wd in sorted(wds, reverse=True):
        opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                line_search_fn='strong_wolfe', tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure(opt=opt, wd=wd):
            opt.zero_grad()
            loss = F.cross_entropy(lin(xt), y_train) + wd * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = _accuracy(lin(xv), y_val)
        val_by_wd[wd] = acc
        if best is None or acc > best[1]:
            best = (wd, acc, copy.deepcopy(lin.state_dict()))
    lin.load_state_dict(best[2])
    lin.requires_grad_(False)

    def predict(x):
        return lin((x - mu) / sd)

    return dict(predict=predict, wd=best[0], val_acc=best[1], val_by_wd=val_by_wd)


# ============ (b), (c): GridClassifier training ============

def _num_steps(n: int, batch: int, epochs: float, max_steps: int) -> int:
    steps = max(1, math.ceil(epochs * math.ceil(n / batch)))
    return min(steps, max_steps) if max_steps > 0 else steps


def _schedule(opt, steps: int, warmup_frac: float):
    warm = max(1, int(round(warmup_frac * steps)))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    """`steps` index batches from per-epoch permutations of range(n) (the last batch of an epoch may be short)."""
    batch = min(batch, n)
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            yield perm[i:i + batch]
            done += 1
            if done == steps:
                return


def _train_steps(module: nn.Module, opt: torch.optim.Optimizer, steps: int, batches, loss_fn, cfg: EvalConfig,
                 desc: str, lr_flag: str) -> Dict:
    """`steps` AdamW steps of ``loss_fn(index batch)`` with warm-up + cosine; stops on a non-finite loss."""
    sched = _schedule(opt, steps, cfg.warmup_frac)
    module.train()
    losses = []
    bar = tqdm(batches, total=steps, desc=desc, leave=False, disable=not cfg.progress)
    for idx in bar:
        loss = loss_fn(idx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f'{desc}: non-finite loss at step {len(losses)}; lower {lr_flag}.')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f'{losses[-1]:.3f}', refresh=False)
    module.eval()
    return dict(steps=steps, final_loss=float(np.mean(losses[-10:])))


def train_on_grid(classifier: GridClassifier, grids: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig,
                  seed: int, desc: str = 'frozen') -> Dict:
    """(b) frozen: train the classifier on pre-extracted latent grids (float16 (N, F, rows, cols))."""
    steps = _num_steps(len(grids), cfg.frozen_batch, cfg.frozen_epochs, cfg.frozen_max_steps)
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.frozen_lr, weight_decay=cfg.frozen_wd)
    batches = _batches(len(grids), cfg.frozen_batch, steps, torch.Generator().manual_seed(seed))
    return _train_steps(classifier, opt, steps, batches,
                        lambda idx: F.cross_entropy(classifier(grids[idx].float()), labels[idx]),
                        cfg, desc, '--frozen-lr')


def _augment(cfg: EvalConfig, size: Tuple[int, int]):
    return v2.Compose([v2.RandomCrop(size, padding=cfg.aug_pad), v2.RandomHorizontalFlip()])


def train_end_to_end(model: EncoderClassifier, images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig,
                     seed: int, encoder_lr_scale: float = 1.0, desc: str = 'e2e') -> Dict:
    """(b) fine-tuned / (c) scratch: encoder + classifier on augmented uint8 images (N, C, H, W)."""
    steps = _num_steps(len(images), cfg.e2e_batch, cfg.e2e_epochs, cfg.e2e_max_steps)
    mean, std = _data_stats(model.encoder)
    groups = [dict(params=list(model.classifier.parameters()), lr=cfg.e2e_lr)]
    if encoder_lr_scale > 0:
        groups.append(dict(params=list(model.encoder.parameters()), lr=cfg.e2e_lr * encoder_lr_scale))
    else:
        model.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.e2e_wd)
    batches = _batches(len(images), cfg.e2e_batch, steps, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the augmentation draws from the global generator
    aug = _augment(cfg, tuple(images.shape[-2:]))
    model.to(memory_format=torch.channels_last)

    def loss_fn(idx):
        x = torch.stack([aug(img) for img in images[idx]])  # per-image crop offsets and flips
        return F.cross_entropy(model(_normalize(x, mean, std)), labels[idx])

    return _train_steps(model, opt, steps, batches, loss_fn, cfg, desc, '--e2e-lr')


@torch.no_grad()
def _predict_images(model: nn.Module, images: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    mean, std = _data_stats(model.encoder)
    model.eval()
    out = [model(_normalize(images[i:i + batch_size], mean, std))
           for i in tqdm(range(0, len(images), batch_size), desc='eval', leave=False, disable=not progress)]
    return torch.cat(out)


@torch.no_grad()
def _predict_grids(classifier: nn.Module, grids: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier(grids[i:i + batch_size].float()) for i in range(0, len(grids), batch_size)])


# ============ the data of one evaluation ============

@dataclass
class EvalData:
    """Images and labels of the labelled pool, the validation split and the eval split (val or test)."""
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

    @property
    def eval_is_val(self) -> bool:
        return self.split == 'val'


def load_eval_data(cfg: EvalConfig) -> EvalData:
    """Fashion-MNIST: pool = train minus val (optionally limited), eval = val or the (limited) test set."""
    x, y = load_fashion_mnist('train', cfg.data_dir or None)
    if cfg.val_size >= len(y):
        raise ValueError(f'val_size {cfg.val_size} leaves no training images (the training set has {len(y)}).')
    pool, val = split_train_val(y, cfg.val_size, cfg.val_seed)
    if cfg.train_subset:
        pool = pool[balanced_count(y[pool], min(cfg.train_subset, len(pool)), cfg.val_seed + 1)]
    if cfg.split == 'val':
        ex, ey = x[val], y[val]
    else:
        ex, ey = load_fashion_mnist('test', cfg.data_dir or None)
        if cfg.eval_limit:
            keep = balanced_count(ey, min(cfg.eval_limit, len(ey)), cfg.val_seed + 2)
            ex, ey = ex[keep], ey[keep]
    return EvalData(x[pool], y[pool], x[val], y[val], ex, ey, cfg.split, len(FASHION_MNIST_CLASSES), pool, val)


@dataclass
class Features:
    pool: torch.Tensor
    val: torch.Tensor
    eval: torch.Tensor
    pool_grid: Optional[torch.Tensor] = None
    eval_grid: Optional[torch.Tensor] = None
    wall_s: float = 0.0
    cpu_s: float = 0.0


def features_for(enc: nn.Module, data: EvalData, keep_grid: bool, desc: str, cfg: EvalConfig) -> Features:
    """Extract pooled (and optionally grid) features of pool, val and eval images once."""
    t0, c0 = time.time(), time.process_time()
    parts = [data.pool_x, data.val_x] + ([] if data.eval_is_val else [data.eval_x])
    pooled, grid = extract_features(enc, torch.cat(parts), cfg.extract_batch, keep_grid, desc, cfg.progress)
    n_p, n_v = len(data.pool_x), len(data.val_x)
    ev = slice(n_p, n_p + n_v) if data.eval_is_val else slice(n_p + n_v, None)
    return Features(pooled[:n_p], pooled[n_p:n_p + n_v], pooled[ev],
                    grid[:n_p] if keep_grid else None, grid[ev] if keep_grid else None, time.time() - t0,
                    time.process_time() - c0)


# ============ one run ============

def run_arm(arm: str, fraction: float, seed: int, data: EvalData, cfg: EvalConfig,
            cpc_encoder: Optional[nn.Module] = None, cpc_feats: Optional[Features] = None,
            random_feats: Optional[Features] = None, model_name: str = 'cpcv2_resnet_tiny',
            model_args: Optional[Dict] = None) -> Dict:
    """Train and evaluate one (arm, fraction, seed). Never modifies ``cpc_encoder`` (fine-tuning works on a copy).

    Returns a record with the accuracy on the eval split, the labelled subset size, wall time and the arm's config.
    """
    if arm not in ARMS:
        raise ValueError(f"Unknown arm '{arm}'; choose from {', '.join(ARMS)}.")
    t0, c0 = time.time(), time.process_time()
    sub = balanced_subset(data.pool_y, fraction, seed)
    y = data.pool_y[sub]
    rec = dict(arm=arm, fraction=fraction, seed=seed, n_labels=len(sub), split=data.split, n_eval=len(data.eval_y))
    if arm in ('cpc_linear', 'random_linear'):
        feats = cpc_feats if arm == 'cpc_linear' else random_feats
        if feats is None:
            raise ValueError(f'{arm} needs the pre-extracted features of its encoder.')
        probe = fit_linear_probe(feats.pool[sub], y, feats.val, data.val_y, cfg.linear_wds, data.num_classes,
                                 cfg.linear_max_iter)
        acc = _accuracy(probe['predict'](feats.eval), data.eval_y)
        rec['config'] = dict(wd=probe['wd'], val_acc_by_wd={str(k): v for k, v in probe['val_by_wd'].items()},
                             max_iter=cfg.linear_max_iter, features='mean-pooled grid, standardized')
    elif arm == 'cpc_frozen':
        if cpc_feats is None or cpc_feats.pool_grid is None:
            raise ValueError('cpc_frozen needs the pre-extracted latent grids of the CPC encoder.')
        torch.manual_seed(seed)
        clf = _make_classifier(cpc_encoder, cfg, data.num_classes)
        info = train_on_grid(clf, cpc_feats.pool_grid[sub], y, cfg, seed, desc=f'frozen {fraction:g}/{seed}')
        acc = _accuracy(_predict_grids(clf, cpc_feats.eval_grid), data.eval_y)
        rec['config'] = dict(info, batch=cfg.frozen_batch, lr=cfg.frozen_lr, wd=cfg.frozen_wd,
                             classifier=cfg.classifier_size, epochs=cfg.frozen_epochs,
                             max_steps=cfg.frozen_max_steps)
    else:
        torch.manual_seed(seed)
        if arm == 'cpc_finetune':
            if cpc_encoder is None:
                raise ValueError('cpc_finetune needs the CPC encoder.')
            enc, scale = copy.deepcopy(cpc_encoder), cfg.finetune_encoder_lr_scale
        else:
            enc, scale = _create(model_name, False, model_args or {}), 1.0
        model = EncoderClassifier(enc, _make_classifier(enc, cfg, data.num_classes))
        info = train_end_to_end(model, data.pool_x[sub], y, cfg, seed, scale, desc=f'{arm} {fraction:g}/{seed}')
        t_eval = time.time()
        acc = _accuracy(_predict_images(model, data.eval_x, cfg.extract_batch, cfg.progress), data.eval_y)
        rec['config'] = dict(info, batch=cfg.e2e_batch, lr=cfg.e2e_lr, encoder_lr_scale=scale, wd=cfg.e2e_wd,
                             classifier=cfg.classifier_size, epochs=cfg.e2e_epochs, max_steps=cfg.e2e_max_steps,
                             aug=f'random crop pad {cfg.aug_pad} + hflip', eval_s=round(time.time() - t_eval, 2))
        rec['model'] = model
    rec.update(accuracy=acc, wall_s=round(time.time() - t0, 2), cpu_s=round(time.process_time() - c0, 2))
    return rec


# ============ summaries ============

def summarize(results: List[Dict]) -> Dict[str, Dict[float, Tuple[float, float, int]]]:
    """{arm: {fraction: (mean, std, n)}} of the accuracies (std over seeds, ddof=1; 0 for one seed)."""
    acc: Dict[str, Dict[float, List[float]]] = {}
    for r in results:
        acc.setdefault(r['arm'], {}).setdefault(float(r['fraction']), []).append(r['accuracy'])
    return {a: {f: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
                for f, v in sorted(d.items())} for a, d in acc.items()}


def headline_cpc_arm(arms: Sequence[str]) -> Optional[str]:
    """The CPC arm compared with scratch: fine-tuned if run, else frozen, else linear."""
    return next((a for a in ('cpc_finetune', 'cpc_frozen', 'cpc_linear') if a in arms), None)


def check_targets(summary: Dict) -> List[Dict]:
    """The issue's targets on mean accuracies: CPC@1% >= scratch@2%, @5% >= @10%, @10% >= @20%; CPC > random."""
    out = []
    cpc = headline_cpc_arm(list(summary))
    for fc, fs in TARGET_PAIRS:
        name = f'CPC@{fc:.0%} >= scratch@{fs:.0%}'
        if cpc is None or 'scratch' not in summary or fc not in summary[cpc] or fs not in summary['scratch']:
            out.append(dict(target=name, status='n/a', detail='fractions or arms not run'))
            continue
        a, b = summary[cpc][fc][0], summary['scratch'][fs][0]
        out.append(dict(target=name, status='PASS' if a >= b else 'MISS',
                        detail=f'{cpc} {100 * a:.2f} vs scratch {100 * b:.2f}'))
    name = 'CPC linear > random linear at every fraction'
    if 'cpc_linear' in summary and 'random_linear' in summary:
        common = sorted(set(summary['cpc_linear']) & set(summary['random_linear']))
        fails = [f for f in common if summary['cpc_linear'][f][0] <= summary['random_linear'][f][0]]
        detail = ', '.join(f'{f:.0%}: {100 * summary["cpc_linear"][f][0]:.1f} vs '
                           f'{100 * summary["random_linear"][f][0]:.1f}' for f in common)
        out.append(dict(target=name, status='PASS' if common and not fails else 'MISS', detail=detail))
    else:
        out.append(dict(target=name, status='n/a', detail='cpc_linear and random_linear not both run'))
    return out


def format_table(summary: Dict, arms: Sequence[str]) -> str:
    fracs = sorted({f for d in summary.values() for f in d})
    lines = ['| arm | ' + ' | '.join(f'{f:.0%}' for f in fracs) + ' |', '|---|' + '---|' * len(fracs)]
    for a in arms:
        if a not in summary:
            continue
        cells = []
        for f in fracs:
            m = summary[a].get(f)
            n_max = max(v[2] for d in summary.values() for v in d.values())
            partial = '' if m is None or m[2] == n_max else f' (n={m[2]})'  # fewer seeds than the other cells
            cells.append('' if m is None else f'{100 * m[0]:.2f} ± {100 * m[1]:.2f}{partial}')
        lines.append(f'| {ARM_LABELS[a]} (`{a}`) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_figure1(summary: Dict, arms: Sequence[str], path: Path, title: str = '', split: str = 'test') -> None:
    """Accuracy against the labelled fraction (log x), one line per arm, mean ± std error bars (paper Fig. 1)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    fracs = sorted({f for d in summary.values() for f in d})
    for a in arms:
        if a not in summary:
            continue
        fs = sorted(summary[a])
        ax.errorbar([100 * f for f in fs], [100 * summary[a][f][0] for f in fs],
                    yerr=[100 * summary[a][f][1] for f in fs], label=ARM_LABELS[a], capsize=3, **ARM_STYLE[a])
    ax.set_xscale('log')
    ax.set_xticks([100 * f for f in fracs])
    ax.set_xticklabels([f'{100 * f:g}%' for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel('Percentage of labelled images (log scale)')
    ax.set_ylabel(f'{split} accuracy (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, payload: Dict) -> str:
    """Write table.md and figure1.png from a results.json payload; returns the markdown."""
    arms = payload['config']['arms']
    summary = summarize(payload['runs'])
    targets = check_targets(summary)
    payload['targets'] = targets
    split = payload['config']['split']
    wall = payload.get('wall_s')
    src = payload.get('checkpoint', {})
    title = (f"{payload['config']['model']} ({src.get('name') or src.get('path') or src.get('kind', '')}), "
             f"Fashion-MNIST {split}, seeds {list(payload['config']['seeds'])}")
    md = [f'# Fashion-MNIST, {split} accuracy (%) against labelled fraction, mean ± std over seeds', '',
          f'Encoder: {title}', '', format_table(summary, arms), '', '## Targets (paper: 2-5x fewer labels)', '',
          '| target | status | detail |', '|---|---|---|']
    md += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in targets]
    md += ['', (f"Labelled pool: {payload.get('n_pool')} images (train minus {payload['config']['val_size']} "
                f"val); evaluated on {payload.get('n_eval')} {split} images."),
           (f"Wall time of the {'longest of the parallel parts' if 'part0' in payload.get('timings', {}) else 'whole command'}"
            f": {wall if wall is None else f'{wall / 60:.1f} min'} "
            f"({payload.get('threads')} threads, {payload.get('host', '')})."),
           f"Cost (s, wall / CPU): {json.dumps(payload.get('timings', {}))}",
           '', f"Command: `{payload.get('command', '')}`", '']
    text = '\n'.join(md)
    (out / 'table.md').write_text(text)
    plot_figure1(summary, arms, out / 'figure1.png', title, split)
    return text


# ============ the whole reproduction ============

def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _run_order(arms: Sequence[str]) -> List[str]:
    """Cheap arms first, so that a budget overrun still leaves the linear and frozen rows."""
    return [a for a in ('cpc_linear', 'random_linear', 'cpc_frozen', 'cpc_finetune', 'scratch') if a in arms]


def run_figure1(cfg: EvalConfig, out: Optional[Path] = None, command: str = '') -> Dict:
    """Run every (arm, fraction, seed), write results.json after each run, then table.md and figure1.png."""
    cfg.validate()
    t_start, c_start = time.time(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(cfg)
    cpc_arms = {'cpc_linear', 'cpc_frozen', 'cpc_finetune'} & set(cfg.arms)
    cpc_encoder, src, model_name, model_args = None, dict(kind='none'), cfg.model, dict(cfg.model_args)
    if cpc_arms:
        cpc_encoder, src = load_encoder(cfg.checkpoint, cfg.model, cfg.model_args, cfg.random_init_seed + 1)
        model_name, model_args = src['model'], src['model_args']
        if src['kind'] == 'random':
            print('WARNING: --checkpoint random: the "CPC" arms use an untrained encoder (tests only).')
    probe = _create(model_name, False, model_args)
    in_size = tuple(probe.pretrained_cfg.get('input_size', (1, 28, 28)))
    if in_size != tuple(data.pool_x.shape[1:]):
        raise ValueError(f'{model_name} expects inputs {in_size}, Fashion-MNIST images are '
                         f'{tuple(data.pool_x.shape[1:])}; evaluate a 1-channel 28 px model (cpcv2_resnet_tiny).')
    del probe
    payload = dict(config=dataclasses.asdict(cfg), checkpoint=src, command=command, n_pool=len(data.pool_y),
                   n_val=len(data.val_y), n_eval=len(data.eval_y), threads=torch.get_num_threads(),
                   host=f'{platform.processor() or platform.machine()}, torch {torch.__version__}', timings={},
                   runs=[])

    def save():
        payload['wall_s'] = round(time.time() - t_start, 1)
        if out is not None:
            (out / 'results.json').write_text(json.dumps(payload, indent=1, default=_json_default))

    cpc_feats = random_feats = None
    if {'cpc_linear', 'cpc_frozen'} & set(cfg.arms):
        cpc_feats = features_for(cpc_encoder, data, 'cpc_frozen' in cfg.arms, 'extract cpc', cfg)
        payload['timings'].update(extract_cpc_s=round(cpc_feats.wall_s, 1), extract_cpc_cpu_s=round(cpc_feats.cpu_s, 1))
    if 'random_linear' in cfg.arms:
        torch.manual_seed(cfg.random_init_seed)
        rand_enc = _create(model_name, False, model_args)
        random_feats = features_for(rand_enc, data, False, 'extract random', cfg)
        payload['timings'].update(extract_random_s=round(random_feats.wall_s, 1),
                                  extract_random_cpu_s=round(random_feats.cpu_s, 1))
        del rand_enc
    jobs = [(a, f, s) for a in _run_order(cfg.arms) for f in cfg.fractions for s in cfg.seeds]
    bar = tqdm(jobs, desc='runs', disable=not cfg.progress)
    for arm, fraction, seed in bar:
        bar.set_postfix_str(f'{arm} {fraction:g} seed {seed}')
        rec = run_arm(arm, fraction, seed, data, cfg, cpc_encoder, cpc_feats, random_feats, model_name, model_args)
        rec.pop('model', None)
        payload['runs'].append(rec)
        tqdm.write(f"{arm:>14s} {fraction:7.2%} seed {seed}: {data.split} acc {100 * rec['accuracy']:.2f}% "
                   f"({rec['n_labels']} labels, {rec['wall_s']:.1f} s)")
        save()
    per_arm, per_arm_cpu = {}, {}
    for r in payload['runs']:
        per_arm[r['arm']] = round(per_arm.get(r['arm'], 0) + r['wall_s'], 1)
        per_arm_cpu[r['arm']] = round(per_arm_cpu.get(r['arm'], 0) + r['cpu_s'], 1)
    payload['timings'].update(runs_s_per_arm=per_arm, runs_cpu_s_per_arm=per_arm_cpu,
                              cpu_s=round(time.process_time() - c_start, 1))
    save()
    if out is not None:
        text = write_report(out, payload)
        save()  # with the targets
        print(text)
    else:
        payload['targets'] = check_targets(summarize(payload['runs']))
    return payload


# ============ CLI ============

def _floats(s: str) -> Tuple[float, ...]:
    vals = []
    for t in s.split(','):
        t = t.strip()
        vals.append(float(t[:-1]) / 100 if t.endswith('%') else float(t))
    return tuple(vals)


def _ints(s: str) -> Tuple[int, ...]:
    return tuple(int(t) for t in s.split(','))


def _strs(s: str) -> Tuple[str, ...]:
    return tuple(t.strip() for t in s.split(',') if t.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cpc-eval', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    f = sub.add_parser('figure1', help='run the arms over fractions and seeds; write table.md, results.json, '
                                       'figure1.png', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EvalConfig()
    f.add_argument('--model', default=d.model, help='timm architecture')
    f.add_argument('--checkpoint', required=True,
                   help='timm name.tag | .safetensors | cpc-train checkpoint (or run) folder | published folder | '
                        'random')
    f.add_argument('--model-args', type=json.loads, default={}, help='extra timm.create_model kwargs, as JSON')
    f.add_argument('--out', type=Path, required=True, help='output folder')
    f.add_argument('--arms', type=_strs, default=d.arms, help=f'comma list of {",".join(ARMS)}')
    f.add_argument('--fractions', type=_floats, default=d.fractions, help='comma list in (0,1] or with %%')
    f.add_argument('--seeds', type=_ints, default=d.seeds)
    f.add_argument('--split', choices=('val', 'test'), default=d.split,
                   help='val: tuning (default); test: the final table, once')
    f.add_argument('--data-dir', default=d.data_dir, help='Fashion-MNIST IDX folder')
    f.add_argument('--val-size', type=int, default=d.val_size)
    f.add_argument('--train-subset', '--limit', type=int, default=d.train_subset,
                   help='>0: labelled pool limited to this many images (fast runs)')
    f.add_argument('--eval-limit', type=int, default=d.eval_limit,
                   help='>0: class-balanced subset of the test split (with --split test)')
    f.add_argument('--linear-wds', type=_floats, default=d.linear_wds)
    f.add_argument('--linear-max-iter', type=int, default=d.linear_max_iter)
    f.add_argument('--classifier-size', choices=sorted(GRID_CLASSIFIER_SIZES), default=d.classifier_size)
    for prefix, keys in (('frozen', ('epochs', 'max_steps', 'batch', 'lr', 'wd')),
                         ('e2e', ('epochs', 'max_steps', 'batch', 'lr', 'wd'))):
        for k in keys:
            name = f'{prefix}_{k}'
            f.add_argument(f'--{name.replace("_", "-")}', type=type(getattr(d, name)), default=getattr(d, name))
    f.add_argument('--finetune-encoder-lr-scale', type=float, default=d.finetune_encoder_lr_scale)
    f.add_argument('--aug-pad', type=int, default=d.aug_pad)
    f.add_argument('--threads', type=int, default=d.threads, help='torch threads (0 = default)')
    f.add_argument('--no-progress', action='store_true')
    r = sub.add_parser('plot', help='table.md and figure1.png again from OUT/results.json')
    r.add_argument('out', type=Path)
    m = sub.add_parser('merge', help='merge figure1 outputs run in parallel (e.g. one process per arm) into OUT')
    m.add_argument('out', type=Path)
    m.add_argument('parts', type=Path, nargs='+', help='figure1 output folders, each with results.json')
    return p


# Settings that may differ between parts of one table: which arms a part ran, its threads and progress bar.
_MERGE_FREE = ('arms', 'threads', 'progress')


def merge_results(parts: Sequence[Dict]) -> Dict:
    """One payload from figure1 payloads of the same evaluation split across processes (disjoint arms).

    Raises ValueError if the parts differ in anything but their arms and threads, or repeat an (arm, fraction, seed).
    """
    base = parts[0]
    same = {k: v for k, v in base['config'].items() if k not in _MERGE_FREE}
    runs, seen, arms = [], set(), []
    for part in parts:
        other = {k: v for k, v in part['config'].items() if k not in _MERGE_FREE}
        if other != same:
            diff = sorted(k for k in set(same) | set(other) if same.get(k) != other.get(k))
            raise ValueError(f'cannot merge evaluations with different settings: {diff}')
        for r in part['runs']:
            key = (r['arm'], r['fraction'], r['seed'])
            if key in seen:
                raise ValueError(f'run {key} appears in more than one part')
            seen.add(key)
            runs.append(r)
        ran = {r['arm'] for r in part['runs']}
        arms += [a for a in part['config']['arms'] if a in ran and a not in arms]
    timings = {}
    for i, part in enumerate(parts):
        timings[f'part{i}'] = dict(arms=sorted({r['arm'] for r in part['runs']}), wall_s=part.get('wall_s'),
                                   threads=part.get('threads'), **part.get('timings', {}))
    return dict(base, config=dict(base['config'], arms=arms), runs=runs, timings=timings,
                wall_s=max(p.get('wall_s') or 0 for p in parts), threads=sum(p.get('threads') or 0 for p in parts),
                command=' ; '.join(p.get('command', '') for p in parts))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == 'merge':
        try:
            payload = merge_results([json.loads((part / 'results.json').read_text()) for part in args.parts])
        except ValueError as e:
            print(f'cpc-eval: error: {e}', file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(args.out, payload))
        (args.out / 'results.json').write_text(json.dumps(payload, indent=1, default=_json_default))
        return 0
    if args.command == 'plot':
        payload = json.loads((args.out / 'results.json').read_text())
        print(write_report(args.out, payload))
        (args.out / 'results.json').write_text(json.dumps(payload, indent=1, default=_json_default))
        return 0
    kw = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(EvalConfig)}}
    cfg = EvalConfig(**kw, progress=not args.no_progress)
    try:
        cfg.validate()
    except ValueError as e:
        print(f'cpc-eval: error: {e}', file=sys.stderr)
        return 2
    command = 'python -m cpc_models.evaluate ' + ' '.join(shlex.quote(a) for a in argv)
    run_figure1(cfg, args.out, command)
    return 0


if __name__ == '__main__':
    sys.exit(main())
