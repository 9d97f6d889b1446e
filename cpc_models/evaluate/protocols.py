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
from ..runtime import channels_last_default
from .eval_config import EvalConfig

__all__ = ['accuracy', 'fit_linear_probe', 'knn_predict', 'EncoderClassifier', 'make_classifier', 'train_until_plateau',
           'train_on_grid', 'train_end_to_end', 'train_images', 'predict_images', 'predict_grids']


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


# ============ k-nearest neighbours ============

@torch.no_grad()
def knn_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_query: torch.Tensor, k: int, num_classes: int,
                batch_size: int = 1024) -> torch.Tensor:
    """Cosine k-NN: each query (N, F) gets the class whose members among its k most similar training rows
    (M, F) have the largest summed cosine similarity. Returns the votes (N, num_classes); argmax = prediction."""
    k = min(k, len(x_train))
    train = F.normalize(x_train.float(), dim=1)
    out = []
    for i in range(0, len(x_query), batch_size):
        sim = F.normalize(x_query[i:i + batch_size].float(), dim=1) @ train.T
        top, idx = sim.topk(k, dim=1)
        out.append(torch.zeros(len(sim), num_classes).scatter_add_(1, y_train[idx], top))
    return torch.cat(out)


# ============ training until the validation accuracy stops improving ============

