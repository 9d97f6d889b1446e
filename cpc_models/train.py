"""cpc-train: CPC v2 pretraining, top to bottom: config, model, step, data, optimizer, resume, loop, checkpoint.

    cpc-train --preset fmnist_tiny                              # CPU: ~65 min per epoch on 2 cores
    cpc-train --preset imagenet_r161 --data /imagenet/train     # CUDA
    torchrun --nproc_per_node 8 -m cpc_models.train --preset imagenet_r161 --data /imagenet/train

Every config value can be overridden on the command line (``--lr 1e-3 --objective.directions 2``); the resolved
config is printed at start and stored in every checkpoint. A run resumes from the newest checkpoint in
``--out-dir`` with ``--resume`` (default ``auto``), continuing exactly where it stopped (same batches, same
augmentation draws). SIGINT (Ctrl-C) and SIGTERM save a checkpoint at the end of the current step, print the
command that resumes, and exit with 130 / 143 (a second Ctrl-C aborts without saving). The config is checked before
any work (ranges, model, device, data, patch grid against the image size): a bad value exits with status 2 and one
line naming the option; so does data without a readable image.
"""
import dataclasses
import importlib.util
import json
import os
import resource
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import config as C
from . import encoder as _encoder  # noqa: F401  (registers the cpc models with timm)
from .atomic import write_text
from .augment import PatchAugment, PatchAugmentConfig
from .checkpoint import latest_checkpoint, load_checkpoint, remove_partial, resolve_checkpoint, save_checkpoint
from .checks import check_device, check_model_name, check_out_dir, one_line
from .data import (
    HF_PREFIX,
    DataPosition,
    HFImageDataset,
    ImageFolderDataset,
    NoReadableImagesError,
    StepSampler,
    TensorImageDataset,
    check_readable,
    fashion_mnist_dir,
    load_fashion_mnist,
    load_hf_dataset,
    refill,
)
from .distributed import init_distributed
from .file_index import FileIndex, default_index_dir
from .images import collate_readable
from .objective import CPCObjective, ObjectiveConfig, ObjectiveOutput
from .patches import patchify
from .runtime import (
    Switch,
    cap_workers,
    channels_last_default,
    checkpointing_default,
    compile_default,
    compile_method,
    resolve,
    saved_activation_bytes,
    tune_cudnn,
)
from .schedule import warmup_cosine

__all__ = ['TrainConfig', 'PRESETS', 'build_config', 'check_config', 'CPCModel', 'build_model', 'build_optimizer',
           'StepSetup', 'build_step_setup', 'train_step', 'compile_trunk', 'compile_model', 'peak_lr', 'lr_at', 'train',
           'main', 'resumed_augment_seed', 'NonFiniteLossError', 'NoReadableImagesError', 'latest_checkpoint']


# ============ config ============

@dataclass
class TrainConfig:
    """Every value of a cpc-train run; printed at start and stored in every checkpoint's config.json."""
    # ---- model ----
    model: str = 'cpcv2_resnet_tiny'  # timm architecture name
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (--model_args.KEY V)
    # ---- data ----
    # 'fashion-mnist', a folder of images (recursive, labels unused), or hf:NAME / hf:FOLDER, a Hugging Face dataset
    # with an image column (Hub name, or a folder written by save_to_disk; needs pip install 'cpc-models[datasets]')
    data: str = 'fashion-mnist'
    data_split: str = 'train'  # the split of an hf: dataset
    image_column: str = ''  # the image column of an hf: dataset; '' = its first column of type datasets.Image
    # where the file index of a --data folder is cached (cpc_models/file_index.py): '' = <data>.cpc_file_index
    # beside the folder, or <out-dir>/file_index where that is read-only
    index_dir: str = ''
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = $CPC_FASHION_MNIST_DIR or the Debian package's)
    image_size: int = 0  # training crop; 0 = the model cfg's input size
    resize: int = 0  # short side before cropping (folders); 0 = image_size
    num_workers: int = 0  # DataLoader processes decoding images (at most the cores available)
    # a local batch without a readable image is refilled from the files after it; this many unreadable in a row: stop
    max_unreadable: int = 64
    # ---- optimization ----
    batch_size: int = 64  # global batch (split over ranks and --accum-steps micro-batches)
    # micro-batches per optimizer step: each rank runs batch_size / (processes x accum_steps) images at a time; the
    # InfoNCE negatives are those of one micro-batch (all ranks), not of the whole step (docs/training.md)
    accum_steps: int = 1
    epochs: float = 1.0  # run length in passes over the data
    max_steps: int = 0  # run length in steps; 0 = from epochs
    lr: float = 2e-3  # peak learning rate after warmup; see --lr-ref-batch
    lr_ref_batch: int = 0  # the global batch --lr is given for; 0 = --batch-size (no scaling)
    # how the peak lr follows --batch-size from --lr-ref-batch: sqrt = lr * sqrt(batch / lr_ref_batch)
    # (Krizhevsky 2014; the rule for Adam, Malladi et al. 2022), linear = lr * batch / lr_ref_batch (Goyal et al.
    # 2017, for SGD)
    lr_scaling: Literal['sqrt', 'linear'] = 'sqrt'
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps
    weight_decay: float = 1e-4  # AdamW; not applied to norms and biases
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # the CPC objective (objective.py)
    augment: PatchAugmentConfig = field(default_factory=PatchAugmentConfig)  # per-patch augmentation (augment.py)
    # ---- runtime ----
    device: str = 'auto'  # auto = cuda if available
    bf16: bool = True  # autocast on CUDA
    # bf16 autocast on the CPU too: opt-in, it rounds (docs/benchmarks.md: 1.5x a58a1bb's step on AVX512-BF16)
    bf16_cpu: bool = False
    # NHWC model and patches; auto = on CUDA, on the CPU as measured faster (cpc_models/runtime.py)
    channels_last: Switch = 'auto'
    # torch.compile the encoder trunk and the objective (eager if compiling fails); auto = on for CUDA runs of at
    # least 1000 steps, off on the CPU (measured no faster there)
    compile: Switch = 'auto'
    # recompute each stack's activations in backward; auto: on CUDA when the step would not fit the free memory
    # (runtime.checkpointing_default, from the activations the step saves, counted on fake tensors), else off
    grad_checkpointing: Switch = 'auto'
    seed: int = 0  # data order; augmentation generator of rank r: seed * 1000 + r
    progress: bool = True  # tqdm progress bar
    # append each step's image indices, per rank, to <out_dir>/image_ids/rank<r>.jsonl (audits the data order)
    log_image_ids: bool = False
    # ---- checkpoint ----
    out_dir: str = 'runs/cpc'  # metrics.jsonl and checkpoints/ go here
    resume: str = 'auto'  # auto = newest checkpoint in out_dir if any; 'none'; or a checkpoint (or run) folder
    save_every: int = 500  # steps between checkpoints (also the last step and SIGTERM)
    keep_last: int = 3  # checkpoints kept; 0 = all
    log_every: int = 10  # steps between metrics.jsonl lines (the only steps that wait for the device)


