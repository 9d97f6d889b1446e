"""The paper's Figure 1: accuracy against the fraction of labels, one line per *arm*, over fractions and seeds.

An arm is registered with :func:`register_arm`: a name, its legend label and plot style, the inputs it needs
(prepared once per evaluation and shared by all its runs), whether it is a CPC arm (a candidate for the best CPC arm
of a fraction, picked on the selection half of val) and whether its seed matters beyond drawing the labelled subset,
and a function that trains and evaluates one classifier on a labelled subset. Adding a line to the figure is one
decorated function::

    @register_arm('cpc_nearest_mean', 'CPC, nearest class mean', dict(color='tab:green', marker='x'),
                  needs=('cpc_features',), cost=0, cpc=True, seeded=False)
    def cpc_nearest_mean(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
        ...
        return dict(scores(inputs.data, predict, feats.eval, feats.select), config=dict(metric='euclidean'))

Inputs an arm can need: ``pixels`` (raw pixels as features), ``cpc_encoder`` (the encoder under evaluation),
``cpc_features`` (its pooled features of pool, val, select and eval images), ``cpc_grids`` (its latent grids too),
``random_features`` / ``random_grids`` (the same for a randomly initialized encoder of the same architecture).

Every trained arm (GridClassifier on frozen grids, fine-tuned, scratch, the supervised CNN) trains until its
accuracy on the tuning half of val stops improving (:func:`~cpc_models.evaluate.protocols.train_until_plateau`).
"""
import copy
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import config as C
from ..checks import check_model_name, one_line
from .baselines import create_supervised
from .data import EvalData, Features, balanced_subset, features_for, load_eval_data, shots_subset
from .encoders import check_checkpoint, create_encoder, load_encoder
from .eval_config import EvalConfig
from .protocols import (
    EncoderClassifier,
    accuracy,
    fit_linear_probe,
    knn_predict,
    make_classifier,
    predict_grids,
    predict_images,
    train_end_to_end,
    train_images,
    train_on_grid,
)
from .sources import FASHION_MNIST, check_source, check_label_amounts, load_eval_source
from .report import (
    check_targets,
    format_section,
    pick_best_cpc,
    summarize,
    target_options,
    write_report,
    write_results,
)

__all__ = ['Arm', 'ARMS', 'register_arm', 'ArmInputs', 'EvalInputError', 'check_config', 'plan_runs', 'run_arm',
           'run_figure1', 'report', 'section', 'merge_results', 'pixel_features', 'grid_features', 'scores']

NEEDS = ('pixels', 'cpc_encoder', 'cpc_features', 'cpc_grids', 'random_features', 'random_grids')


@dataclass(frozen=True)
class Arm:
    """One line of the figure."""
    name: str
    label: str  # legend and table row
    style: Dict  # matplotlib errorbar style
    needs: FrozenSet[str]  # of NEEDS
    run: Callable[..., Dict]  # (inputs, labelled pool indices, seed, desc) -> dict(accuracy, select_accuracy, config)
    cost: int  # arms run cheapest first, so that a run cut short still holds the cheap lines
    cpc: bool = False  # a CPC arm: a candidate for the best CPC arm of a fraction (picked on the selection half)
    seeded: bool = True  # False: the seed only draws the labelled subset, so at 100% one run stands for all seeds
    # the EvalConfig settings only some arms read that this one does (names; a trailing '_' matches a prefix);
    # None: it may read any (two results of it are comparable only if every setting is equal)
    reads: Optional[Tuple[str, ...]] = None


ARMS: Dict[str, Arm] = {}


def _matches(key: str, read: str) -> bool:
    return key == read or (read.endswith('_') and key.startswith(read))


