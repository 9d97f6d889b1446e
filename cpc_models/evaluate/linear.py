"""``cpc-eval linear``: the paper's linear evaluation at any scale. A softmax classifier on the frozen, mean-pooled
features (Hénaff et al. 2020: the ImageNet linear classification results, a linear classifier on the mean-pooled
patch features; the supplementary's optimizer settings were not at hand here, see docs/evaluation.md), trained from
features extracted once to disk (:mod:`~cpc_models.evaluate.feature_store`), top-1 and top-5 on the eval split.

RAM stays bounded whatever the number of images: the training pass holds one chunk of features (``chunk_rows`` x
dim, float16 on disk, float32 per batch) and the classifier. Rows are stored in a seeded random order, so every
chunk is a sample of all classes and mini-batches drawn within a chunk are unbiased.

The protocol (what the paper leaves open is a config value, chosen here and written into results.json):

* features standardized with the training rows' mean and std (one streaming pass, float64);
* every L2 penalty of ``wds`` trained at once (one classifier each, same batches), mini-batch SGD with Nesterov
  momentum, cosine learning-rate decay to 0 over ``epochs``; the penalty is picked on a seeded ``holdout_fraction``
  of the training rows that no classifier trains on;
* the picked classifier is scored once on the eval split (ImageNet: its validation set), top-1 and top-5.

    cpc-eval linear --checkpoint runs/in1k --data /data/imagenet --features /scratch/in1k-feats --out results/linear
    torchrun --nproc-per-node 8 -m cpc_models.evaluate linear ...   # extraction on every GPU, training on rank 0
    cpc-eval linear --features /scratch/in1k-feats --out results/linear    # train again from the stored features
"""
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import config as C
from ..atomic import write_text
from ..checks import check_model_name, one_line
from ..distributed import init_distributed, is_main_process
from .encoders import check_checkpoint, load_encoder
from .feature_store import FeatureStore, extract_to_store
from .sources import list_image_folder, source_kind

__all__ = ['LinearConfig', 'fit_from_store', 'evaluate_store', 'feature_stats', 'peak_rss_mb', 'run_linear',
           'extract_stores', 'format_linear', 'main']


