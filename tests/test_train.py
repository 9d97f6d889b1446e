"""cpc-train end to end on CPU: the tiny encoder on real Fashion-MNIST images, a handful of steps per run.

No mocks. Interruptions are real signals sent to real subprocesses, DDP is two real gloo processes started by
torchrun, checkpoints are read back with safetensors / ``torch.load(weights_only=True)``, and export goes
through timm's own Hub loading code (offline, from a Hugging Face cache written in tmp_path).
Most runs call ``train.main(argv)`` in this process (imports are the slow part of a subprocess).
"""
import copy
import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models import config, hub, train
from cpc_models.augment import PatchAugment, PatchAugmentConfig
from cpc_models.data import load_fashion_mnist
from cpc_models.images import find_images
from cpc_models.objective import CPCObjective, ObjectiveConfig
from conftest import wait_for

ARCH = 'cpcv2_resnet_tiny'
# Small and fast, but the fmnist_tiny preset's real recipe otherwise (augmentation on, 4 directions, offsets 2, 3).
FAST = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--batch-size', '8', '--objective.context_hidden', '16',
        '--warmup-steps', '5', '--progress', '0', '--num-workers', '0']
STATE_FILES = ['config.json', 'encoder.safetensors', 'metrics.json', 'objective.safetensors', 'state.pt']

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # Same thread count as the subprocesses (OMP_NUM_THREADS=1), so in-process and subprocess runs are bit-comparable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    return env


def _log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / 'metrics.jsonl').read_text().splitlines()]


def _losses(out_dir):
    """{step: loss}, the last logged value of each step."""
    return {m['step']: m['loss'] for m in _log(out_dir)}


def _ckpts(out_dir):
    return sorted(p.name for p in (Path(out_dir) / 'checkpoints').iterdir())


def _weights(ckpt):
    return {**{f'encoder.{k}': v for k, v in load_file(Path(ckpt) / 'encoder.safetensors').items()},
            **{f'objective.{k}': v for k, v in load_file(Path(ckpt) / 'objective.safetensors').items()}}


def _assert_equal_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def _run(argv, capsys=None):
    rc = train.main(argv)
    return (rc, *capsys.readouterr()) if capsys is not None else rc


# ============ 1. learning on real images ============

def test_learns_on_fashion_mnist(tmp_path):
    out = tmp_path / 'run'
    assert _run(FAST + ['--max-steps', '60', '--lr', '5e-3', '--log-every', '1', '--out-dir', str(out)]) == 0
    log = _log(out)
    assert [m['step'] for m in log] == list(range(1, 61))
    # patches per image: the positions of the latent grid the encoder computes from a whole 28 px image
    per_image = timm.create_model(ARCH, num_classes=0).forward_features(torch.zeros(1, 1, 28, 28))[0, 0].numel()
    directions, offsets = ('down', 'up', 'right', 'left'), (2, 3)
    for m in log:
        for key in ('loss', 'acc', 'lr', 'grad_norm', 'images_per_s', 'patches_per_s', 'memory_mb', 'skipped_images',
                    'epoch', 'wall_time_s', *(f'acc/{d}/k{k}' for d in directions for k in offsets)):
            assert key in m and math.isfinite(m[key]), key
        assert m['images_per_s'] > 0 and m['patches_per_s'] == pytest.approx(per_image * m['images_per_s'])
        assert m['memory_mb'] > 0 and m['skipped_images'] == 0
    # warmup (linear over 5 steps) then cosine decay
    lrs = [m['lr'] for m in log]
    assert lrs[:5] == pytest.approx([5e-3 * (i + 1) / 5 for i in range(5)])
    assert max(lrs) == pytest.approx(5e-3) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    # InfoNCE over 8 images x 36 patches: chance is log(288) = 5.66; the loss must fall well below both
    losses = [m['loss'] for m in log]
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert first == pytest.approx(math.log(8 * 36), abs=0.15)
    assert last < first - 0.25 and last < math.log(8 * 36) - 0.25, (first, last)
    assert np.mean([m['acc'] for m in log[-10:]]) > 2 / (8 * 36)  # above chance too


# ============ 2. exact resume ============

