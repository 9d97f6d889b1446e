"""CPC v2 encoders: pre-activation (v2) bottleneck ResNets with layer norm, run on a grid of patches.

Hénaff et al., *Data-Efficient Image Recognition with Contrastive Predictive Coding*, ICML 2020
(arXiv 1905.09272). Sec. 4.1 and Table 1 fix the encoder:

* ResNet-161: the first three stacks of ResNet-v2-101 with the third stack converted to 46 blocks,
  4096-channel outputs and 512-wide bottlenecks (305M parameters); no fourth stack.
* Batch norm replaced by layer norm: each sample is normalized over (C, H, W) with per-channel affine
  parameters, i.e. GroupNorm with one group; :class:`LayerNormAct2d` computes it with ``F.layer_norm``
  (faster than ``F.group_norm``, same ``weight``/``bias`` keys as timm's ``GroupNorm1Act``).
* Every patch of the image grid is encoded on its own and mean-pooled to one vector, giving the latent
  grid z (B, C, rows, cols) the context network predicts over.

Layout follows ``timm/models/resnetv2.py`` (blocks, model, checkpoint filter, ``_create``, ``default_cfgs``,
entrypoints) with the same state-dict key names (``stem.conv``, ``stages.i.blocks.j.{norm1,conv1,...}``,
``norm``, ``head.fc``).

Modes:

* grid (default): ``forward_features`` returns the patch-latent grid (B, C, rows, cols).
* dense (``dense=True``): the whole image runs through the trunk, ``forward_features`` returns the map at the
  last stack's reduction (16 for the three-stack ImageNet encoders, 32 for ResNet-50, 4 with the small stem);
  ``features_only=True`` builds this mode and returns the multi-scale maps through ``forward_intermediates``
  (timm's ``FeatureGetterNet``), for detection and segmentation.
"""
import contextlib
import os
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ClassifierHead,
    DropPath,
    GroupNorm1Act,
    create_conv2d,
    get_norm_act_layer,
    register_notrace_function,
    register_notrace_module,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._weights import WeightsMismatchError, check_keys, pretrained_errors
from .fused_norm import add_layer_norm_act_nhwc, cast_all, layer_norm_act_nhwc, use_fused
from .patches import check_images, grid_size, is_symbolic_tracing, patchify

__all__ = ['CPCResNetV2', 'LayerNormAct2d', 'PatchConv2d', 'PreActBottleneck', 'WEIGHTS_DIR']

# Published checkpoints (<arch>.<tag>/model.safetensors) found locally are used before the Hub: $CPC_MODELS_WEIGHTS_DIR,
# else the copies a wheel carries (cpc_models/weights/, see setup.py), else weights/ beside the package (a checkout).
_PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = Path(os.environ.get('CPC_MODELS_WEIGHTS_DIR') or next(
    (d for d in (_PACKAGE_DIR / 'weights', _PACKAGE_DIR.parent / 'weights') if d.is_dir()), _PACKAGE_DIR / 'weights'))
HF_ORG = 'cpc-models'


