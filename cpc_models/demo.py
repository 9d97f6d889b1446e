"""The main job on the bundled default: what CPC features buy with a handful of labels.

    python -m cpc_models.demo          (or `make demo`, or `cpc-demo`)

Loads the published backbone ``cpcv2_resnet_tiny_wide.fmnist`` (bundled: weights/ or the wheel, no network), extracts
features of a small labelled sample bundled with the package (1,000 Fashion-MNIST test images, 100 per class),
and trains the same linear classifier with ``--shots`` labelled images per class on
(1) the CPC latent grid (flattened), (2) its mean over the grid, (3) raw pixels, (4) the latent grid of the same
encoder with random weights.
Accuracy is measured on the sample's images outside the labelled ones, averaged over ``--repeats`` draws.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import timm
import torch
from safetensors import safe_open

from . import encoder as _encoder  # noqa: F401  (registers the models)
from .checks import create_model, one_line
from . import config as C
from .config import ConfigError
from .evaluate import fit_linear_probe
from .extract import extract_features

SAMPLE = Path(__file__).resolve().parent / 'assets' / 'fashion_mnist_sample.safetensors'
DEFAULT_MODEL = 'cpcv2_resnet_tiny_wide.fmnist'
VAL_PER_CLASS = 10  # images per class for picking the L2 penalty


def load_sample(path=SAMPLE):
    """The bundled labelled sample: uint8 images (N, 1, 28, 28), int64 labels (N,), class names."""
    with safe_open(str(path), framework='pt') as f:
        classes = json.loads(f.metadata()['classes'])
        return f.get_tensor('images'), f.get_tensor('labels'), classes


def few_shot_split(labels: torch.Tensor, shots: int, val_per_class: int, seed: int):
    """Per class: `shots` labelled, `val_per_class` for picking the L2 penalty, the rest to test on."""
    g = torch.Generator().manual_seed(seed)
    train, val, test = [], [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        train.append(idx[:shots])
        val.append(idx[shots:shots + val_per_class])
        test.append(idx[shots + val_per_class:])
    return torch.cat(train), torch.cat(val), torch.cat(test)


def few_shot_accuracy(features: torch.Tensor, labels: torch.Tensor, shots: int, repeats: int,
                      val_per_class: int = VAL_PER_CLASS) -> List[float]:
    """Test accuracy of an L2-regularized softmax classifier trained on `shots` images per class, per repeat."""
    accs = []
    for seed in range(repeats):
        tr, va, te = few_shot_split(labels, shots, val_per_class, seed)
        probe = fit_linear_probe(features[tr], labels[tr], features[va], labels[va],
                                 wds=(1e-1, 1e-2, 1e-3, 1e-4), num_classes=int(labels.max()) + 1)
        accs.append(float((probe['predict'](features[te]).argmax(1) == labels[te]).float().mean()))
    return accs


def main(argv: Optional[List[str]] = None) -> int:
    parser = C.ArgumentParser(prog='cpc-demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=DEFAULT_MODEL, help='timm name with tag, hf-hub: or local-dir:')
    parser.add_argument('--shots', type=int, nargs='+', default=[1, 5, 10, 20], help='labelled images per class')
    parser.add_argument('--repeats', type=int, default=5, help='random draws of the labelled images')
    # one thread: on 2 shared cores under load, 2 threads made the demo ~20x slower (README, Time)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (default: 1, fastest on a shared '
                                                               'machine)')
    args = parser.parse_args(argv)
    if args.threads < 1:
        return C.usage_error('cpc-demo', f'--threads {args.threads}: must be >= 1')
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, parser)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, parser) -> int:
    torch.manual_seed(0)
    t0 = time.perf_counter()

    images, labels, classes = load_sample()
    most = int(labels.bincount().min()) - VAL_PER_CLASS - 1  # leave images to pick the penalty on and to test on
    if args.repeats < 1 or not all(1 <= s <= most for s in args.shots):
        return parser.exit(2, f'cpc-demo: error: --shots must be in [1, {most}] (the sample has '
                              f'{most + VAL_PER_CLASS + 1} images per class) and --repeats >= 1\n')
    try:
        cpc = create_model(args.model, pretrained=True).eval()
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        return parser.exit(2, f'cpc-demo: error: {one_line(e)}\n')
    random = timm.create_model(cpc.pretrained_cfg['architecture'], pretrained=False, num_classes=0,
                               in_chans=cpc.in_chans).eval()
    say(f'backbone: {args.model} ({sum(p.numel() for p in cpc.parameters()) / 1e6:.2f}M parameters, '
        f'weights: {cpc.pretrained_cfg.get("file") or cpc.pretrained_cfg.get("hf_hub_id")})')
    say(f'sample: {len(images)} Fashion-MNIST test images, {len(classes)} classes ({", ".join(classes)})')

    cpc_pooled, cpc_grid = extract_features(cpc, images, keep_grid=True, desc='CPC features')
    feats = {
        'CPC grid': cpc_grid.float().flatten(1),  # the 6x6 latent grid, as the paper's grid classifiers see it
        'CPC pooled': cpc_pooled,  # mean over the grid: the paper's linear-evaluation feature
        'raw pixels': images.flatten(1).float() / 255,
        'random-init grid': extract_features(random, images, keep_grid=True, desc='random-init features')[1]
        .float().flatten(1),
    }
    dims = {k: v.shape[1] for k, v in feats.items()}
    say(f'\nfew-shot accuracy on the held-out images (mean ± std over {args.repeats} draws of the labelled set):')
    header = f'{"labels per class":>18} | ' + ' | '.join(f'{k} ({dims[k]}-d)' for k in feats)
    say(header)
    say('-' * len(header))
    for shots in args.shots:
        cells = []
        for name, f in feats.items():
            accs = torch.tensor(few_shot_accuracy(f, labels, shots, args.repeats))
            std = accs.std() if len(accs) > 1 else torch.tensor(0.0)
            cells.append(f'{100 * accs.mean():6.1f}% ± {100 * std:4.1f}'.center(len(f'{name} ({dims[name]}-d)')))
        say(f'{shots:>18} | ' + ' | '.join(cells))  # each row as soon as it is ready
    say(f'\ndone in {time.perf_counter() - t0:.1f} s')
    return 0


def say(line: str) -> None:
    print(line, flush=True)  # also when stdout is a pipe or a file (make demo | tee ...)


if __name__ == '__main__':
    sys.exit(main())