def _batches(n: int, batch: int, gen: torch.Generator):
    """Index batches from per-epoch permutations of range(n), without end (the last batch of an epoch may be
    short)."""
    batch = min(batch, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            yield perm[i:i + batch]


def train_until_plateau(module: nn.Module, opt: torch.optim.Optimizer, n: int, batch: int, loss_fn, evaluate,
                        cfg: EvalConfig, seed: int, max_epochs: float, max_steps: int, desc: str,
                        lr_flag: str) -> Dict:
    """AdamW steps of ``loss_fn(index batch)`` over ``n`` labelled items until ``evaluate()`` (accuracy on the
    tuning half of the validation split) stops improving; then the best state is restored.

    The rule: validate after every round of max(1 epoch, ``cfg.round_images`` items); after ``cfg.patience``
    rounds without a new best the learning rate drops x0.1, ``cfg.lr_drops`` times, and the next plateau ends the
    run. A linear warm-up spans the first round. Caps: ``max_epochs`` epochs, ``max_steps`` steps (0: none); a run
    that hits one says ``stopped='cap'``. Returns the record: best epoch, epochs and steps trained, images seen,
    validation curve, why it stopped.
    """
    steps_per_epoch = math.ceil(n / min(batch, n))
    round_steps = math.ceil(max(n, cfg.round_images) / min(batch, n))
    cap = math.ceil(max_epochs * steps_per_epoch)
    cap = min(cap, max_steps) if max_steps > 0 else cap
    base_lrs = [g['lr'] for g in opt.param_groups]
    scale, drops, bad, step, seen = 1.0, [], 0, 0, 0
    best = (-1.0, 0.0, None)  # (val accuracy, epoch, state)
    curve = []
    batches = _batches(n, batch, torch.Generator().manual_seed(seed))
    bar = tqdm(total=cap, desc=desc, leave=False, disable=not cfg.progress)
    stopped = 'cap'
    losses = []
    module.train()
    while step < cap:
        for _ in range(min(round_steps, cap - step)):
            warm = min(1.0, (step + 1) / round_steps)
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g['lr'] = lr * scale * warm
            idx = next(batches)
            loss = loss_fn(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'{desc}: non-finite loss at step {step}; lower {lr_flag}.')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(idx)
            losses.append(loss.item())
            bar.update()
        module.eval()
        acc = evaluate()
        module.train()
        epoch = round(seen / n, 3)
        curve.append((epoch, round(acc, 5)))
        bar.set_postfix(val=f'{100 * acc:.2f}', best=f'{100 * max(acc, best[0]):.2f}', refresh=False)
        if acc > best[0]:
            best, bad = (acc, epoch, copy.deepcopy(module.state_dict())), 0
        else:
            bad += 1
        if bad >= cfg.patience:
            if len(drops) == cfg.lr_drops:
                stopped = 'plateau'
                break
            scale, bad = scale * 0.1, 0
            drops.append(epoch)
    bar.close()
    module.load_state_dict(best[2])
    module.eval()
    return dict(best_epoch=best[1], best_val_acc=round(best[0], 5), epochs=round(seen / n, 3), steps=step,
                images_seen=seen, stopped=stopped, lr_drops_at=drops, val_curve=curve,
                final_loss=float(np.mean(losses[-10:])))


# ============ the trained classifiers: GridClassifier on frozen grids or end to end, a whole-image CNN ============

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


@torch.no_grad()
def predict_grids(classifier: nn.Module, grids: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    classifier.eval()
    return torch.cat([classifier(grids[i:i + batch_size].float()) for i in range(0, len(grids), batch_size)])


def train_on_grid(classifier: GridClassifier, grids: torch.Tensor, labels: torch.Tensor, val_grids: torch.Tensor,
                  val_labels: torch.Tensor, cfg: EvalConfig, seed: int, desc: str = 'frozen') -> Dict:
    """Frozen encoder: train the classifier on pre-extracted latent grids (float16 (N, F, rows, cols)) until the
    accuracy on ``val_grids`` stops improving."""
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.frozen_lr, weight_decay=cfg.frozen_wd)
    return train_until_plateau(
        classifier, opt, len(grids), cfg.frozen_batch,
        lambda idx: F.cross_entropy(classifier(grids[idx].float()), labels[idx]),
        lambda: accuracy(predict_grids(classifier, val_grids), val_labels),
        cfg, seed, cfg.frozen_max_epochs, cfg.frozen_max_steps, desc, '--frozen-lr')


def _augment(cfg: EvalConfig, size: Tuple[int, int]):
    return v2.Compose([v2.RandomCrop(size, padding=cfg.aug_pad), v2.RandomHorizontalFlip()])


@torch.no_grad()
def predict_images(model: nn.Module, images: torch.Tensor, batch_size: int, progress: bool = False,
                   prep=None) -> torch.Tensor:
    """Logits of uint8 images (N, C, H, W); ``prep`` maps a uint8 batch to the model's input (default: normalize
    with the encoder's mean/std, for an EncoderClassifier)."""
    prep = prep or (lambda x: normalize(x, model.encoder))
    model.eval()
    return torch.cat([model(prep(images[i:i + batch_size]))
                      for i in tqdm(range(0, len(images), batch_size), desc='eval', leave=False, disable=not progress)])


def train_images(model: nn.Module, groups, images: torch.Tensor, labels: torch.Tensor, val_images: torch.Tensor,
                 val_labels: torch.Tensor, prep, cfg: EvalConfig, seed: int, batch: int, wd: float,
                 max_epochs: float, max_steps: int, desc: str, lr_flag: str) -> Dict:
    """Train ``model`` on augmented uint8 images (N, C, H, W) (random crop of the ``cfg.aug_pad``-padded image +
    horizontal flip, per image) until the accuracy on ``val_images`` stops improving; ``prep`` maps a uint8 batch
    to the model's input, ``groups`` are AdamW parameter groups."""
    opt = torch.optim.AdamW(groups, weight_decay=wd)
    torch.manual_seed(seed)  # the augmentation draws from the global generator
    aug = _augment(cfg, tuple(images.shape[-2:]))
    model.to(memory_format=torch.channels_last if channels_last_default(next(model.parameters()).device)
             else torch.contiguous_format)

    def loss_fn(idx):
        x = torch.stack([aug(img) for img in images[idx]])  # per-image crop offsets and flips
        return F.cross_entropy(model(prep(x)), labels[idx])

    def evaluate():
        return accuracy(predict_images(model, val_images, cfg.extract_batch, False, prep), val_labels)

    return train_until_plateau(model, opt, len(images), batch, loss_fn, evaluate, cfg, seed, max_epochs, max_steps,
                               desc, lr_flag)


def train_end_to_end(model: EncoderClassifier, images: torch.Tensor, labels: torch.Tensor, val_images: torch.Tensor,
                     val_labels: torch.Tensor, cfg: EvalConfig, seed: int, encoder_lr_scale: float = 1.0,
                     desc: str = 'e2e') -> Dict:
    """Fine-tuned / scratch: encoder + GridClassifier on augmented uint8 images (N, C, H, W), until the accuracy on
    ``val_images`` stops improving."""
    groups = [dict(params=list(model.classifier.parameters()), lr=cfg.e2e_lr)]
    if encoder_lr_scale > 0:
        groups.append(dict(params=list(model.encoder.parameters()), lr=cfg.e2e_lr * encoder_lr_scale))
    else:
        model.encoder.requires_grad_(False)
    return train_images(model, groups, images, labels, val_images, val_labels,
                        lambda x: normalize(x, model.encoder), cfg, seed, cfg.e2e_batch, cfg.e2e_wd,
                        cfg.e2e_max_epochs, cfg.e2e_max_steps, desc, '--e2e-lr')