def _nhwc(x: torch.Tensor) -> bool:
    """A 4-D channels_last tensor that is not also contiguous NCHW (its (N, H, W, C) view is the contiguous one)."""
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@register_notrace_module  # one branch on the memory format: a leaf for timm's FX feature extraction
class LayerNormAct2d(GroupNorm1Act):
    """CPC v2's layer norm + activation: each sample normalized over (C, H, W), per-channel affine, then the act.

    The function (and the ``weight``/``bias`` parameters of shape (C,)) of ``GroupNorm(1, C)`` / timm's
    ``GroupNorm1Act``, computed by ``F.layer_norm`` over the trailing (C, H, W) dims with the per-channel affine
    expanded to (C, H, W): the CPU kernels of ``group_norm``'s backward are slow on the small maps of patch
    encoders (2x2, 1x1), ``layer_norm``'s are not. A channels_last input is normalized as its (N, H, W, C) view,
    which is contiguous, so neither layout is copied. Under autocast it runs in the input's dtype (bf16 in, bf16
    out, statistics in fp32) instead of autocast's fp32 for layer_norm: no copies of the activations to fp32 and back.

    Shapes:
        x (N, C, H, W) -> (N, C, H, W), same memory format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fused(x):
            return layer_norm_act_nhwc(x, self.weight, self.bias, self.eps, type(self.act) is nn.ReLU)
        nhwc = _nhwc(x)
        if nhwc:
            x = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous: channels are the last normalized dim
        shape = list(x.shape[1:])
        view = [-1] if nhwc else [-1] + [1] * (x.ndim - 2)  # the per-channel affine, broadcast over H, W
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None:
            weight, bias = weight.view(view).expand(shape), bias.view(view).expand(shape)
        if torch.jit.is_scripting():  # TorchScript has no per-device autocast state to ask
            x = F.layer_norm(x, shape, weight, bias, self.eps)
        else:
            x = self._layer_norm(x, shape, weight, bias)
        # the activation (often in place) acts on the normalized tensor itself, never on a permuted view of it
        x = self.act(self.drop(x))
        return x.permute(0, 3, 1, 2) if nhwc else x

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> bool:
        """cpc_models.fused_norm's one-kernel norm + ReLU (CUDA, channels_last, Triton): no per-step expand, cast or
        sum of the per-channel parameters."""
        return use_fused(x, self.act, self.drop, self.weight is not None and self.bias is not None)

    @torch.jit.unused
    def _layer_norm(self, x: torch.Tensor, shape: List[int], weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.device.type != 'meta' and torch.is_autocast_enabled(x.device.type):  # meta has no autocast state
            # autocast runs layer_norm in fp32: it would copy a bf16 x to fp32 and hand the next convolution an fp32
            # tensor to copy back. The kernel accumulates its statistics in fp32 for bf16 input anyway.
            with torch.autocast(x.device.type, enabled=False):
                weight = weight.to(x.dtype) if weight is not None else None
                bias = bias.to(x.dtype) if bias is not None else None
                return F.layer_norm(x, shape, weight, bias, self.eps)
        return F.layer_norm(x, shape, weight, bias, self.eps)


@register_notrace_function  # one branch on the memory format: a leaf for timm's FX feature extraction
def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over H and W: (N, C, H, W) -> (N, C). A channels_last map is averaged as its (N, H, W, C) view so that
    its gradient comes back channels_last as well: ``mean((2, 3))``'s is NCHW, and the norm-act backward that meets
    it ran ~10x slower on the mismatched layouts (threshold_backward on the 2x2 maps of the fmnist_tiny step)."""
    if _nhwc(x):
        return x.permute(0, 2, 3, 1).mean((1, 2))
    return x.mean((2, 3))


