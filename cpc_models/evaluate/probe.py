"""``cpc-eval probe``: the validation-split linear probe that compares checkpoints (e.g. in a pretraining search).

For each seed, the class-balanced labelled subset of Figure 1 (same pool, same draw) is encoded with the frozen
encoder; a softmax regression on the standardized features gets its L2 penalty picked on the tuning half of the
validation split and is scored on the selection half. Reported: the mean (and std) over seeds, per feature kind:

* ``pooled``: what ``timm.create_model(name, pretrained=True, num_classes=0)`` returns (mean over the grid);
* ``grid``: the latent grid ``forward_features`` (B, F, rows, cols), flattened;
* ``pixels``: the raw pixels (no encoder), the floor features must beat.

Only the labelled subsets and the validation split are encoded (about 6,700 images at 1%), so a probe takes a
minute or two on a CPU. The test set is never read.

    cpc-eval probe --checkpoint runs/fmnist/checkpoints/step_001000            # 1%, pooled and grid, seeds 0,1,2
    cpc-eval probe --checkpoint cpcv2_resnet_tiny.fmnist --features pooled,grid,pixels --out probe.json
"""
import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import numpy as np
import torch

from .. import config as C
from ..atomic import write_text
from ..checks import check_model_name, check_out_file, one_line
from ..data import FASHION_MNIST_CLASSES
from ..extract import extract_features
from .data import balanced_subset, load_eval_splits
from .encoders import check_checkpoint, load_encoder
from .eval_config import EvalConfig
from .figure1 import EvalInputError, model_data_config
from .sources import FASHION_MNIST, check_source, check_label_amounts, eval_splits, load_source
from .protocols import accuracy, fit_linear_probe

__all__ = ['ProbeConfig', 'check_probe', 'run_probe', 'format_probe', 'FEATURE_KINDS']

FEATURE_KINDS = ('pooled', 'grid', 'pixels')
_EVAL = EvalConfig()


@dataclass
class ProbeConfig:
    """Options of ``cpc-eval probe`` (the validation split only; defaults shared with ``cpc-eval figure1``)."""
    # ---- encoder ----
    checkpoint: str = ''  # timm 'name.tag' | .safetensors file | checkpoint (or run) folder | published folder | random
    model: str = _EVAL.model  # timm architecture (a 'name.tag' or checkpoint folder overrides it)
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs, as JSON
    # ---- probe ----
    features: Tuple[str, ...] = ('pooled', 'grid')  # comma list of pooled | grid | pixels
    fraction: float = 0.01  # labelled fraction of the pool (1% or 0.01)
    seeds: Tuple[int, ...] = (0, 1, 2)  # seeds of the labelled subsets (the mean over them is reported)
    linear_wds: Tuple[float, ...] = _EVAL.linear_wds  # L2 penalty grid, picked on the tuning half of val
    linear_max_iter: int = _EVAL.linear_max_iter  # L-BFGS iterations per penalty
    # ---- data ----
    data: str = _EVAL.data  # fashion-mnist | a folder of class subfolders (or train/ val/ test/ of them) | hf:NAME
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = $CPC_FASHION_MNIST_DIR or the Debian package's)
    val_size: int = _EVAL.val_size  # fashion-mnist: validation images carved from the training set, as in figure1
    val_fraction: float = _EVAL.val_fraction  # other --data without a val split: fraction of train carved as val
    test_fraction: float = _EVAL.test_fraction  # other --data without a test split: fraction held out (never read)
    convert_colour: bool = False  # read colour images as greyscale for a 1-channel model (else they are refused)
    val_seed: int = _EVAL.val_seed  # seed of the validation split, as in figure1
    # ---- runtime ----
    extract_batch: int = _EVAL.extract_batch  # images per forward pass
    threads: int = 0  # torch.set_num_threads (0 = torch's default)
    progress: bool = True  # progress bars
    out: str = ''  # also write the result to this JSON file

    def validate(self) -> None:
        bad = [f for f in self.features if f not in FEATURE_KINDS]
        if bad or not self.features:
            raise ValueError(f'Unknown feature kind(s) {bad or "(none given)"}; '
                             f'choose from {", ".join(FEATURE_KINDS)}.')
        if not 0 < self.fraction <= 1:
            raise ValueError(f'fraction {self.fraction} is outside (0, 1]; give 0.01 or 1% for 1%.')
        if not self.seeds or not self.linear_wds:
            raise ValueError('Give at least one seed and one linear_wds value.')
        if self.val_size < 20:
            raise ValueError(f'val_size must be >= 20 (two halves with every class), got {self.val_size}.')
        if not self.checkpoint and set(self.features) - {'pixels'}:
            raise ValueError('Give --checkpoint: a timm name.tag, a .safetensors file, a checkpoint folder, or '
                             '"random" (or probe only --features pixels).')
        for key in ('seeds', 'val_seed', 'linear_wds', 'threads'):
            C.check_range(self, key, 0)
        for key in ('extract_batch', 'linear_max_iter'):
            C.check_range(self, key, 1)
        for key in ('val_fraction', 'test_fraction'):
            C.check_range(self, key, 0, 1, low_open=True, high_open=True)


