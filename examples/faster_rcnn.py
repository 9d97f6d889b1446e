"""Object detection on CPC v2 features: torchvision Faster R-CNN + FPN on a CPC backbone's dense multi-scale maps.

``timm.create_model(name, features_only=True, out_indices=...)`` builds the encoder in dense mode (the whole image
runs through the trunk instead of the patch grid) wrapped in timm's ``FeatureGetterNet``; it returns one map per
requested level: index 0 is the stem, i the i-th stack, (B, C_i, H / r_i, W / r_i). A torchvision
``FeaturePyramidNetwork`` turns them into same-width maps for the RPN and RoI heads.

    python examples/faster_rcnn.py                           # tiny encoder, random init, synthetic boxes, CPU
    python examples/faster_rcnn.py --model cpcv2_resnet_tiny_wide.fmnist --pretrained --out-indices 1 2 3

The second starts from the published (bundled) Fashion-MNIST weights. No ImageNet-scale tag is published yet: for a
``cpcv2_resnet50`` you trained, pass ``--model cpcv2_resnet50 --checkpoint <its encoder.safetensors> --image-size 256
--out-indices 1 2 3 4``. tests/test_faster_rcnn_example.py runs every command of this docstring (for 1 step).

The synthetic task: filled (class 1) and outlined (class 2) rectangles on a noisy background.
"""
import argparse
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import cpc_models  # noqa: F401  (registers the CPC architectures with timm)

NUM_CLASSES = 3  # background, filled rectangle, outlined rectangle


class CPCBackboneWithFPN(nn.Module):
    """CPC encoder (dense, ``features_only``) + FPN, in the form torchvision's detection models expect.

    Args:
        model_name: timm name of a CPC encoder (tags, ``hf-hub:``, ``local-dir:`` ok).
        out_indices: feature levels to use (0: stem, i: stack i); default the three stacks of ``(1, 2, 3)``.
        fpn_channels: width of the FPN maps (``out_channels``).
        pretrained: load the encoder's published weights.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``pretrained_cfg_overlay=dict(file=...)``).

    ``forward(x (B, C, H, W))`` returns an OrderedDict ``'0', '1', ... -> (B, fpn_channels, H / r_i, W / r_i)`` plus
    ``'pool'`` (the last level max-pooled by 2).
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (1, 2, 3), fpn_channels: int = 256,
                 pretrained: bool = False, **model_kwargs):
        super().__init__()
        self.body = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                      out_indices=tuple(out_indices), **model_kwargs)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.reductions: List[int] = self.body.feature_info.reduction()
        self.pretrained_cfg = self.body.pretrained_cfg

    @property
    def featmap_names(self) -> List[str]:
        return [str(i) for i in range(len(self.reductions))]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict(zip(self.featmap_names, feats)))


def build_faster_rcnn(
        model_name: str = 'cpcv2_resnet_tiny',
        num_classes: int = NUM_CLASSES,
        out_indices: Sequence[int] = (1, 2, 3),
        fpn_channels: int = 256,
        pretrained: bool = False,
        min_size: int = 800,
        max_size: int = 1333,
        anchor_sizes: Optional[Sequence[int]] = None,
        **kwargs,
) -> FasterRCNN:
    """Faster R-CNN on a CPC backbone with FPN.

    Args:
        model_name, out_indices, fpn_channels, pretrained: see :class:`CPCBackboneWithFPN`.
        num_classes: object classes + 1 (background).
        min_size, max_size: torchvision's resize of the input images.
        anchor_sizes: one anchor size (px) per FPN level incl. ``'pool'``; default 8 x the level's reduction.
        **kwargs: passed to ``FasterRCNN`` (e.g. ``box_detections_per_img``) except ``model_kwargs``, a dict for
            ``timm.create_model``.

    The images are normalized with the encoder's own mean/std (its pretrained cfg), so ``model(images)`` takes
    a list of (C, H, W) tensors in [0, 1] with the encoder's channel count.
    """
    backbone = CPCBackboneWithFPN(model_name, out_indices, fpn_channels, pretrained, **kwargs.pop('model_kwargs', {}))
    reductions = backbone.reductions + [backbone.reductions[-1] * 2]  # 'pool' level
    sizes = tuple((int(s),) for s in (anchor_sizes or [8 * r for r in reductions]))
    if len(sizes) != len(reductions):
        raise ValueError(
            f'anchor_sizes needs {len(reductions)} values (one per FPN level incl. pool), got {len(sizes)}.')
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=backbone.featmap_names, output_size=7, sampling_ratio=2)
    cfg = backbone.pretrained_cfg
    return FasterRCNN(
        backbone, num_classes=num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
        min_size=min_size, max_size=max_size, image_mean=list(cfg['mean']), image_std=list(cfg['std']), **kwargs)


def synthetic_batch(batch_size: int, image_size: int, in_chans: int, generator: torch.Generator,
                    max_objects: int = 3) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Images (C, H, W) in [0, 1] with 1..max_objects filled (label 1) or outlined (label 2) rectangles.

    Returns:
        ``(images, targets)``, targets with ``boxes`` (N, 4) float xyxy in pixels and ``labels`` (N,) int64.
    """
    images, targets = [], []
    for _ in range(batch_size):
        img = 0.3 + 0.1 * torch.rand(in_chans, image_size, image_size, generator=generator)
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=generator))):
            w, h = (torch.randint(image_size // 6, image_size // 2, (2,), generator=generator)).tolist()
            x0 = int(torch.randint(0, image_size - w, (1,), generator=generator))
            y0 = int(torch.randint(0, image_size - h, (1,), generator=generator))
            color = (0.7 + 0.3 * torch.rand(in_chans, 1, 1, generator=generator))
            label = int(torch.randint(1, 3, (1,), generator=generator))
            img[:, y0:y0 + h, x0:x0 + w] = color
            if label == 2:  # outline: hollow out the inside
                t = max(1, min(w, h) // 6)
                img[:, y0 + t:y0 + h - t, x0 + t:x0 + w - t] = 0.35
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        images.append(img.clamp(0, 1))
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels)))
    return images, targets