PRESETS: Dict[str, Dict] = {
    # (a) the paper's ImageNet ResNet-161 run (Sec. 4.1). Optimizer, batch, schedule and length are ours:
    # the paper leaves them open. 260 px crops (resize 300), 6x6 grid of 80 px patches, 4 directions.
    'imagenet_r161': dict(
        model='cpcv2_resnet161', data='', image_size=260, resize=300, num_workers=10, batch_size=512,
        epochs=200, lr=4e-4, warmup_steps=5000, weight_decay=1e-4, grad_checkpointing='auto', save_every=2000,
        objective=dict(directions=4), augment={}, lr_ref_batch=512),
    # (b) ImageNet ResNet-50 (the paper's 63.8% model), same recipe.
    'imagenet_r50': dict(
        model='cpcv2_resnet50', data='', image_size=260, resize=300, num_workers=10, batch_size=512,
        epochs=200, lr=4e-4, warmup_steps=5000, weight_decay=1e-4, save_every=2000,
        objective=dict(directions=4), augment={}, lr_ref_batch=512),
    # (c) small images (STL-10 / CIFAR upscaled): 64 px crops, 7x7 grid of 16 px patches.
    'stl10_small': dict(
        model='cpcv2_resnet_small', data='', image_size=64, resize=72, num_workers=4, batch_size=128,
        epochs=100, lr=1e-3, warmup_steps=1000, save_every=1000,
        objective=dict(directions=4), augment={}),
    # (d) CPU-sized: Fashion-MNIST 28 px, 6x6 grid of 8 px patches, grayscale (no colour ops).
    'fmnist_tiny': dict(
        model='cpcv2_resnet_tiny', data='fashion-mnist', batch_size=32, epochs=2, lr=2e-3, warmup_steps=100,
        save_every=500, objective=dict(directions=4, offsets=[2, 3], context_hidden=64, context_blocks=3),
        augment=dict(color_drop=0.0, jitter=1, elastic=0.0, num_ops=1, magnitude=5.0)),
    # The published cpcv2_resnet_tiny_wide.fmnist: fmnist_tiny's objective and augmentation, 512-d feature, 10 epochs
    # at batch 128 (4,688 steps = 600,064 images; chosen by the val probe, results/fmnist_search/). ~6 min on one H200.
    'fmnist_wide': dict(
        model='cpcv2_resnet_tiny_wide', data='fashion-mnist', batch_size=128, epochs=10, max_steps=4688, lr=4e-3,
        warmup_steps=100, save_every=500, objective=dict(directions=4, offsets=[2, 3], context_hidden=64, context_blocks=3),
        augment=dict(color_drop=0.0, jitter=1, elastic=0.0, num_ops=1, magnitude=5.0)),
}
DEFAULT_PRESET = 'fmnist_tiny'

# Where each value a preset sets comes from: the paper (Hénaff et al. 2020, arXiv 1905.09272 v3; section) or "ours"
# with the reason. The paper's supplementary material (optimizer, schedule, batch, epochs) could not be read from
# this project's sources (docs/reproduce.md, "The recipe against the paper"): values marked "ours" there are unchecked.
_PAPER_IMAGENET = dict(
    data='the paper: ImageNet ILSVRC-2012 train (Sec. 4); given with --data',
    image_size='ours: 260 px crops hold a 6x6 grid of the paper\'s 80 px patches at stride 36 (Sec. 4.1 fixes 80 px)',
    resize='ours: short side 300 before the random 260 px crop (the paper does not state it in the main text)',
    num_workers='ours: decoding at ~200 img/s per core (benchmarks/results/data_scale.md) feeds one GPU step',
    batch_size='ours, unchecked against the appendix: 512 global',
    lr_ref_batch='ours: --lr is given for the global batch 512; other batches scale it by --lr-scaling (sqrt)',
    epochs='ours, unchecked against the appendix',
    lr='ours, unchecked against the appendix: 4e-4 (AdamW) at batch 512',
    warmup_steps='ours: linear warmup, then cosine (schedule.py)',
    weight_decay='ours: 1e-4 on weights, none on norms and biases',
    save_every='ours: a checkpoint every 2,000 steps bounds the work a preemption loses',
    objective='the paper: 4 directions (Sec. 4.1, "predicting lengths and directions"); offsets, context network '
              'and target width from the appendix pseudo-code (docs/objective.md)',
    augment='the paper: per-patch colour dropping, flips, AutoAugment-style ops, elastic deformations, colour '
            'transforms (Sec. 4.1); magnitudes ours (docs/augment.md)',
)
PRESET_SOURCES: Dict[str, Dict[str, str]] = {
    'imagenet_r161': dict(
        _PAPER_IMAGENET, model='the paper: ResNet-161, the headline encoder (Sec. 4.1, Table 1)',
        grad_checkpointing='ours: auto, on only where the step would not fit the free GPU memory '
                           '(runtime.checkpointing_default; full checkpointing made the step 1.28x slower)'),
    'imagenet_r50': dict(_PAPER_IMAGENET, model='the paper: ResNet-50 v2 trained with CPC, 63.8% top-1 linear (Sec. 4)'),
    'stl10_small': dict(
        model='ours: a small encoder for 64 px images', data='ours: e.g. STL-10 unlabeled, given with --data',
        image_size='ours: 64 px crops, a 7x7 grid of 16 px patches', resize='ours: short side 72',
        num_workers='ours', batch_size='ours', epochs='ours', lr='ours', warmup_steps='ours', save_every='ours',
        objective='the paper: 4 directions (Sec. 4.1)', augment='the paper\'s per-patch ops, our magnitudes'),
    'fmnist_tiny': dict(
        model='ours: the CPU-sized encoder', data='ours: Fashion-MNIST train (60k), installed with the package',
        batch_size='ours', epochs='ours', lr='ours', warmup_steps='ours', save_every='ours',
        objective='ours: offsets 2, 3 and a smaller context network fit the 6x6 grid of 28 px images',
        augment='ours: grayscale, so no colour dropping; milder ops for 8 px patches'),
    'fmnist_wide': dict(
        model='ours: the published cpcv2_resnet_tiny_wide', data='ours: Fashion-MNIST train (60k)',
        batch_size='ours: chosen on the validation probe (results/fmnist_search/)', epochs='ours: as batch_size',
        max_steps='ours: 4,688 steps = 10 epochs at batch 128', lr='ours: as batch_size', warmup_steps='ours',
        save_every='ours', objective='ours: as fmnist_tiny', augment='ours: as fmnist_tiny'),
}


