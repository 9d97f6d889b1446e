"""CPCObjective under torch.distributed (2 CPU processes, gloo, DDP) vs one process on the same global batch.

Each rank's loss is the mean over its own anchors against the all-gathered targets, so
  mean over ranks of the rank losses == the single-process loss,
  DDP-averaged parameter gradients  == the single-process gradients,
  rank r's input gradient           == world_size * single-process gradient of its shard
(the gather's backward sums every rank's loss gradient into the shard owner; DDP's 1/world_size then
applies when the input gradient reaches the encoder's parameters, which the tiny encoder here checks).
"""
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from cpc_models import objective
from cpc_models.distributed import gather_with_grad, init_distributed, is_distributed, is_main_process, world_size
from cpc_models.objective import CPCObjective

WORLD = 2
GLOBAL_BATCH = 4


class _Model(nn.Module):
    """1x1-conv 'encoder' on a fake input grid + the objective, so encoder gradients are checked too."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 1)
        self.objective = CPCObjective(8, context_hidden=8, context_blocks=2, target_dim=6, offsets=(1, 2),
                                      directions=4, emb_scale=0.5)

    def forward(self, x):
        return self.objective(self.encoder(x))


def _build():
    torch.manual_seed(0)
    model = _Model().double()
    x = torch.randn(GLOBAL_BATCH, 3, 4, 5, dtype=torch.float64)
    return model, x


def _recording_warnings(forward):
    """Run forward() with the single-image warning re-armed; return its output and the warnings it raised."""
    objective._warned_single_image = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = forward()
    return out, [str(w.message) for w in caught]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES='')
    got_rank, got_world, device = init_distributed()
    assert (got_rank, got_world, device.type, world_size(), is_main_process()) == (rank, WORLD, 'cpu', WORLD, rank == 0)
    model, x = _build()
    ddp = nn.parallel.DistributedDataParallel(model)
    x = x.chunk(WORLD)[rank].clone().requires_grad_(True)
    out, warned = _recording_warnings(lambda: ddp(x))
    out.loss.backward()
    # One image per rank: a global batch of two; without gathering, a batch of one image on each rank.
    one, one_warned = _recording_warnings(lambda: model.objective(model.encoder(x.detach()[:1])))
    model.objective.gather_distributed = False
    local, local_warned = _recording_warnings(lambda: model.objective(model.encoder(x.detach()[:1])))
    # Saved before gather_with_grad's own check below runs: the DDP comparisons never depend on it.
    torch.save(dict(loss=out.loss.detach(), acc=out.metrics['acc'], x_grad=x.grad,
                    grads={n: p.grad for n, p in model.named_parameters()},
                    warnings=warned, one_image_loss=one.loss.detach(), one_image_warnings=one_warned,
                    local_loss=local.loss.detach(), local_warnings=local_warned),
               os.path.join(out_dir, f'rank{rank}.pt'))
    # gather_with_grad on its own: forward order and backward sum over ranks. An error is recorded for its test
    # (test_gather_with_grad_orders_by_rank_and_sums_gradients), not raised into the fixture of the others.
    try:
        shard = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = gather_with_grad(shard)
        (gathered * (rank + 1)).sum().backward()
        check = dict(gathered=gathered.detach(), shard_grad=shard.grad)
    except Exception as e:  # noqa: BLE001  (any failure of the helper is that test's failure)
        check = dict(error=f'{type(e).__name__}: {e}')
    torch.save(check, os.path.join(out_dir, f'gather{rank}.pt'))
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_dir(tmp_path_factory):
    """The folder the two workers write their results to."""
    out_dir = str(tmp_path_factory.mktemp('ddp'))
    # fork: the children inherit the imported modules instead of re-importing torch and timm (~10 s each on a
    # busy machine); spawn once CUDA is initialized, which a forked child cannot use.
    method = 'spawn' if torch.cuda.is_initialized() else 'fork'
    mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True, start_method=method)
    return out_dir


@pytest.fixture(scope='module')
def ranks(ddp_dir):
    """Each rank's DDP results (loss, gradients, warnings), saved before gather_with_grad's own check ran."""
    return [torch.load(os.path.join(ddp_dir, f'rank{r}.pt'), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope='module')
def gather_check(ddp_dir):
    """What each rank's gather_with_grad check recorded (its outputs, or the error it raised)."""
    return [torch.load(os.path.join(ddp_dir, f'gather{r}.pt'), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope='module')
def single():
    model, x = _build()
    x.requires_grad_(True)
    out = model(x)
    out.loss.backward()
    return dict(loss=out.loss.detach(), x_grad=x.grad, grads={n: p.grad for n, p in model.named_parameters()})


def test_mean_rank_loss_is_the_single_process_loss(ranks, single):
    rank_losses = torch.stack([r['loss'] for r in ranks])
    torch.testing.assert_close(rank_losses.mean(), single['loss'], atol=1e-10, rtol=0)
    # Not trivially equal: each rank scores only its own anchors.
    assert not torch.allclose(rank_losses[0], rank_losses[1])


def test_ddp_gradients_match_single_process(ranks, single):
    for name, g in single['grads'].items():
        for r in ranks:  # DDP has already averaged, so every rank holds the same gradient
            torch.testing.assert_close(r['grads'][name], g, atol=1e-10, rtol=0, msg=f'gradient of {name}')


def test_input_gradient_is_world_size_times_single_process(ranks, single):
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r['x_grad'] / WORLD, single['x_grad'].chunk(WORLD)[rank], atol=1e-10, rtol=0)


def test_gather_with_grad_orders_by_rank_and_sums_gradients(gather_check):
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    for r in gather_check:
        assert 'error' not in r, r.get('error')
        torch.testing.assert_close(r['gathered'], expected)
        # rank s's loss is (s + 1) * sum(gathered): every shard receives 1 + 2 from the two ranks.
        torch.testing.assert_close(r['shard_grad'], torch.full((2, 3), 3.0))


def test_one_image_per_rank_is_a_global_batch_of_two(ranks):
    """Its negatives include the other rank's image: the rank losses average to the single-process loss of the
    two images, and the single-image warning stays silent on every rank (as it does for two images per rank)."""
    model, x = _build()
    ref, warned = _recording_warnings(lambda: model(x[::GLOBAL_BATCH // WORLD]))  # the first image of each shard
    assert warned == []
    torch.testing.assert_close(torch.stack([r['one_image_loss'] for r in ranks]).mean(), ref.loss.detach(),
                               atol=1e-10, rtol=0)
    assert [r['one_image_warnings'] for r in ranks] == [[], []] and [r['warnings'] for r in ranks] == [[], []]


def test_without_gathering_each_rank_contrasts_its_own_images(ranks):
    """gather_distributed=False: a rank's loss is the single-process loss of its own shard (here one image, which
    then warns)."""
    model, x = _build()
    for rank, r in enumerate(ranks):
        ref, warned = _recording_warnings(lambda: model(x.chunk(WORLD)[rank][:1]))
        torch.testing.assert_close(r['local_loss'], ref.loss.detach(), atol=1e-10, rtol=0)
        assert len(warned) == 1 and r['local_warnings'] == warned


def test_single_process_helpers_are_no_ops():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x
    assert world_size() == 1 and is_main_process()


def test_init_distributed_without_torchrun_environment(monkeypatch):
    """Plain ``python`` (no RANK, no LOCAL_RANK): nothing is initialized, this process is rank 0 of 1."""
    for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    device = torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu')
    assert init_distributed() == (0, 1, device)
    assert not is_distributed()