def train_step(model: FasterRCNN, optimizer: torch.optim.Optimizer, images, targets) -> Dict[str, float]:
    """One optimisation step; returns the losses (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``,
    ``loss_rpn_box_reg``, ``loss``)."""
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {**{k: float(v.detach()) for k, v in losses.items()}, 'loss': float(loss.detach())}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='cpcv2_resnet_tiny')
    parser.add_argument('--pretrained', action='store_true', help='load the encoder\'s published weights')
    parser.add_argument('--checkpoint', default=None, help='encoder weights (.safetensors) to start from')
    parser.add_argument('--out-indices', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--image-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--lr', type=float, default=0.01)
    parser.add_argument('--fpn-channels', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model_kwargs = dict(pretrained_cfg_overlay=dict(file=args.checkpoint)) if args.checkpoint else {}
    model = build_faster_rcnn(
        args.model, out_indices=args.out_indices, fpn_channels=args.fpn_channels,
        pretrained=args.pretrained or bool(args.checkpoint), min_size=args.image_size, max_size=args.image_size,
        model_kwargs=model_kwargs)
    in_chans = model.backbone.pretrained_cfg['input_size'][0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        images, targets = synthetic_batch(args.batch_size, args.image_size, in_chans, gen)
        losses = train_step(model, optimizer, images, targets)
        print(f'step {step:4d}  ' + '  '.join(f'{k} {v:.4f}' for k, v in losses.items()), flush=True)
    model.eval()
    images, targets = synthetic_batch(2, args.image_size, in_chans, gen)
    with torch.no_grad():
        detections = model(images)
    for i, (det, tgt) in enumerate(zip(detections, targets)):
        print(f'image {i}: {len(tgt["boxes"])} objects, {len(det["boxes"])} detections, '
              f'top scores {[round(float(s), 3) for s in det["scores"][:3]]}')


if __name__ == '__main__':
    main()
