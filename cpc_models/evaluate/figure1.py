"""The paper's Figure 1: accuracy against the fraction of labels, one line per *arm*, over fractions and seeds.

An arm is registered with :func:`register_arm`: a name, its legend label and plot style, the inputs it needs
(prepared once per evaluation and shared by all its runs) and a function that trains and evaluates one classifier
on a labelled subset. Adding a line to the figure is one decorated function::

    @register_arm('knn', 'CPC, k-NN', dict(color='tab:green', marker='x'), needs=('cpc_features',), cost=1)
    def knn(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
        ...
        return dict(accuracy=acc, config=dict(k=20))

Inputs an arm can need: ``cpc_encoder`` (the encoder under evaluation), ``cpc_features`` (its pooled features of
pool, val and eval images), ``cpc_grids`` (its latent grids too), ``random_features`` (pooled features of a
randomly initialized encoder of the same architecture).
"""
import copy
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import config as C
from ..checks import check_model_name, one_line
from ..data import fashion_mnist_dir
from .data import EvalData, Features, balanced_subset, features_for, load_eval_data
from .encoders import check_checkpoint, create_encoder, load_encoder
from .eval_config import EvalConfig
from .protocols import (
    EncoderClassifier,
    accuracy,
    fit_linear_probe,
    make_classifier,
    predict_grids,
    predict_images,
    train_end_to_end,
    train_on_grid,
)
from .report import check_targets, summarize, write_report, write_results

__all__ = ['Arm', 'ARMS', 'register_arm', 'ArmInputs', 'EvalInputError', 'check_config', 'run_arm', 'run_figure1',
           'report', 'merge_results']

NEEDS = ('cpc_encoder', 'cpc_features', 'cpc_grids', 'random_features')


@dataclass(frozen=True)
class Arm:
    """One line of the figure."""
    name: str
    label: str  # legend and table row
    style: Dict  # matplotlib errorbar style
    needs: FrozenSet[str]  # of NEEDS
    run: Callable[..., Dict]  # (inputs, labelled pool indices, seed, desc) -> dict(accuracy, config[, model])
    cost: int  # arms run cheapest first, so that a run cut short still holds the cheap lines


ARMS: Dict[str, Arm] = {}


def register_arm(name: str, label: str, style: Dict, needs: Sequence[str] = (), cost: int = 0):
    """Decorator: add an arm function to :data:`ARMS` (see the module docstring)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f'Unknown needs {sorted(unknown)}; choose from {NEEDS}.')

    def add(fn):
        ARMS[name] = Arm(name, label, dict(style), frozenset(needs), fn, cost)
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

    def has(self, need: str) -> bool:
        if need == 'cpc_grids':
            return self.cpc_features is not None and self.cpc_features.pool_grid is not None
        return getattr(self, need) is not None


# ============ the arms ============

def _linear(inputs: ArmInputs, feats: Features, labelled: torch.Tensor) -> Dict:
    cfg, data = inputs.cfg, inputs.data
    probe = fit_linear_probe(feats.pool[labelled], data.pool_y[labelled], feats.val, data.val_y, cfg.linear_wds,
                             data.num_classes, cfg.linear_max_iter)
    return dict(accuracy=accuracy(probe['predict'](feats.eval), data.eval_y),
                config=dict(wd=probe['wd'], val_acc_by_wd={str(k): v for k, v in probe['val_by_wd'].items()},
                            max_iter=cfg.linear_max_iter, features='mean-pooled grid, standardized'))


def _end_to_end(inputs: ArmInputs, encoder: nn.Module, lr_scale: float, labelled: torch.Tensor, seed: int,
                desc: str) -> Dict:
    cfg, data = inputs.cfg, inputs.data
    model = EncoderClassifier(encoder, make_classifier(encoder, cfg, data.num_classes))
    info = train_end_to_end(model, data.pool_x[labelled], data.pool_y[labelled], cfg, seed, lr_scale, desc)
    t_eval = time.time()
    acc = accuracy(predict_images(model, data.eval_x, cfg.extract_batch, cfg.progress), data.eval_y)
    return dict(accuracy=acc, model=model, config=dict(
        info, batch=cfg.e2e_batch, lr=cfg.e2e_lr, encoder_lr_scale=lr_scale, wd=cfg.e2e_wd,
        classifier=cfg.classifier_size, epochs=cfg.e2e_epochs, max_steps=cfg.e2e_max_steps,
        aug=f'random crop pad {cfg.aug_pad} + hflip', eval_s=round(time.time() - t_eval, 2)))


@register_arm('cpc_linear', 'CPC, linear probe', dict(color='tab:blue', marker='o', linestyle='--'),
              needs=('cpc_features',), cost=0)
def cpc_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Frozen CPC encoder, pooled features extracted once, linear softmax classifier (L2 penalty picked on val)."""
    return _linear(inputs, inputs.cpc_features, labelled)