@register_notrace_module  # one branch on the map size: a leaf for timm's FX feature extraction
class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a zero-padded, centred convolution of a 1x1 map as the matrix product it is.

    Small patches shrink to 1x1 maps in the deep stacks (8 px patches after the 7x7/2 stem and max-pool). There
    every output sees only the kernel's centre tap (the others fall on the zero padding, whatever the stride), so
    the convolution is a linear layer with the centre weights; oneDNN computes all k x k taps. Same parameters and
    state-dict keys as the ``nn.Conv2d`` it replaces (:meth:`convert`); every other input goes through the conv.
    """
    centre_only: torch.jit.Final[bool]

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Turn every plain ``nn.Conv2d`` in ``module`` into a PatchConv2d in place (parameters and RNG untouched)."""
        for m in module.modules():
            if type(m) is nn.Conv2d:
                m.__class__ = cls
                m.centre_only = (
                    m.groups == 1 and m.padding_mode == 'zeros' and m.dilation == (1, 1)
                    and not isinstance(m.padding, str) and all(k % 2 == 1 for k in m.kernel_size)
                    and tuple(m.padding) == tuple(k // 2 for k in m.kernel_size))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not torch.jit.is_scripting():
            weight = self._weight()
        if self.centre_only and x.ndim == 4 and x.shape[2] == 1 and x.shape[3] == 1:
            centre = weight[:, :, self.kernel_size[0] // 2, self.kernel_size[1] // 2]
            return F.linear(x.flatten(1), centre, self.bias).view(x.shape[0], -1, 1, 1)
        return self._conv_forward(x, weight, self.bias)

    @torch.jit.unused
    def _weight(self) -> torch.Tensor:
        """The weight, or its copy in autocast's dtype made for the whole trunk at once (CPCResNetV2._cast_weights)."""
        cast = self.__dict__.get('_cast_weight')
        return self.weight if cast is None else cast


def _norm_act(norm_layer: Union[str, Callable], act_layer, eps: float) -> Callable:
    """'layernorm' -> LayerNormAct2d (GroupNorm(1, C) + act, CPC v2), 'batchnorm' -> BatchNorm2d + act (CPC v1)."""
    if norm_layer == 'layernorm':
        return partial(LayerNormAct2d, act_layer=act_layer, eps=eps)
    name = {'batchnorm': 'batchnorm2d'}.get(norm_layer, norm_layer)
    return partial(get_norm_act_layer(name, act_layer), eps=eps)


class DownsampleConv(nn.Module):
    """1x1 (strided) projection shortcut, fed the pre-activated input as in ResNet-v2."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        self.conv = create_conv2d(in_chs, out_chs, 1, stride=stride, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: norm-act, 1x1, norm-act, 3x3 (carries the stride), norm-act, 1x1, + shortcut."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            mid_chs: int,
            stride: int = 1,
            norm_layer: Callable = nn.BatchNorm2d,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.downsample = (
            DownsampleConv(in_chs, out_chs, stride, **dd) if stride != 1 or in_chs != out_chs else None)
        self.norm1 = norm_layer(in_chs, **dd)
        self.conv1 = create_conv2d(in_chs, mid_chs, 1, **dd)
        self.norm2 = norm_layer(mid_chs, **dd)
        self.conv2 = create_conv2d(mid_chs, mid_chs, 3, stride=stride, **dd)
        self.norm3 = norm_layer(mid_chs, **dd)
        self.conv3 = create_conv2d(mid_chs, out_chs, 1, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        branch, shortcut = self.forward_branches(x, x_preact)
        return self.drop_path(branch) + shortcut

    def forward_branches(self, x: torch.Tensor, x_preact: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block's two summands before the residual add: (conv3(...conv1(x_preact)), shortcut), from its input
        x and x_preact = norm1(x)."""
        shortcut = x if self.downsample is None else self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return x, shortcut


class ResNetStage(nn.Module):
    """A stack of bottlenecks; only the first one strides and projects."""

    def __init__(self, in_chs, out_chs, mid_chs, depth, stride, norm_layer, drop_path_rates: Sequence[float],
                 device=None, dtype=None):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            PreActBottleneck(
                in_chs if i == 0 else out_chs, out_chs, mid_chs, stride=stride if i == 0 else 1,
                norm_layer=norm_layer, drop_path_rate=drop_path_rates[i], device=device, dtype=dtype)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _create_stem(in_chans: int, out_chs: int, stem_type: str, device=None, dtype=None) -> Tuple[nn.Sequential, int]:
    """'' = ResNet-v2 stem (7x7/2 conv + 3x3/2 max-pool, reduction 4); 'small' = 3x3/1 conv (reduction 1)."""
    dd = dict(device=device, dtype=dtype)
    if stem_type == 'small':
        return nn.Sequential(OrderedDict(conv=create_conv2d(in_chans, out_chs, 3, **dd))), 1
    if stem_type == '':
        return nn.Sequential(OrderedDict(
            conv=create_conv2d(in_chans, out_chs, 7, stride=2, **dd),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1))), 4
    raise ValueError(f"Unknown stem_type '{stem_type}'; use '' (ImageNet) or 'small' (small images).")


class CPCResNetV2(nn.Module):
    """Pre-activation bottleneck ResNet that encodes an image patch by patch (CPC v2).

    Args:
        layers: blocks per stack, e.g. (3, 4, 46) for ResNet-161.
        channels: output channels per stack.
        bottle_widths: bottleneck width per stack (default: channels / 4).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: image channels.
        global_pool: pooling of the latent grid before the classifier ('avg', 'max', ... or '' for none).
        stem_chs: stem output channels.
        stem_type: '' (7x7/2 conv + max-pool) or 'small' (3x3/1 conv, for small images).
        norm_layer: 'layernorm' (CPC v2), 'batchnorm' (CPC v1) or a timm norm-act layer.
        norm_eps: normalization epsilon.
        patch_size: side of the square patches (pixels).
        patch_stride: step between patches (pixels); < patch_size gives overlapping patches.
        dense: run the whole image through the trunk instead of the patch grid (detection, segmentation).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        zero_init_last: start every block's last conv at zero (the block begins as the identity).
        device, dtype: where and in which dtype to create the parameters (timm's factory kwargs).
    """

    def __init__(
            self,
            layers: Sequence[int],
            channels: Sequence[int] = (256, 512, 1024),
            bottle_widths: Optional[Sequence[int]] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            stem_chs: int = 64,
            stem_type: str = '',
            norm_layer: Union[str, Callable] = 'layernorm',
            norm_eps: float = 1e-5,
            act_layer: Callable = nn.ReLU,
            patch_size: int = 80,
            patch_stride: int = 36,
            dense: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if len(layers) != len(channels):
            raise ValueError(f'layers {tuple(layers)} and channels {tuple(channels)} must have the same length.')
        if patch_stride < 1 or patch_size < 1:
            raise ValueError(f'patch_size ({patch_size}) and patch_stride ({patch_stride}) must be positive.')
        bottle_widths = bottle_widths or [c // 4 for c in channels]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.dense = dense
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        norm_act = _norm_act(norm_layer, act_layer, norm_eps)

        self.stem, reduction = _create_stem(in_chans, stem_chs, stem_type, **dd)
        self.feature_info = [dict(num_chs=stem_chs, reduction=reduction, module='stem')]
        rates = [drop_path_rate * i / max(sum(layers) - 1, 1) for i in range(sum(layers))]
        dpr = [rates[sum(layers[:i]):sum(layers[:i + 1])] for i in range(len(layers))]
        stages = []
        prev_chs = stem_chs
        for i, (depth, out_chs, mid_chs) in enumerate(zip(layers, channels, bottle_widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            stages.append(ResNetStage(prev_chs, out_chs, mid_chs, depth, stride, norm_act, dpr[i], **dd))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
            prev_chs = out_chs
        self.stages = nn.Sequential(*stages)
        if not dense:
            # One latent per patch: every level of the grid has the patch stride as its reduction.
            for info in self.feature_info:
                info['reduction'] = patch_stride
        self.num_features = self.head_hidden_size = prev_chs
        self.norm = norm_act(prev_chs, **dd)
        self.head = ClassifierHead(prev_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        PatchConv2d.convert(self)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
            elif zero_init_last and isinstance(m, PreActBottleneck):
                m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        ref = self.stem.conv.weight  # the new head follows the model's device, dtype and train/eval mode
        self.head.to(device=ref.device, dtype=ref.dtype).train(self.training)

    def grid_size(self, img_size) -> Tuple[int, int]:
        """(rows, cols) of the latent grid for an image of img_size = (H, W) or an int."""
        return grid_size(img_size, self.patch_size, self.patch_stride)

    # Input checks run in eager mode only: TorchScript skips the `not torch.jit.is_scripting()` blocks, and under
    # torch.fx tracing shapes are symbolic (`is_symbolic_tracing`), so scripted and traced graphs carry no checks.
    def _check_patches(self, patches: torch.Tensor) -> None:
        if is_symbolic_tracing():
            return
        if not isinstance(patches, torch.Tensor) or patches.ndim != 6 or 0 in patches.shape[1:3]:
            shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(
                f'Expected patches (B, rows, cols, C, P, P) with rows, cols >= 1, got {shape}; '
                f'cut images with cpc_models.patches.patchify(x, {self.patch_size}, {self.patch_stride}).')
        check_images(patches[:, 0, 0], self.in_chans)

    def _check_images(self, x: torch.Tensor) -> None:
        if not is_symbolic_tracing():
            check_images(x, self.in_chans)

    def _pool_patches(self, x: torch.Tensor, grid: List[int]) -> torch.Tensor:
        """Per-patch maps (B * rows * cols, C, h, w) -> latent grid (B, C, rows, cols); dense maps pass through."""
        if self.dense:
            return x
        return spatial_mean(x).unflatten(0, grid).permute(0, 3, 1, 2)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stacks and final norm-act on a batch of images or patches (N, C, H, W) -> (N, F, h, w)."""
        x = self.stem(x)
        if not torch.jit.is_scripting() and self._fuse_residuals(x):
            return self._forward_blocks_fused(x)
        return self.norm(self.stages(x))

    @torch.jit.unused
    def _fuse_residuals(self, x: torch.Tensor) -> bool:
        """Each residual add fused with the norm-act that reads its sum (cpc_models.fused_norm): where the norm-act
        layers take the fused path, without checkpointing or stochastic depth."""
        if is_symbolic_tracing():  # torch.fx (timm's feature extraction) traces the modules' own path
            return False
        norm = self.norm
        return (isinstance(norm, LayerNormAct2d) and len(self.stages) > 0 and not self.grad_checkpointing
                and not any(s.grad_checkpointing for s in self.stages)
                and all(isinstance(b.drop_path, nn.Identity) and isinstance(b.norm1, LayerNormAct2d)
                        and type(b.norm1.act) is type(norm.act) for s in self.stages for b in s.blocks)
                and norm._fused(x))

    @torch.jit.unused
    def _forward_blocks_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The stacks and the final norm with every block's residual add done by the next norm-act's kernel: the same
        function as ``self.norm(self.stages(x))`` (the norm-act modules' forward hooks do not run)."""
        blocks = [b for s in self.stages for b in s.blocks]
        with self._cast_weights(x):
            y = blocks[0].norm1(x)
            for i, block in enumerate(blocks):
                branch, shortcut = block.forward_branches(x, y)
                norm = blocks[i + 1].norm1 if i + 1 < len(blocks) else self.norm
                x, y = add_layer_norm_act_nhwc(branch, shortcut, norm.weight, norm.bias, norm.eps,
                                               type(norm.act) is nn.ReLU)
        return y

    @torch.jit.unused
    @contextlib.contextmanager
    def _cast_weights(self, x: torch.Tensor) -> Iterator[None]:
        """Under autocast, the stacks' convolution weights cast to its dtype in one multi-tensor copy (and their
        gradients back in one), instead of one cast per convolution each way; eager only (a compiled graph fuses them)."""
        kind = x.device.type
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        # Under DDP the gradients must come back stack by stack, so that their all-reduce overlaps the backward
        # (one cast's backward would hand every trunk gradient over only at its end): one cast per convolution there.
        if kind == 'meta' or not torch.is_autocast_enabled(kind) or torch.compiler.is_compiling() or distributed:
            yield
            return
        dtype = torch.get_autocast_dtype(kind)
        convs = [m for s in self.stages for m in s.modules() if isinstance(m, PatchConv2d) and m.weight.dtype != dtype]
        for m, w in zip(convs, cast_all([m.weight for m in convs], dtype)):
            m.__dict__['_cast_weight'] = w
        try:
            yield
        finally:
            for m in convs:
                m.__dict__.pop('_cast_weight', None)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Encode pre-cut (e.g. augmented) patches (B, rows, cols, C, P, P) into the latent grid (B, F, rows, cols).

        All patches go through the trunk as one batch of B * rows * cols images, and each is mean-pooled.
        """
        if not torch.jit.is_scripting():
            self._check_patches(patches)
        z = spatial_mean(self.forward_trunk(patches.flatten(0, 2)))
        return z.unflatten(0, patches.shape[:3]).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> latent grid (B, F, rows, cols), or the dense map (B, F, H/r, W/r) if dense."""
        if not torch.jit.is_scripting():
            self._check_images(x)
        if self.dense:
            return self.forward_trunk(x)
        return self.forward_patches(patchify(x, self.patch_size, self.patch_stride))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem and of each stack: latent grids (B, C_i, rows, cols), or dense maps if dense.

        Returns:
            ``(final, intermediates)``, where ``final`` equals ``forward_features(x)``; or only the list.
        """
        if output_fmt != 'NCHW':
            raise ValueError("Only output_fmt='NCHW' is supported, got '" + output_fmt + "'.")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        if not torch.jit.is_scripting():
            self._check_images(x)
        grid: List[int] = []
        if not self.dense:  # all patches through the trunk as one batch; pooled back onto the grid per level
            patches = patchify(x, self.patch_size, self.patch_stride)
            grid = patches.shape[:3]
            x = patches.flatten(0, 2)

        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(self._pool_patches(x, grid))
        last_idx = len(self.stages)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript cannot slice the stacks
            stages = self.stages
        else:
            stages = self.stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self._pool_patches(self.norm(x) if norm and feat_idx == last_idx else x, grid))
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return self._pool_patches(x, grid), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stacks after the last requested intermediate (and optionally the final norm and the head).

        When stacks are dropped, the final norm (sized for the last stack) and the head go too, and
        ``num_features`` becomes the channel count of the last kept level, as in timm's ``ResNetV2``.
        """
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            self.head = ClassifierHead(self.num_features, 0, pool_type='', drop_rate=self.drop_rate)
            self.num_classes = 0
        elif prune_head:
            self.reset_classifier(0, '')
        return take_indices


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: CPCResNetV2) -> Dict[str, torch.Tensor]:
    """Accept training checkpoints (``encoder.``/``module.``/``_orig_mod.`` prefixes, no head) and check shapes.

    Known aliases (those prefixes) are mapped; no key is ever dropped. Keys are checked by timm's strict load
    (``pretrained_strict=True``, rewritten by ``_weights.pretrained_errors`` to name the key and the file), except
    when timm adapts the classifier (``num_classes`` differs from the weights'): timm then loads non-strictly, so
    every key but the classifier's is checked here.

    Raises:
        WeightsMismatchError: naming the first key whose shape does not fit, or the missing / unexpected keys.
    """
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', '_orig_mod.', 'encoder.'):
            k = k.removeprefix(prefix)
        out[k] = v
    target = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    first_conv = cfg.get('first_conv', 'stem.conv')
    classifier = cfg.get('classifier', 'head.fc')
    head = {f'{classifier}.weight', f'{classifier}.bias'}
    skip = {f'{first_conv}.weight'} | head  # timm adapts in_chans / num_classes
    for k in target:  # in model order, so the first mismatch is the earliest layer that differs
        v = out.get(k)
        if v is not None and k not in skip and tuple(target[k].shape) != tuple(v.shape):
            raise WeightsMismatchError(
                f'Checkpoint does not fit {type(model).__name__}: first mismatching key "{k}" has shape '
                f'{tuple(v.shape)} in the checkpoint but {tuple(target[k].shape)} in the model. Create the model '
                f'architecture the checkpoint was trained with (see its config.json "architecture"/"model_args").')
    if getattr(model, 'num_classes', 0) != cfg.get('num_classes', 0):  # timm will pop the head and load non-strictly
        check_keys([k for k in out if k not in head], [k for k in target if k not in head], 'the weights',
                   type(model).__name__)
    return out


def _create_cpc_resnetv2(variant: str, pretrained: bool = False, **kwargs) -> CPCResNetV2:
    feature_cfg = {'feature_cls': 'getter', **(kwargs.pop('feature_cfg', None) or {})}
    if kwargs.get('features_only'):
        kwargs.setdefault('dense', True)  # multi-scale maps for detection: the whole image through the trunk
        kwargs.setdefault('out_indices', tuple(range(len(kwargs['layers']) + 1)))
        feature_cls = kwargs.get('feature_cls', feature_cfg['feature_cls'])
        if not kwargs['dense'] and feature_cls != 'getter':
            raise ValueError(
                f"features_only=True with dense=False returns latent grids, which only feature_cls='getter' (the "
                f"default) computes; feature_cls={feature_cls!r} would return per-patch module outputs. Use "
                f"dense=True (the features_only default) for {feature_cls!r}.")
    with pretrained_errors(variant, pretrained, kwargs):
        return build_model_with_cfg(
            CPCResNetV2, variant, pretrained,
            feature_cfg=feature_cfg,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )


def _cfg(**kwargs) -> Dict:
    return {
        'num_classes': 0, 'input_size': (3, 260, 260), 'pool_size': (6, 6),
        'crop_pct': 260 / 300, 'interpolation': 'bicubic', 'crop_mode': 'center',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:1905.09272',
        'paper_name': 'Data-Efficient Image Recognition with Contrastive Predictive Coding',
        **kwargs,
    }


def _published(arch_tag: str, **kwargs) -> Dict:
    """Cfg of a published checkpoint: the copy in weights/ when present (offline), else the Hugging Face Hub."""
    local = WEIGHTS_DIR / arch_tag / 'model.safetensors'
    cfg = _cfg(hf_hub_id=f'{HF_ORG}/{arch_tag}', **kwargs)
    if local.is_file():
        cfg['file'] = str(local)
    return cfg


_FMNIST = dict(
    input_size=(1, 28, 28), pool_size=(6, 6), crop_pct=1.0, interpolation='bilinear',
    mean=(0.2860,), std=(0.3530,))

# ImageNet geometry (paper Sec. 4.1: 80x80 patches; grid and stride are ours): a 260 px crop (resize the short
# side to 300, centre crop 260) cut into a 6x6 grid of 80 px patches with a 36 px stride (55% overlap, close to
# v1's 50%), so that 80 + 5 * 36 = 260 covers the crop exactly.
default_cfgs = generate_default_cfgs({
    'cpcv2_resnet161': _cfg(),
    'cpcv2_resnet50': _cfg(),
    'cpcv1_resnet101': _cfg(input_size=(3, 256, 256), pool_size=(7, 7), crop_pct=0.875),
    'cpcv2_resnet_small': _cfg(input_size=(3, 64, 64), pool_size=(7, 7), crop_pct=1.0),
    # Pretrained with `cpc-train --preset fmnist_tiny --max-steps 800` on Fashion-MNIST train (weights/ model card).
    'cpcv2_resnet_tiny.fmnist': _published('cpcv2_resnet_tiny.fmnist', **_FMNIST),
    # Pretrained with `cpc-train --preset fmnist_wide` (10 epochs), chosen by the val-split linear probe among the
    # runs in results/fmnist_search/ (weights/ model card).
    'cpcv2_resnet_tiny_wide.fmnist': _published('cpcv2_resnet_tiny_wide.fmnist', **_FMNIST),
})


@register_model
def cpcv2_resnet161(pretrained: bool = False, **kwargs) -> CPCResNetV2:
    """CPC v2 ResNet-161 (paper Table 1): stacks [3, 4, 46], 4096-d output, 512-wide bottlenecks, layer norm."""
    model_args = dict(layers=(3, 4, 46), channels=(256, 512, 4096), bottle_widths=(64, 128, 512))
    return _create_cpc_resnetv2('cpcv2_resnet161', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpcv2_resnet50(pretrained: bool = False, **kwargs) -> CPCResNetV2:
    """CPC v2 ResNet-50 (v2, [3, 4, 6, 3], layer norm): the paper's 24M-parameter result."""
    model_args = dict(layers=(3, 4, 6, 3), channels=(256, 512, 1024, 2048))
    return _create_cpc_resnetv2('cpcv2_resnet50', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpcv1_resnet101(pretrained: bool = False, **kwargs) -> CPCResNetV2:
    """CPC v1 encoder: the first three stacks of ResNet-v2-101 with batch norm, 64 px patches, 32 px stride."""
    model_args = dict(layers=(3, 4, 23), channels=(256, 512, 1024), norm_layer='batchnorm',
                      patch_size=64, patch_stride=32)
    return _create_cpc_resnetv2('cpcv1_resnet101', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpcv2_resnet_small(pretrained: bool = False, **kwargs) -> CPCResNetV2:
    """Small CPC v2 encoder for 64 px images (STL-10 / CIFAR scale): 16 px patches, 8 px stride, 7x7 grid."""
    model_args = dict(layers=(2, 2, 2), channels=(128, 256, 512), stem_chs=32, stem_type='small',
                      patch_size=16, patch_stride=8)
    return _create_cpc_resnetv2('cpcv2_resnet_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpcv2_resnet_tiny(pretrained: bool = False, **kwargs) -> CPCResNetV2:
    """Tiny CPC v2 encoder for 28 px images (Fashion-MNIST) and CPU training: 8 px patches, 4 px stride, 6x6 grid."""
    model_args = dict(layers=(1, 1, 1), channels=(64, 128, 256), stem_chs=32, stem_type='small',
                      patch_size=8, patch_stride=4)
    return _create_cpc_resnetv2('cpcv2_resnet_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cpcv2_resnet_tiny_wide(pretrained: bool = False, **kwargs) -> CPCResNetV2:
    """cpcv2_resnet_tiny with a 512-channel last stack (128-wide bottleneck): a 512-d feature for 28 px images."""
    model_args = dict(layers=(1, 1, 1), channels=(64, 128, 512), stem_chs=32, stem_type='small',
                      patch_size=8, patch_stride=4)
    return _create_cpc_resnetv2('cpcv2_resnet_tiny_wide', pretrained=pretrained, **dict(model_args, **kwargs))
