"""cpc-train: CPC v2 pretraining, top to bottom: config, model, step, data, optimizer, resume, loop, checkpoint.

    cpc-train --preset fmnist_tiny                              # CPU, ~minutes per epoch
    cpc-train --preset imagenet_r161 --data /imagenet/train     # CUDA
    torchrun --nproc_per_node 8 -m cpc_models.train --preset imagenet_r161 --data /imagenet/train

Every config value can be overridden on the command line (``--lr 1e-3 --objective.directions 2``); the resolved
config is printed at start and stored in every checkpoint. A run resumes from the newest checkpoint in
``--out-dir`` with ``--resume`` (default ``auto``), continuing exactly where it stopped (same batches, same
augmentation draws). SIGTERM saves a checkpoint at the end of the current step and exits.
"""
import dataclasses
import json
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
from .data import ImageFolderDataset, StepSampler, TensorImageDataset, load_fashion_mnist
from .distributed import init_distributed
from .images import collate_readable
from .objective import CPCObjective, ObjectiveConfig, ObjectiveOutput
from .patches import patchify
from .schedule import warmup_cosine

__all__ = ['TrainConfig', 'PRESETS', 'build_config', 'CPCModel', 'build_model', 'build_optimizer', 'StepSetup',
           'build_step_setup', 'train_step', 'compile_trunk', 'lr_at', 'train', 'main', 'NonFiniteLossError',
           'latest_checkpoint']


# ============ config ============

@dataclass
class TrainConfig:
    """Every value of a cpc-train run; printed at start and stored in every checkpoint's config.json."""
    # ---- model ----
    model: str = 'cpcv2_resnet_tiny'  # timm architecture name
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (--model_args.KEY V)
    # ---- data ----
    data: str = 'fashion-mnist'  # 'fashion-mnist' or a folder of images (recursive, labels unused)
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = $CPC_FASHION_MNIST_DIR or the Debian package's)
    image_size: int = 0  # training crop; 0 = the model cfg's input size
    resize: int = 0  # short side before cropping (folders); 0 = image_size
    num_workers: int = 0  # DataLoader processes decoding images
    # ---- optimization ----
    batch_size: int = 64  # global batch (split over ranks)
    epochs: float = 1.0  # run length in passes over the data
    max_steps: int = 0  # run length in steps; 0 = from epochs
    lr: float = 2e-3  # peak learning rate, after the linear warmup
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
    channels_last: bool = True  # NHWC model and patches
    compile: bool = False  # torch.compile the encoder trunk
    grad_checkpointing: bool = False  # recompute each stack's activations in backward
    seed: int = 0  # data order; augmentation generator of rank r: seed * 1000 + r
    progress: bool = True  # tqdm progress bar
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
        epochs=200, lr=4e-4, warmup_steps=5000, weight_decay=1e-4, grad_checkpointing=True, save_every=2000,
        objective=dict(directions=4), augment={}),
    # (b) ImageNet ResNet-50 (the paper's 63.8% model), same recipe.
    'imagenet_r50': dict(
        model='cpcv2_resnet50', data='', image_size=260, resize=300, num_workers=10, batch_size=512,
        epochs=200, lr=4e-4, warmup_steps=5000, weight_decay=1e-4, save_every=2000,
        objective=dict(directions=4), augment={}),
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
}
DEFAULT_PRESET = 'fmnist_tiny'


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