RESUME = FAST + ['--max-steps', '16', '--save-every', '4', '--log-every', '1', '--keep-last', '10', '--lr', '5e-3']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The uninterrupted run (augmentation on) that interrupted runs must reproduce bit for bit."""
    out = tmp_path_factory.mktemp('reference')
    assert _run(RESUME + ['--out-dir', str(out)]) == 0
    return out


def _start(out, extra=()):
    # a session of its own, so that a signal can go to the whole process group, as Ctrl-C in a terminal does
    return subprocess.Popen([sys.executable, '-m', 'cpc_models.train', *RESUME, '--out-dir', str(out), *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _assert_same_run(out, reference):
    log = _log(out)
    assert [m['step'] for m in log] == list(range(1, 17))  # replayed steps are not logged twice
    assert _losses(out) == _losses(reference)  # exact float equality, every step
    assert [m['acc'] for m in log] == [m['acc'] for m in _log(reference)]
    _assert_equal_weights(out / 'checkpoints' / 'step_00000016', reference / 'checkpoints' / 'step_00000016')
    s1 = torch.load(out / 'checkpoints' / 'step_00000016' / 'state.pt', weights_only=True)
    s2 = torch.load(reference / 'checkpoints' / 'step_00000016' / 'state.pt', weights_only=True)
    for k, v in s1['optimizer']['state'].items():
        for name in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(v[name], s2['optimizer']['state'][k][name]), (k, name)
    assert all(torch.equal(a, b) for a, b in zip(s1['rng_aug'], s2['rng_aug']))


@pytest.mark.parametrize('sig, status, workers', [(signal.SIGTERM, 143, 0), (signal.SIGINT, 130, 1)],
                         ids=['SIGTERM', 'SIGINT'])
@pytest.mark.slow
def test_resume_after_a_signal_is_exact(sig, status, workers, tmp_path, reference, capsys):
    """SIGTERM (to the process) and Ctrl-C (SIGINT to the process group: the DataLoader worker gets it too) both
    save a checkpoint at the step where they land, print the resume command, and resuming reproduces the
    uninterrupted run bit for bit."""
    out = tmp_path / 'run'
    proc = _start(out, ['--num-workers', str(workers)])
    wait_for(proc, lambda: (out / 'metrics.jsonl').is_file() and len(_log(out)) >= 3, timeout=120)
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    assert 'Traceback' not in stderr, stderr
    stopped = int(_ckpts(out)[-1].split('_')[1])
    assert 3 <= stopped < 16, _ckpts(out)  # a checkpoint at the step where the signal landed
    assert f'stopped by {sig.name} at step {stopped}' in stdout
    resume = stdout.split('resume with: ', 1)[1].splitlines()[0].split()
    assert resume[0] == 'cpc-train' and resume[-2:] == ['--resume', 'auto']
    assert resume[1:-2] == [*RESUME, '--out-dir', str(out), '--num-workers', str(workers)]
    rc, stdout, _ = _run(resume[1:], capsys)  # the printed command, as given
    assert rc == 0 and f'resumed from {out / "checkpoints" / f"step_{stopped:08d}"} at step {stopped}' in stdout
    _assert_same_run(out, reference)


def test_resume_after_sigkill_is_exact(tmp_path, reference, capsys):
    out = tmp_path / 'run'
    proc = _start(out)
    wait_for(proc, lambda: (out / 'checkpoints' / 'step_00000004').is_dir() and len(_log(out)) >= 6,
             timeout=120)
    proc.kill()
    proc.communicate(timeout=60)
    last_ckpt = int(_ckpts(out)[-1].split('_')[1])
    assert last_ckpt < max(_losses(out)) < 16  # steps after the checkpoint were logged, then lost
    # a save torn by the kill leaves a temporary folder: never taken for a checkpoint, removed by the next run
    torn = out / 'checkpoints' / '.tmp_step_00000099_12345'
    torn.mkdir()
    (torn / 'encoder.safetensors').write_bytes(b'partial')
    assert train.latest_checkpoint(out).name == f'step_{last_ckpt:08d}'
    rc, stdout, _ = _run(RESUME + ['--out-dir', str(out)], capsys)  # --resume auto is the default
    assert rc == 0 and f'at step {last_ckpt}' in stdout
    assert not torn.exists()
    _assert_same_run(out, reference)


# ============ 3. the training step, and DDP: 2 gloo processes == 1 process on the same draws ============

DDP = FAST + ['--max-steps', '3', '--log-every', '1', '--save-every', '1', '--keep-last', '10', '--lr', '5e-3']
# Two processes sum the same numbers in another order than one: results agree up to float32 rounding, never bitwise.
F32_TOL = 2 ** 8 * torch.finfo(torch.float32).eps  # 3e-5


def test_sampler_gives_each_rank_a_contiguous_slice():
    one = iter(train.StepSampler(100, 8, 0, 1, seed=3))
    ranks = [iter(train.StepSampler(100, 8, r, 2, seed=3)) for r in range(2)]
    for _ in range(30):  # crosses epoch boundaries (12 steps per epoch)
        full = next(one)
        assert [next(r) for r in ranks] == [full[:4], full[4:]]
    resumed = iter(train.StepSampler(100, 8, 0, 1, seed=3, start_step=13))
    fresh = iter(train.StepSampler(100, 8, 0, 1, seed=3))
    assert next(resumed) == [next(fresh) for _ in range(14)][-1]
    with pytest.raises(ValueError, match='divisible'):
        train.StepSampler(100, 9, 0, 2, seed=0)
    with pytest.raises(ValueError, match='fewer than one batch'):
        train.StepSampler(5, 8, 0, 1, seed=0)


def test_sampler_epochs_are_permutations_in_a_new_order():
    """Each epoch takes its steps_per_epoch batches from one permutation of the images: no image twice in an
    epoch, n // batch * batch distinct ones; the next epoch, and another seed, visit them in another order."""
    n, batch = 50, 8
    sampler = train.StepSampler(n, batch, 0, 1, seed=5)
    assert len(sampler) == sampler.steps_per_epoch == 6
    it = iter(sampler)
    epochs = [[i for _ in range(6) for i in next(it)] for _ in range(3)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == 48 and set(epoch) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    other = iter(train.StepSampler(n, batch, 0, 1, seed=6))
    assert [i for _ in range(6) for i in next(other)] != epochs[0]
    assert [len(next(iter(train.StepSampler(n, batch, r, 4, seed=5)))) for r in range(4)] == [2] * 4
    exact = iter(train.StepSampler(8, 8, 0, 1, seed=5))  # a dataset of exactly one batch: one step per epoch
    assert [sorted(next(exact)) for _ in range(2)] == [list(range(8))] * 2


def _cut_patches(x, size, stride):
    """(B, C, H, W) -> (B, rows, cols, C, size, size) with Tensor.unfold (not the package's patchify)."""
    return x.unfold(2, size, stride).unfold(3, size, stride).permute(0, 2, 3, 1, 4, 5)


def _reference_step(model, images_by_rank, generators, cfg, bf16=False):
    """A training step's loss and gradients, written out: each rank's uint8 images -> [0, 1] -> patches ->
    PatchAugment with that rank's generator -> timm's mean/std; all ranks' patches then go through the encoder and
    the objective together, in one process (the global batch), and backward.

    Returns (loss, {parameter name: gradient}, global gradient norm in float64).
    """
    enc = model.encoder
    data_cfg = timm.data.resolve_model_data_config(enc)
    mean, std = torch.tensor(data_cfg['mean']).view(-1, 1, 1), torch.tensor(data_cfg['std']).view(-1, 1, 1)
    augment, grids = PatchAugment(cfg.augment), []
    for images, generator in zip(images_by_rank, generators, strict=True):
        p = _cut_patches(images.float() / 255, enc.patch_size, enc.patch_stride)
        flat = augment(p.reshape(-1, *p.shape[3:]), generator)
        grids.append(((flat - mean) / std).view(p.shape))
    model.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        loss = model.objective(enc.forward_patches(torch.cat(grids))).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def _clipped(grads, norm, max_norm):
    """torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) where that is below 1."""
    coef = min(1.0, max_norm / (norm + 1e-6))
    return {n: g * coef for n, g in grads.items()}


def _optimizer_order(model):
    """Parameter names in the order of the optimizer's state (build_optimizer: weights first, then 1-D ones)."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.ndim > 1] + [n for n, p in named if p.ndim <= 1]


@pytest.fixture
def gloo_world_of_one():
    """A real one-process gloo group, so that DistributedDataParallel can wrap a model in this process."""
    torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize('variant', ['plain', 'ddp', 'bf16', 'no_clip'])
def test_train_step_is_the_recipe_written_out(variant, request):
    """One train_step against _reference_step and AdamW's first step by hand: the loss, the gradient norm before
    clipping, the clipped gradients (AdamW's first moment), the updated parameters, the augmentation draws
    consumed and the learning rate of every parameter group; on a model wrapped in DistributedDataParallel too,
    under bf16 autocast (CPU) and with clipping off."""
    cfg = dataclasses.replace(train.build_config(FAST + ['--seed', '3']), grad_clip=0.0 if variant == 'no_clip'
                              else 0.02)  # 0.02: well below this step's gradient norm (~0.1), so clipping acts
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, torch.device('cpu'))
    ref_model = copy.deepcopy(model)
    images, _ = load_fashion_mnist('train')
    images = images[:3]
    setup = train.build_step_setup(cfg, model.encoder, torch.device('cpu'), rank=1)
    setup = dataclasses.replace(setup, bf16=variant == 'bf16', channels_last=variant == 'ddp')
    optimizer = train.build_optimizer(cfg, model)
    for p in model.parameters():  # stale gradients from an earlier step: the step must not add to them
        p.grad = torch.ones_like(p)
    if variant == 'ddp':
        request.getfixturevalue('gloo_world_of_one')
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if variant == 'ddp' else model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 0.02  # not cfg.lr, the optimizer's initial value

    out, grad_norm = train.train_step(wrapped, images, optimizer, setup, lr)

    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 1)  # rank 1's stream (docs/training.md)
    loss, grads, norm = _reference_step(ref_model, [images], [generator], cfg, bf16=variant == 'bf16')
    assert torch.equal(setup.generator.get_state(), generator.get_state())  # the same draws, all of them
    assert out.loss.item() == pytest.approx(loss.item(), rel=F32_TOL)
    assert float(grad_norm) == pytest.approx(norm, rel=F32_TOL)  # before clipping
    assert [g['lr'] for g in optimizer.param_groups] == [lr, lr]
    clipped = _clipped(grads, norm, cfg.grad_clip) if cfg.grad_clip else grads
    scale = max(float(g.abs().max()) for g in clipped.values())
    if variant == 'bf16':  # autocast was on: the fp32 step's gradients are measurably different
        _, fp32_grads, fp32_norm = _reference_step(copy.deepcopy(ref_model), [images], [torch.Generator().manual_seed(
            cfg.seed * 1000 + 1)], cfg)
        fp32_grads = _clipped(fp32_grads, fp32_norm, cfg.grad_clip)
        assert max(float((fp32_grads[n] - g).abs().max()) for n, g in clipped.items()) > 100 * F32_TOL * scale
    assert norm > 2 * cfg.grad_clip or not cfg.grad_clip, norm  # clipping acts
    beta1, beta2 = cfg.betas
    wds = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    for i, name in enumerate(_optimizer_order(model)):
        p, g = dict(model.named_parameters())[name], clipped[name]
        state = optimizer.state[p]
        torch.testing.assert_close(state['exp_avg'], (1 - beta1) * g, rtol=F32_TOL, atol=F32_TOL * scale, msg=name)
        torch.testing.assert_close(state['exp_avg_sq'], (1 - beta2) * g * g, rtol=1e-4,
                                   atol=(F32_TOL * scale) ** 2, msg=name)
        # AdamW's first step: decay, then lr * g / (|g| + eps) (the bias corrections cancel); where |g| is at the
        # rounding level the sign of g is not determined, so only clear gradients are compared
        assert wds[id(p)] == (cfg.weight_decay if p.ndim > 1 else 0.0), name
        expected = before[name] * (1 - lr * wds[id(p)]) - lr * g / (g.abs() + 1e-8)
        clear = g.abs() > 1e-3 * scale
        torch.testing.assert_close(p.detach()[clear], expected[clear], rtol=1e-5, atol=1e-3 * lr, msg=name)


def test_train_step_labels_its_parts_for_the_profiler():
    """benchmarks/profile_step.py groups a step's time by these record_function labels."""
    cfg = train.build_config(FAST)
    model = train.build_model(cfg, torch.device('cpu'))
    setup = train.build_step_setup(cfg, model.encoder, torch.device('cpu'))
    optimizer = train.build_optimizer(cfg, model)
    images, _ = load_fashion_mnist('train')
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train.train_step(model, images[:2], optimizer, setup, 1e-3)
    names = {e.name for e in prof.events()}
    assert {f'cpc::{part}' for part in ('augment', 'encoder', 'objective', 'backward', 'optimizer')} <= names


def test_build_step_setup_follows_the_config():
    """Rank r's augmentation stream is seeded seed * 1000 + r (docs/training.md); normalization is timm's
    data config of the encoder; bf16 only on CUDA; the augmentation, clipping and layout come from the config."""
    cfg = dataclasses.replace(train.build_config(FAST + ['--seed', '7', '--augment.hflip', '0.25']), bf16=True,
                              channels_last=True, grad_clip=0.3)
    encoder = timm.create_model(ARCH, num_classes=0)
    setups = [train.build_step_setup(cfg, encoder, torch.device('cpu'), rank=r) for r in range(2)]
    assert [s.generator.initial_seed() for s in setups] == [7000, 7001]
    assert train.build_step_setup(cfg, encoder, torch.device('cpu')).generator.initial_seed() == 7000  # rank 0
    data_cfg = timm.data.resolve_model_data_config(encoder)
    for s in setups:
        assert s.mean.shape == s.std.shape == (1, 1, 1, 1)
        assert s.mean.flatten().tolist() == pytest.approx(list(data_cfg['mean']))
        assert s.std.flatten().tolist() == pytest.approx(list(data_cfg['std']))
        assert s.augment.cfg == cfg.augment and s.augment.cfg.hflip == 0.25
        assert (s.bf16, s.channels_last, s.grad_clip) == (False, True, 0.3)  # bf16 autocast is for CUDA only
        assert s.generator.device.type == s.mean.device.type == 'cpu'
    with torch.device('meta'):  # an RGB encoder: three channel means, broadcast over (N, C, P, P)
        rgb = timm.create_model('cpcv2_resnet50', num_classes=0)
    s = train.build_step_setup(cfg, rgb, torch.device('cpu'))
    assert s.mean.shape == s.std.shape == (1, 3, 1, 1) and s.mean.device.type == 'cpu'
    assert s.std.flatten().tolist() == pytest.approx(list(timm.data.resolve_model_data_config(rgb)['std']))


def _step_gradients(ckpt, model):
    """{name: gradient (after clipping)} of the first optimizer step: AdamW's first moment is (1 - beta1) * g."""
    state = torch.load(Path(ckpt) / 'state.pt', weights_only=True)
    beta1 = json.loads((Path(ckpt) / 'config.json').read_text())['betas'][0]
    assert state['step'] == 1
    names = _optimizer_order(model)
    assert sorted(state['optimizer']['state']) == list(range(len(names)))  # every parameter got a gradient
    return {names[k]: v['exp_avg'] / (1 - beta1) for k, v in state['optimizer']['state'].items()}


def _assert_step_matches(log, ckpt, reference):
    loss, grads, norm = reference
    assert log[0]['loss'] == pytest.approx(loss, rel=F32_TOL)  # the global-batch loss, not one rank's
    assert log[0]['grad_norm'] == pytest.approx(norm, rel=F32_TOL)
    scale = max(g.abs().max() for g in grads.values())  # rounding errors scale with the largest summands
    got = _step_gradients(ckpt, _ddp_reference_model())
    assert got.keys() == grads.keys()
    for k in grads:  # DDP averages the ranks' gradients (a sum, or rank 0's alone, would be far off)
        torch.testing.assert_close(got[k], grads[k], rtol=F32_TOL, atol=F32_TOL * scale, msg=f'parameter {k}')


def _ddp_reference_model():
    cfg = train.build_config(DDP)
    torch.manual_seed(cfg.seed)  # as train() does before building the model
    return train.build_model(cfg, torch.device('cpu'))


def _ddp_reference(world, seeds=None):
    """Step 1 of the DDP recipe in one process: the first global batch, rank r's slice augmented with the
    generator seed * 1000 + r (or ``seeds``), the whole batch through the model.

    Returns (loss, {name: clipped gradient}, gradient norm before clipping)."""
    cfg = train.build_config(DDP)
    images, _ = load_fashion_mnist('train')
    batch = next(iter(train.StepSampler(len(images), cfg.batch_size, 0, 1, cfg.seed)))
    slices = images[batch].chunk(world)
    seeds = seeds or [cfg.seed * 1000 + r for r in range(world)]
    loss, grads, norm = _reference_step(_ddp_reference_model(), slices,
                                        [torch.Generator().manual_seed(s) for s in seeds], cfg)
    return loss.item(), _clipped(grads, norm, cfg.grad_clip), norm


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, capsys):
    """The real recipe, augmentation on: with 2 processes, rank r augments its half of the global batch with its
    own generator (seed * 1000 + r), so 2 processes and 1 draw different augmentations and their runs differ.
    What is equal: step 1 of each run equals one process computing the loss of the same global batch with the same
    per-rank draws (_ddp_reference), in loss and in every parameter's (clipped) gradient."""
    single, ddp = tmp_path / 'single', tmp_path / 'ddp'
    assert _run(DDP + ['--out-dir', str(single)]) == 0
    res = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         '-m', 'cpc_models.train', *DDP, '--out-dir', str(ddp)],
        env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '2 process(es)' in res.stdout
    a, b = _log(single), _log(ddp)
    assert [m['step'] for m in b] == [1, 2, 3] and all(math.isfinite(m['loss']) for m in b)
    # Step 1 starts from the same weights on the same global batch and draws, so its loss and gradients are the
    # same numbers summed in another order. Later steps are not compared: Adam divides by sqrt(v), which turns a
    # rounding-level difference in a near-zero gradient (objective.target_proj.bias's is exactly zero in exact
    # arithmetic) into a full lr-sized step, and the runs part.
    one_process, two_ranks = _ddp_reference(1), _ddp_reference(2)
    _assert_step_matches(a, single / 'checkpoints' / 'step_00000001', one_process)
    _assert_step_matches(b, ddp / 'checkpoints' / 'step_00000001', two_ranks)
    # the per-rank streams matter: both ranks on rank 0's stream, or one process's draws, give another step
    cfg = train.build_config(DDP)
    same_stream = _ddp_reference(2, [cfg.seed * 1000] * 2)
    scale = max(float(g.abs().max()) for g in two_ranks[1].values())
    for other in (same_stream, one_process):  # (the loss at step 1 is near log(candidates) whatever the draws)
        assert max(float((other[1][n] - g).abs().max()) for n, g in two_ranks[1].items()) > 100 * F32_TOL * scale
    state = torch.load(ddp / 'checkpoints' / 'step_00000003' / 'state.pt', weights_only=True)
    assert len(state['rng_aug']) == 2  # one augmentation generator state per rank
    # resuming with another world size continues (the image order: tests/test_elastic.py), and says so
    rc, out, _ = _run(DDP + ['--out-dir', str(tmp_path / 'other'), '--max-steps', '4',
                             '--resume', str(ddp / 'checkpoints' / 'step_00000002')], capsys)
    assert rc == 0
    assert 'written by 2 process(es), now 1: same image order, augmentation streams reseeded' in out


