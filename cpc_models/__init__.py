"""cpc-models: Contrastive Predictive Coding v2 (Hénaff et al., ICML 2020) backbones for timm.

``import cpc_models`` registers the ``cpcv1_*`` / ``cpcv2_*`` architectures with timm, so that
``timm.create_model("cpcv2_resnet161")`` works. Training pieces: :class:`CPCObjective` (context network +
four-direction InfoNCE), :class:`PatchAugment` (batched per-patch augmentation), ``cpc_models.train``.
"""
from .augment import PatchAugment, PatchAugmentConfig
from .context import MaskedContextNet
from .encoder import CPCResNetV2
from .objective import CPCObjective, ObjectiveConfig, ObjectiveOutput
from .patches import grid_size, patchify

__version__ = '0.1.0'
__all__ = [
    'CPCResNetV2', 'CPCObjective', 'ObjectiveConfig', 'ObjectiveOutput', 'MaskedContextNet', 'PatchAugment',
    'PatchAugmentConfig', 'grid_size', 'patchify', '__version__',
]
