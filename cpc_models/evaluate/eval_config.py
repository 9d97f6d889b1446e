"""``EvalConfig``: every value a ``cpc-eval figure1`` run depends on (written into results.json)."""
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Tuple

from ..classifier import GRID_CLASSIFIER_SIZES
from ..config import check_range

__all__ = ['EvalConfig', 'DEFAULT_FRACTIONS', 'DEFAULT_ARMS']

DEFAULT_FRACTIONS = (0.01, 0.02, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
DEFAULT_ARMS = ('pixels_linear', 'pixels_knn', 'random_linear', 'random_grid_linear', 'cpc_linear', 'cpc_grid_linear',
                'cpc_knn', 'cpc_frozen', 'cpc_finetune', 'supervised')


@dataclass
class EvalConfig:
    """Everything a Figure-1 run depends on; written into results.json. Options of ``cpc-eval figure1``."""
    # ---- encoder ----
    model: str = 'cpcv2_resnet_tiny'  # timm architecture (a 'name.tag' or checkpoint folder overrides it)
    checkpoint: str = ''  # timm 'name.tag' | .safetensors file | checkpoint (or run) folder | published folder | random
    model_args: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs, as JSON
    # ---- runs ----
    arms: Tuple[str, ...] = DEFAULT_ARMS  # comma list of the figure's lines (see cpc_models.evaluate.ARMS)
    fractions: Tuple[float, ...] = DEFAULT_FRACTIONS  # labelled fractions of the pool, in (0, 1] (1% or 0.01)
    shots: Tuple[int, ...] = ()  # labelled images per class instead of fractions (e.g. 1,5,10,50); arm_fractions unused
    # per arm, fractions replacing --fractions (JSON); fine-tuning to convergence costs ~10 CPU-ms per image seen, so
    # by default it runs where the label-efficiency targets look (docs/evaluation.md); '{}' runs it everywhere
    arm_fractions: Dict[str, Any] = field(default_factory=lambda: {'cpc_finetune': [0.01, 0.02, 0.05]})
    # with --shots, per arm the most shots per class it runs at (JSON; at least at the smallest count): by default the
    # fine-tuned arm runs at the CPC side of the label-efficiency targets (1 vs 5, 5 vs 10, 10 vs 50 per class),
    # which keeps ~2,000 images within 15 minutes on 2 CPU cores (results/own_data); '{}' runs it at every count
    arm_max_shots: Dict[str, Any] = field(default_factory=lambda: {'cpc_finetune': 10})
    seeds: Tuple[int, ...] = (0, 1, 2)  # seeds of the labelled subsets (and of inits and batch orders)
    out: str = ''  # output folder: results.json, table.md, figure1.png
    # ---- data ----
    data: str = 'fashion-mnist'  # fashion-mnist | a folder of class subfolders (or train/ val/ test/ of them) | hf:NAME
    split: Literal['val', 'test'] = 'val'  # val: report on the selection half of val (default); test: once, at the end
    resume: bool = True  # keep the runs of an earlier results.json in --out made with the same settings
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = $CPC_FASHION_MNIST_DIR or the Debian package's)
    val_size: int = 5000  # fashion-mnist: validation images carved from train (class-balanced): half tunes, half selects
    val_fraction: float = 0.1  # other --data without a val split: the fraction of train carved as val (class-balanced)
    test_fraction: float = 0.2  # other --data without a test split: the fraction of every class held out as test
    convert_colour: bool = False  # read colour images as greyscale for a 1-channel model (else they are refused)
    val_seed: int = 0  # seed of the validation split
    train_subset: int = 0  # >0: limit the labelled pool to this many images (class-balanced; fast runs)
    eval_limit: int = 0  # >0: evaluate on a class-balanced subset of this many images of the eval split
    random_init_seed: int = 0  # the random encoder of random_linear (and of checkpoint='random')
    extract_batch: int = 64  # larger batches cost more in page faults (sys time) than they save on CPU
    # ---- linear probe ----
    linear_wds: Tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 penalty grid, picked on the tuning half of val
    linear_max_iter: int = 100  # L-BFGS iterations per penalty
    # ---- k-NN ----
    knn_k: int = 20  # neighbours (cosine similarity, similarity-weighted vote)
    # ---- convergence (every trained arm) ----
    round_images: int = 5000  # validate after every max(1 epoch, this many images)
    patience: int = 3  # validations without a new best before the learning rate drops x0.1, or training stops
    lr_drops: int = 1  # learning-rate drops before a plateau ends the run
    # ---- GridClassifier ----
    classifier_size: str = 'small'  # tiny | small | paper (11 blocks)
    classifier_drop: float = 0.1  # dropout before the classifier's linear layer
    frozen_max_epochs: float = 200.0  # cpc_frozen: cap on epochs over the labelled grids
    frozen_max_steps: int = 0  # cpc_frozen: cap on steps (0: none)
    frozen_batch: int = 128  # cpc_frozen: grids per step
    frozen_lr: float = 1e-3  # cpc_frozen: AdamW peak learning rate
    frozen_wd: float = 0.05  # cpc_frozen: AdamW weight decay
    e2e_max_epochs: float = 200.0  # cpc_finetune, scratch: cap on epochs over the labelled images
    e2e_max_steps: int = 0  # cpc_finetune, scratch: cap on steps (0: none)
    e2e_batch: int = 64  # cpc_finetune, scratch: images per step
    e2e_lr: float = 5e-3  # picked on val for scratch at 2% labels with a 150-step budget (docs/evaluation.md)
    e2e_wd: float = 0.05  # cpc_finetune, scratch: AdamW weight decay
    finetune_encoder_lr_scale: float = 0.1  # cpc_finetune: encoder learning rate = e2e_lr * this
    # ---- supervised baseline (whole-image CNN) ----
    supervised_model: str = 'convnet'  # 'convnet' or a timm model name (docs/evaluation.md)
    # its keyword arguments, as JSON; picked on val at 100% of the labels: depth 2 93.7%, depth 1 91.9% (tuning half;
    # docs/evaluation.md)
    supervised_args: Dict[str, Any] = field(default_factory=lambda: {'widths': [32, 64, 128], 'depth': 2})
    # more baseline networks, each trained to the val plateau; the best on the tuning half of val is scored:
    # 'convnet', timm names, 'auto' (a timm ResNet-18 for images of >= 64 px, other data than Fashion-MNIST)
    supervised_candidates: Tuple[str, ...] = ('auto',)
    supervised_batch: int = 128  # images per step
    supervised_lr: float = 2e-3  # AdamW peak learning rate
    supervised_wd: float = 0.05  # AdamW weight decay
    supervised_max_epochs: float = 200.0  # cap on epochs over the labelled images
    supervised_max_steps: int = 0  # cap on steps (0: none)
    # ---- augmentation of the trained-on-images arms ----
    aug_pad: int = 2  # random crop with this padding, plus horizontal flip
    # ---- runtime ----
    threads: int = 0  # torch.set_num_threads (0 = torch's default)
    progress: bool = True  # progress bars

    def validate(self) -> None:
        """Raise ValueError (config.ConfigError for ranges) naming the first bad value and what is allowed (arm names,
        encoder and data: figure1.check_config)."""
        for arm, fracs in self.arm_fractions.items():
            if not isinstance(fracs, (list, tuple)) or not fracs or not all(
                    isinstance(f, (int, float)) and 0 < f <= 1 for f in fracs):
                raise ValueError(f'arm_fractions["{arm}"] must be a list of fractions in (0, 1], got {fracs!r}.')
        for arm, most in self.arm_max_shots.items():
            if isinstance(most, bool) or not isinstance(most, int) or most < 1:
                raise ValueError(f'arm_max_shots["{arm}"] must be a whole number of shots per class >= 1, '
                                 f'got {most!r}.')
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ValueError(f'Label fraction {f} is outside (0, 1]; give fractions like 0.01 for 1%.')
        if not self.fractions or not self.seeds:
            raise ValueError('Give at least one fraction and one seed.')
        if self.split not in ('val', 'test'):
            raise ValueError(f"split must be 'val' or 'test', got '{self.split}'.")
        if self.classifier_size not in GRID_CLASSIFIER_SIZES:
            raise ValueError(f"Unknown classifier size '{self.classifier_size}'; "
                             f"choose from {sorted(GRID_CLASSIFIER_SIZES)}.")
        if self.val_size < 10:
            raise ValueError(f'val_size must be >= 10 (one image per class), got {self.val_size}.')
        if not self.linear_wds:
            raise ValueError('linear_wds needs at least one value.')
        for key in ('seeds', 'val_seed', 'train_subset', 'eval_limit', 'random_init_seed', 'threads', 'aug_pad',
                    'linear_wds', 'frozen_wd', 'e2e_wd', 'supervised_wd', 'frozen_max_steps', 'e2e_max_steps',
                    'supervised_max_steps', 'lr_drops'):
            check_range(self, key, 0)
        for key in ('extract_batch', 'linear_max_iter', 'frozen_batch', 'e2e_batch', 'supervised_batch', 'knn_k',
                    'patience', 'round_images'):
            check_range(self, key, 1)
        for key in ('frozen_lr', 'e2e_lr', 'supervised_lr', 'finetune_encoder_lr_scale', 'frozen_max_epochs',
                    'e2e_max_epochs', 'supervised_max_epochs'):
            check_range(self, key, 0, low_open=True)
        check_range(self, 'classifier_drop', 0, 1, high_open=True)
        check_range(self, 'val_fraction', 0, 1, low_open=True, high_open=True)
        check_range(self, 'test_fraction', 0, 1, low_open=True, high_open=True)
        check_range(self, 'shots', 1)