def preset_config(name: str = DEFAULT_PRESET) -> TrainConfig:
    """The defaults with a preset applied."""
    return C.apply(TrainConfig(), PRESETS[name])


def build_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Defaults, then the preset (``--preset``, default fmnist_tiny), then the command line (config.parse_args)."""
    preset = C.peek(argv, 'preset') or DEFAULT_PRESET
    if preset not in PRESETS:
        C.fail('cpc-train', f"--preset: invalid choice: '{preset}' (choose from {', '.join(PRESETS)})")
    return C.parse_args(preset_config(preset), argv, prog='cpc-train', description=__doc__,
                        selectors={'preset': f'the recipe to start from: {", ".join(PRESETS)} '
                                             f'(default: {DEFAULT_PRESET})'})


FASHION_MNIST_SIZE = 28


def check_config(cfg: TrainConfig, world: Optional[int] = None) -> None:
    """Everything about a run that can be checked before any work: ranges, model, device, data, resume, and the
    patch grid of the model on the data's images against the objective. Raises ConfigError naming the option."""
    world = world or int(os.environ.get('WORLD_SIZE', '1'))
    check_out_dir(cfg.out_dir, '--out-dir')
    for key, low, low_open in (('batch_size', 1, False), ('accum_steps', 1, False), ('lr_ref_batch', 0, False),
                               ('epochs', 0, True), ('max_steps', 0, False),
                               ('lr', 0, True), ('warmup_steps', 0, False), ('weight_decay', 0, False),
                               ('grad_clip', 0, False), ('num_workers', 0, False), ('image_size', 0, False),
                               ('resize', 0, False), ('max_unreadable', 0, False), ('save_every', 1, False),
                               ('keep_last', 0, False), ('log_every', 1, False), ('seed', 0, False)):
        C.check_range(cfg, key, low, low_open=low_open)
    C.check_range(cfg, 'min_lr_ratio', 0, 1)
    C.check_range(cfg, 'betas', 0, 1, high_open=True)
    if len(cfg.betas) != 2:
        raise C.ConfigError(f'--betas {cfg.betas}: AdamW takes two betas, e.g. 0.9,0.999')
    if cfg.batch_size % world:
        raise C.ConfigError(f'--batch-size {cfg.batch_size}: the global batch must split evenly over the {world} '
                            f'processes')
    if cfg.batch_size % (world * cfg.accum_steps):
        raise C.ConfigError(f'--accum-steps {cfg.accum_steps}: the global batch {cfg.batch_size} must split evenly '
                            f'into {cfg.accum_steps} micro-batches on each of the {world} processes')
    check_device(cfg.device)
    check_model_name(cfg.model)
    fmnist = cfg.data == 'fashion-mnist'
    if fmnist:
        try:
            fashion_mnist_dir(cfg.data_dir or None)
        except FileNotFoundError as e:
            raise C.ConfigError(f'--data fashion-mnist: {e}') from None
        if cfg.image_size not in (0, FASHION_MNIST_SIZE):
            raise C.ConfigError(f'--image-size {cfg.image_size}: Fashion-MNIST images are {FASHION_MNIST_SIZE} px '
                                f'(give 0); other sizes need a folder of images (--data FOLDER)')
    elif not cfg.data:
        raise C.ConfigError('--data: this preset needs a folder of training images (e.g. ImageNet\'s train/), or '
                            '--data fashion-mnist')
    elif cfg.data.startswith(HF_PREFIX):
        if importlib.util.find_spec('datasets') is None:
            raise C.ConfigError(f"--data {cfg.data}: Hugging Face datasets need the `datasets` package: pip install "
                                f"'cpc-models[datasets]'")
        if not cfg.data[len(HF_PREFIX):]:
            raise C.ConfigError('--data hf:: give a Hub dataset name (hf:ILSVRC/imagenet-1k) or a folder written by '
                                'save_to_disk (hf:/data/my_dataset)')
    elif not Path(cfg.data).is_dir():
        raise C.ConfigError(f'--data {cfg.data}: no such folder (give a folder of JPEG/PNG images, searched '
                            f'recursively, or fashion-mnist)')
    if cfg.resume not in ('auto', 'none'):
        try:
            resolve_checkpoint(cfg.resume)
        except FileNotFoundError as e:
            raise C.ConfigError(f'--resume: {e} Or give auto (the newest in --out-dir) or none.') from None
    resume_from = _resume_source(cfg)
    if resume_from is not None and (resume_from / 'config.json').is_file():
        _check_same_network(cfg, resume_from)
    with torch.device('meta'):  # shapes only: the ImageNet encoders are large
        try:
            encoder = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.model_args)
        except TypeError as e:
            raise C.ConfigError(f'--model_args {json.dumps(cfg.model_args)}: {cfg.model} does not take them ({e})'
                                ) from None
        try:
            objective = CPCObjective(encoder.num_features, **dataclasses.asdict(cfg.objective))
        except ValueError as e:
            raise C.ConfigError(f'--objective: {e}') from None
    native = timm.data.resolve_model_data_config(encoder)['input_size'][-1]
    img = FASHION_MNIST_SIZE if fmnist else (cfg.image_size or native)
    if not fmnist and cfg.resize and cfg.resize < img:
        raise C.ConfigError(f'--resize {cfg.resize}: smaller than the {img} px crop; give 0 or at least {img}')
    try:
        rows, cols = encoder.grid_size(img)
        objective.check_latents(torch.empty(1, encoder.num_features, rows, cols, device='meta'))
    except ValueError as e:
        source = 'Fashion-MNIST\'s' if fmnist else f'the {img} px crops of'
        hint = (f' Train {cfg.model} on a folder of images instead: --data FOLDER (crops of {native} px).'
                if fmnist and native > FASHION_MNIST_SIZE else '')
        raise C.ConfigError(f'--model {cfg.model} on {source} {img} px images: {e}{hint}') from None