# ============ 4. checkpoints ============

@pytest.fixture(scope='module')
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('short') / 'run'
    argv = FAST + ['--max-steps', '7', '--save-every', '2', '--keep-last', '2', '--log-every', '3',
                   '--out-dir', str(out), '--objective.directions', '2']
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert train.main(argv) == 0
    return out, argv, buf.getvalue()


def test_checkpoints_atomic_complete_and_pruned(short_run):
    out, argv, stdout = short_run
    # steps 2, 4, 6 and the final 7 were saved; keep_last=2 leaves the newest two, and no temporary folder
    assert _ckpts(out) == ['step_00000006', 'step_00000007']
    for ckpt in (out / 'checkpoints').iterdir():
        assert sorted(p.name for p in ckpt.iterdir()) == STATE_FILES
    last = out / 'checkpoints' / 'step_00000007'
    state = torch.load(last / 'state.pt', weights_only=True)
    assert state['step'] == 7 and state['optimizer']['state'] and len(state['rng_aug']) == 1
    assert state['wall_time_s'] > 0
    enc = load_file(last / 'encoder.safetensors')
    model = timm.create_model(ARCH, num_classes=0)
    assert enc.keys() == model.state_dict().keys()
    obj = load_file(last / 'objective.safetensors')
    assert any(k.startswith('predictors.up.k3') for k in obj) and not any('right' in k for k in obj)
    # config.json is the resolved config, as printed on stdout, and rebuilds the run
    saved = json.loads((last / 'config.json').read_text())
    assert saved == config.to_dict(train.build_config(argv))
    assert config.from_dict(train.TrainConfig, saved) == train.build_config(argv)  # and rebuilds the config
    assert saved['objective']['directions'] == 2 and saved['objective']['target_dim'] == 64  # library default
    assert saved['augment']['jitter'] == 1 and saved['augment']['hflip'] == 0.5  # preset, library default
    printed = stdout.split('config: ', 1)[1]
    assert json.loads(printed[:printed.index('\n}') + 2]) == saved
    metrics = json.loads((last / 'metrics.json').read_text())
    assert metrics['step'] == 7 and 'loss' in metrics  # the last logged metrics (every 3 steps and the last)


