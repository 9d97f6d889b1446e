"""The CPC v2 objective: context network, per-offset linear predictors and InfoNCE over 1, 2 or 4 directions.

Hénaff et al., *Data-Efficient Image Recognition with Contrastive Predictive Coding*, ICML 2020
(arXiv 1905.09272), Sec. 3.1 (InfoNCE with negatives from the same image and other images), Sec. 4.1
(predicting from above, below, left and right) and the appendix pseudo-code (``CPC``): for every offset k,

    t[b, i, j]   = W_t z[b, :, i, j]                                  targets, (N = B * R * W, D)
    p_k[b, i, j] = emb_scale * W_k c[b, :, i, j],  i < R - k          predictions, (B * (R - k) * W, D)
    loss_k       = mean over anchors of  -log softmax_n(p_k . t_n)[label = (b, i + k, j)]

with n over every target in the (global) batch. The other directions apply the same to the grid flipped
and/or transposed so that "down" in the frame is up, right or left in the image. See docs/objective.md.
"""
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .context import MaskedContextNet
from .distributed import gather_with_grad, rank, world_size

__all__ = ['DIRECTIONS', 'CPCObjective', 'ObjectiveConfig', 'ObjectiveOutput', 'from_frame', 'info_nce', 'to_frame']

# Prediction directions, in the order directions=1, 2, 4 switches them on. 'down' = context from the rows
# above predicts rows below (top-to-bottom, the paper's original task).
DIRECTIONS = ('down', 'up', 'right', 'left')

_warned_single_image = False


def to_frame(x: torch.Tensor, direction: str) -> torch.Tensor:
    """View a grid (..., R, W) in the frame of ``direction``: frame row r + 1 lies one step further along it."""
    if direction == 'down':
        return x
    if direction == 'up':
        return x.flip(-2)
    if direction == 'right':
        return x.transpose(-2, -1)
    if direction == 'left':
        return x.transpose(-2, -1).flip(-2)
    raise ValueError(f'Unknown direction {direction!r}; use one of {DIRECTIONS}.')