class NonFiniteLossError(RuntimeError):
    pass


# ============ model and training step (also what the benchmarks and the profiler run) ============

class CPCModel(nn.Module):
    """Encoder + objective in one module, so DDP sees every parameter: patches -> ObjectiveOutput."""

    def __init__(self, encoder: nn.Module, objective: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, patches: torch.Tensor) -> ObjectiveOutput:
        with record_function('cpc::encoder'):
            z = self.encoder.forward_patches(patches)
        with record_function('cpc::objective'):
            return self.objective(z)


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """The config's ``channels_last``, with ``auto`` resolved for ``device`` (runtime.channels_last_default)."""
    return resolve(cfg.channels_last, channels_last_default(device, 'train'))


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast: on CUDA with ``bf16``, on the CPU with ``bf16_cpu``; fp32 elsewhere."""
    return (cfg.bf16 and device.type == 'cuda') or (cfg.bf16_cpu and device.type == 'cpu')


def use_compile(cfg: TrainConfig, device: torch.device, total_steps: int) -> bool:
    """The config's ``compile``, with ``auto`` resolved: on for runs long enough on a device where it pays."""
    return resolve(cfg.compile, compile_default(device, 'train', total_steps))


def build_model(cfg: TrainConfig, device: torch.device) -> CPCModel:
    """The timm encoder (num_classes=0) and the objective, on ``device``, with the config's runtime switches."""
    encoder = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.model_args)
    objective = CPCObjective(encoder.num_features, **dataclasses.asdict(cfg.objective))
    model = CPCModel(encoder, objective).to(device)
    model = model.to(memory_format=torch.channels_last) if use_channels_last(cfg, device) else model
    encoder.set_grad_checkpointing(use_checkpointing(cfg, model, device))
    return model