# ============ 5. non-finite loss ============

def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path, capsys):
    out = tmp_path / 'run'
    rc, _, err = _run(FAST + ['--lr', '1e30', '--warmup-steps', '1', '--grad-clip', '0', '--max-steps', '20',
                              '--save-every', '1', '--log-every', '1', '--out-dir', str(out)], capsys)
    assert rc == 2
    last = max(_losses(out))
    assert f'at step {last}; stopping. Last good checkpoint: {out / "checkpoints" / f"step_{last:08d}"}' in err
    assert last < 20 and all(math.isfinite(v) for v in _losses(out).values())


def test_nonfinite_loss_found_at_the_next_sync_step(tmp_path, capsys):
    """The host reads the loss only at log and checkpoint steps: a non-finite loss in between is found at the next
    one, named with the step where it happened (as when every step is read), and nothing is logged or saved after it."""
    blow_up = FAST + ['--lr', '1e30', '--warmup-steps', '1', '--grad-clip', '0', '--max-steps', '20', '--keep-last', '0']
    rc, _, every = _run(blow_up + ['--save-every', '100', '--log-every', '1', '--out-dir', str(tmp_path / 'a')], capsys)
    assert rc == 2
    bad = int(every.split('at step ')[1].split(';')[0])
    out = tmp_path / 'b'
    rc, _, err = _run(blow_up + ['--save-every', '3', '--log-every', '4', '--out-dir', str(out)], capsys)
    assert rc == 2 and f'at step {bad};' in err
    logged = _losses(out) if (out / 'metrics.jsonl').read_text() else {}
    assert all(step <= bad and step % 4 == 0 and math.isfinite(v) for step, v in logged.items())
    saved = [int(p.split('_')[1]) for p in _ckpts(out)] if (out / 'checkpoints').is_dir() else []
    assert all(step <= bad for step in saved)
    assert f'Last good checkpoint: {out / "checkpoints" / f"step_{max(saved):08d}" if saved else "none"}' in err