def build_model(cfg: TrainConfig, device: torch.device) -> CPCModel:
    """The timm encoder (num_classes=0) and the objective, on ``device``, with the config's runtime switches."""
    encoder = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.model_args)
    encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    objective = CPCObjective(encoder.num_features, **dataclasses.asdict(cfg.objective))
    model = CPCModel(encoder, objective).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def compile_trunk(encoder: nn.Module) -> None:
    """torch.compile the encoder's trunk (stem, stacks, norm), where nearly all the FLOPs are; the state dict
    keeps its names (no ``_orig_mod.`` prefix)."""
    encoder.forward_trunk = torch.compile(encoder.forward_trunk)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on weights only (none on 1-D parameters: norms, biases); fused on CUDA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW(
        [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=cfg.lr, betas=tuple(cfg.betas), fused=next(model.parameters()).device.type == 'cuda')


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (schedule.warmup_cosine)."""
    return warmup_cosine(step, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio)


@dataclass
class StepSetup:
    """What every training step of a run shares; built once by :func:`build_step_setup`."""
    augment: PatchAugment
    generator: torch.Generator  # this rank's augmentation draws (part of the checkpointed state)
    mean: torch.Tensor  # (1, C, 1, 1), the encoder's normalization, on the device
    std: torch.Tensor
    channels_last: bool
    bf16: bool  # bf16 autocast (CUDA only)
    grad_clip: float  # max global grad norm; 0 = off


def build_step_setup(cfg: TrainConfig, encoder: nn.Module, device: torch.device, rank: int = 0) -> StepSetup:
    data_cfg = timm.data.resolve_model_data_config(encoder)
    return StepSetup(
        augment=PatchAugment(cfg.augment),
        generator=torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank),
        mean=torch.tensor(data_cfg['mean'], device=device).view(1, -1, 1, 1),
        std=torch.tensor(data_cfg['std'], device=device).view(1, -1, 1, 1),
        channels_last=cfg.channels_last, bf16=cfg.bf16 and device.type == 'cuda', grad_clip=cfg.grad_clip)


def train_step(model: nn.Module, images: torch.Tensor, optimizer: torch.optim.Optimizer, setup: StepSetup,
               lr: float) -> Tuple[ObjectiveOutput, torch.Tensor]:
    """One optimizer step on uint8 images (B, C, H, W): patchify -> PatchAugment (every patch its own draw) ->
    normalize -> encoder.forward_patches -> CPCObjective -> backward -> clip -> AdamW at learning rate ``lr``.

    ``model`` is a :class:`CPCModel`, or one wrapped in DistributedDataParallel. Returns the objective's output
    and the gradient norm before clipping, as tensors on the device: nothing here waits for the device.
    """
    core = model.module if isinstance(model, DistributedDataParallel) else model
    for g in optimizer.param_groups:
        g['lr'] = lr
    device = setup.mean.device
    with record_function('cpc::augment'):
        x = images.to(device, non_blocking=True).float().div_(255)
        p = patchify(x, core.encoder.patch_size, core.encoder.patch_stride)  # (B, R, W, C, P, P)
        flat = setup.augment(p.reshape(-1, *p.shape[3:]), setup.generator)  # (B * R * W, C, P, P)
        flat = (flat - setup.mean) / setup.std
        if setup.channels_last:
            flat = flat.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.bf16):
        out = model(flat.view(*p.shape[:3], *flat.shape[1:]))
    with record_function('cpc::backward'):
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
    with record_function('cpc::optimizer'):
        grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), setup.grad_clip or float('inf'))
        optimizer.step()
    return out, grad_norm


# ============ data ============

def _dataset(cfg: TrainConfig, in_chans: int, img_size: int):
    if cfg.data == 'fashion-mnist':
        images, _ = load_fashion_mnist('train', cfg.data_dir or None)
        return TensorImageDataset(images.expand(-1, in_chans, -1, -1) if in_chans != 1 else images)
    return ImageFolderDataset(cfg.data, img_size, in_chans, resize=cfg.resize or None, train=True)


def _check_data(cfg: TrainConfig) -> None:
    if cfg.data == 'fashion-mnist':
        return
    if not cfg.data:
        raise ValueError("This preset needs --data: a folder of training images (e.g. ImageNet's train/), "
                         "or --data fashion-mnist.")
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(f'--data {cfg.data}: no such folder (pass a folder of JPEG/PNG images, searched '
                                f'recursively, or fashion-mnist).')


# ============ bookkeeping ============

class StepStats:
    """What the host learns about the steps, in one collective per step and one host sync per log or checkpoint.

    Per step: the loss and accuracies (mean over ranks: the single-process values on the global batch) and two
    flags, unreadable images and stop requests (sums over ranks), reduced together. The flags and the first
    non-finite loss accumulate on the device until :meth:`read`, which only log and checkpoint steps call, so the
    host never waits for the device in between; every rank reads the same values and acts the same.
    """

    def __init__(self, device: torch.device, world: int):
        self.world = world
        self.flags = torch.zeros(2, device=device)  # this step: unreadable images, stop requested
        # since the last read: unreadable images, stop requests, first non-finite step (-1: none) and its loss
        self.pending = torch.tensor([0.0, 0.0, -1.0, 0.0], dtype=torch.float64, device=device)
        self.last: Optional[torch.Tensor] = None

    def update(self, step: int, out: ObjectiveOutput, unreadable: int, stop_requested: bool) -> None:
        self.flags[0].fill_(unreadable)
        self.flags[1].fill_(float(stop_requested))
        values = [out.loss.detach().float(), *[v.detach().float() for v in out.metrics.values()]]
        stats = torch.cat([torch.stack(values), self.flags])
        if self.world > 1:
            torch.distributed.all_reduce(stats)
            stats[:-2] /= self.world
        self.pending[:2] += stats[-2:]
        first_bad = ~torch.isfinite(stats[0]) & (self.pending[2] < 0)
        self.pending[2:] = torch.where(first_bad, torch.stack([torch.full_like(self.pending[2], step),
                                                               stats[0].double()]), self.pending[2:])
        self.last = stats

    def read(self) -> Tuple[int, bool, Optional[Tuple[int, float]]]:
        """(unreadable images, stop requested, (step, loss) of the first non-finite loss or None) since the last
        read. Waits for the device."""
        skipped, stops, bad_step, bad_loss = self.pending.tolist()
        self.pending[:2] = 0
        return int(skipped), stops > 0, ((int(bad_step), bad_loss) if bad_step >= 0 else None)

    def values(self, names) -> Dict[str, float]:
        """The last step's loss and metrics (``names``: the keys of ObjectiveOutput.metrics)."""
        values = self.last.tolist()
        return dict(loss=values[0], **dict(zip(names, values[1:-2])))


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
    config.json lacks is not a change)."""
    def leaves(d, prefix=''):
        for k, v in d.items():
            if isinstance(v, dict) and k != 'model_args':
                yield from leaves(v, f'{prefix}{k}.')
            else:
                yield prefix + k, v
    old = dict(leaves(saved))
    return {k: (old[k], v) for k, v in leaves(C.to_dict(cfg))
            if k in old and k not in ('resume', 'progress') and old[k] != v}


def _memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ============ training ============

def train(cfg: TrainConfig) -> Dict:
    """Run (or resume) pretraining; returns the final metrics. Raises NonFiniteLossError on NaN/inf loss."""
    # ============ distributed and device ============
    _check_data(cfg)
    rank, world, device = init_distributed()
    if cfg.device != 'auto':
        device = torch.device(cfg.device)
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

    # ============ optimizer ============
    optimizer = build_optimizer(cfg, model)

    # ============ resume ============
    step, wall_before = 0, 0.0
    resume_from = None if cfg.resume == 'none' else (
        latest_checkpoint(out_dir) if cfg.resume == 'auto' else resolve_checkpoint(cfg.resume))
    if resume_from is not None:
        state = load_checkpoint(resume_from, model.encoder, model.objective, device)
        optimizer.load_state_dict(state['optimizer'])
        torch.set_rng_state(state['rng_cpu'])
        if len(state['rng_aug']) != world:
            raise ValueError(f'{resume_from} was written by {len(state["rng_aug"])} process(es); resume it with '
                             f'the same number (now {world}) to continue exactly.')
        setup.generator.set_state(state['rng_aug'][rank])
        if 'rng_cuda' in state and device.type == 'cuda':
            torch.cuda.set_rng_state_all(state['rng_cuda'])
        step = state['step']
        wall_before = float(state.get('wall_time_s', 0.0))
        if main_process:
            print(f'resumed from {resume_from} at step {step}')
            changed = _config_changes(json.loads((resume_from / 'config.json').read_text()), cfg)
            if changed:  # e.g. a longer --max-steps is fine; a different model or lr changes the run
                print('warning: the resumed run differs from the checkpoint\'s config in '
                      + ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items()), file=sys.stderr)
            _trim_log(out_dir / 'metrics.jsonl', step)

    sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed, start_step=step)
    local_batch = cfg.batch_size // world
    total_steps = cfg.max_steps or int(cfg.epochs * sampler.steps_per_epoch)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_readable, num_workers=cfg.num_workers,
        pin_memory=device.type == 'cuda', persistent_workers=cfg.num_workers > 0)
    ddp_model = DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        compile_trunk(encoder)

    if main_process:
        print('config:', json.dumps(C.to_dict(cfg), indent=2))
        n_params = sum(p.numel() for p in encoder.parameters())
        print(f'{cfg.model}: {n_params / 1e6:.2f}M encoder parameters; {img_size}px images -> {rows}x{cols} grid of '
              f'{encoder.patch_size}px patches; {world} process(es); {total_steps} steps on {device}')
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(out_dir)

    stop = {'signal': None}

    def _on_sigterm(signum, frame):
        stop['signal'] = signum

    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm) if main_process or world > 1 else None

    # ============ training loop ============
    metrics: Dict = {}
    last_ckpt = latest_checkpoint(out_dir) if main_process else None
    skipped_total = 0
    stats = StepStats(device, world)
    log_file = open(out_dir / 'metrics.jsonl', 'a') if main_process else None
    bar = tqdm(total=total_steps, initial=step, disable=not (main_process and cfg.progress), desc='cpc-train')
    t_start = t_last = time.perf_counter()
    images_since = 0
    model.train()
    try:
        for batch, _, unreadable in loader:
            if step >= total_steps:
                break
            if batch is None:
                skipped_total += len(unreadable)
                continue
            if world > 1 and batch.shape[0] < local_batch:  # unreadable images: refill so every rank has the same
                batch = batch[torch.arange(local_batch) % batch.shape[0]]  # shape (the target gather needs it)
            out, grad_norm = train_step(ddp_model, batch, optimizer, setup, lr_at(step, cfg, total_steps))
            stats.update(step, out, len(unreadable), stop['signal'] is not None)
            step += 1
            images_since += batch.shape[0] * world
            bar.update(1)

            log_now = step % cfg.log_every == 0 or step == total_steps
            save_now = step % cfg.save_every == 0 or step == total_steps
            stopping = world == 1 and stop['signal'] is not None  # one process: no need to wait for a read
            if not (log_now or save_now or stopping):
                continue
            skipped, stop_requested, bad = stats.read()
            skipped_total += skipped
            stopping = stopping or stop_requested
            if bad is not None:
                raise NonFiniteLossError(
                    f'Loss is {bad[1]} at step {bad[0]}; stopping. Last good checkpoint: {last_ckpt or "none"}. '
                    f'Lower --lr, raise --warmup-steps or check the data, then resume with --resume '
                    f'{last_ckpt or "none"}.')
            if log_now and main_process:
                dt = time.perf_counter() - t_last
                metrics = dict(
                    step=step, epoch=step / sampler.steps_per_epoch, **stats.values(out.metrics),
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
                                 rng_aug=aug_states, wall_time_s=wall_before + time.perf_counter() - t_start)
                    if torch.cuda.is_available():
                        state['rng_cuda'] = torch.cuda.get_rng_state_all()
                    last_ckpt = save_checkpoint(out_dir, step, model.encoder, model.objective, state,
                                                C.to_dict(cfg), dict(metrics, wall_time_s=state['wall_time_s']),
                                                cfg.keep_last)
                if world > 1:
                    torch.distributed.barrier()
            if stopping:
                if main_process:
                    print(f'stopped by signal at step {step}; resume with --resume auto --out-dir {out_dir}')
                break
    finally:
        bar.close()
        if log_file:
            log_file.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if skipped_total and main_process:
        print(f'skipped {skipped_total} unreadable images')
    return dict(metrics, step=step, checkpoint=str(last_ckpt) if last_ckpt else None, stopped=stop['signal'])


def main(argv: Optional[List[str]] = None) -> int:
    cfg = build_config(argv)
    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # bad config, data or checkpoint: say what to change
        print(f'error: {e}', file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0 if result['stopped'] is None else 143


if __name__ == '__main__':
    sys.exit(main())
