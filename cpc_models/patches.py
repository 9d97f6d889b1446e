"""Cutting images into CPC's grid of overlapping square patches.

CPC encodes every patch of an image on its own (Hénaff et al. 2020, Sec. 3; v1 used 64x64 patches with
a 32 px stride, v2 80x80). The patch grid is described by a patch size P and a stride S:

    rows = (H - P) // S + 1,  cols = (W - P) // S + 1

Pixels past the last full patch (when (H - P) is not a multiple of S) are dropped, as a valid convolution does.
"""
from typing import Tuple

import torch

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_symbolic_tracing
except ImportError:  # older torch: the same flag, without telling torch.export apart
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_symbolic_tracing

__all__ = ['grid_size', 'patchify', 'check_images', 'is_symbolic_tracing']


def is_symbolic_tracing() -> bool:
    """True while torch.fx traces a model: tensors are Proxies, so shape checks cannot run (they stay eager-only).

    Not scriptable: call it inside ``if not torch.jit.is_scripting():``, which TorchScript skips.
    """
    return _fx_symbolic_tracing()


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def grid_size(img_size, patch_size: int, stride: int) -> Tuple[int, int]:
    """Return the (rows, cols) of the patch grid for an image of `img_size` = (H, W) or an int.

    Raises:
        ValueError: the image is smaller than one patch.
    """
    h, w = _pair(img_size)
    if h < patch_size or w < patch_size:
        raise ValueError(
            f'Image of {h}x{w} px is smaller than one {patch_size}x{patch_size} patch. '
            f'Resize the image to at least {patch_size} px per side (the model\'s pretrained cfg gives the '
            f'expected input size), or build the model with a smaller `patch_size`.')
    return (h - patch_size) // stride + 1, (w - patch_size) // stride + 1


def check_images(x, in_chans: int) -> None:
    """Validate a batch of images (B, C, H, W) before it reaches a convolution; raise a clear error if not."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'Expected a torch.Tensor of images (B, C, H, W), got {type(x).__name__}.')
    if x.ndim != 4:
        hint = ' Add a batch dimension with x.unsqueeze(0).' if x.ndim == 3 else ''
        raise ValueError(f'Expected a 4-D batch of images (B, C, H, W), got shape {tuple(x.shape)}.{hint}')
    if not x.is_floating_point():
        raise TypeError(
            f'Expected floating-point images, got dtype {x.dtype}. Convert with x.float() and normalize with the '
            f'model\'s mean/std (timm.data.resolve_model_data_config(model) + timm.data.create_transform).')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'Expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}). Convert the images '
            f'(e.g. PIL .convert("RGB") or "L"), or create the model with in_chans={x.shape[1]}.')


def patchify(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Cut images into the patch grid.

    Args:
        x: images (B, C, H, W).
        patch_size: side P of the square patches.
        stride: step S between neighbouring patches (S < P gives overlapping patches).

    Returns:
        patches (B, rows, cols, C, P, P), a view where possible (no copy until the trunk needs one).
    """
    if not torch.jit.is_scripting():
        if not is_symbolic_tracing():  # eager mode: a clear error for images smaller than one patch
            grid_size(x.shape[-2:], patch_size, stride)
    # unfold: (B, C, rows, W, P) -> (B, C, rows, cols, P, P)
    p = x.unfold(2, patch_size, stride).unfold(3, patch_size, stride)
    return p.permute(0, 2, 3, 1, 4, 5)
