"""The paper's classifier on the CPC latent grid ("efficient classification", Hénaff et al. 2020, Fig. 1).

The paper trains a ResNet-33 (11 pre-activation bottleneck blocks, 3 convolutions each) on top of the CPC
feature grid z (B, C, rows, cols) with a fraction of the labels. The blocks keep the grid's resolution (no
striding: the grid is already coarse), then the grid is average-pooled and a linear layer gives the logits.

The block widths are not fixed in our notes; we size the stack to the grid: ``width`` channels in the residual
stream (default: the grid's channels) and ``mid_chs`` in the bottleneck (default ``width // 4``, the ResNet
convention). Named sizes (see ``GRID_CLASSIFIER_SIZES``):

* ``paper``: 11 blocks, width = in_chs, bottleneck = in_chs / 4 (e.g. 256/64 on the tiny 6x6x256 grid).
* ``small`` (default of ``cpc-eval``): 3 blocks, width = in_chs / 2, bottleneck = width / 4; cheap on a CPU.
* ``tiny``: 1 block, width = in_chs / 2, bottleneck = width / 4.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_norm_act_layer

from .encoder import PreActBottleneck

__all__ = ['GridClassifier', 'GRID_CLASSIFIER_SIZES', 'grid_classifier_kwargs']

# blocks, width as a fraction of the grid's channels; the bottleneck is width // 4.
GRID_CLASSIFIER_SIZES = {
    'tiny': dict(blocks=1, width_ratio=0.5),
    'small': dict(blocks=3, width_ratio=0.5),
    'paper': dict(blocks=11, width_ratio=1.0),
}


def grid_classifier_kwargs(size: str, in_chs: int) -> dict:
    """``GridClassifier`` keyword arguments (blocks, width, mid_chs) of a named size for a grid of in_chs channels."""
    if size not in GRID_CLASSIFIER_SIZES:
        raise ValueError(f"Unknown classifier size '{size}'; choose from {sorted(GRID_CLASSIFIER_SIZES)}.")
    s = GRID_CLASSIFIER_SIZES[size]
    width = max(int(in_chs * s['width_ratio']), 4)
    return dict(blocks=s['blocks'], width=width, mid_chs=max(width // 4, 1))


class GridClassifier(nn.Module):
    """Pre-activation bottleneck ResNet on a latent grid (B, in_chs, rows, cols) -> logits (B, num_classes).

    Args:
        in_chs: channels of the latent grid (the encoder's ``num_features``).
        num_classes: classifier outputs.
        blocks: number of bottleneck blocks (the paper's ResNet-33 has 11).
        width: residual-stream channels (default in_chs); the first block projects in_chs -> width.
        mid_chs: bottleneck channels (default width // 4).
        norm_layer: timm norm-act name ('batchnorm2d', 'groupnorm1' = layer norm, ...).
        drop_rate: dropout before the final linear layer.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
    """

    def __init__(
            self,
            in_chs: int,
            num_classes: int,
            blocks: int = 3,
            width: Optional[int] = None,
            mid_chs: Optional[int] = None,
            norm_layer: str = 'batchnorm2d',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        if in_chs < 1 or num_classes < 1 or blocks < 1:
            raise ValueError(f'in_chs ({in_chs}), num_classes ({num_classes}) and blocks ({blocks}) must be >= 1.')
        width = width or in_chs
        mid_chs = mid_chs or max(width // 4, 1)
        self.in_chs, self.num_classes, self.num_features = in_chs, num_classes, width
        norm_act = get_norm_act_layer(norm_layer, nn.ReLU)
        rates = [drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]
        self.blocks = nn.Sequential(*[
            PreActBottleneck(in_chs if i == 0 else width, width, mid_chs, stride=1, norm_layer=norm_act,
                             drop_path_rate=rates[i])
            for i in range(blocks)])
        self.norm = norm_act(width)
        self.head = ClassifierHead(width, num_classes, pool_type='avg', drop_rate=drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        for b in self.blocks:  # each residual branch starts at zero: the stack starts close to the identity
            b.zero_init_last()

    def forward_features(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.in_chs:
            raise ValueError(
                f'GridClassifier expects a latent grid (B, {self.in_chs}, rows, cols), got shape {tuple(z.shape)}; '
                f'feed it encoder.forward_features(images).')
        return self.norm(self.blocks(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(z))
