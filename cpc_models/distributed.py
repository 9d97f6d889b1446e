"""torch.distributed helpers: env-driven initialization and an all-gather that carries gradients.

CPC v2's InfoNCE contrasts each prediction against the targets of every image in the batch (Hénaff et al.
2020, Sec. 3.1); under data parallelism the batch is the global one, so targets are all-gathered with
:func:`gather_with_grad`. Everything here is a no-op in a single process.
"""
import os

import torch
import torch.distributed as dist

__all__ = ['gather_with_grad', 'init_distributed', 'is_distributed', 'is_main_process', 'rank', 'world_size']


def is_distributed() -> bool:
    """True when a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group described by the environment (``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Backend nccl on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo otherwise. Without RANK in the
    environment (plain ``python``) nothing is initialized.

    Returns:
        (rank, world_size, device) for this process.
    """
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    cuda = torch.cuda.is_available()
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if 'RANK' not in os.environ or is_distributed():
        if cuda:
            torch.cuda.set_device(device)
        return rank(), world_size(), device
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend='nccl' if cuda else 'gloo', rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
    return dist.get_rank(), dist.get_world_size(), device


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, x)
        return torch.cat(shards, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on this rank's shard: sum their gradients, keep our own rows.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.chunk(dist.get_world_size(), 0)[dist.get_rank()]


@torch.compiler.disable  # under torch.compile: the collective runs eagerly, between two graphs
def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (N, ...) from every rank into (world_size * N, ...), ordered by rank.

    The backward pass sums the incoming gradients over ranks and returns each rank its own N rows, i.e. the
    gradient of the *sum* of all ranks' losses with respect to this rank's shard. With DDP averaging parameter
    gradients over ranks, this gives the gradient of the mean of the per-rank losses. All ranks must pass the
    same shape. Returns ``x`` itself when not distributed.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