# ============ 5b. checkpoints written by earlier versions ============

# config.json as written by cpc-train before configs were typed (objective and augment as plain dicts), for
# FAST + --max-steps 6 --save-every 2 --log-every 1; and the older form whose groups held only the preset's keys.
OLD_CONFIG = json.loads('''{"model": "cpcv2_resnet_tiny", "model_args": {}, "data": "fashion-mnist", "data_dir": "",
 "image_size": 0, "resize": 0, "num_workers": 0, "batch_size": 8, "epochs": 2, "max_steps": 6, "lr": 0.002,
 "min_lr_ratio": 0.01, "warmup_steps": 5, "weight_decay": 0.0001, "betas": [0.9, 0.999], "grad_clip": 1.0,
 "objective": {"context_hidden": 16, "context_blocks": 3, "target_dim": 64, "offsets": [2, 3], "directions": 4,
  "shared_context": true, "emb_scale": 0.1, "gather_distributed": true},
 "augment": {"color_drop": 0.0, "color_drop_mode": "zero", "hflip": 0.5, "jitter": 1, "auto_augment": true,
  "auto_augment_ops": ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX",
   "ShearY", "TranslateXRel", "TranslateYRel"], "num_ops": 1, "magnitude": 5.0, "magnitude_std": 0.5,
  "magnitude_max": 10.0, "auto_augment_prob": 0.5, "elastic": 0.0, "elastic_alpha": 50.0, "elastic_sigma": 5.0,
  "color_jitter": [0.4, 0.4, 0.4, 0.1], "color_jitter_prob": 0.8, "interpolation": "bilinear",
  "padding_mode": "reflection"},
 "device": "cpu", "bf16": true, "channels_last": true, "compile": false, "grad_checkpointing": false, "out_dir": "OUT",
 "resume": "auto", "save_every": 2, "keep_last": 3, "log_every": 1, "seed": 0, "progress": false}''')