def register_arm(name: str, label: str, style: Dict, needs: Sequence[str] = (), cost: int = 0, cpc: bool = False,
                 seeded: bool = True, reads: Optional[Sequence[str]] = None):
    """Decorator: add an arm function to :data:`ARMS` (see the module docstring). ``reads``: the arm-specific
    settings it reads (see :class:`Arm`); the default, None, makes its results depend on every setting."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f'Unknown needs {sorted(unknown)}; choose from {NEEDS}.')
    fields = C.to_dict(EvalConfig())
    bad = [r for r in reads or () if not any(_matches(k, r) for k in fields)]
    if bad:
        raise ValueError(f'reads={bad} names no EvalConfig setting; give setting names or prefixes ending in "_".')

    def add(fn):
        ARMS[name] = Arm(name, label, dict(style), frozenset(needs), fn, cost, cpc, seeded,
                         None if reads is None else tuple(reads))
        return fn
    return add


@dataclass
class ArmInputs:
    """What the runs of one evaluation share: data, config, the encoder under evaluation, features extracted once."""
    data: EvalData
    cfg: EvalConfig
    model: str = 'cpcv2_resnet_tiny'  # timm architecture, for arms that build a fresh encoder
    model_args: Dict = field(default_factory=dict)
    cpc_encoder: Optional[nn.Module] = None
    cpc_features: Optional[Features] = None
    random_features: Optional[Features] = None
    pixels: Optional[Features] = None  # raw pixels as features (pixel_features)

    def has(self, need: str) -> bool:
        if need in ('cpc_grids', 'random_grids'):
            feats = self.cpc_features if need == 'cpc_grids' else self.random_features
            return feats is not None and feats.pool_grid is not None
        return getattr(self, need) is not None


def pixel_features(data: EvalData) -> Features:
    """Raw pixels as features: uint8 images flattened to (N, C * H * W) float32."""
    def flat(x):
        return x.flatten(1).float()
    return Features(flat(data.pool_x), flat(data.val_x), flat(data.eval_x), select=flat(data.select_x))


def grid_features(feats: Features) -> Features:
    """The latent grids (N, F, rows, cols) flattened to (N, F * rows * cols) features (views, float16)."""
    return Features(feats.pool_grid.flatten(1), feats.val_grid.flatten(1), feats.eval_grid.flatten(1),
                    select=feats.select_grid.flatten(1))


def scores(data: EvalData, predict: Callable, eval_in, select_in) -> Dict:
    """accuracy on the eval split and select_accuracy on the selection half (the same with split 'val')."""
    logits = predict(eval_in)
    acc = accuracy(logits, data.eval_y)
    return dict(accuracy=acc, select_accuracy=acc if data.eval_is_val else accuracy(predict(select_in), data.select_y),
                per_class=per_class_accuracy(logits, data.eval_y, data.num_classes))


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> List[Optional[float]]:
    """Accuracy on the images of each class (None for a class without images)."""
    hit = (logits.argmax(1) == y).float()
    n = torch.bincount(y, minlength=num_classes)
    right = torch.zeros(num_classes).index_add_(0, y, hit)
    return [None if int(k) == 0 else round(float(r) / int(k), 5) for r, k in zip(right, n, strict=True)]


# ============ the arms ============

def _linear(inputs: ArmInputs, feats: Features, labelled: torch.Tensor, features: str) -> Dict:
    cfg, data = inputs.cfg, inputs.data
    probe = fit_linear_probe(feats.pool[labelled].float(), data.pool_y[labelled], feats.val.float(), data.val_y,
                             cfg.linear_wds, data.num_classes, cfg.linear_max_iter)
    return dict(scores(data, lambda x: probe['predict'](x.float()), feats.eval, feats.select),
                config=dict(wd=probe['wd'], val_acc_by_wd={str(k): v for k, v in probe['val_by_wd'].items()},
                            max_iter=cfg.linear_max_iter, features=f'{features}, standardized'))


def _knn(inputs: ArmInputs, feats: Features, labelled: torch.Tensor, features: str) -> Dict:
    cfg, data = inputs.cfg, inputs.data

    def predict(x):
        return knn_predict(feats.pool[labelled], data.pool_y[labelled], x, cfg.knn_k, data.num_classes)

    return dict(scores(data, predict, feats.eval, feats.select),
                config=dict(k=cfg.knn_k, metric='cosine', vote='similarity-weighted', features=features))


def _end_to_end(inputs: ArmInputs, encoder: nn.Module, lr_scale: float, labelled: torch.Tensor, seed: int,
                desc: str) -> Dict:
    cfg, data = inputs.cfg, inputs.data
    model = EncoderClassifier(encoder, make_classifier(encoder, cfg, data.num_classes))
    info = train_end_to_end(model, data.pool_x[labelled], data.pool_y[labelled], data.val_x, data.val_y, cfg, seed,
                            lr_scale, desc)
    t_eval = time.time()
    out = scores(data, lambda x: predict_images(model, x, cfg.extract_batch, cfg.progress), data.eval_x, data.select_x)
    return dict(out, model=model, config=dict(
        info, batch=cfg.e2e_batch, lr=cfg.e2e_lr, encoder_lr_scale=lr_scale, wd=cfg.e2e_wd,
        classifier=cfg.classifier_size, max_epochs=cfg.e2e_max_epochs, max_steps=cfg.e2e_max_steps,
        aug=f'random crop pad {cfg.aug_pad} + hflip', eval_s=round(time.time() - t_eval, 2)))


# what the built-in arms read beyond the settings every arm shares (encoder, data, split)
_LINEAR, _KNN, _TRAINED = ('linear_',), ('knn_',), ('round_images', 'patience', 'lr_drops')


@register_arm('pixels_linear', 'Pixels, linear probe', dict(color='black', marker='.', linestyle=':'),
              needs=('pixels',), cost=0, seeded=False, reads=_LINEAR)
def pixels_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Raw pixels, standardized, softmax regression (L2 penalty picked on val): what features must beat."""
    return _linear(inputs, inputs.pixels, labelled, 'raw pixels')