def check_probe(cfg: ProbeConfig) -> None:
    """cfg.validate(), the encoder (--model, --checkpoint), the data and --out, before any work; raises ValueError
    (ConfigError: naming the option) saying what is allowed."""
    cfg.validate()
    if set(cfg.features) - {'pixels'}:
        check_model_name(cfg.model)
        check_checkpoint(cfg.checkpoint)
    check_source(cfg.data, cfg.data_dir)
    if cfg.out:
        check_out_file(cfg.out, '--out', suffix='.json')


def run_probe(cfg: ProbeConfig) -> Dict:
    """Run the probe; returns dict(results={kind: dict(mean, std, per_seed)}, checkpoint, config, n_*, timings)."""
    check_probe(cfg)
    t0, c0 = time.time(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.data == FASHION_MNIST:
            x, y, pool, tune, select = load_eval_splits(cfg)
            classes = list(FASHION_MNIST_CLASSES)
        else:
            source = load_source(cfg, model_data_config(cfg), progress=cfg.progress)
            x, y, pool, tune, select, _, _ = eval_splits(source, cfg)  # the test split is never read
            classes = source.classes
        check_label_amounts(y[pool], classes, cfg.data, (cfg.fraction,), fraction_flag='--fraction')
    except (ValueError, FileNotFoundError) as e:  # the data given
        raise EvalInputError(one_line(e)) from e
    subsets = {s: pool[balanced_subset(y[pool], cfg.fraction, s)] for s in cfg.seeds}
    needed = torch.unique(torch.cat([*subsets.values(), tune, select]))  # sorted global indices to encode
    pos = torch.full((len(y),), -1, dtype=torch.long)
    pos[needed] = torch.arange(len(needed))
    feats, src = {}, dict(kind='none')
    if 'pixels' in cfg.features:
        feats['pixels'] = x[needed].flatten(1).float()
    if set(cfg.features) - {'pixels'}:
        try:
            enc, src = load_encoder(cfg.checkpoint, cfg.model, cfg.model_args)
        except (ValueError, FileNotFoundError, RuntimeError) as e:  # the encoder given
            raise EvalInputError(one_line(e)) from e
        pooled, grid = extract_features(enc, x[needed], cfg.extract_batch, 'grid' in cfg.features, 'probe',
                                        cfg.progress)
        feats['pooled'], feats['grid'] = pooled, None if grid is None else grid.flatten(1)
    t_extract = time.time() - t0
    results = {}
    for kind in cfg.features:
        f = feats[kind]
        per_seed = []
        for s, sub in subsets.items():
            probe = fit_linear_probe(f[pos[sub]].float(), y[sub], f[pos[tune]].float(), y[tune], cfg.linear_wds,
                                     len(classes), cfg.linear_max_iter)
            acc = accuracy(probe['predict'](f[pos[select]].float()), y[select])
            per_seed.append(dict(seed=s, accuracy=acc, wd=probe['wd'], tune_accuracy=probe['val_acc']))
        accs = [r['accuracy'] for r in per_seed]
        results[kind] = dict(mean=float(np.mean(accs)), std=float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                             per_seed=per_seed, dims=int(f.shape[1]))
    out = dict(results=results, checkpoint=src, config=C.to_dict(cfg), classes=classes,
               n_labels=len(subsets[cfg.seeds[0]]),
               n_tune=len(tune), n_select=len(select),
               timings=dict(wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
                            extract_s=round(t_extract, 1)))
    if cfg.out:
        write_text(cfg.out, json.dumps(out, indent=1))
    return out


def format_probe(res: Dict) -> str:
    """One line per feature kind: mean ± std (%) on the selection half of val, and the picked penalties."""
    cfg = res['config']
    lines = [f"linear probe, {cfg['fraction']:.0%} labels ({res['n_labels']} images), L2 picked on "
             f"{res['n_tune']} val images, accuracy on the other {res['n_select']}, seeds {cfg['seeds']}:"]
    for kind, r in res['results'].items():
        wds = ', '.join(f"{p['wd']:g}" for p in r['per_seed'])
        lines.append(f"  {kind:>7s} ({r['dims']} dims): {100 * r['mean']:.2f} ± {100 * r['std']:.2f}  (L2 {wds})")
    lines.append(f"({res['timings']['wall_s']:.0f} s wall, {res['timings']['cpu_s']:.0f} CPU-s)")
    return '\n'.join(lines)