def use_checkpointing(cfg: TrainConfig, model: 'CPCModel', device: torch.device) -> bool:
    """The config's ``grad_checkpointing``, with ``auto`` resolved: on CUDA, on when the activations a step at this
    rank's batch saves (counted on fake tensors, with the run's layout and precision) plus the resident parameters,
    gradients and AdamW state exceed the free memory's headroom (runtime.checkpointing_default); off elsewhere."""
    if isinstance(cfg.grad_checkpointing, bool) or device.type != 'cuda':
        return resolve(cfg.grad_checkpointing, False)
    enc = model.encoder
    data_cfg = timm.data.resolve_model_data_config(enc)
    rows, cols = enc.grid_size(cfg.image_size or data_cfg['input_size'][-1])
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    per_rank = max(1, cfg.batch_size // world)
    flat = torch.zeros(2 * rows * cols, data_cfg['input_size'][0], enc.patch_size, enc.patch_size, device=device)
    if use_channels_last(cfg, device):
        flat = flat.contiguous(memory_format=torch.channels_last)
    patches = flat.view(2, rows, cols, *flat.shape[1:])  # 2 images: the objective's negatives need more than one
    enc.set_grad_checkpointing(False)
    act = saved_activation_bytes(model, patches, autocast_dtype=torch.bfloat16 if use_bf16(cfg, device) else None)
    resident = 16 * sum(p.numel() for p in model.parameters())  # fp32 weights, gradients, AdamW's two moments
    return checkpointing_default(device, act // 2 * per_rank, resident)


def compile_trunk(encoder: nn.Module, **compile_kwargs) -> None:
    """torch.compile the encoder's trunk (stem, stacks, norm), where nearly all the FLOPs are, falling back to
    eager if compiling fails; the state dict keeps its names (no ``_orig_mod.`` prefix)."""
    compile_method(encoder, 'forward_trunk', **compile_kwargs)


def compile_model(model: CPCModel, **compile_kwargs) -> None:
    """torch.compile what a training step runs: the encoder trunk and the objective (each with the eager fallback;
    state-dict keys unchanged; ``compile_kwargs`` go to torch.compile). Both trace without graph breaks
    (tests/test_runtime.py)."""
    compile_trunk(model.encoder, **compile_kwargs)
    compile_method(model.objective, 'forward', **compile_kwargs)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on weights only (none on 1-D parameters: norms, biases); fused on CUDA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=cfg.lr, betas=tuple(cfg.betas), fused=next(model.parameters()).device.type == 'cuda')


def peak_lr(cfg: TrainConfig) -> float:
    """The peak learning rate of the run: ``lr``, given for the global batch ``lr_ref_batch``, scaled to
    ``batch_size`` by ``lr_scaling`` (sqrt: lr * sqrt(batch / lr_ref_batch); linear: lr * batch / lr_ref_batch);
    ``lr`` when ``lr_ref_batch`` is 0."""
    if not cfg.lr_ref_batch or cfg.lr_ref_batch == cfg.batch_size:
        return cfg.lr
    ratio = cfg.batch_size / cfg.lr_ref_batch
    return cfg.lr * (ratio ** 0.5 if cfg.lr_scaling == 'sqrt' else ratio)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to peak_lr * min_lr_ratio (schedule.warmup_cosine)."""
    return warmup_cosine(step, total_steps, cfg.warmup_steps, peak_lr(cfg), cfg.min_lr_ratio)


@dataclass
class StepSetup:
    """What every training step of a run shares; built once by :func:`build_step_setup`."""
    augment: PatchAugment
    generator: torch.Generator  # this rank's augmentation draws (part of the checkpointed state)
    mean: torch.Tensor  # (1, C, 1, 1), the encoder's normalization, on the device
    std: torch.Tensor
    channels_last: bool
    bf16: bool  # bf16 autocast
    grad_clip: float  # max global grad norm; 0 = off


def build_step_setup(cfg: TrainConfig, encoder: nn.Module, device: torch.device, rank: int = 0) -> StepSetup:
    data_cfg = timm.data.resolve_model_data_config(encoder)
    return StepSetup(
        augment=PatchAugment(cfg.augment),
        generator=torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank),
        mean=torch.tensor(data_cfg['mean'], device=device).view(1, -1, 1, 1),
        std=torch.tensor(data_cfg['std'], device=device).view(1, -1, 1, 1),
        channels_last=use_channels_last(cfg, device), bf16=use_bf16(cfg, device), grad_clip=cfg.grad_clip)


def train_step(model: nn.Module, images: Union[torch.Tensor, Sequence[torch.Tensor]], optimizer: torch.optim.Optimizer,
               setup: StepSetup, lr: float) -> Tuple[ObjectiveOutput, torch.Tensor]:
    """One optimizer step on uint8 images (B, C, H, W): patchify -> PatchAugment (every patch its own draw) ->
    normalize -> encoder.forward_patches -> CPCObjective -> backward -> clip -> AdamW at learning rate ``lr``.

    ``images`` may be the step's k micro-batches (gradient accumulation, ``--accum-steps``): each goes through the
    model on its own, so its InfoNCE negatives are the images of that micro-batch (all ranks'); each loss is scaled
    by 1/k and the gradients add up, giving the gradient of the mean of the k micro-batch losses; DDP synchronizes
    once, after the last. The returned loss and metrics are the means over the micro-batches.

    ``model`` is a :class:`CPCModel`, or one wrapped in DistributedDataParallel. Returns the objective's output
    and the gradient norm before clipping, as tensors on the device: nothing here waits for the device.
    """
    core = model.module if isinstance(model, DistributedDataParallel) else model
    micro = [images] if isinstance(images, torch.Tensor) else list(images)
    for g in optimizer.param_groups:
        g['lr'] = lr
    device = setup.mean.device
    optimizer.zero_grad(set_to_none=True)
    outs = []
    for j, batch in enumerate(micro):
        with record_function('cpc::augment'):
            x = batch.to(device, non_blocking=True).float().div_(255)
            p = patchify(x, core.encoder.patch_size, core.encoder.patch_stride)  # (B, R, W, C, P, P)
            flat = setup.augment(p.reshape(-1, *p.shape[3:]), setup.generator)  # (B * R * W, C, P, P)
            flat = (flat - setup.mean) / setup.std
            if setup.channels_last:
                flat = flat.contiguous(memory_format=torch.channels_last)
        last = j == len(micro) - 1
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.bf16):
                out = model(flat.view(*p.shape[:3], *flat.shape[1:]))
            with record_function('cpc::backward'):
                (out.loss / len(micro) if len(micro) > 1 else out.loss).backward()
        outs.append(out)
    if len(outs) > 1:
        out = ObjectiveOutput(torch.stack([o.loss.detach() for o in outs]).mean(),
                              {k: torch.stack([o.metrics[k] for o in outs]).mean() for k in outs[0].metrics})
    with record_function('cpc::optimizer'):
        grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), setup.grad_clip or float('inf'))
        optimizer.step()
    return out, grad_norm


# ============ data ============

def _dataset(cfg: TrainConfig, in_chans: int, img_size: int):
    if cfg.data == 'fashion-mnist':
        images, _ = load_fashion_mnist('train', cfg.data_dir or None)
        return TensorImageDataset(images.expand(-1, in_chans, -1, -1) if in_chans != 1 else images)
    if cfg.data.startswith(HF_PREFIX):
        source = cfg.data[len(HF_PREFIX):]
        dataset = _one_per_node_first(lambda first: load_hf_dataset(source, cfg.data_split))  # the Hub download once
        return HFImageDataset(dataset, img_size, in_chans, resize=cfg.resize or None, train=True,
                              image_column=cfg.image_column, root=cfg.data)
    return ImageFolderDataset(cfg.data, img_size, in_chans, resize=cfg.resize or None, train=True,
                              index=shared_file_index(cfg.data, index_location(cfg)))


def held_out_splits(data: str) -> List[str]:
    """The evaluation splits (val/, validation/, test/) a --data folder holds beside a train/ folder: pretraining
    on the folder would read their images too."""
    root = Path(data)
    if data == 'fashion-mnist' or data.startswith(HF_PREFIX) or not (root / 'train').is_dir():
        return []
    return [name for name in ('val', 'validation', 'test') if (root / name).is_dir()]


def index_location(cfg: TrainConfig) -> Path:
    """Where the file index of ``cfg.data`` is cached: ``--index-dir``, else beside the data, else (a read-only
    data folder) in the run folder."""
    if cfg.index_dir:
        return Path(cfg.index_dir)
    beside = default_index_dir(cfg.data)
    writable = os.access(beside if beside.exists() else beside.parent, os.W_OK)
    return beside if writable else Path(cfg.out_dir) / 'file_index'


def _one_per_node_first(load):
    """``load(first)`` on the first process of each node (LOCAL_RANK 0, ``first=True``) while the others wait, then
    on the others (``first=False``): what the first one builds or downloads, the others read. A failure of the
    first is raised on every rank alike (as FileNotFoundError or ValueError)."""
    if not torch.distributed.is_initialized():
        return load(True)
    first = os.environ.get('LOCAL_RANK', '0') == '0'
    result, error = None, None
    if first:
        try:
            result = load(True)
        except (OSError, ValueError, ImportError) as e:
            error = (type(e).__name__, str(e))
    errors: List[Optional[Tuple[str, str]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)  # also the barrier: what the first ones wrote is there now
    failed = next((e for e in errors if e), None)
    if failed:
        raise (FileNotFoundError if failed[0] in ('FileNotFoundError', 'NotADirectoryError') else ValueError)(failed[1])
    return result if first else load(False)


def shared_file_index(root: str, location: Path) -> FileIndex:
    """The file index of ``root``, built once per machine: the first process of each node reuses or builds the
    cached index at ``location`` while the others wait, then every process memory-maps it."""
    def load(first: bool) -> FileIndex:
        if first:
            return FileIndex.open(root, location)
        try:
            return FileIndex.open(root, location, build=False)
        except FileNotFoundError:  # the first could not write it (read-only location): scan here too
            return FileIndex.scan(root)
    return _one_per_node_first(load)


# ============ bookkeeping ============

class Flags(NamedTuple):
    """What :meth:`StepStats.read` returns: the same values on every rank."""
    skipped: int  # unreadable images since the last read, all ranks
    stop: bool  # a stop was requested (SIGINT / SIGTERM) on some rank
    no_images: bool  # some rank found no readable image for its batch (data.refill gave up)
    non_finite: Optional[Tuple[int, float]]  # (step, loss) of the first non-finite loss, or None


class StepStats:
    """What the host learns about the steps, in one collective per step and one host sync per log or checkpoint.

    Per step: the loss and accuracies (mean over ranks: the single-process values on the global batch) and three
    flags, unreadable images, stop requests and ranks without a readable image (sums over ranks), reduced together.
    The flags and the first non-finite loss accumulate on the device until :meth:`read`, which only log and
    checkpoint steps call, so the host never waits for the device in between; every rank reads the same values and
    acts the same.
    """

    def __init__(self, device: torch.device, world: int):
        self.world = world
        self.flags = torch.zeros(3, device=device)  # this step: unreadable images, stop requested, no readable image
        # since the last read: the three flags, first non-finite step (-1: none) and its loss
        self.pending = torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0], dtype=torch.float64, device=device)
        self.last: Optional[torch.Tensor] = None

    def update(self, step: int, out: ObjectiveOutput, unreadable: int, stop_requested: bool,
               no_images: bool = False) -> None:
        self.flags[0].fill_(unreadable)
        self.flags[1].fill_(float(stop_requested))
        self.flags[2].fill_(float(no_images))
        values = [out.loss.detach().float(), *[v.detach().float() for v in out.metrics.values()]]
        stats = torch.cat([torch.stack(values), self.flags])
        if self.world > 1:
            torch.distributed.all_reduce(stats)
            stats[:-3] /= self.world
        self.pending[:3] += stats[-3:]
        first_bad = ~torch.isfinite(stats[0]) & (self.pending[3] < 0)
        self.pending[3:] = torch.where(first_bad, torch.stack([torch.full_like(self.pending[3], step),
                                                               stats[0].double()]), self.pending[3:])
        self.last = stats

    def read(self) -> Flags:
        """The flags since the last read. Waits for the device."""
        skipped, stops, no_images, bad_step, bad_loss = self.pending.tolist()
        self.pending[:3] = 0
        return Flags(int(skipped), stops > 0, no_images > 0,
                     (int(bad_step), bad_loss) if bad_step >= 0 else None)

    def values(self, names) -> Dict[str, float]:
        """The last step's loss and metrics (``names``: the keys of ObjectiveOutput.metrics)."""
        values = self.last.tolist()
        return dict(loss=values[0], **dict(zip(names, values[1:-3])))


def _trim_log(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines past ``step`` (and a torn last line): the resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)['step'] <= step:
                kept.append(line + '\n')
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    write_text(path, ''.join(kept))


def _config_changes(saved: Dict, cfg: TrainConfig) -> Dict[str, Tuple[Any, Any]]:
    """{key: (saved, now)} of the values a resumed run changes, comparing leaf by leaf (a key an older
    config.json lacks is not a change, nor is a runtime switch now 'auto': it is resolved again for this device)."""
    def leaves(d, prefix=''):
        for k, v in d.items():
            if isinstance(v, dict) and k != 'model_args':
                yield from leaves(v, f'{prefix}{k}.')
            else:
                yield prefix + k, v
    old = dict(leaves(saved))
    return {k: (old[k], v) for k, v in leaves(C.to_dict(cfg))
            if k in old and k not in ('resume', 'progress') and old[k] != v and v != 'auto'}


# The values that shape the parameters: a checkpoint only resumes into a run that has the same.
NETWORK_KEYS = ('model', 'model_args', 'objective.context_hidden', 'objective.context_blocks', 'objective.target_dim',
                'objective.offsets', 'objective.directions', 'objective.shared_context')


def _resume_source(cfg: TrainConfig) -> Optional[Path]:
    """The checkpoint folder a run continues from (None: a fresh start)."""
    if cfg.resume == 'none':
        return None
    return latest_checkpoint(cfg.out_dir) if cfg.resume == 'auto' else resolve_checkpoint(cfg.resume)


def _check_same_network(cfg: TrainConfig, ckpt: Path) -> None:
    """Refuse (ConfigError) to resume ``ckpt`` into a network of other shapes, naming the options to give."""
    changed = {k: v for k, v in _config_changes(json.loads((ckpt / 'config.json').read_text()), cfg).items()
               if k in NETWORK_KEYS}
    if changed:
        flags = ' '.join(f'--{k} {shlex.quote(json.dumps(a) if isinstance(a, (dict, list, bool)) else str(a))}'
                         for k, (a, _) in changed.items())
        raise C.ConfigError(
            f'--resume: {ckpt} holds another network ('
            + ', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in changed.items())
            + f'). To continue it, add {flags}; to start a new run, give --resume none or another --out-dir.')


def _memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ============ training ============

def train(cfg: TrainConfig) -> Dict:
    """Run (or resume) pretraining; returns the final metrics.

    Raises ConfigError (a bad config, before any work), NoReadableImagesError (the data has no readable image),
    NonFiniteLossError (NaN/inf loss), each with a message that says what to do.
    """
    # ============ distributed and device ============
    check_config(cfg)
    rank, world, device = init_distributed()
    if cfg.device != 'auto':
        device = check_device(cfg.device)
    tune_cudnn(device)  # fixed shapes every step: cuDNN picks its fastest convolution algorithms once
    main_process = rank == 0
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)

    # ============ model, objective and step ============
    model = build_model(cfg, device)
    encoder = model.encoder
    in_chans, native = timm.data.resolve_model_data_config(encoder)['input_size'][0::2]
    img_size = cfg.image_size or native
    rows, cols = encoder.grid_size(img_size)
    setup = build_step_setup(cfg, encoder, device, rank)

    # ============ data ============
    dataset = _dataset(cfg, in_chans, img_size)
    check_readable(dataset)  # a folder of junk stops here, on every rank alike
    held_out = held_out_splits(cfg.data)
    if held_out and main_process:
        print(f'warning: --data {cfg.data} holds {", ".join(h + "/" for h in held_out)} beside train/: pretraining '
              f'reads every image under it, those too; give --data {Path(cfg.data) / "train"} to keep them out',
              file=sys.stderr)

    # ============ optimizer ============
    optimizer = build_optimizer(cfg, model)

    # ============ resume ============
    step, wall_before, position = 0, 0.0, None
    resume_from = _resume_source(cfg)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model.encoder, model.objective, device)
        optimizer.load_state_dict(state['optimizer'])
        torch.set_rng_state(state['rng_cpu'])
        step = state['step']
        saved_world = len(state['rng_aug'])
        if saved_world == world:
            setup.generator.set_state(state['rng_aug'][rank])
        else:  # elastic resume: the per-rank augmentation streams start afresh, seeded by rank and step
            setup.generator.manual_seed(resumed_augment_seed(cfg.seed, rank, step))
        if 'rng_cuda' in state and device.type == 'cuda':
            torch.cuda.set_rng_state_all(state['rng_cuda'])
        if 'data_epoch' in state:  # the place in the global image stream (older checkpoints: from the step)
            position = DataPosition(int(state['data_epoch']), int(state['data_offset']))
        wall_before = float(state.get('wall_time_s', 0.0))
        if main_process:
            print(f'resumed from {resume_from} at step {step}'
                  + (f' (written by {saved_world} process(es), now {world}: same image order, augmentation '
                     f'streams reseeded)' if saved_world != world else ''))
            if int(state.get('data_size', len(dataset))) != len(dataset):
                print(f'warning: the data has {len(dataset)} images, the checkpoint\'s run had '
                      f'{int(state["data_size"])}: the image order differs from the interrupted run\'s',
                      file=sys.stderr)
            changed = _config_changes(json.loads((resume_from / 'config.json').read_text()), cfg)
            if changed:  # e.g. a longer --max-steps is fine; a different model or lr changes the run
                print('warning: the resumed run differs from the checkpoint\'s config in '
                      + ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items()), file=sys.stderr)
            _trim_log(out_dir / 'metrics.jsonl', step)
            for ids_log in (out_dir / 'image_ids').glob('rank*.jsonl'):  # every rank's, of any earlier world
                _trim_log(ids_log, step)

    sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed, start_step=step, position=position,
                          accum_steps=cfg.accum_steps)
    position = sampler.position
    local_batch = cfg.batch_size // (world * cfg.accum_steps)  # images per rank and micro-batch
    total_steps = cfg.max_steps or int(cfg.epochs * sampler.steps_per_epoch)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_readable, num_workers=cap_workers(cfg.num_workers),
        pin_memory=device.type == 'cuda', persistent_workers=cfg.num_workers > 0, worker_init_fn=_ignore_sigint)
    ddp_model = DistributedDataParallel(model) if world > 1 else model
    compiled = use_compile(cfg, device, total_steps)
    if compiled:
        compile_model(model)

    if main_process:
        print('config:', json.dumps(C.to_dict(cfg), indent=2))
        n_params = sum(p.numel() for p in encoder.parameters())
        print(f'{cfg.model}: {n_params / 1e6:.2f}M encoder parameters; {img_size}px images -> {rows}x{cols} grid of '
              f'{encoder.patch_size}px patches; {world} process(es); {total_steps} steps on {device}')
        print(f'runtime: channels_last {setup.channels_last}, bf16 autocast {setup.bf16}, torch.compile {compiled}, '
              f'gradient checkpointing {encoder.grad_checkpointing} (config: channels_last={cfg.channels_last}, '
              f'compile={cfg.compile}, grad_checkpointing={cfg.grad_checkpointing})')
        if setup.bf16 and device.type == 'cpu' and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            print('warning: --bf16-cpu on a CPU without native bf16 (AVX512-BF16 or AMX): oneDNN emulates it, '
                  'which is usually slower than fp32; drop --bf16-cpu', file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(out_dir)

    stop = {'signal': None}

    def _on_signal(signum, frame):
        if stop['signal'] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort without saving
        stop['signal'] = signum
        if main_process:
            print(f'\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint'
                  + (' (Ctrl-C again to abort without saving)' if signum == signal.SIGINT else ''),
                  file=sys.stderr, flush=True)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous_handlers = {s: signal.signal(s, _on_signal) for s in handled}

    # ============ training loop ============
    metrics: Dict = {}
    last_ckpt = latest_checkpoint(out_dir) if main_process else None
    skipped_total = 0
    errors: List[Tuple[int, str]] = []  # the first unreadable files of this rank, for the error message
    last_batch: Optional[torch.Tensor] = None
    stats = StepStats(device, world)
    log_file = open(out_dir / 'metrics.jsonl', 'a') if main_process else None
    bar = tqdm(total=total_steps, initial=step, disable=not (main_process and cfg.progress), desc='cpc-train')
    ids_log = None
    if cfg.log_image_ids:
        (out_dir / 'image_ids').mkdir(parents=True, exist_ok=True)
        ids_log = open(out_dir / 'image_ids' / f'rank{rank}.jsonl', 'a')
    t_start = t_last = time.perf_counter()
    images_since = 0
    micro: List[torch.Tensor] = []  # this step's micro-batches so far (--accum-steps), their image ids and flags
    micro_ids: List[int] = []
    micro_unreadable, micro_no_images = 0, False
    model.train()
    try:
        for batch, ids, unreadable in loader:
            if step >= total_steps:
                break
            if batch is None:  # no readable image in this rank's slice: refill from the files that follow
                batch, more = refill(dataset, [i for i, _ in unreadable], local_batch, cfg.max_unreadable)
                unreadable = unreadable + more
            errors += unreadable[:max(0, 3 - len(errors))]
            no_images = batch is None
            if no_images:
                if world == 1:
                    raise NoReadableImagesError(dataset, skipped_total + stats.read().skipped + len(unreadable),
                                                errors)
                # the other ranks wait for this one in the step's collectives: it takes part with its last batch,
                # and all stop together at the next read (before anything of this step is logged or saved)
                batch = last_batch if last_batch is not None else torch.zeros(
                    local_batch, in_chans, img_size, img_size, dtype=torch.uint8)
            if world > 1 and batch.shape[0] < local_batch:  # unreadable images: refill so every rank has the same
                batch = batch[torch.arange(local_batch) % batch.shape[0]]  # shape (the target gather needs it)
            last_batch = batch
            micro.append(batch)
            micro_ids += ids
            micro_unreadable += len(unreadable)
            micro_no_images |= no_images
            if len(micro) < cfg.accum_steps:
                continue
            out, grad_norm = train_step(ddp_model, micro if len(micro) > 1 else batch, optimizer, setup,
                                        lr_at(step, cfg, total_steps))
            stats.update(step, out, micro_unreadable, stop['signal'] is not None, micro_no_images)
            step += 1
            position = sampler.advance(position)
            images_since += sum(m.shape[0] for m in micro) * world
            if ids_log is not None:
                ids_log.write(json.dumps(dict(step=step, ids=micro_ids)) + '\n')
                ids_log.flush()
            micro, micro_ids, micro_unreadable, micro_no_images = [], [], 0, False
            bar.update(1)

            log_now = step % cfg.log_every == 0 or step == total_steps
            save_now = step % cfg.save_every == 0 or step == total_steps
            stopping = world == 1 and stop['signal'] is not None  # one process: no need to wait for a read
            if not (log_now or save_now or stopping):
                continue
            flags = stats.read()
            skipped_total += flags.skipped
            stopping = stopping or flags.stop
            if flags.no_images:  # every rank reads the same flags: all stop here, together
                if world > 1:
                    gathered = [None] * world
                    torch.distributed.all_gather_object(gathered, errors[:3])
                    errors = [e for rank_errors in gathered for e in rank_errors]
                raise NoReadableImagesError(dataset, skipped_total, errors)
            if flags.non_finite is not None:
                bad = flags.non_finite
                raise NonFiniteLossError(
                    f'Loss is {bad[1]} at step {bad[0]}; stopping. Last good checkpoint: {last_ckpt or "none"}. '
                    f'Lower --lr, raise --warmup-steps or check the data, then resume with --resume '
                    f'{last_ckpt or "none"}.')
            if log_now and main_process:
                dt = time.perf_counter() - t_last
                metrics = dict(
                    step=step, epoch=position.epoch + position.offset / (sampler.steps_per_epoch * cfg.batch_size),
                    **stats.values(out.metrics),
                    lr=optimizer.param_groups[0]['lr'], grad_norm=float(grad_norm),
                    images_per_s=images_since / dt, patches_per_s=images_since * rows * cols / dt,
                    memory_mb=_memory_mb(device), skipped_images=skipped_total,
                    wall_time_s=wall_before + time.perf_counter() - t_start)
                log_file.write(json.dumps(metrics) + '\n')
                log_file.flush()
                bar.set_postfix(loss=f'{metrics["loss"]:.3f}', acc=f'{metrics.get("acc", 0):.3f}',
                                img_s=f'{metrics["images_per_s"]:.0f}')
                t_last, images_since = time.perf_counter(), 0
            if save_now or stopping:
                aug_states = [setup.generator.get_state()]
                if world > 1:  # every rank draws its own augmentations: keep each rank's generator state
                    aug_states = [None] * world
                    torch.distributed.all_gather_object(aug_states, setup.generator.get_state().cpu())
                if main_process:
                    state = dict(step=step, optimizer=optimizer.state_dict(), rng_cpu=torch.get_rng_state(),
                                 rng_aug=aug_states, wall_time_s=wall_before + time.perf_counter() - t_start,
                                 data_epoch=position.epoch, data_offset=position.offset, data_size=len(dataset))
                    if torch.cuda.is_available():
                        state['rng_cuda'] = torch.cuda.get_rng_state_all()
                    last_ckpt = save_checkpoint(out_dir, step, model.encoder, model.objective, state,
                                                C.to_dict(cfg), dict(metrics, wall_time_s=state['wall_time_s']),
                                                cfg.keep_last)
                if world > 1:
                    torch.distributed.barrier()
            if stopping:
                signum = stop['signal'] or signal.SIGTERM  # another rank's signal, under DDP
                if main_process:
                    print(f'stopped by {signal.Signals(signum).name} at step {step}; saved {last_ckpt}', flush=True)
                stop['signal'] = signum
                break
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f'aborted at step {step} without saving; the last checkpoint is '
                                f'{last_ckpt or "none"}') from None
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if ids_log:
            ids_log.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if skipped_total and main_process:
        print(f'skipped {skipped_total} unreadable images')
    return dict(metrics, step=step, checkpoint=str(last_ckpt) if last_ckpt else None, stopped=stop['signal'])