@register_arm('pixels_knn', 'Pixels, k-NN', dict(color='black', marker='x', linestyle=(0, (1, 3))),
              needs=('pixels',), cost=0, seeded=False, reads=_KNN)
def pixels_knn(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Raw pixels, cosine k-NN."""
    return _knn(inputs, inputs.pixels, labelled, 'raw pixels')


@register_arm('cpc_linear', 'CPC, linear probe (pooled)', dict(color='tab:blue', marker='o', linestyle='--'),
              needs=('cpc_features',), cost=0, cpc=True, seeded=False, reads=_LINEAR)
def cpc_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Frozen CPC encoder, pooled features (what timm's num_classes=0 model returns), linear softmax classifier."""
    return _linear(inputs, inputs.cpc_features, labelled, 'mean-pooled grid')


@register_arm('cpc_grid_linear', 'CPC, linear probe (grid)', dict(color='tab:cyan', marker='o', linestyle='--'),
              needs=('cpc_grids',), cost=1, cpc=True, seeded=False, reads=_LINEAR)
def cpc_grid_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Frozen CPC encoder, the whole latent grid flattened, linear softmax classifier."""
    return _linear(inputs, grid_features(inputs.cpc_features), labelled, 'latent grid, flattened')


@register_arm('cpc_knn', 'CPC, k-NN (pooled)', dict(color='tab:blue', marker='x', linestyle=(0, (1, 3))),
              needs=('cpc_features',), cost=0, cpc=True, seeded=False, reads=_KNN)
def cpc_knn(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Frozen CPC encoder, pooled features, cosine k-NN."""
    return _knn(inputs, inputs.cpc_features, labelled, 'mean-pooled grid')


@register_arm('random_linear', 'Random encoder, linear probe (pooled)',
              dict(color='tab:gray', marker='v', linestyle=':'), needs=('random_features',), cost=0, seeded=False,
              reads=_LINEAR)
def random_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Randomly initialized encoder, linear probe as cpc_linear: the floor of what pretraining adds."""
    return _linear(inputs, inputs.random_features, labelled, 'mean-pooled grid of a random encoder')


@register_arm('random_grid_linear', 'Random encoder, linear probe (grid)',
              dict(color='silver', marker='v', linestyle=':'), needs=('random_grids',), cost=1, seeded=False,
              reads=_LINEAR)
def random_grid_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Randomly initialized encoder, linear probe on the flattened grid as cpc_grid_linear."""
    return _linear(inputs, grid_features(inputs.random_features), labelled, 'latent grid of a random encoder')


@register_arm('cpc_frozen', 'CPC (frozen) + GridClassifier', dict(color='tab:blue', marker='s'),
              needs=('cpc_encoder', 'cpc_grids'), cost=2, cpc=True, reads=(*_TRAINED, 'classifier_', 'frozen_'))
def cpc_frozen(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Frozen CPC encoder, latent grids extracted once, GridClassifier trained on them until val stops improving."""
    cfg, data, feats = inputs.cfg, inputs.data, inputs.cpc_features
    torch.manual_seed(seed)
    clf = make_classifier(inputs.cpc_encoder, cfg, data.num_classes)
    info = train_on_grid(clf, feats.pool_grid[labelled], data.pool_y[labelled], feats.val_grid, data.val_y, cfg,
                         seed, desc=desc)
    return dict(scores(data, lambda g: predict_grids(clf, g), feats.eval_grid, feats.select_grid),
                config=dict(info, batch=cfg.frozen_batch, lr=cfg.frozen_lr, wd=cfg.frozen_wd,
                            classifier=cfg.classifier_size, max_epochs=cfg.frozen_max_epochs,
                            max_steps=cfg.frozen_max_steps))


@register_arm('cpc_finetune', 'CPC fine-tuned + GridClassifier', dict(color='tab:purple', marker='D'),
              needs=('cpc_encoder',), cost=4, cpc=True,
              reads=(*_TRAINED, 'classifier_', 'e2e_', 'aug_pad', 'finetune_encoder_lr_scale'))
def cpc_finetune(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """CPC encoder + GridClassifier trained end to end (encoder LR scaled down); works on a copy of the encoder."""
    torch.manual_seed(seed)
    return _end_to_end(inputs, copy.deepcopy(inputs.cpc_encoder), inputs.cfg.finetune_encoder_lr_scale,
                       labelled, seed, desc)


@register_arm('scratch', 'Patch-grid encoder from scratch + GridClassifier', dict(color='tab:orange', marker='^'),
              cost=5, reads=(*_TRAINED, 'classifier_', 'e2e_', 'aug_pad'))
def scratch(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Randomly initialized CPC encoder (patch grid) + GridClassifier trained end to end with crop/flip."""
    torch.manual_seed(seed)
    return _end_to_end(inputs, create_encoder(inputs.model, inputs.model_args), 1.0, labelled, seed, desc)


@register_arm('supervised', 'Supervised CNN (whole image)', dict(color='tab:red', marker='^', linewidth=2), cost=3,
              reads=(*_TRAINED, 'supervised_', 'aug_pad'))
def supervised(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """The supervised baseline: a whole-image CNN (``supervised_model``, and each of ``supervised_candidates``) from
    random init, crop/flip augmentation, trained until the validation accuracy stops improving; the candidate with
    the best accuracy on the tuning half of val is scored."""
    cfg, data = inputs.cfg, inputs.data
    mean, std = data.pool_x.float().mean() / 255, data.pool_x.float().std() / 255

    def prep(x):
        return ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)

    best, tried = None, []
    for name, args in supervised_networks(cfg, data):
        torch.manual_seed(seed)
        net = create_supervised(name, data.num_classes, data.pool_x.shape[1], args)
        info = train_images(net, [dict(params=list(net.parameters()), lr=cfg.supervised_lr)], data.pool_x[labelled],
                            data.pool_y[labelled], data.val_x, data.val_y, prep, cfg, seed, cfg.supervised_batch,
                            cfg.supervised_wd, cfg.supervised_max_epochs, cfg.supervised_max_steps,
                            f'{desc} {name}', '--supervised-lr')
        tried.append(dict(model=name, args=args, best_val_acc=info['best_val_acc'], epochs=info['epochs']))
        if best is None or info['best_val_acc'] > best[2]['best_val_acc']:
            best = (name, args, info, net)
    name, args, info, net = best
    out = scores(data, lambda x: predict_images(net, x, 500, False, prep), data.eval_x, data.select_x)
    extra = dict(candidates=tried) if len(tried) > 1 else {}
    return dict(out, model=net, config=dict(
        info, model=name, args=dict(args), params=sum(p.numel() for p in net.parameters()),
        batch=cfg.supervised_batch, lr=cfg.supervised_lr, wd=cfg.supervised_wd, max_epochs=cfg.supervised_max_epochs,
        max_steps=cfg.supervised_max_steps, aug=f'random crop pad {cfg.aug_pad} + hflip', **extra))


AUTO_TIMM_BASELINE = ('resnet18', 64)  # 'auto': this timm CNN joins the candidates for images of >= this side


def supervised_networks(cfg: EvalConfig, data: Optional[EvalData] = None) -> List[Tuple[str, Dict]]:
    """The baseline networks the supervised arm trains and picks from on val: ``supervised_model`` with
    ``supervised_args``, then each of ``supervised_candidates`` ('convnet', a timm name, or 'auto': a timm ResNet-18
    for images of 64 px or more that are not Fashion-MNIST), with their default arguments."""
    out = [(cfg.supervised_model, dict(cfg.supervised_args))]
    for name in cfg.supervised_candidates:
        if name == 'auto':
            side = 0 if data is None else min(data.pool_x.shape[-2:])
            if cfg.data != FASHION_MNIST and side >= AUTO_TIMM_BASELINE[1]:
                out.append((AUTO_TIMM_BASELINE[0], {}))
        else:
            out.append((name, {}))
    unique = []
    for n, a in out:
        if (n, a) not in unique:
            unique.append((n, a))
    return unique


# ============ runs ============

class EvalInputError(ValueError):
    """The data or the encoder given could not be loaded; the message says what to change."""


def check_config(cfg: EvalConfig) -> None:
    """cfg.validate(), the arm names, the encoder (--model, --checkpoint) and the data, before any work; raises
    ValueError (ConfigError: naming the option) saying what is allowed."""
    bad = [a for a in (*cfg.arms, *cfg.arm_fractions, *cfg.arm_max_shots) if a not in ARMS]
    if bad or not cfg.arms:
        hint = C.did_you_mean(bad[0], list(ARMS)) if bad else ''
        raise ValueError(f'Unknown arm(s) {bad or "(none given)"}{hint}; choose from {", ".join(ARMS)}.')
    cfg.validate()
    check_model_name(cfg.model)
    if cfg.checkpoint:
        check_checkpoint(cfg.checkpoint)
    elif any(n.startswith('cpc_') for a in cfg.arms for n in ARMS[a].needs):
        raise ValueError('Give --checkpoint: a timm name.tag, a .safetensors file, a checkpoint folder, or "random".')
    import timm
    bad = [n for n in cfg.supervised_candidates if n not in ('auto', 'convnet') and not timm.is_model(n)]
    if bad:
        raise C.ConfigError(f'--supervised-candidates {bad[0]}: not a timm model; give convnet, auto or timm names '
                            f'(e.g. resnet18){C.did_you_mean(bad[0], timm.list_models())}')
    check_source(cfg.data, cfg.data_dir)
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise C.ConfigError(f'--out {cfg.out}: is a file; give a folder for results.json, table.md and figure1.png')


def run_arm(arm: str, fraction: float, seed: int, inputs: ArmInputs) -> Dict:
    """Train and evaluate one (arm, fraction, seed). Never modifies ``inputs`` (fine-tuning works on a copy).

    Returns a record with the accuracy on the eval split, the accuracy on the selection half of val
    (``select_accuracy``), the labelled subset size, wall and CPU time and the arm's config (and ``model`` for arms
    that train one).
    """
    spec = ARMS.get(arm)
    if spec is None:
        raise ValueError(f"Unknown arm '{arm}'; choose from {', '.join(ARMS)}.")
    missing = [n for n in sorted(spec.needs) if not inputs.has(n)]
    if missing:
        raise ValueError(f'{arm} needs {", ".join(missing)} in its ArmInputs.')
    t0, c0 = time.time(), time.process_time()
    data = inputs.data
    labelled = (shots_subset(data.pool_y, int(fraction), seed) if inputs.cfg.shots
                else balanced_subset(data.pool_y, fraction, seed))
    rec = dict(arm=arm, fraction=fraction, seed=seed, n_labels=len(labelled), split=data.split,
               n_eval=len(data.eval_y))
    result = spec.run(inputs, labelled, seed, f'{arm} {fraction:g}/{seed}')
    rec['config'] = result['config']
    if 'model' in result:
        rec['model'] = result['model']
    if result.get('per_class') is not None:
        rec['per_class'] = result['per_class']
    rec.update(accuracy=result['accuracy'], select_accuracy=result.get('select_accuracy'),
               wall_s=round(time.time() - t0, 2), cpu_s=round(time.process_time() - c0, 2))
    return rec


def _prepare(cfg: EvalConfig, data: EvalData, timings: Dict, arms: Sequence[str]) -> Tuple[ArmInputs, Dict]:
    """Load the encoder and extract the features ``arms`` need, once; returns them and the encoder's source
    (timings of the extraction go into ``timings``)."""
    needs = set().union(*(ARMS[a].needs for a in arms))
    inputs = ArmInputs(data, cfg, cfg.model, dict(cfg.model_args))
    src = dict(kind='none')
    if needs & {'cpc_encoder', 'cpc_features', 'cpc_grids'}:
        inputs.cpc_encoder, src = load_encoder(cfg.checkpoint, cfg.model, cfg.model_args, cfg.random_init_seed + 1)
        inputs.model, inputs.model_args = src['model'], src['model_args']
        if src['kind'] == 'random':
            print('WARNING: --checkpoint random: the "CPC" arms use an untrained encoder (tests only).')
    probe = create_encoder(inputs.model, inputs.model_args)
    in_size = tuple(probe.pretrained_cfg.get('input_size', (1, 28, 28)))
    if in_size != tuple(data.pool_x.shape[1:]):
        raise ValueError(f'{inputs.model} expects inputs {in_size}, the {data.name} images are '
                         f'{tuple(data.pool_x.shape[1:])}; evaluate a model of their channels and size (for '
                         f'Fashion-MNIST a 1-channel 28 px model, cpcv2_resnet_tiny)')
    del probe
    if 'pixels' in needs:
        inputs.pixels = pixel_features(data)
    if needs & {'cpc_features', 'cpc_grids'}:
        inputs.cpc_features = features_for(inputs.cpc_encoder, data, 'cpc_grids' in needs, 'extract cpc', cfg)
        timings.update(extract_cpc_s=round(inputs.cpc_features.wall_s, 1),
                       extract_cpc_cpu_s=round(inputs.cpc_features.cpu_s, 1))
    if needs & {'random_features', 'random_grids'}:
        torch.manual_seed(cfg.random_init_seed)
        inputs.random_features = features_for(create_encoder(inputs.model, inputs.model_args), data,
                                              'random_grids' in needs, 'extract random', cfg)
        timings.update(extract_random_s=round(inputs.random_features.wall_s, 1),
                       extract_random_cpu_s=round(inputs.random_features.cpu_s, 1))
    return inputs, src


def _say(message: str) -> None:
    """A progress line, printed now (also with --no-progress and when stdout is a file), above any bar."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def _labels() -> Dict[str, str]:
    return {n: a.label for n, a in ARMS.items()}


def _cpc_arms() -> List[str]:
    return [n for n, a in ARMS.items() if a.cpc]


def report(out: Path, payload: Dict) -> str:
    """table.md and figure1.png of a results payload, with the registered arms' labels and styles."""
    return write_report(out, payload, _labels(), {n: a.style for n, a in ARMS.items()}, _cpc_arms())


def section(payload: Dict, image: str) -> str:
    """The README / model-card section of a results payload (``image``: the figure's path from that file)."""
    return format_section(payload, _labels(), _cpc_arms(), image, heading='###')


def plan_runs(cfg: EvalConfig) -> List[Tuple[str, float, int]]:
    """The (arm, fraction, seed) runs of a config, cheapest arm first; an arm in ``cfg.arm_fractions`` runs its own
    fractions. At fraction 1 an arm that uses its seed only to draw the labelled subset (``seeded=False``) runs once:
    every seed would give the same run. With shots (the 'fraction' is then shots per class), an arm in
    ``cfg.arm_max_shots`` runs at the counts up to its cap, and at least at the smallest."""
    if cfg.shots:
        def counts(arm):
            most = cfg.arm_max_shots.get(arm)
            return cfg.shots if most is None else [k for k in cfg.shots if k <= most] or [min(cfg.shots)]
        return [(a, float(k), s) for a in sorted(cfg.arms, key=lambda a: ARMS[a].cost) for k in counts(a)
                for s in cfg.seeds]
    return [(a, float(f), s) for a in sorted(cfg.arms, key=lambda a: ARMS[a].cost)
            for f in cfg.arm_fractions.get(a, cfg.fractions)
            for s in (cfg.seeds[:1] if f == 1.0 and not ARMS[a].seeded else cfg.seeds)]


# Settings that may differ between parts of one table, or between a run and its resumption: which runs a part
# does, its threads, progress bar and folder.
_MERGE_FREE = ('arms', 'fractions', 'arm_fractions', 'arm_max_shots', 'seeds', 'threads', 'progress', 'out', 'resume')


def _arm_reads(arm: str, config: Dict) -> Optional[set]:
    """The settings of ``config`` that only some arms read and ``arm`` does; None: every setting (unknown arm)."""
    reads = ARMS[arm].reads if arm in ARMS else None
    return None if reads is None else {k for k in config if any(_matches(k, r) for r in reads)}


def _relevant(config: Dict, arms) -> set:
    """The settings that results of ``arms`` depend on: those every arm shares plus those these arms read."""
    keys = set(config) - set(_MERGE_FREE)
    some = set().union(*(_arm_reads(a, config) or set() for a in ARMS))  # read by some arms only
    out = keys - some
    for arm in arms:
        reads = _arm_reads(arm, config)
        out |= keys if reads is None else reads
    return out


def _settings_differ(a: Dict, b: Dict, arms) -> List[str]:
    """The settings that results of ``arms`` depend on and in which configs ``a`` and ``b`` differ."""
    defaults = C.to_dict(EvalConfig())  # a setting added since a results.json was written has its default there
    a, b = {**defaults, **a}, {**defaults, **b}
    keys = _relevant(a, arms) | _relevant(b, arms)
    return sorted(k for k in keys if a.get(k) != b.get(k))


def _resumed_runs(cfg: EvalConfig, out: Optional[Path]) -> Tuple[Dict, float]:
    """``out/results.json`` when resuming (else an empty payload) and that file's wall time. Every finished run of
    it is kept, also of arms, fractions and seeds this config does not ask for (a run split over several commands
    into one folder); the settings its runs read must be this config's (the file then records this config)."""
    path = None if out is None else out / 'results.json'
    if not cfg.resume or path is None or not path.is_file():
        return dict(config={}, runs=[]), 0.0
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalInputError(f'{path} is not valid JSON ({e}); delete it or pass --no-resume to start over') from None
    diff = _settings_differ(old['config'], C.to_dict(cfg), {r['arm'] for r in old['runs']})
    if diff:
        raise EvalInputError(f'{path} was made with other settings ({", ".join(diff)}); give another --out, delete '
                             f'it, or pass --no-resume to start over')
    return old, float(old.get('wall_s') or 0.0)


def _union(*lists) -> List:
    return list(dict.fromkeys(x for xs in lists for x in xs))


def load_data(cfg: EvalConfig) -> EvalData:
    """The EvalData of ``cfg.data``: Fashion-MNIST's IDX files, or a folder / dataset decoded to the input size
    of the evaluated model (its data config: ``timm.data.resolve_model_data_config``)."""
    if cfg.data == FASHION_MNIST:
        data = load_eval_data(cfg)
        check_label_amounts(data.pool_y, data.classes, cfg.data, () if cfg.shots else cfg.fractions, cfg.shots)
        return data
    return load_eval_source(cfg, model_data_config(cfg), cfg.progress)


def model_data_config(cfg) -> Dict:
    """The data config (input size, interpolation, crop, mean, std) of the encoder ``cfg`` evaluates, from a model
    without its weights: the tag of a 'name.tag', the architecture recorded in a checkpoint folder, or --model."""
    import timm
    name, args = cfg.model, dict(cfg.model_args)
    path = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else None
    if path is not None and path.is_dir():
        _, src = load_encoder(cfg.checkpoint, cfg.model, cfg.model_args)
        name, args = src['model'], src['model_args']
    elif cfg.checkpoint and '.' in cfg.checkpoint and '/' not in cfg.checkpoint and not path.exists():
        name = cfg.checkpoint  # name.tag: the tag's pretrained cfg
    return timm.data.resolve_model_data_config(create_encoder(name, args))


def run_figure1(cfg: EvalConfig, out: Optional[Path] = None, command: str = '') -> Dict:
    """Run every (arm, fraction, seed), write results.json after each run, then table.md and figure1.png."""
    check_config(cfg)
    t_start, c_start = time.time(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    before, wall_before = _resumed_runs(cfg, out)  # before any work: a results.json of other settings is refused
    done = before['runs']
    have = {(r['arm'], r['fraction'], r['seed']) for r in done}
    jobs = [j for j in plan_runs(cfg) if j not in have]
    timings: Dict = {}
    _say(f'loading {cfg.data} and the encoder; extracting the features the arms need once')
    try:
        data = load_data(cfg)
        inputs, src = _prepare(cfg, data, timings, {a for a, _, _ in jobs})
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # the data or the encoder given
        raise EvalInputError(one_line(e)) from e
    if out is not None:  # after every check of the data and the encoder: a refused command leaves no folder
        out.mkdir(parents=True, exist_ok=True)
    if src['kind'] == 'none' and before.get('checkpoint'):  # nothing left to run needs the encoder
        src = before['checkpoint']
    # a folder filled by several commands records each that ran something, in order (' ; ', as merge joins parts)
    earlier = [c for c in before.get('command', '').split(' ; ') if c]
    command = ' ; '.join(_union(earlier, [command] if jobs or not earlier else []))
    payload = dict(config=C.to_dict(cfg), checkpoint=src, command=command, data_name=data.name,
                   classes=list(data.classes), splits_note=data.note, skipped=data.skipped, n_pool=len(data.pool_y),
                   n_val=len(data.val_y), n_eval=len(data.eval_y), threads=torch.get_num_threads(),
                   host=f'{platform.processor() or platform.machine()}, torch {torch.__version__}', timings=timings,
                   runs=[])

    payload['runs'] = done
    old_cfg = before['config']
    payload['config'].update(arms=_union(old_cfg.get('arms', ()), cfg.arms),
                             fractions=sorted(_union(old_cfg.get('fractions', ()), cfg.fractions,
                                                     *(cfg.arm_fractions.get(a, ()) for a in cfg.arms))),
                             seeds=sorted(_union(old_cfg.get('seeds', ()), cfg.seeds)))
    if data.note:
        _say(f'{data.name}: {data.note}')
    if data.skipped:
        _say(f'skipped {len(data.skipped)} unreadable image(s): ' + '; '.join(
            f"{r['path']} ({r['error']})" for r in data.skipped[:20]) + (' ...' if len(data.skipped) > 20 else ''))
    if done:
        _say(f'resuming {out / "results.json"}: {len(done)} finished runs kept')

    def save():
        payload['wall_s'] = round(wall_before + time.time() - t_start, 1)
        if out is not None:
            write_results(out, payload)

    where = f'; {out / "results.json"} is rewritten after each run' if out is not None else ''
    amounts = f'shots per class {list(cfg.shots)}' if cfg.shots else f'fractions {list(cfg.fractions)}'
    _say(f'{len(jobs)} runs to do ({len(done)} done before): {len(cfg.arms)} arm(s), {amounts}, seeds '
         f'{list(cfg.seeds)}, cheapest arms first{where}')
    bar = tqdm(jobs, desc='runs', disable=not cfg.progress)
    for k, (arm, fraction, seed) in enumerate(bar, 1):
        bar.set_postfix_str(f'{arm} {fraction:g} seed {seed}')
        amount = f'{int(fraction)}/class' if cfg.shots else f'{fraction:.2%}'
        _say(f'[{k}/{len(jobs)}] {arm} {amount} seed {seed} ...')
        rec = run_arm(arm, fraction, seed, inputs)
        rec.pop('model', None)
        if not cfg.shots and not ARMS[arm].seeded and fraction == 1.0:
            rec['deterministic'] = True  # the labelled set is the whole pool: every seed gives this run
        payload['runs'].append(rec)
        save()
        _say(f"[{k}/{len(jobs)}] {arm} {amount} seed {seed}: {data.split} acc {100 * rec['accuracy']:.2f}% "
             f"({rec['n_labels']} labels, {rec['wall_s']:.1f} s)" + (' saved' if out is not None else ''))
    per_arm, per_arm_cpu = {}, {}
    for r in payload['runs']:
        per_arm[r['arm']] = round(per_arm.get(r['arm'], 0) + r['wall_s'], 1)
        per_arm_cpu[r['arm']] = round(per_arm_cpu.get(r['arm'], 0) + r['cpu_s'], 1)
    timings.update(runs_s_per_arm=per_arm, runs_cpu_s_per_arm=per_arm_cpu,
                   cpu_s=round(time.process_time() - c_start, 1))
    save()
    if out is not None:
        text = report(out, payload)
        save()  # with the targets
        print(text)
    else:
        payload['targets'] = check_targets(summarize(payload['runs']), pick_best_cpc(payload['runs'], _cpc_arms()),
                                           **target_options(payload))
    return payload


def merge_results(parts: Sequence[Dict], take: Optional[Sequence[Optional[Sequence[str]]]] = None) -> Dict:
    """One payload from figure1 payloads of the same evaluation split across processes.

    ``take[i]``: the arms whose runs to take from part i (None: all). Raises ValueError if parts differ in a setting
    that the runs taken from them read (arms, fractions, seeds and threads may differ; so may, say, the supervised
    baseline's settings between a part that ran it and one that did not), repeat an (arm, fraction, seed), or a
    part gives no runs.
    """
    take = list(take) if take is not None else [None] * len(parts)
    if len(take) != len(parts):
        raise ValueError(f'take: one entry per part ({len(parts)}), got {len(take)}')
    given = parts
    parts = [dict(p, runs=[r for r in p['runs'] if t is None or r['arm'] in t]) for p, t in zip(parts, take)]
    for i, (part, t) in enumerate(zip(parts, take)):
        if not part['runs']:
            has = sorted({r['arm'] for r in given[i]['runs']})
            raise ValueError(f'part {i} gives no runs' + (f' of arms {list(t)}' if t is not None else '')
                             + '; take arms it has run' + (f' ({", ".join(has)})' if has else ''))
    ran = [{r['arm'] for r in p['runs']} for p in parts]
    config = dict(parts[0]['config'])
    readers: Dict[str, int] = {}  # setting -> first part whose runs read it
    for i, part in enumerate(parts):
        for key in sorted(_relevant(part['config'], ran[i])):
            j = readers.setdefault(key, i)
            if parts[j]['config'].get(key) != part['config'].get(key):
                raise ValueError(f"cannot merge evaluations with different settings: ['{key}'] (part {j}: "
                                 f"{parts[j]['config'].get(key)!r}, part {i}: {part['config'].get(key)!r}, read "
                                 f"by the runs of {', '.join(sorted(ran[i]))})")
            config[key] = part['config'].get(key)
    runs, seen, arms = [], set(), []
    for part in parts:
        for r in part['runs']:
            key = (r['arm'], r['fraction'], r['seed'])
            if key in seen:
                raise ValueError(f'run {key} appears in more than one part')
            seen.add(key)
            runs.append(r)
        arms += [a for a in part['config']['arms'] if a in {r['arm'] for r in part['runs']} and a not in arms]
    timings = {}
    for i, part in enumerate(parts):
        timings[f'part{i}'] = dict(arms=sorted({r['arm'] for r in part['runs']}), wall_s=part.get('wall_s'),
                                   threads=part.get('threads'), **part.get('timings', {}))
    fractions = sorted({f for p in parts for f in p['config'].get('fractions', ())})
    seeds = sorted({s for p in parts for s in p['config'].get('seeds', ())})
    # the encoder evaluated: a part that ran only arms without it (pixels, supervised) records kind 'none'
    checkpoint = next((p['checkpoint'] for p in parts if p.get('checkpoint', {}).get('kind', 'none') != 'none'),
                      parts[0].get('checkpoint'))
    return dict(parts[0], config=dict(config, arms=arms, fractions=fractions, seeds=seeds), runs=runs,
                checkpoint=checkpoint,
                timings=timings,
                wall_s=max(p.get('wall_s') or 0 for p in parts), threads=sum(p.get('threads') or 0 for p in parts),
                command=' ; '.join(p.get('command', '') for p in parts))
