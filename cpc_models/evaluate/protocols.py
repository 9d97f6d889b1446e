"""The evaluation protocols: a linear probe on frozen features, and the GridClassifier trained on frozen latent
grids or end to end with its encoder (Hénaff et al. 2020, Sec. 4.2 and Fig. 1; see docs/evaluation.md)."""
import copy
import math
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..classifier import GridClassifier, grid_classifier_kwargs
from ..extract import normalize
from ..schedule import warmup_cosine
from .eval_config import EvalConfig

__all__ = ['accuracy', 'fit_linear_probe', 'EncoderClassifier', 'make_classifier', 'train_on_grid',
           'train_end_to_end', 'predict_images', 'predict_grids']


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


# ============ linear probe ============

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
            acc = accuracy(lin(xv), y_val)
        val_by_wd[wd] = acc
        if best is None or acc > best[1]:
            best = (wd, acc, copy.deepcopy(lin.state_dict()))
    lin.load_state_dict(best[2])
    lin.requires_grad_(False)

    def predict(x):
        return lin((x - mu) / sd)

    return dict(predict=predict, wd=best[0], val_acc=best[1], val_by_wd=val_by_wd)


# ============ GridClassifier: on frozen grids, or end to end ============

class EncoderClassifier(nn.Module):
    """Images -> encoder latent grid -> GridClassifier logits (the end-to-end arms)."""

    def __init__(self, encoder: nn.Module, classifier: GridClassifier):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder.forward_features(x))


def make_classifier(enc: nn.Module, cfg: EvalConfig, num_classes: int) -> GridClassifier:
    kw = grid_classifier_kwargs(cfg.classifier_size, enc.num_features)
    return GridClassifier(enc.num_features, num_classes, drop_rate=cfg.classifier_drop, **kw)


def _num_steps(n: int, batch: int, epochs: float, max_steps: int) -> int:
    steps = max(1, math.ceil(epochs * math.ceil(n / batch)))
    return min(steps, max_steps) if max_steps > 0 else steps


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
    """`steps` AdamW steps of ``loss_fn(index batch)``, warm-up capped cosine over the run; stops on a non-finite
    loss."""
    warm = max(1, int(round(cfg.warmup_frac * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, steps, warm, decay_during_warmup=True))
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
    """Frozen encoder: train the classifier on pre-extracted latent grids (float16 (N, F, rows, cols))."""
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
    """Fine-tuned / scratch: encoder + classifier on augmented uint8 images (N, C, H, W)."""
    steps = _num_steps(len(images), cfg.e2e_batch, cfg.e2e_epochs, cfg.e2e_max_steps)
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
        return F.cross_entropy(model(normalize(x, model.encoder)), labels[idx])

    return _train_steps(model, opt, steps, batches, loss_fn, cfg, desc, '--e2e-lr')


@torch.no_grad()
def predict_images(model: EncoderClassifier, images: torch.Tensor, batch_size: int, progress: bool) -> torch.Tensor:
    model.eval()
    out = [model(normalize(images[i:i + batch_size], model.encoder))
           for i in tqdm(range(0, len(images), batch_size), desc='eval', leave=False, disable=not progress)]
    return torch.cat(out)


@torch.no_grad()
def predict_grids(classifier: nn.Module, grids: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier(grids[i:i + batch_size].float()) for i in range(0, len(grids), batch_size)])
