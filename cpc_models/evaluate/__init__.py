"""``cpc-eval``: the paper's evaluation protocols on Fashion-MNIST, and its Figure 1 (accuracy against labels).

Hénaff et al. 2020 evaluate CPC features (a) with a linear classifier on the mean-pooled patch features,
(b) with a ResNet-33-style classifier trained on the CPC feature grid with a fraction of the labels (the
"efficient classification" of the paper's Fig. 1), against (c) a supervised network trained on pixels. We add the
floors a reviewer expects: raw pixels and a randomly initialized encoder. See docs/evaluation.md.

Arms (``--arms``; registered in :mod:`cpc_models.evaluate.figure1`, where adding one is one function):

* ``pixels_linear`` / ``pixels_knn``: raw pixels, linear probe / cosine k-NN (k=20).
* ``random_linear`` / ``random_grid_linear``: a randomly initialized encoder, linear probe on the pooled feature /
  on the flattened latent grid.
* ``cpc_linear`` / ``cpc_grid_linear`` / ``cpc_knn``: the frozen CPC encoder, linear probe on the pooled feature
  (what ``timm.create_model(name, pretrained=True, num_classes=0)`` returns) / on the grid, k-NN on the pooled one.
* ``cpc_frozen``: frozen CPC encoder, latent grids extracted once, ``GridClassifier`` trained on them.
* ``cpc_finetune``: CPC encoder + ``GridClassifier`` trained end to end (encoder LR scaled down).
* ``supervised``: the baseline, a whole-image CNN from random init with crop/flip augmentation.
* ``scratch``: the patch-grid encoder from random init + ``GridClassifier``, end to end (not in the default arms).

Linear probes pick their L2 penalty, trained arms their stopping epoch on the tuning half of the validation split;
the best CPC arm of each fraction is picked on the other half. The official test set is only read with
``--split test``.

Usage::

    cpc-eval figure1 --checkpoint cpcv2_resnet_tiny.fmnist --out results/fmnist --split test
    cpc-eval probe --checkpoint runs/fmnist/checkpoints/step_001000   # val-split probe at 1%: compare checkpoints
    cpc-eval figure1 --checkpoint runs/mine --data photos/ --shots 1,5,10,50 --out results/mine   # your own folder
    cpc-eval linear --checkpoint runs/in1k --data /data/imagenet --features /scratch/feats   # top-1/top-5, any scale
    cpc-eval plot results/fmnist --readme README.md                   # table, figure, README section again
    cpc-eval figure1 --help                                           # every option, with its default

Any labelled source (``--data``): ``fashion-mnist``, a folder of class subfolders (or train/ val/ test/ of them), a
Hugging Face dataset (``hf:NAME`` or a ``save_to_disk`` folder); ``--shots 1,5,10,50`` instead of fractions.
``cpc-eval linear``: the paper's linear evaluation at any scale, from features extracted once to disk in chunks.

Modules: ``eval_config`` (EvalConfig), ``data`` (label subsets, splits, features), ``sources`` (folders and datasets:
listing, checks, decoding, splits), ``encoders`` (which encoder), ``baselines`` (the supervised CNNs), ``protocols``
(linear probe, k-NN, the convergence rule, training), ``figure1`` (arms, runs, resuming, merging), ``probe``,
``report`` (tables, targets, plot), ``feature_store`` (chunked features on disk), ``linear`` (``cpc-eval linear``),
``cli``.
"""
from ..extract import extract_features
from .baselines import ConvNet, create_supervised
from .cli import main
from .data import (
    EvalData,
    Features,
    balanced_count,
    balanced_subset,
    features_for,
    load_eval_data,
    split_halves,
    split_train_val,
)
from .encoders import create_encoder, load_encoder
from .eval_config import DEFAULT_ARMS, DEFAULT_FRACTIONS, EvalConfig
from .figure1 import (
    ARMS,
    Arm,
    ArmInputs,
    check_config,
    merge_results,
    plan_runs,
    register_arm,
    run_arm,
    run_figure1,
)
from .probe import ProbeConfig, run_probe
from .protocols import fit_linear_probe, knn_predict, train_end_to_end, train_on_grid, train_until_plateau
from .report import check_targets, format_table, pick_best_cpc, plot_figure1, summarize

__all__ = [
    'ARMS', 'Arm', 'ArmInputs', 'ConvNet', 'DEFAULT_ARMS', 'DEFAULT_FRACTIONS', 'EvalConfig', 'EvalData', 'Features',
    'ProbeConfig', 'balanced_count', 'balanced_subset', 'check_config', 'check_targets', 'create_encoder',
    'create_supervised', 'extract_features', 'features_for', 'fit_linear_probe', 'format_table', 'knn_predict',
    'load_encoder', 'load_eval_data', 'main', 'merge_results', 'pick_best_cpc', 'plan_runs', 'plot_figure1',
    'register_arm', 'run_arm', 'run_figure1', 'run_probe', 'split_halves', 'split_train_val', 'summarize',
    'train_end_to_end', 'train_on_grid', 'train_until_plateau',
]