OLDER_CONFIG = dict(OLD_CONFIG, objective=dict(directions=4, offsets=[2, 3], context_hidden=16, context_blocks=3),
                    augment=dict(color_drop=0.0, jitter=1, elastic=0.0, num_ops=1, magnitude=5.0))


@pytest.mark.parametrize('old', [OLD_CONFIG, OLDER_CONFIG], ids=['dict-groups', 'partial-groups'])
def test_old_checkpoint_config_resumes(old, tmp_path, capsys):
    out = tmp_path / 'run'
    argv = FAST + ['--save-every', '2', '--log-every', '1', '--out-dir', str(out)]
    assert _run(argv + ['--max-steps', '4']) == 0
    ckpt = out / 'checkpoints' / 'step_00000004'
    (ckpt / 'config.json').write_text(json.dumps(dict(old, out_dir=str(out))))
    loaded = config.from_dict(train.TrainConfig, json.loads((ckpt / 'config.json').read_text()))
    # missing keys: today's defaults; the runtime switches earlier versions wrote as booleans are 'auto' today
    assert dataclasses.replace(loaded, channels_last='auto', compile='auto', grad_checkpointing='auto') == train.build_config(
        argv + ['--max-steps', '6'])
    rc, stdout, err = _run(argv + ['--max-steps', '6'], capsys)
    assert rc == 0 and f'resumed from {ckpt} at step 4' in stdout
    assert 'differs' not in err  # the same options: no key reported as changed
    assert [m['step'] for m in _log(out)] == list(range(1, 7))
    (out / 'checkpoints' / 'step_00000006' / 'config.json').write_text(json.dumps(dict(old, lr=0.005,
                                                                                       out_dir=str(out))))
    rc, _, err = _run(argv + ['--max-steps', '7'], capsys)
    assert rc == 0 and "differs from the checkpoint's config in max_steps: 6 -> 7, lr: 0.005 -> 0.002" in err


def test_resume_into_another_network_is_refused_with_the_options_to_give(tmp_path, capsys):
    out = tmp_path / 'run'
    wide = ['--model_args', '{"channels": [16, 32, 96]}', '--objective.offsets', '3']
    assert _run(FAST + wide + ['--max-steps', '2', '--out-dir', str(out)]) == 0
    # the preset's network cannot take these weights: refused before any work, with the options that fit
    rc, _, err = _run(FAST + ['--max-steps', '3', '--out-dir', str(out)], capsys)
    assert rc == 2 and 'holds another network' in err
    assert "model_args: {'channels': [16, 32, 96]} there, {} now" in err and 'objective.offsets: [3] there' in err
    flags = err.split('To continue it, add ')[1].split('; to start')[0]
    assert "--model_args '{\"channels\": [16, 32, 96]}'" in flags and '--objective.offsets' in flags
    assert not (out / 'checkpoints' / 'step_00000003').exists()
    # the options it names are enough to continue the run
    rc, stdout, _ = _run(FAST + shlex.split(flags) + ['--max-steps', '3', '--out-dir', str(out)], capsys)
    assert rc == 0 and 'resumed from' in stdout and (out / 'checkpoints' / 'step_00000003').is_dir()
    # a new run in the same folder is the user's call
    assert _run(FAST + ['--max-steps', '1', '--resume', 'none', '--out-dir', str(tmp_path / 'other')]) == 0