@register_arm('cpc_frozen', 'CPC (frozen) + GridClassifier', dict(color='tab:blue', marker='s'),
              needs=('cpc_encoder', 'cpc_grids'), cost=2)
def cpc_frozen(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Frozen CPC encoder, latent grids extracted once, GridClassifier trained on them."""
    cfg, data, feats = inputs.cfg, inputs.data, inputs.cpc_features
    torch.manual_seed(seed)
    clf = make_classifier(inputs.cpc_encoder, cfg, data.num_classes)
    info = train_on_grid(clf, feats.pool_grid[labelled], data.pool_y[labelled], cfg, seed, desc=desc)
    acc = accuracy(predict_grids(clf, feats.eval_grid), data.eval_y)
    return dict(accuracy=acc, config=dict(info, batch=cfg.frozen_batch, lr=cfg.frozen_lr, wd=cfg.frozen_wd,
                                          classifier=cfg.classifier_size, epochs=cfg.frozen_epochs,
                                          max_steps=cfg.frozen_max_steps))


@register_arm('cpc_finetune', 'CPC fine-tuned + GridClassifier', dict(color='tab:purple', marker='D'),
              needs=('cpc_encoder',), cost=3)
def cpc_finetune(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """CPC encoder + GridClassifier trained end to end (encoder LR scaled down); works on a copy of the encoder."""
    torch.manual_seed(seed)
    return _end_to_end(inputs, copy.deepcopy(inputs.cpc_encoder), inputs.cfg.finetune_encoder_lr_scale,
                       labelled, seed, desc)


@register_arm('scratch', 'Supervised from scratch', dict(color='tab:red', marker='^'), cost=4)
def scratch(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Randomly initialized encoder + GridClassifier trained end to end with crop/flip augmentation."""
    torch.manual_seed(seed)
    return _end_to_end(inputs, create_encoder(inputs.model, inputs.model_args), 1.0, labelled, seed, desc)


@register_arm('random_linear', 'Random encoder, linear probe', dict(color='tab:gray', marker='v', linestyle=':'),
              needs=('random_features',), cost=1)
def random_linear(inputs: ArmInputs, labelled: torch.Tensor, seed: int, desc: str) -> Dict:
    """Randomly initialized encoder, linear probe as cpc_linear: the floor of what pretraining adds."""
    return _linear(inputs, inputs.random_features, labelled)


# ============ runs ============

class EvalInputError(ValueError):
    """The data or the encoder given could not be loaded; the message says what to change."""


def check_config(cfg: EvalConfig) -> None:
    """cfg.validate(), the arm names, the encoder (--model, --checkpoint) and the data, before any work; raises
    ValueError (ConfigError: naming the option) saying what is allowed."""
    bad = [a for a in cfg.arms if a not in ARMS]
    if bad or not cfg.arms:
        hint = C.did_you_mean(bad[0], list(ARMS)) if bad else ''
        raise ValueError(f'Unknown arm(s) {bad or "(none given)"}{hint}; choose from {", ".join(ARMS)}.')
    cfg.validate()
    check_model_name(cfg.model)
    if cfg.checkpoint:
        check_checkpoint(cfg.checkpoint)
    elif any(n.startswith('cpc_') for a in cfg.arms for n in ARMS[a].needs):
        raise ValueError('Give --checkpoint: a timm name.tag, a .safetensors file, a checkpoint folder, or "random".')
    try:
        fashion_mnist_dir(cfg.data_dir or None)
    except FileNotFoundError as e:
        raise C.ConfigError(f'--data-dir: {e}') from None
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise C.ConfigError(f'--out {cfg.out}: is a file; give a folder for results.json, table.md and figure1.png')


def run_arm(arm: str, fraction: float, seed: int, inputs: ArmInputs) -> Dict:
    """Train and evaluate one (arm, fraction, seed). Never modifies ``inputs`` (fine-tuning works on a copy).

    Returns a record with the accuracy on the eval split, the labelled subset size, wall time and the arm's config
    (and ``model`` for arms that train one end to end).
    """
    spec = ARMS.get(arm)
    if spec is None:
        raise ValueError(f"Unknown arm '{arm}'; choose from {', '.join(ARMS)}.")
    missing = [n for n in sorted(spec.needs) if not inputs.has(n)]
    if missing:
        raise ValueError(f'{arm} needs {", ".join(missing)} in its ArmInputs.')
    t0, c0 = time.time(), time.process_time()
    data = inputs.data
    labelled = balanced_subset(data.pool_y, fraction, seed)
    rec = dict(arm=arm, fraction=fraction, seed=seed, n_labels=len(labelled), split=data.split,
               n_eval=len(data.eval_y))
    result = spec.run(inputs, labelled, seed, f'{arm} {fraction:g}/{seed}')
    rec['config'] = result['config']
    if 'model' in result:
        rec['model'] = result['model']
    rec.update(accuracy=result['accuracy'], wall_s=round(time.time() - t0, 2),
               cpu_s=round(time.process_time() - c0, 2))
    return rec


def _prepare(cfg: EvalConfig, data: EvalData, timings: Dict) -> Tuple[ArmInputs, Dict]:
    """Load the encoder and extract the features the chosen arms need, once; returns them and the encoder's
    source (timings of the extraction go into ``timings``)."""
    needs = set().union(*(ARMS[a].needs for a in cfg.arms))
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
        raise ValueError(f'{inputs.model} expects inputs {in_size}, Fashion-MNIST images are '
                         f'{tuple(data.pool_x.shape[1:])}; evaluate a 1-channel 28 px model (cpcv2_resnet_tiny).')
    del probe
    if needs & {'cpc_features', 'cpc_grids'}:
        inputs.cpc_features = features_for(inputs.cpc_encoder, data, 'cpc_grids' in needs, 'extract cpc', cfg)
        timings.update(extract_cpc_s=round(inputs.cpc_features.wall_s, 1),
                       extract_cpc_cpu_s=round(inputs.cpc_features.cpu_s, 1))
    if 'random_features' in needs:
        torch.manual_seed(cfg.random_init_seed)
        inputs.random_features = features_for(create_encoder(inputs.model, inputs.model_args), data, False,
                                              'extract random', cfg)
        timings.update(extract_random_s=round(inputs.random_features.wall_s, 1),
                       extract_random_cpu_s=round(inputs.random_features.cpu_s, 1))
    return inputs, src


def _say(message: str) -> None:
    """A progress line, printed now (also with --no-progress and when stdout is a file), above any bar."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def report(out: Path, payload: Dict) -> str:
    """table.md and figure1.png of a results payload, with the registered arms' labels and styles."""
    return write_report(out, payload, {n: a.label for n, a in ARMS.items()}, {n: a.style for n, a in ARMS.items()})


def run_figure1(cfg: EvalConfig, out: Optional[Path] = None, command: str = '') -> Dict:
    """Run every (arm, fraction, seed), write results.json after each run, then table.md and figure1.png."""
    check_config(cfg)
    t_start, c_start = time.time(), time.process_time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    timings: Dict = {}
    _say('loading Fashion-MNIST and the encoder; extracting the features the arms need once')
    try:
        data = load_eval_data(cfg)
        inputs, src = _prepare(cfg, data, timings)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # the data or the encoder given
        raise EvalInputError(one_line(e)) from e
    payload = dict(config=C.to_dict(cfg), checkpoint=src, command=command, n_pool=len(data.pool_y),
                   n_val=len(data.val_y), n_eval=len(data.eval_y), threads=torch.get_num_threads(),
                   host=f'{platform.processor() or platform.machine()}, torch {torch.__version__}', timings=timings,
                   runs=[])

    def save():
        payload['wall_s'] = round(time.time() - t_start, 1)
        if out is not None:
            write_results(out, payload)

    jobs = [(a, f, s) for a in sorted(cfg.arms, key=lambda a: ARMS[a].cost) for f in cfg.fractions
            for s in cfg.seeds]
    where = f'; {out / "results.json"} is rewritten after each run' if out is not None else ''
    _say(f'{len(jobs)} runs: {len(cfg.arms)} arm(s) x {len(cfg.fractions)} fraction(s) x {len(cfg.seeds)} seed(s), '
         f'cheapest arms first{where}')
    bar = tqdm(jobs, desc='runs', disable=not cfg.progress)
    for k, (arm, fraction, seed) in enumerate(bar, 1):
        bar.set_postfix_str(f'{arm} {fraction:g} seed {seed}')
        _say(f'[{k}/{len(jobs)}] {arm} {fraction:.2%} seed {seed} ...')
        rec = run_arm(arm, fraction, seed, inputs)
        rec.pop('model', None)
        payload['runs'].append(rec)
        save()
        _say(f"[{k}/{len(jobs)}] {arm} {fraction:.2%} seed {seed}: {data.split} acc {100 * rec['accuracy']:.2f}% "
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
        payload['targets'] = check_targets(summarize(payload['runs']))
    return payload


# Settings that may differ between parts of one table: which arms a part ran, its threads, progress bar and folder.
_MERGE_FREE = ('arms', 'threads', 'progress', 'out')


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