@dataclass
class LinearConfig:
    """Options of ``cpc-eval linear``."""
    # ---- encoder (extraction; not needed when --features already holds both stores) ----
    checkpoint: str = ''  # timm 'name.tag' | .safetensors file | checkpoint (or run) folder | published folder
    model: str = 'cpcv2_resnet_tiny'  # timm architecture (a 'name.tag' or checkpoint folder overrides it)
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs, as JSON
    # ---- data ----
    data: str = ''  # a folder with train/ and val/ (or test/) of class subfolders ('' = --features is extracted)
    features: str = ''  # the folder of the feature stores (train/, eval/): extracted once, resumed after a kill
    out: str = ''  # the folder for results.json
    chunk_rows: int = 4096  # rows per chunk on disk (float16): what one training step reads at most
    order_seed: int = 0  # rows are stored in this seeded random order (chunks sample every class)
    extract_batch: int = 256  # images per forward pass
    workers: int = 4  # DataLoader processes decoding images
    device: str = 'auto'  # where the encoder runs (auto: cuda:LOCAL_RANK when there is a GPU)
    # ---- classifier ----
    epochs: int = 30  # passes over the training rows
    batch_size: int = 1024  # rows per SGD step
    lr: float = 0.1  # peak learning rate (standardized features), cosine decay to 0
    momentum: float = 0.9  # Nesterov momentum
    wds: Tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4)  # L2 penalties trained at once, one picked on the holdout
    holdout_fraction: float = 0.02  # training rows held out to pick the penalty (seeded by seed)
    seed: int = 0  # batches and the holdout
    threads: int = 0  # torch.set_num_threads (0 = torch's default)
    progress: bool = True

    def validate(self) -> None:
        if not self.features:
            raise C.ConfigError('--features: give the folder for the feature stores (extracted once, resumable)')
        if not self.wds:
            raise C.ConfigError('--wds: give at least one L2 penalty')
        for key in ('chunk_rows', 'extract_batch', 'epochs', 'batch_size'):
            C.check_range(self, key, 1)
        for key in ('workers', 'wds', 'momentum', 'seed', 'order_seed', 'threads'):
            C.check_range(self, key, 0)
        C.check_range(self, 'lr', 0, low_open=True)
        C.check_range(self, 'holdout_fraction', 0, 1, low_open=True, high_open=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MB; ru_maxrss is KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _holdout_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < fraction


def feature_stats(store: FeatureStore, use: np.ndarray, progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) (dim,) float32 of the rows where ``use`` (n,) is True and the image was readable; one pass,
    float64 sums per chunk."""
    s = np.zeros(store.dim)
    ss = np.zeros(store.dim)
    count = 0
    for k, feats, _, valid in tqdm(store.chunks(), total=store.spec.n_chunks, desc='feature stats', leave=False,
                                   disable=not progress):
        rows = store.spec.rows(k)
        keep = valid & use[rows.start:rows.stop]
        x = np.asarray(feats[keep], dtype=np.float64)
        s += x.sum(0)
        ss += (x * x).sum(0)
        count += len(x)
    mean = s / max(count, 1)
    var = np.maximum(ss / max(count, 1) - mean ** 2, 0.0)
    return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(var)).float().clamp_min(1e-6)


def _batches(store: FeatureStore, use: np.ndarray, batch: int, gen: np.random.Generator):
    """(x float32 (B, dim), y (B,)) over the rows where ``use`` is True, chunks in random order, rows shuffled within
    each chunk. One chunk in memory at a time."""
    for k in gen.permutation(store.spec.n_chunks):
        feats, y, valid = store.chunk(int(k))
        rows = store.spec.rows(int(k))
        idx = np.nonzero(valid & use[rows.start:rows.stop])[0]
        if not len(idx):
            continue
        x = torch.from_numpy(np.asarray(feats[np.sort(idx)], dtype=np.float32))
        yk = torch.from_numpy(np.asarray(y[np.sort(idx)], dtype=np.int64))
        del feats
        order = torch.from_numpy(gen.permutation(len(idx)))
        for i in range(0, len(idx), batch):
            sel = order[i:i + batch]
            yield x[sel], yk[sel]


def fit_from_store(store: FeatureStore, cfg: LinearConfig, num_classes: int) -> Dict:
    """Train one softmax classifier per penalty of ``cfg.wds`` on the store's training rows (all but the holdout),
    pick the penalty on the holdout. Returns dict(predict=callable(x float (B, dim)) -> logits, wd, holdout_acc
    by penalty, mean, std, steps)."""
    holdout = _holdout_mask(store.n, cfg.holdout_fraction, cfg.seed)
    train = ~holdout
    mean, std = feature_stats(store, train, cfg.progress)
    torch.manual_seed(cfg.seed)
    heads = nn.ModuleList(nn.Linear(store.dim, num_classes) for _ in cfg.wds)
    for h in heads:
        nn.init.zeros_(h.weight)
        nn.init.zeros_(h.bias)
    groups = [dict(params=[h.weight], weight_decay=wd) for h, wd in zip(heads, cfg.wds, strict=True)]
    groups.append(dict(params=[h.bias for h in heads], weight_decay=0.0))
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    n_train = int((train & _valid_rows(store)).sum())
    steps_per_epoch = sum(math.ceil(int((train[r.start:r.stop] & v).sum()) / cfg.batch_size)
                          for r, v in ((store.spec.rows(k), store.chunk(k)[2]) for k in range(store.spec.n_chunks)))
    total = max(1, steps_per_epoch * cfg.epochs)
    gen = np.random.default_rng(cfg.seed + 1)
    step, losses = 0, []
    bar = tqdm(total=total, desc='linear', disable=not cfg.progress, file=sys.stderr)
    for _ in range(cfg.epochs):
        for x, y in _batches(store, train, cfg.batch_size, gen):
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g['lr'] = lr
            x = (x - mean) / std
            loss = sum(F.cross_entropy(h(x), y) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item() / len(heads))
            bar.update()
    bar.close()
    heads.requires_grad_(False)
    hits = evaluate_store(store, [lambda x, h=h: h((x - mean) / std) for h in heads], holdout)
    accs = {wd: h['top1'] for wd, h in zip(cfg.wds, hits, strict=True)}
    best = max(range(len(cfg.wds)), key=lambda i: (accs[cfg.wds[i]], -i))
    head = heads[best]
    return dict(predict=lambda x: head((x - mean) / std), wd=cfg.wds[best], holdout_top1_by_wd={
        str(k): v for k, v in accs.items()}, n_train=n_train, n_holdout=int((holdout & _valid_rows(store)).sum()),
        steps=step, final_loss=float(np.mean(losses[-20:])) if losses else None)


def _valid_rows(store: FeatureStore) -> np.ndarray:
    valid = np.ones(store.n, dtype=bool)
    for row, _, _ in store.skipped():
        valid[row] = False
    return valid


@torch.no_grad()
def evaluate_store(store: FeatureStore, predictors: List, use: Optional[np.ndarray] = None,
                   batch: int = 4096) -> List[Dict]:
    """Top-1 and top-5 accuracy of each predictor (x float32 (B, dim) -> logits) on the store's readable rows where
    ``use`` is True (all by default), one chunk at a time."""
    top1 = [0] * len(predictors)
    top5 = [0] * len(predictors)
    count = 0
    for k, feats, y, valid in store.chunks():
        rows = store.spec.rows(k)
        keep = valid if use is None else valid & use[rows.start:rows.stop]
        idx = np.nonzero(keep)[0]
        for i in range(0, len(idx), batch):
            sel = idx[i:i + batch]
            x = torch.from_numpy(np.asarray(feats[sel], dtype=np.float32))
            t = torch.from_numpy(np.asarray(y[sel], dtype=np.int64))
            for j, p in enumerate(predictors):
                logits = p(x)
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                top1[j] += int((top[:, 0] == t).sum())
                top5[j] += int((top == t[:, None]).any(1).sum())
        count += len(idx)
    return [dict(top1=a / max(count, 1), top5=b / max(count, 1), n=count) for a, b in zip(top1, top5, strict=True)]


def run_linear(cfg: LinearConfig) -> Dict:
    """Train from ``cfg.features``/train, pick the penalty on its holdout, score ``cfg.features``/eval once; write
    ``cfg.out``/results.json. Returns the results."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0, c0 = time.time(), time.process_time()
    root = Path(cfg.features)
    train, ev = FeatureStore(root / 'train'), FeatureStore(root / 'eval')
    if train.spec.classes != ev.spec.classes or train.dim != ev.dim:
        raise C.ConfigError(f'--features {root}: train and eval stores differ in classes or dimensions')
    fit = fit_from_store(train, cfg, len(train.spec.classes))
    t_fit = time.time() - t0
    score = evaluate_store(ev, [fit.pop('predict')])[0]
    res = dict(top1=score['top1'], top5=score['top5'], n_eval=score['n'], classes=len(train.spec.classes),
               dim=train.dim, n_train_rows=train.n, model=train.spec.model, fit=fit, config=C.to_dict(cfg),
               skipped=dict(train=len(train.skipped()), eval=len(ev.skipped())),
               timings=dict(wall_s=round(time.time() - t0, 1), fit_s=round(t_fit, 1),
                            cpu_s=round(time.process_time() - c0, 1)),
               peak_rss_mb=round(peak_rss_mb(), 1))
    if cfg.out:
        write_text(Path(cfg.out) / 'results.json', json.dumps(res, indent=1))
    return res


def format_linear(res: Dict) -> str:
    f = res['fit']
    return (f"linear evaluation of {res['model']} ({res['dim']}-d features, {res['classes']} classes): top-1 "
            f"{100 * res['top1']:.2f}%, top-5 {100 * res['top5']:.2f}% on {res['n_eval']} eval images; L2 {f['wd']:g} "
            f"picked on {f['n_holdout']} held-out training rows ({f['n_train']} trained on, {f['steps']} steps); "
            f"{res['timings']['wall_s']:.0f} s wall, peak RSS {res['peak_rss_mb']:.0f} MB")


def _store_split(listing) -> Tuple[str, str]:
    """(train split, eval split) of a folder listing: train/ and test/ (else val/)."""
    ev = 'test' if 'test' in listing.splits else 'val' if 'val' in listing.splits else None
    if 'train' not in listing.splits or ev is None:
        raise C.ConfigError(f'--data {listing.where}: needs train/ and val/ (or test/) folders of class subfolders '
                            f'(found {", ".join(listing.splits)})')
    return 'train', ev


def check_linear(cfg: LinearConfig):
    """Everything checked before any work: the options, the folder (classes, splits), the checkpoint. Returns the
    folder listing (None without --data)."""
    cfg.validate()
    if not cfg.data:
        for split in ('train', 'eval'):
            FeatureStore(Path(cfg.features) / split)  # raises ConfigError if missing or unfinished
        return None
    if source_kind(cfg.data) != 'folder':
        raise C.ConfigError(f'--data {cfg.data}: cpc-eval linear reads a folder with train/ and val/ (or test/)')
    listing = list_image_folder(Path(cfg.data).expanduser(), cfg.data)
    _store_split(listing)
    if len(listing.classes) < 2:
        raise C.ConfigError(f'--data {cfg.data}: only one class; a classifier needs at least two')
    if not cfg.checkpoint:
        raise C.ConfigError('--checkpoint: give the encoder whose features to extract (or no --data, to train '
                            'from the stores already in --features)')
    check_model_name(cfg.model)
    check_checkpoint(cfg.checkpoint)
    return listing


def extract_stores(cfg: LinearConfig, listing, progress: Optional[bool] = None) -> Dict:
    """Extract the train and eval features of ``listing`` into ``cfg.features``/train and /eval (resumable; every
    rank of a torchrun launch extracts its share of the chunks). Returns per split what this rank did."""
    rank, world, device = init_distributed()
    if cfg.device not in ('auto', ''):
        device = torch.device(cfg.device)
    enc, src = load_encoder(cfg.checkpoint, cfg.model, cfg.model_args)
    name = src.get('name') or src.get('path') or src['model']
    done = {}
    for split, store in zip(_store_split(listing), ('train', 'eval'), strict=True):
        items = listing.splits[split]
        order = np.random.default_rng(cfg.order_seed).permutation(len(items))
        paths = [str(items[i][0]) for i in order]
        labels = [int(items[i][1]) for i in order]
        done[store] = extract_to_store(enc, Path(cfg.features) / store, paths, labels, listing.classes, name,
                                       cfg.chunk_rows, cfg.extract_batch, cfg.workers, device,
                                       cfg.progress if progress is None else progress, rank, world)
    return dict(rank=rank, world_size=world, **done)


def main(argv: Optional[List[str]] = None) -> int:
    """cpc-eval linear. Exit status: 0 done, 2 bad input (one line says what to change)."""
    prog = 'cpc-eval linear'
    cfg = C.parse_args(LinearConfig(), list(sys.argv[1:] if argv is None else argv), prog=prog,
                       description=__doc__.split('\n\n')[0])
    try:
        listing = check_linear(cfg)
    except ValueError as e:
        return C.usage_error(prog, one_line(e))
    try:
        if listing is not None:
            did = extract_stores(cfg, listing)
            print(f"{prog}: rank {did['rank']}/{did['world_size']}: " + '; '.join(
                f"{s}: {d['computed']} chunk(s) extracted, {d['kept']} already on disk, {d['skipped']} unreadable "
                f"image(s) skipped" for s, d in did.items() if isinstance(d, dict)), file=sys.stderr)
        if not is_main_process():
            return 0
        res = run_linear(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # the encoder or the stores given
        print(f'{prog}: error: {one_line(e)}', file=sys.stderr)
        return 2
    print(format_linear(res))
    return 0