def from_frame(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`to_frame`: a frame grid back to the image's (..., R, W) orientation."""
    if direction in ('down', 'up', 'right'):
        return to_frame(x, direction)  # these three are involutions
    if direction == 'left':
        return x.flip(-2).transpose(-2, -1)
    raise ValueError(f'Unknown direction {direction!r}; use one of {DIRECTIONS}.')


class _InfoNCE(torch.autograd.Function):
    """Row-wise cross-entropy and top-1 hits from one max, one exp-sum and (backward) one scaled softmax pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        top, best = logits.max(1)  # the row maxima and their first indices (argmax) in one pass
        e = (logits - top[:, None]).exp_()
        s = e.sum(1)
        ce = top + s.log() - logits.gather(1, labels[:, None]).squeeze(1)
        hit = best == labels
        ctx.mark_non_differentiable(hit)
        ctx.save_for_backward(e, s, labels)
        return ce, hit

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_hit: torch.Tensor):
        e, s, labels = ctx.saved_tensors
        grad = e * (grad_ce / s)[:, None]  # softmax * grad; not in place: a retained graph may run backward again
        return grad.scatter_add_(1, labels[:, None], -grad_ce[:, None]), None


def info_nce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE terms of every anchor: logits (A, N) float, labels (A,) int64 -> (cross-entropy (A,), hit (A,) bool).

    ``F.cross_entropy(logits, labels, reduction='none')`` and ``logits.argmax(1) == labels``, in fewer passes over
    the (A, N) logits, the objective's largest tensor: log_softmax, nll, argmax and their backward read or write it
    about ten times, this six (max, exp, sum; one scaled copy in backward).
    """
    return _InfoNCE.apply(logits, labels)


class ObjectiveOutput(NamedTuple):
    """``loss``: scalar fp32 tensor to backpropagate. ``metrics``: detached scalars, ``acc/<direction>/k<offset>``
    (top-1 accuracy of picking the true target among all candidates) and ``acc`` (their mean)."""
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass
class ObjectiveConfig:
    """The keyword arguments of :class:`CPCObjective` (same names and defaults): ``CPCObjective(C, **asdict(cfg))``."""
    context_hidden: int = 256  # width of the context network's blocks (256 in the paper)
    context_blocks: int = 5  # residual blocks of the context network (5 in the paper)
    target_dim: int = 64  # width D of targets and predictions (64 in the paper)
    offsets: list[int] = field(default_factory=lambda: [3])  # rows ahead to predict ([3]: the pseudo-code's)
    directions: int = 4  # 1 (top-to-bottom), 2 (+ bottom-to-top) or 4 (+ left-to-right, right-to-left)
    shared_context: bool = True  # one context network for every direction (the grid flipped/transposed)
    emb_scale: float = 0.1  # scale of the predictions, an inverse temperature (0.1 in the pseudo-code)
    gather_distributed: bool = True  # under torch.distributed, contrast against the targets of every rank
    # 'bfloat16': targets, predictions, the all-gather and the logits matmul in bf16 (half the gather's bytes, the
    # matmul on tensor cores), the cross-entropy still in fp32; 'float32' (default): all of it in fp32. The paper is
    # silent; the loss moves by bf16 rounding (tests/test_objective.py bounds it against fp32).
    logits_dtype: str = 'float32'


class CPCObjective(nn.Module):
    """CPC v2 InfoNCE objective on a latent grid (Hénaff et al. 2020, Sec. 3.1, 4.1, appendix ``CPC``).

    Args:
        latent_channels: channels C of the latent grid (the encoder's ``num_features``).
        context_hidden: width of the context network's blocks (256 in the paper).
        context_blocks: residual blocks in the context network (5 in the paper).
        target_dim: D, width of targets and predictions (64 in the paper).
        offsets: prediction offsets k (rows ahead). The pseudo-code's ``steps_to_ignore=2, steps_to_predict=3``
            is ``range(2, 3)`` -> a single offset of i + 1 = 3 rows, our default (3,).
        directions: 1 (top-to-bottom), 2 (+ bottom-to-top) or 4 (+ left-to-right and right-to-left).
        shared_context: one context network for all directions (the grid is flipped/transposed into its frame),
            or one per direction. Predictors are always per direction and offset; the target projection is
            always shared (targets are the same vectors whatever the direction).
        emb_scale: scale of the predictions (0.1 in the pseudo-code), i.e. an inverse temperature.
        gather_distributed: under torch.distributed, contrast against the targets of all ranks.
        logits_dtype: 'float32' (default) or 'bfloat16': the dtype of targets, predictions, their all-gather and the
            logits matmul; the cross-entropy and the loss are fp32 either way.

    Shapes:
        z (B, C, R, W) -> ObjectiveOutput(loss (), metrics {name: ()}).

    Every prediction is scored against all B * R * W targets of the batch (times world_size when gathering):
    other positions of the same image and every position of the other images are the negatives. The loss is
    the mean cross-entropy over anchors for each (direction, offset), averaged over directions and offsets.
    Under torch.distributed each rank returns that mean over its own anchors (against the global targets);
    with equal per-rank batches the mean of the rank losses is the single-process loss on the global batch,
    which is what DDP's gradient averaging optimizes.

    Example:
        >>> obj = CPCObjective(256, directions=4)
        >>> out = obj(torch.randn(8, 256, 6, 6))
        >>> out.loss.backward(); sorted(out.metrics)[:2]
        ['acc', 'acc/down/k3']
    """

    def __init__(
            self,
            latent_channels: int,
            context_hidden: int = 256,
            context_blocks: int = 5,
            target_dim: int = 64,
            offsets: Sequence[int] = (3,),
            directions: int = 4,
            shared_context: bool = True,
            emb_scale: float = 0.1,
            gather_distributed: bool = True,
            logits_dtype: str = 'float32',
    ):
        super().__init__()
        if logits_dtype not in ('float32', 'bfloat16'):
            raise ValueError(f"logits_dtype must be 'float32' or 'bfloat16', got {logits_dtype!r}.")
        self.logits_dtype = getattr(torch, logits_dtype)
        if isinstance(offsets, int):
            offsets = (offsets,)
        offsets = tuple(offsets)
        if not offsets or any(int(k) != k or k < 1 for k in offsets) or len(set(offsets)) != len(offsets):
            raise ValueError(
                f'offsets must be a non-empty sequence of distinct positive integers (rows ahead to predict), '
                f'got {offsets}; e.g. offsets=(3,) as in the paper\'s pseudo-code.')
        if directions not in (1, 2, 4):
            raise ValueError(
                f'directions must be 1 (top-to-bottom), 2 (+ bottom-to-top) or 4 (+ left/right), got {directions}.')
        if latent_channels < 1 or target_dim < 1:
            raise ValueError(
                f'latent_channels ({latent_channels}) and target_dim ({target_dim}) must be positive; '
                f'pass latent_channels=model.num_features.')
        if not emb_scale > 0:
            raise ValueError(f'emb_scale must be positive (0.1 in the paper), got {emb_scale}.')
        self.latent_channels = latent_channels
        self.target_dim = target_dim
        self.offsets = tuple(int(k) for k in offsets)
        self.directions = DIRECTIONS[:directions]
        self.shared_context = shared_context
        self.emb_scale = emb_scale
        self.gather_distributed = gather_distributed

        if shared_context:
            self.context = MaskedContextNet(latent_channels, context_hidden, context_blocks)
        else:
            self.context = nn.ModuleDict(
                {d: MaskedContextNet(latent_channels, context_hidden, context_blocks) for d in self.directions})
        self.target_proj = nn.Linear(latent_channels, target_dim)  # a 1x1 conv on the grid
        self.predictors = nn.ModuleDict({
            d: nn.ModuleDict({f'k{k}': nn.Linear(latent_channels, target_dim) for k in self.offsets})
            for d in self.directions})

    def extra_repr(self) -> str:
        return (f'offsets={self.offsets}, directions={self.directions}, shared_context={self.shared_context}, '
                f'emb_scale={self.emb_scale}, gather_distributed={self.gather_distributed}, '
                f'logits_dtype={str(self.logits_dtype)[6:]}')

    def check_latents(self, z: torch.Tensor) -> None:
        """Raise a ValueError that says what to change when ``z`` is not a usable latent grid (B, C, R, W)."""
        if not isinstance(z, torch.Tensor) or z.ndim != 4:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f'CPCObjective expects a latent grid (B, C, rows, cols), got {shape}; get one from the encoder '
                f'with model.forward_features(images) (not forward(), which pools).')
        if not z.is_floating_point():
            raise ValueError(f'CPCObjective expects floating-point latents, got dtype {z.dtype}.')
        if z.shape[1] != self.latent_channels:
            raise ValueError(
                f'CPCObjective was built for {self.latent_channels} latent channels, got {z.shape[1]} '
                f'(shape {tuple(z.shape)}); build it with CPCObjective(model.num_features, ...).')
        if z.shape[0] < 1:
            raise ValueError(f'CPCObjective got an empty batch (shape {tuple(z.shape)}).')
        rows, cols = z.shape[2], z.shape[3]
        k = max(self.offsets)
        lengths = {d: (rows, 'rows') if d in ('down', 'up') else (cols, 'cols') for d in self.directions}
        for d, (length, axis) in lengths.items():
            if length <= k:
                raise ValueError(
                    f'Latent grid {rows}x{cols} is too small for offsets={self.offsets} with '
                    f'directions={len(self.directions)}: predicting {k} steps {d} needs at least {k + 1} {axis}, '
                    f'got {length}. Use smaller offsets (at most {min(n for n, _ in lengths.values()) - 1} here), '
                    f'fewer directions, or a larger grid (larger images or a smaller patch stride).')

    def frame_contexts(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Context of every direction in its own frame: {direction: (B, C, R', W')}, (R', W') = (R, W) or (W, R)."""
        frames = {d: to_frame(z, d) for d in self.directions}
        if not self.shared_context:
            return {d: self.context[d](frames[d]) for d in self.directions}
        # One pass per frame shape: directions with the same frame shape are stacked along the batch.
        groups: dict[tuple, list] = {}
        for d in self.directions:
            groups.setdefault(tuple(frames[d].shape[2:]), []).append(d)
        out = {}
        for names in groups.values():
            # Stacked channels-last (the layout the encoder's grid has): the context convolutions read it without
            # reordering, measured faster on the CPU whatever the layout of their weights (docs/benchmarks.md).
            stacked = torch.cat([frames[d].permute(0, 2, 3, 1) for d in names]).permute(0, 3, 1, 2)
            ctx = self.context(stacked)
            out.update(zip(names, ctx.chunk(len(names)), strict=True))
        return out

    def context_grids(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Context of every direction in the image's orientation: {direction: (B, C, R, W)}."""
        return {d: from_frame(c, d) for d, c in self.frame_contexts(z).items()}

    def forward(self, z: torch.Tensor) -> ObjectiveOutput:
        """Latent grid z (B, C, R, W) -> ObjectiveOutput(loss, metrics)."""
        self.check_latents(z)
        b, _, rows, cols = z.shape
        gather = self.gather_distributed and world_size() > 1
        _warn_single_image(b * (world_size() if gather else 1))
        contexts = self.frame_contexts(z)
        dim, n = self.target_dim, rows * cols
        # Projections, logits and cross-entropy in fp32 even under autocast (logits over thousands of candidates),
        # unless logits_dtype is bf16: then the projections, the gather and the logits matmul run in bf16
        low = self.logits_dtype == torch.bfloat16
        cast = _bf16 if low else _fp32
        with torch.autocast(device_type=z.device.type, enabled=False):
            proj = self.target_proj
            targets = F.linear(cast(z).permute(0, 2, 3, 1), cast(proj.weight), cast(proj.bias)).reshape(b * n, dim)
            first = 0
            if gather:
                targets = gather_with_grad(targets)
                first = rank() * b * n
            image_start = first + torch.arange(b, device=z.device).view(b, 1, 1) * n
            positions = torch.arange(n, device=z.device).view(rows, cols)
            preds, labels, names, sizes = [], [], [], []
            for d in self.directions:
                heads = self.predictors[d].values()
                weight = cast(torch.cat([h.weight for h in heads]))
                bias = cast(torch.cat([h.bias for h in heads]))
                pred = F.linear(cast(contexts[d]).permute(0, 2, 3, 1), weight, bias) * self.emb_scale
                frame_pos = to_frame(positions, d)
                length = frame_pos.shape[0]
                for i, k in enumerate(self.offsets):
                    # Anchors: frame rows 0 .. length - k - 1; label: the target k frame rows further.
                    preds.append(pred[:, :length - k, :, i * dim:(i + 1) * dim].reshape(-1, dim))
                    labels.append((image_start + frame_pos[k:]).reshape(-1))
                    names.append(f'{d}/k{k}')
                    sizes.append(preds[-1].shape[0])
            logits = torch.cat(preds) @ targets.t()  # (anchors, candidates), one matmul for all tasks
            if low:
                logits = logits.float()  # the cross-entropy in fp32
            labels = torch.cat(labels)
            ce, hit = info_nce(logits, labels)
            correct = hit.float()
            task_loss = torch.stack([x.mean() for x in ce.split(sizes)])
            task_acc = torch.stack([x.mean() for x in correct.split(sizes)])
        metrics = {f'acc/{name}': acc for name, acc in zip(names, task_acc, strict=True)}
        metrics['acc'] = task_acc.mean()
        return ObjectiveOutput(task_loss.mean(), metrics)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Promote half/bfloat16 to float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _warn_single_image(global_batch: int) -> None:
    global _warned_single_image
    if global_batch == 1 and not _warned_single_image:
        _warned_single_image = True
        warnings.warn(
            'CPCObjective got a batch of ONE image: its only negatives are other positions of the same image, not '
            'other images (Hénaff et al. 2020, Sec. 3.1). Use at least 2 images per step for the paper\'s objective. '
            '(Warned once per process.)', UserWarning, stacklevel=3)