# ============ 6. a folder of images, with unreadable files ============

def test_image_folder_with_corrupt_files(tmp_path, capsys):
    root = tmp_path / 'images'
    images, _ = load_fashion_mnist('test')
    rng = np.random.default_rng(0)
    written = []
    for i in range(40):  # real Fashion-MNIST images, as PNG and JPEG, some grey some RGB, of other sizes
        sub = root / f'class{i % 3}' / ('deep' if i % 5 == 0 else '')
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(images[i, 0].numpy()).resize((32 + i % 7, 30 + i % 5))
        if i % 2:
            written.append(sub / f'{i:03d}.jpg')
            img.convert('RGB').save(written[-1], quality=90)
        else:
            written.append(sub / f'{i:03d}.PNG')
            img.save(written[-1])
    good = written[0].read_bytes()
    (root / 'class1' / 'truncated.png').write_bytes(good[:len(good) // 2])
    (root / 'class2' / 'garbage.jpg').write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / 'class0' / 'empty.png').write_bytes(b'')
    (root / 'notes.txt').write_text('not an image')
    files = find_images(root)
    assert len(files) == 43
    corrupt = {i for i, f in enumerate(files) if f.stem in ('truncated', 'garbage', 'empty')}
    steps = 8
    sampler = iter(train.StepSampler(len(files), 8, 0, 1, seed=0))
    expected = sum(len(corrupt & set(next(sampler))) for _ in range(steps))
    assert expected > 0
    out = tmp_path / 'run'
    rc, stdout, _ = _run(FAST + ['--data', str(root), '--max-steps', str(steps), '--log-every', '1',
                                 '--out-dir', str(out)], capsys)
    assert rc == 0
    log = _log(out)
    assert [m['step'] for m in log] == list(range(1, steps + 1))
    assert log[-1]['skipped_images'] == expected and all(math.isfinite(m['loss']) for m in log)
    assert f'skipped {expected} unreadable images' in stdout
    # a missing folder is a clear error, not a traceback
    rc, _, err = _run(FAST + ['--data', str(tmp_path / 'nope'), '--out-dir', str(out)], capsys)
    assert rc == 2 and 'no such folder' in err


def test_a_folder_with_test_beside_train_is_pretrained_on_whole_with_a_warning(tmp_path, capsys):
    images, _ = load_fashion_mnist('test')
    root = tmp_path / 'photos'
    for split, rows in (('train', range(0, 16)), ('test', range(16, 20)), ('val', range(20, 24))):
        (root / split / 'a').mkdir(parents=True)
        for i in rows:
            Image.fromarray(images[i, 0].numpy()).save(root / split / 'a' / f'{i}.png')
    rc, _, err = _run(FAST + ['--data', str(root), '--max-steps', '1', '--out-dir', str(tmp_path / 'run')], capsys)
    assert rc == 0
    warning = [line for line in err.splitlines() if line.startswith('warning: --data')]
    assert warning == [f'warning: --data {root} holds val/, test/ beside train/: pretraining reads every image '
                       f'under it, those too; give --data {root / "train"} to keep them out']
    assert train.held_out_splits(str(root / 'train')) == [] and train.held_out_splits('fashion-mnist') == []
    (root / 'train').rename(root / 'unlabelled')  # without a train/ folder the splits are not this layout's
    assert train.held_out_splits(str(root)) == []


# ============ 7. command line and presets ============

def test_cli_overrides():
    cfg = train.build_config([
        '--lr', '1e-3', '--batch-size', '12', '--max_steps=5', '--objective.directions', '2',
        '--augment.hflip', '0', '--augment.auto_augment', 'false', '--objective.offsets', '[1, 2]',
        '--betas', '0.8,0.9', '--model_args', '{"stem_chs": 16}', '--no-bf16', '--progress',
        '--objective.target-dim', '32', '--augment.jitter=2', '--seed', '7', '--model_args.drop_path_rate', '0.1'])
    assert isinstance(cfg, train.TrainConfig)
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.betas, cfg.bf16, cfg.seed) == (1e-3, 12, 5, [0.8, 0.9], False, 7)
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.lr, float) and cfg.progress is True
    assert cfg.objective == ObjectiveConfig(directions=2, offsets=[1, 2], target_dim=32, context_hidden=64,
                                            context_blocks=3)  # the preset's context size survives
    assert isinstance(cfg.augment, PatchAugmentConfig)
    assert cfg.augment.hflip == 0.0 and cfg.augment.auto_augment is False and cfg.augment.jitter == 2
    assert cfg.model_args == {'stem_chs': 16, 'drop_path_rate': 0.1}
    # a group as JSON updates the group; negative numbers are values, not options
    cfg = train.build_config(['--objective', '{"directions": 1}', '--lr', '-1e-3', '--warmup-steps=-1'])
    assert cfg.objective.directions == 1 and cfg.objective.offsets == [2, 3]
    assert cfg.lr == -1e-3 and cfg.warmup_steps == -1


