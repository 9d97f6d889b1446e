"""cpc-train: CPC v2 pretraining, top to bottom: config, data, model, objective, loop, checkpoint.

    cpc-train --preset fmnist_tiny                              # CPU, ~minutes per epoch
    cpc-train --preset imagenet_r161 --data /imagenet/train     # CUDA
    torchrun --nproc_per_node 8 -m cpc_models.train --preset imagenet_r161 --data /imagenet/train

Every config value can be overridden on the command line (``--lr 1e-3 --objective.directions 2``); the resolved
config is printed at start and stored in every checkpoint. A run resumes from the newest checkpoint in
``--out-dir`` with ``--resume`` (default ``auto``), continuing exactly where it stopped (same batches, same
augmentation draws). SIGTERM saves a checkpoint at the end of the current step and exits.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from . import encoder as _encoder  # noqa: F401  (registers the cpc models with timm)
from .augment import PatchAugment, PatchAugmentConfig
from .data import ImageFolderDataset, TensorImageDataset, collate_skip, load_fashion_mnist
from .distributed import init_distributed
from .objective import CPCObjective
from .patches import patchify

__all__ = ['TrainConfig', 'PRESETS', 'train', 'main', 'NonFiniteLossError', 'latest_checkpoint']


# ============ config ============

@dataclass
class TrainConfig:
    # model
    model: str = 'cpcv2_resnet_tiny'  # timm architecture name
    model_args: Dict = field(default_factory=dict)  # extra kwargs for timm.create_model (patch_size, ...)
    # data
    data: str = 'fashion-mnist'  # 'fashion-mnist' or a folder of images (recursive, labels unused)
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = Debian package / $CPC_FASHION_MNIST_DIR)
    image_size: int = 0  # training crop; 0 = the model cfg's input size
    resize: int = 0  # short side before cropping (folders); 0 = image_size
    num_workers: int = 0
    # optimization
    batch_size: int = 64  # global batch (split over ranks)
    epochs: float = 1.0
    max_steps: int = 0  # 0 = from epochs
    lr: float = 2e-3
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 1e-4  # AdamW; not applied to norms and biases
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # objective and augmentation (see objective.py, augment.py)
    objective: Dict = field(default_factory=dict)
    augment: Dict = field(default_factory=dict)
    # hardware
    device: str = 'auto'  # auto = cuda if available
    bf16: bool = True  # autocast on CUDA
    channels_last: bool = True
    compile: bool = False
    grad_checkpointing: bool = False
    # bookkeeping
    out_dir: str = 'runs/cpc'
    resume: str = 'auto'  # auto = newest checkpoint in out_dir if any; 'none'; or a checkpoint folder
    save_every: int = 500  # steps
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    progress: bool = True


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


def _flatten(d: Dict, prefix: str = '') -> Dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ('objective', 'augment', 'model_args'):
            out[f'{prefix}{k}'] = v  # also settable as a whole, as JSON
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _parse_value(text: str, default):
    if isinstance(default, bool):
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
        raise argparse.ArgumentTypeError(f'expected true/false, got {text!r}')
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)(float(text)) if isinstance(default, int) and float(text).is_integer() else float(text)
    if isinstance(default, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v


def nested_defaults() -> Dict[str, Dict]:
    """Every settable key of the ``objective`` (CPCObjective kwargs) and ``augment`` (PatchAugmentConfig) groups."""
    sig = inspect.signature(CPCObjective.__init__).parameters
    objective = {k: _jsonable(p.default) for k, p in sig.items() if k not in ('self', 'latent_channels')}
    augment = {k: _jsonable(v) for k, v in dataclasses.asdict(PatchAugmentConfig()).items()}
    return dict(objective=objective, augment=augment)


def build_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Preset, then command-line overrides (``--key value``, nested ``--objective.offsets [1,2,3]``).

    The ``objective`` and ``augment`` groups are resolved in full (library defaults, then the preset, then the
    command line), so the printed and checkpointed config holds every value the run used.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--preset', default='fmnist_tiny', choices=sorted(PRESETS))
    known, rest = pre.parse_known_args(argv)
    base = dataclasses.asdict(TrainConfig())
    base.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[known.preset].items()})
    for group, defaults in nested_defaults().items():
        base[group] = {**defaults, **{k: _jsonable(v) for k, v in base[group].items()}}

    parser = argparse.ArgumentParser(
        prog='cpc-train', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[pre],
        allow_abbrev=False)
    flat = _flatten(base)
    for key, default in flat.items():
        parser.add_argument(f'--{key}', f'--{key.replace("_", "-")}', dest=key, default=None, metavar='V',
                            help=f'(default: {json.dumps(default)})')
    parser.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                        help='extra nested values not listed, e.g. --set objective.context_blocks=3')
    args = parser.parse_args(rest)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ('preset', 'set')}
    for kv in args.set:
        if '=' not in kv:
            parser.error(f'--set expects KEY=VALUE, got {kv!r}')
        k, v = kv.split('=', 1)
        overrides[k] = v
    for key, text in overrides.items():
        target, leaf = base, key
        if '.' in key:
            group, leaf = key.split('.', 1)
            if group not in ('objective', 'augment', 'model_args'):
                parser.error(f'unknown option --{key}')
            if group != 'model_args' and key not in flat:  # model_args: any timm.create_model kwarg
                parser.error(f'unknown option --{key}; the {group} group has: {", ".join(sorted(base[group]))}')
            target = base[group]
        elif key not in flat:
            parser.error(f'unknown option --{key}')
        try:
            value = _parse_value(text, flat.get(key, None))
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f'--{key} {text!r}: {e}')
        if isinstance(flat.get(key), int) and not isinstance(flat.get(key), bool) and not isinstance(value, int):
            parser.error(f'--{key} expects an integer, got {text!r}')
        if key in ('objective', 'augment', 'model_args'):
            if not isinstance(value, dict):
                parser.error(f'--{key} expects a JSON object, got {text!r}')
            value = {**base[key], **value}  # a group given as JSON updates the group
        target[leaf] = value
    return TrainConfig(**base)


def latest_checkpoint(out_dir) -> Optional[Path]:
    """Newest complete checkpoint folder in out_dir/checkpoints (temporary folders are ignored)."""
    ckpts = sorted((Path(out_dir) / 'checkpoints').glob('step_*[0-9]'))
    return ckpts[-1] if ckpts else None


class NonFiniteLossError(RuntimeError):
    pass


class StepSampler(Sampler):
    """Global batches from a seeded per-epoch permutation; each rank takes its contiguous slice.

    Starting at ``start_step`` replays nothing and skips nothing, which makes resume exact.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int = 0):
        if global_batch % world:
            raise ValueError(f'batch_size {global_batch} must be divisible by the number of processes {world}.')
        if n < global_batch:
            raise ValueError(f'The dataset has {n} images, fewer than one batch of {global_batch}; lower --batch-size.')
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.steps_per_epoch = n // global_batch
        self.start_step = start_step

    def __iter__(self) -> Iterator[List[int]]:
        step = self.start_step
        local = self.global_batch // self.world
        while True:
            epoch, i = divmod(step, self.steps_per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            start = i * self.global_batch + self.rank * local
            yield perm[start:start + local].tolist()
            step += 1

    def __len__(self) -> int:
        return self.steps_per_epoch


class CPCModel(nn.Module):
    """Encoder + objective in one module, so DDP sees every parameter: patches -> ObjectiveOutput."""

    def __init__(self, encoder: nn.Module, objective: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.objective = objective

    def forward(self, patches: torch.Tensor):
        return self.objective(self.encoder.forward_patches(patches))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _save_checkpoint(out_dir: Path, step: int, cfg: TrainConfig, model: CPCModel, optimizer,
                     aug_states: List[torch.Tensor], metrics: Dict, keep_last: int) -> Path:
    """Write out_dir/checkpoints/step_N atomically (temporary folder, then rename); keep the newest keep_last."""
    root = out_dir / 'checkpoints'
    final = root / f'step_{step:08d}'
    tmp = root / f'.tmp_step_{step:08d}_{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, tmp / 'encoder.safetensors')
    save_file({k: v.contiguous() for k, v in model.objective.state_dict().items()}, tmp / 'objective.safetensors')
    state = dict(step=step, optimizer=optimizer.state_dict(), rng_cpu=torch.get_rng_state(), rng_aug=aug_states,
                 wall_time_s=metrics.get('wall_time_s', 0.0))
    if torch.cuda.is_available():
        state['rng_cuda'] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / 'state.pt')
    (tmp / 'config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (tmp / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    with open(tmp / 'config.json', 'rb') as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in sorted(root.glob('step_*[0-9]'))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(kept))
    os.replace(tmp, path)


def _memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: TrainConfig) -> Dict:
    """Run (or resume) pretraining; returns the final metrics. Raises NonFiniteLossError on NaN/inf loss."""
    # ============ distributed and device ============
    if cfg.data != 'fashion-mnist':
        if not cfg.data:
            raise ValueError("This preset needs --data: a folder of training images (e.g. ImageNet's train/), "
                             "or --data fashion-mnist.")
        if not Path(cfg.data).is_dir():
            raise FileNotFoundError(f'--data {cfg.data}: no such folder (pass a folder of JPEG/PNG images, searched '
                                    f'recursively, or fashion-mnist).')
    rank, world, device = init_distributed()
    if cfg.device != 'auto':
        device = torch.device(cfg.device)
    main_process = rank == 0
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)

    # ============ model and objective ============
    encoder = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.model_args)
    encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    objective = CPCObjective(encoder.num_features, **cfg.objective)
    model = CPCModel(encoder, objective).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_cfg = timm.data.resolve_model_data_config(encoder)
    in_chans, img_size = data_cfg['input_size'][0], cfg.image_size or data_cfg['input_size'][-1]
    mean = torch.tensor(data_cfg['mean'], device=device).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg['std'], device=device).view(1, -1, 1, 1)
    rows, cols = encoder.grid_size(img_size)
    augment = PatchAugment(PatchAugmentConfig(**cfg.augment))
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    # ============ data ============
    if cfg.data == 'fashion-mnist':
        images, _ = load_fashion_mnist('train', cfg.data_dir or None)
        if in_chans != 1:
            images = images.expand(-1, in_chans, -1, -1)
        dataset = TensorImageDataset(images)
    else:
        if not cfg.data:
            raise ValueError("This preset needs --data: a folder of training images (e.g. ImageNet's train/).")
        dataset = ImageFolderDataset(cfg.data, img_size, in_chans, resize=cfg.resize or None, train=True)

    # ============ optimizer ============
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == 'cuda')

    # ============ resume ============
    step, wall_before = 0, 0.0
    resume_from = None if cfg.resume == 'none' else (
        latest_checkpoint(out_dir) if cfg.resume == 'auto' else Path(cfg.resume))
    if resume_from is not None:
        if not (resume_from / 'state.pt').is_file():
            raise FileNotFoundError(f'--resume {resume_from}: not a checkpoint folder (no state.pt); pass a '
                                    f'{out_dir}/checkpoints/step_* folder, auto or none.')
        model.encoder.load_state_dict(load_file(resume_from / 'encoder.safetensors', device=str(device)))
        model.objective.load_state_dict(load_file(resume_from / 'objective.safetensors', device=str(device)))
        state = torch.load(resume_from / 'state.pt', map_location='cpu', weights_only=True)
        optimizer.load_state_dict(state['optimizer'])
        torch.set_rng_state(state['rng_cpu'])
        if len(state['rng_aug']) != world:
            raise ValueError(f'{resume_from} was written by {len(state["rng_aug"])} process(es); resume it with '
                             f'the same number (now {world}) to continue exactly.')
        aug_gen.set_state(state['rng_aug'][rank])
        if 'rng_cuda' in state and device.type == 'cuda':
            torch.cuda.set_rng_state_all(state['rng_cuda'])
        step = state['step']
        wall_before = float(state.get('wall_time_s', 0.0))
        if main_process:
            print(f'resumed from {resume_from} at step {step}')
            saved = json.loads((resume_from / 'config.json').read_text())
            changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                       if k not in ('resume', 'progress') and saved.get(k) != v}
            if changed:  # e.g. a longer --max-steps is fine; a different model or lr changes the run
                print('warning: the resumed run differs from the checkpoint\'s config in '
                      + ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items()), file=sys.stderr)
            _trim_log(out_dir / 'metrics.jsonl', step)

    sampler = StepSampler(len(dataset), cfg.batch_size, rank, world, cfg.seed, start_step=step)
    local_batch = cfg.batch_size // world
    total_steps = cfg.max_steps or int(cfg.epochs * sampler.steps_per_epoch)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_skip, num_workers=cfg.num_workers,
        pin_memory=device.type == 'cuda', persistent_workers=cfg.num_workers > 0)
    ddp_model = DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        encoder.forward_trunk = torch.compile(encoder.forward_trunk)

    if main_process:
        print('config:', json.dumps(dataclasses.asdict(cfg), indent=2))
        n_params = sum(p.numel() for p in encoder.parameters())
        print(f'{cfg.model}: {n_params / 1e6:.2f}M encoder parameters; {img_size}px images -> {rows}x{cols} grid of '
              f'{encoder.patch_size}px patches; {world} process(es); {total_steps} steps on {device}')
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / 'checkpoints').glob('.tmp_step_*'):  # left by a killed run mid-save
            shutil.rmtree(stale, ignore_errors=True)

    stop = {'signal': None}

    def _on_sigterm(signum, frame):
        stop['signal'] = signum

    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm) if main_process or world > 1 else None

    # ============ training loop ============
    metrics: Dict = {}
    last_ckpt = latest_checkpoint(out_dir) if main_process else None
    skipped_total = 0
    log_file = open(out_dir / 'metrics.jsonl', 'a') if main_process else None
    bar = tqdm(total=total_steps, initial=step, disable=not (main_process and cfg.progress), desc='cpc-train')
    t_start = t_last = time.perf_counter()
    images_since = 0
    model.train()
    try:
        for batch, skipped in loader:
            if step >= total_steps:
                break
            if batch is None:
                skipped_total += skipped
                continue
            for g in optimizer.param_groups:
                g['lr'] = lr_at(step, cfg, total_steps)
            if world > 1 and batch.shape[0] < local_batch:  # unreadable images: refill so every rank has the same
                batch = batch[torch.arange(local_batch) % batch.shape[0]]  # shape (the target gather needs it)
            x = batch.to(device, non_blocking=True).float().div_(255)
            b = x.shape[0]
            p = patchify(x, encoder.patch_size, encoder.patch_stride)  # (B, R, W, C, P, P)
            flat = augment(p.reshape(-1, *p.shape[3:]), aug_gen)  # independent draws for every patch
            flat = (flat - mean) / std
            if cfg.channels_last:
                flat = flat.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == 'cuda'):
                out = ddp_model(flat.view(b, *p.shape[1:3], *flat.shape[1:]))
            loss = out.loss
            # Logged values are the mean over ranks (= the single-process values on the global batch);
            # skipped images are summed. Every rank sees the same numbers, so all stop together on NaN.
            stats = torch.stack([loss.detach().float(), *[v.detach().float() for v in out.metrics.values()],
                                 torch.tensor(float(skipped), device=device)])
            if world > 1:
                torch.distributed.all_reduce(stats)
                stats[:-1] /= world
            stats = stats.tolist()
            skipped_total += int(stats[-1])
            if not math.isfinite(stats[0]):
                raise NonFiniteLossError(
                    f'Loss is {stats[0]} at step {step}; stopping. Last good checkpoint: '
                    f'{last_ckpt or "none"}. Lower --lr, raise --warmup-steps or check the data, then resume '
                    f'with --resume {last_ckpt or "none"}.')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float('inf'))
            optimizer.step()
            step += 1
            images_since += b * world
            bar.update(1)

            if main_process and (step % cfg.log_every == 0 or step == total_steps):
                dt = time.perf_counter() - t_last
                metrics = dict(
                    step=step, epoch=step / sampler.steps_per_epoch, loss=stats[0],
                    **dict(zip(out.metrics, stats[1:-1])),
                    lr=optimizer.param_groups[0]['lr'], grad_norm=float(grad_norm),
                    images_per_s=images_since / dt, patches_per_s=images_since * rows * cols / dt,
                    memory_mb=_memory_mb(device), skipped_images=skipped_total,
                    wall_time_s=wall_before + time.perf_counter() - t_start)
                log_file.write(json.dumps(metrics) + '\n')
                log_file.flush()
                bar.set_postfix(loss=f'{metrics["loss"]:.3f}', acc=f'{metrics.get("acc", 0):.3f}',
                                img_s=f'{metrics["images_per_s"]:.0f}')
                t_last, images_since = time.perf_counter(), 0
            stopping = stop['signal'] is not None
            if world > 1:  # every rank must agree to stop, or the next collective hangs
                flag = torch.tensor([float(stopping)], device=device)
                torch.distributed.all_reduce(flag)
                stopping = bool(flag.item())
            if step % cfg.save_every == 0 or step == total_steps or stopping:
                aug_states = [aug_gen.get_state()]
                if world > 1:  # every rank draws its own augmentations: keep each rank's generator state
                    aug_states = [None] * world
                    torch.distributed.all_gather_object(aug_states, aug_gen.get_state().cpu())
                if main_process:
                    wall = wall_before + time.perf_counter() - t_start
                    last_ckpt = _save_checkpoint(out_dir, step, cfg, model, optimizer, aug_states,
                                                 dict(metrics, wall_time_s=wall), cfg.keep_last)
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