def resumed_augment_seed(seed: int, rank: int, step: int) -> int:
    """The augmentation seed of rank ``rank`` in a run resumed at ``step`` on another number of processes than the
    checkpoint's (the per-rank streams cannot carry over): deterministic, so resuming the same checkpoint on the
    same number of processes twice draws the same augmentations, and apart from the streams of a fresh start."""
    return (seed * 1000 + rank) * 1_000_003 + step + 1


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers: Ctrl-C reaches the whole process group; the main process decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_command(argv: List[str], world: int) -> str:
    """The command that resumes a stopped run: the same options, with --resume auto."""
    kept, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok.replace('_', '-') == '--resume':
            skip = True
        elif not tok.replace('_', '-').startswith('--resume='):
            kept.append(tok)
    prog = 'cpc-train' if world == 1 else f'torchrun --nproc_per_node {world} -m cpc_models.train'
    return ' '.join([prog, *map(shlex.quote, kept), '--resume', 'auto'])


def main(argv: Optional[List[str]] = None) -> int:
    """cpc-train. Exit status: 0 done, 2 bad input (one line says what to change: config, data, checkpoint, or a
    non-finite loss), 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (the resume command is printed).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = build_config(argv)
    except SystemExit as e:  # --help (0), or an option the parser rejects (2, said in one line)
        return e.code
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    try:
        result = train(cfg)
    except C.ConfigError as e:  # checked before any work, the same on every rank
        if rank == 0:
            C.usage_error('cpc-train', one_line(e))
        return 2
    except (NonFiniteLossError, NoReadableImagesError) as e:  # every rank stops together, on the same values
        if rank == 0:
            print(f'cpc-train: error: {one_line(e)}', file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # the data or the checkpoint: say what to change
        # one write per line (print writes the text and the newline separately when unbuffered): the ranks share
        # the launcher's stderr, and their lines must not interleave
        sys.stderr.write(f'cpc-train: error: {"" if world == 1 else f"[rank {rank}] "}{one_line(e)}\n')
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt as e:
        if rank == 0:
            print(f'cpc-train: {str(e) or "aborted"}', file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result['stopped'] is None:
        if rank == 0:  # also when nothing else was printed (--progress false)
            where = f'last checkpoint {result["checkpoint"]}' if result['checkpoint'] else 'no checkpoint written'
            print(f'cpc-train: done at step {result["step"]}; {where}; metrics in '
                  f'{Path(cfg.out_dir) / "metrics.jsonl"}', flush=True)
        return 0
    if rank == 0:
        print(f'resume with: {_resume_command(argv, world)}', flush=True)
    return 128 + int(result['stopped'])


if __name__ == '__main__':
    sys.exit(main())
