"""``cpc-eval``: the paper's evaluation protocols on Fashion-MNIST, and its Figure 1 (accuracy against labels).

Hénaff et al. 2020 evaluate CPC features (a) with a linear classifier on the mean-pooled patch features,
(b) with a ResNet-33-style classifier trained on the CPC feature grid with a fraction of the labels (the
"efficient classification" of the paper's Fig. 1), against (c) the same network trained on pixels from scratch
with supervision. We add (d) a floor: the linear probe on a randomly initialized encoder. See docs/evaluation.md.

Arms (``--arms``; registered in :mod:`cpc_models.evaluate.figure1`, where adding one is one function):

* ``cpc_linear``: frozen CPC encoder, pooled features extracted once, linear softmax classifier (L-BFGS, weight
  decay picked on the validation split).
* ``cpc_frozen``: frozen CPC encoder, latent grids extracted once, ``GridClassifier`` trained on them.
* ``cpc_finetune``: CPC encoder + ``GridClassifier`` trained end to end (encoder LR scaled down).
* ``scratch``: randomly initialized encoder + ``GridClassifier`` trained end to end with crop/flip augmentation.
* ``random_linear``: randomly initialized encoder, linear probe as in ``cpc_linear``.

Data: the labelled pool is Fashion-MNIST train minus a class-balanced validation split (``--val-size`` images,
fixed seed) used for all tuning; labelled subsets are class-balanced fractions of the pool. The official test set
is only read with ``--split test``.

Usage::

    python -m cpc_models.evaluate figure1 --model cpcv2_resnet_tiny --checkpoint cpcv2_resnet_tiny.fmnist \\
        --out results/fmnist --split test
    python -m cpc_models.evaluate plot results/fmnist        # table + figure again from results.json
    python -m cpc_models.evaluate figure1 --help             # every option, with its default

Modules: ``eval_config`` (EvalConfig), ``data`` (label subsets, splits, features), ``encoders`` (which encoder),
``protocols`` (linear probe, GridClassifier training), ``figure1`` (arms, runs, merging), ``report`` (table,
targets, plot), ``cli``.
"""
from ..extract import extract_features
from .cli import main
from .data import EvalData, Features, balanced_count, balanced_subset, features_for, load_eval_data, split_train_val
from .encoders import create_encoder, load_encoder
from .eval_config import DEFAULT_ARMS, DEFAULT_FRACTIONS, EvalConfig
from .figure1 import ARMS, Arm, ArmInputs, check_config, merge_results, register_arm, run_arm, run_figure1
from .protocols import fit_linear_probe, train_end_to_end, train_on_grid
from .report import check_targets, format_table, plot_figure1, summarize

__all__ = [
    'ARMS', 'Arm', 'ArmInputs', 'DEFAULT_ARMS', 'DEFAULT_FRACTIONS', 'EvalConfig', 'EvalData', 'Features',
    'balanced_count', 'balanced_subset', 'check_config', 'check_targets', 'create_encoder', 'extract_features',
    'features_for', 'fit_linear_probe', 'format_table', 'load_encoder', 'load_eval_data', 'main', 'merge_results',
    'plot_figure1', 'register_arm', 'run_arm', 'run_figure1', 'split_train_val', 'summarize', 'train_end_to_end',
    'train_on_grid',
]