@pytest.mark.parametrize('argv, message', [
    (['--bogus', '1'], 'unknown option --bogus'),
    (['--objective.bogus', '1'], 'unknown option --objective.bogus; the objective group has: context_hidden'),
    (['--batch', '8'], 'unknown option --batch (did you mean --batch-size'),  # no silent abbreviations
    (['--optimizer.lr', '1'], 'unknown option --optimizer.lr'),
    (['--objective', '{"nope": 1}'], 'unknown option --objective.nope; the objective group has'),
    (['--lr'], '--lr expects a value (FLOAT)'),
    (['--lr', 'fast'], "--lr 'fast': expected a number"),
    (['--batch-size', '8.5'], 'expects an integer'),
    (['--bf16', 'maybe'], 'expected true/false'),
    (['--objective', '[1]'], 'expects a JSON object'),
    (['--augment.hflip', '2'], 'augment.hflip: PatchAugmentConfig.hflip is a probability'),
    (['--preset', 'imagenet_r18'], "invalid choice: 'imagenet_r18' (choose from imagenet_r161"),
    (['stray'], "unexpected argument 'stray'"),
])
def test_cli_rejects_unknown_or_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.build_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith('usage: cpc-train'), err


@pytest.mark.parametrize('preset', sorted(train.PRESETS))
def test_presets_resolve_and_build(preset, tmp_path, capsys):
    cfg = train.build_config(['--preset', preset])
    assert isinstance(cfg, train.TrainConfig) and cfg == train.preset_config(preset)
    aug = cfg.augment  # a PatchAugmentConfig: every augmentation value validated
    with torch.device('meta'):  # the ImageNet encoders are large: shapes only
        encoder = timm.create_model(cfg.model, num_classes=0, **cfg.model_args)
        objective = CPCObjective(encoder.num_features, **dataclasses.asdict(cfg.objective))
    img = cfg.image_size or timm.data.resolve_model_data_config(encoder)['input_size'][-1]
    rows, cols = encoder.grid_size(img)
    objective.check_latents(torch.empty(2, encoder.num_features, rows, cols, device='meta'))  # grid fits the offsets
    assert len(objective.directions) == 4
    if preset.startswith('fmnist_'):
        assert cfg.data == 'fashion-mnist' and aug.color_drop == 0 and (rows, cols) == (6, 6)
        return
    assert cfg.data == '' and cfg.resize >= cfg.image_size
    rc, _, err = _run(['--preset', preset, '--out-dir', str(tmp_path)], capsys)
    assert rc == 2 and '--data: this preset needs a folder of training images' in err


def test_cpc_train_help():
    exe = Path(sys.executable).with_name('cpc-train')
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'cpc_models.train']
    res = subprocess.run([*cmd, '--preset', 'stl10_small', '--help'], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for text in ('usage: cpc-train', '--preset', '--objective.directions', '--augment.hflip', 'torchrun'):
        assert text in res.stdout
    lines = res.stdout.splitlines()
    groups = [line[:-1].split(':')[0] for line in lines if line and not line.startswith(' ') and ':' in line
              and line.split(':')[0] in ('model', 'data', 'objective', 'augment', 'optimization', 'runtime',
                                         'checkpoint')]
    assert groups == ['model', 'data', 'optimization', 'objective', 'augment', 'runtime', 'checkpoint']
    flags = [line.split()[0] for line in lines if line.startswith('  --')]
    assert len(flags) == len(set(flags)) == len(config.options(train.TrainConfig())) + 1  # each once, + --preset
    lr = next(line for line in lines if line.startswith('  --lr '))
    assert 'peak learning rate' in lr and '(default: 0.001)' in lr  # one line, the chosen preset's default


# ============ 8. export to a published folder, loaded back through the Hub code path ============

def test_export_checkpoint_loads_through_hub(short_run, tmp_path, monkeypatch):
    out, _, _ = short_run
    ckpt = out / 'checkpoints' / 'step_00000007'
    pub = hub.export_checkpoint(ckpt, tmp_path / f'{ARCH}.test', tag='test')
    assert sorted(p.name for p in pub.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    readme = (pub / 'README.md').read_text()
    for text in ('cpc-train', '"batch_size": 8', '"context_hidden": 16', '| loss |', '| step | 7 |', 'fashion-mnist'):
        assert text in readme, text
    assert json.loads((pub / 'config.json').read_text())['architecture'] == ARCH

    repo = 'cpc-models/cpcv2_resnet_tiny.test'
    cache = tmp_path / 'hf'
    hub.add_to_hf_cache(pub, repo, cache_dir=cache)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    expected = load_file(ckpt / 'encoder.safetensors')
    for model in (
            timm.create_model(ARCH, pretrained=True, cache_dir=cache,
                              pretrained_cfg_overlay=dict(hf_hub_id=repo, file='')),
            timm.create_model(f'hf-hub:{repo}', pretrained=True, cache_dir=cache)):
        state = model.state_dict()
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(state[k], v), k


def test_bf16_autocast_on_cuda_by_default_and_on_the_cpu_on_request():
    cfg = train.preset_config()
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert train.use_bf16(cfg, cuda) and not train.use_bf16(cfg, cpu)  # fp32 on the CPU unless asked
    assert not train.use_bf16(dataclasses.replace(cfg, bf16=False), cuda)
    asked = train.build_config(['--bf16-cpu'])
    assert train.use_bf16(asked, cpu) and not train.use_bf16(asked, torch.device('meta'))
    model = train.build_model(asked, cpu)
    assert train.build_step_setup(asked, model.encoder, cpu).bf16
    assert not train.build_step_setup(cfg, model.encoder, cpu).bf16
