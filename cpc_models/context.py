"""The masked (PixelCNN-style) context network of CPC v2.

Hénaff et al., *Data-Efficient Image Recognition with Contrastive Predictive Coding*, ICML 2020
(arXiv 1905.09272), Sec. 3.1 and the appendix pseudo-code (``pixelCNN``): a stack of residual blocks over the
latent grid z (B, C, rows, cols) whose output c[r, j] depends only on latents z[u, *] with u <= r.

Each block is 1x1 conv -> ReLU -> 1x3 conv -> pad one row at the top -> 2x1 conv (valid) -> ReLU -> 1x1 conv
back to C channels, added to its input; a ReLU follows the last block. The 2x1 conv after the top pad mixes a
row only with the row above it, so information never flows upwards; each block widens the view by one row
above (and one column either side).

The 1x3 conv is zero-padded along the width ("same"), so the grid keeps its width and the residual sum needs
no cropping; the pseudo-code marks only the 2x1 conv as valid. Any grid of at least 1x1 is accepted.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_norm import cast_all

__all__ = ['MaskedContextNet', 'MaskedResidualBlock']


class MaskedResidualBlock(nn.Module):
    """One causal residual block: (B, C, R, W) -> (B, C, R, W); output row r sees input rows r-1 and r."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.conv3 = nn.Conv2d(hidden, hidden, (2, 1))
        self.conv4 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, params: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """``params``: the four convolutions' (weight, bias) in order, e.g. cast copies; default: the modules' own."""
        w = params if params is not None else self.conv_params()
        h = F.conv2d(F.relu(F.conv2d(x, w[0], w[1])), w[2], w[3], padding=(0, 1))
        h = F.relu(F.conv2d(F.pad(h, (0, 0, 1, 0)), w[4], w[5]))  # pad (left, right, top, bottom): one row on top
        return x + F.conv2d(h, w[6], w[7])

    def conv_params(self) -> List[torch.Tensor]:
        return [p for c in (self.conv1, self.conv2, self.conv3, self.conv4) for p in (c.weight, c.bias)]


class MaskedContextNet(nn.Module):
    """PixelCNN-style context network (Hénaff et al. 2020, Sec. 3.1, appendix ``pixelCNN``).

    Args:
        channels: latent channels C (input and output).
        hidden: width of the blocks (256 in the paper).
        blocks: number of residual blocks (5 in the paper); the context at row r sees rows r - blocks .. r.

    Shapes:
        z (B, C, R, W) -> context (B, C, R, W), where context[:, :, r] depends only on z[:, :, :r + 1].

    Example:
        >>> net = MaskedContextNet(256)
        >>> net(torch.randn(2, 256, 6, 6)).shape
        torch.Size([2, 256, 6, 6])
    """

    def __init__(self, channels: int, hidden: int = 256, blocks: int = 5):
        super().__init__()
        for name, value in (('channels', channels), ('hidden', hidden), ('blocks', blocks)):
            if int(value) < 1:
                raise ValueError(f'MaskedContextNet: {name} must be a positive integer, got {value}.')
        self.channels = channels
        self.blocks = nn.Sequential(*[MaskedResidualBlock(channels, hidden) for _ in range(blocks)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4:
            raise ValueError(
                f'MaskedContextNet expects a latent grid (B, C, rows, cols), got shape {tuple(z.shape)}; '
                f'get one from an encoder with model.forward_features(images).')
        if z.shape[1] != self.channels:
            raise ValueError(
                f'MaskedContextNet was built for {self.channels} latent channels, got {z.shape[1]} '
                f'(shape {tuple(z.shape)}); build it with channels=model.num_features.')
        if z.shape[2] < 1 or z.shape[3] < 1:
            raise ValueError(f'MaskedContextNet needs a latent grid of at least 1x1, got shape {tuple(z.shape)}.')
        kind = z.device.type
        if kind == 'meta' or not torch.is_autocast_enabled(kind) or torch.compiler.is_compiling():
            return F.relu(self.blocks(z))
        # under autocast: every block's weights and biases cast in one multi-tensor copy (their gradients back in
        # one), not one cast per tensor and direction
        params = [p for b in self.blocks for p in b.conv_params()]
        dtype = torch.get_autocast_dtype(kind)
        cast = iter(cast_all(params, dtype) if all(p.dtype != dtype for p in params) else params)
        for block in self.blocks:
            z = block(z, [next(cast) for _ in range(8)])
        return F.relu(z)
