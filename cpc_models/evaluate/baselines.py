"""The supervised baseline of Figure 1: a whole-image CNN trained from random init on the labelled images.

The paper's baseline is a ResNet trained on pixels with all the tricks it could find (Hénaff et al. 2020, Sec. 4.2,
Fig. 1 red). Here it is a small network; the default was measured on the validation split (docs/evaluation.md):

* ``convnet``: a plain VGG-style net (:class:`ConvNet`): stages of 3x3 conv + batch norm + ReLU, a 2x2 max-pool
  between stages, global average pool, dropout, linear.
* any timm model name (``resnet18``, ``cpcv2_resnet_tiny`` with ``{"dense": true}``, ...), created with
  ``in_chans`` and ``num_classes``.
"""
from typing import Dict, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import ConvNormAct

from .. import encoder as _encoder  # noqa: F401  (registers the cpc models with timm, for the dense encoder)

__all__ = ['ConvNet', 'create_supervised']


class ConvNet(nn.Module):
    """Images (B, in_chans, img_size, img_size) -> logits (B, num_classes).

    Args:
        widths: channels of each stage; a 2x2 max-pool sits between consecutive stages.
        depth: 3x3 conv-BN-ReLU layers per stage.
        drop_rate: dropout before the linear layer.
        flatten: the linear layer sees the whole last map (keeps where things are) instead of its global average.
        img_size: image side (only needed with ``flatten``).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths: Sequence[int] = (32, 64, 128),
                 depth: int = 2, drop_rate: float = 0.2, flatten: bool = False, img_size: int = 28):
        super().__init__()
        if not widths or depth < 1:
            raise ValueError(f'ConvNet needs at least one stage and depth >= 1, got widths={widths}, depth={depth}.')
        layers, chs = [], in_chans
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(depth):
                layers.append(ConvNormAct(chs, w, 3))
                chs = w
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        side = img_size // 2 ** (len(widths) - 1)
        pool = nn.Identity() if flatten else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(pool, nn.Flatten(), nn.Dropout(drop_rate),
                                  nn.Linear(chs * side * side if flatten else chs, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create_supervised(name: str, num_classes: int, in_chans: int = 1, args: Optional[Dict] = None) -> nn.Module:
    """The baseline network ``name`` ('convnet' or a timm model name) with ``args`` as keyword arguments."""
    args = dict(args or {})
    if name == 'convnet':
        return ConvNet(in_chans, num_classes, **args)
    if not timm.is_model(name):
        raise ValueError(f"Unknown supervised model '{name}'; use 'convnet' or a timm model name.")
    return timm.create_model(name, in_chans=in_chans, num_classes=num_classes, **args)
