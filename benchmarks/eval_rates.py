"""CPU time per image of each piece of a ``cpc-eval figure1`` run, per encoder: the rates that size a full run.

A trained arm costs (images it sees) x (its rate); a run sees about 10-20 rounds of max(1 epoch, 5,000 images) before
its validation accuracy stops improving (docs/evaluation.md). Random weights and random 28 px images: the rates do
not depend on either.

Usage (from the repository root): python -m benchmarks.eval_rates [--models cpcv2_resnet_tiny,...] [--threads 1]
Prints a markdown table (CPU-milliseconds per image, ``time.process_time``).
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F

import cpc_models  # noqa: F401  (registers the models)
from cpc_models.evaluate import EvalConfig, create_supervised
from cpc_models.evaluate.protocols import EncoderClassifier, make_classifier
from cpc_models.extract import extract_features, normalize


def cpu_ms(fn, n_images: int, reps: int) -> float:
    """CPU-milliseconds per image of ``fn`` (one warm-up call, then the mean of ``reps``)."""
    fn()
    c0 = time.process_time()
    for _ in range(reps):
        fn()
    return 1e3 * (time.process_time() - c0) / reps / n_images


def adamw_step(module: torch.nn.Module, inputs, labels):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def step():
        loss = F.cross_entropy(module(inputs()), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def rates(name: str, cfg: EvalConfig, reps: int):
    """{piece: CPU-ms per image} for the encoder ``name``."""
    enc = timm.create_model(name, num_classes=0)
    x = torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (256,))
    out = {'extract (forward, grid kept)': cpu_ms(lambda: extract_features(enc, x, cfg.extract_batch, True, '', False),
                                                  len(x), reps)}
    grids = extract_features(enc, x[:cfg.frozen_batch], cfg.extract_batch, True, '', False)[1].float()
    clf = make_classifier(enc, cfg, 10)
    out['cpc_frozen step'] = cpu_ms(adamw_step(clf, lambda: grids, y[:len(grids)]), len(grids), reps)
    model = EncoderClassifier(enc, make_classifier(enc, cfg, 10))
    batch = x[:cfg.e2e_batch]
    out['cpc_finetune / scratch step'] = cpu_ms(adamw_step(model, lambda: normalize(batch, enc), y[:len(batch)]),
                                                len(batch), max(1, reps // 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='cpcv2_resnet_tiny,cpcv2_resnet_tiny_wide')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--reps', type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = EvalConfig()
    table = {m: rates(m, cfg, args.reps) for m in args.models.split(',')}
    net = create_supervised(cfg.supervised_model, 10, 1, cfg.supervised_args).to(memory_format=torch.channels_last)
    x = torch.rand(cfg.supervised_batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    sup = cpu_ms(adamw_step(net, lambda: x, torch.randint(0, 10, (len(x),))), len(x), args.reps)
    pieces = list(next(iter(table.values())))
    print(f'CPU-ms per image, {args.threads} thread(s), torch {torch.__version__}\n')
    print('| piece | ' + ' | '.join(f'`{m}`' for m in table) + ' |')
    print('|---|' + '---|' * len(table))
    for piece in pieces:
        print(f'| {piece} | ' + ' | '.join(f'{table[m][piece]:.2f}' for m in table) + ' |')
    print(f'| supervised step (`{cfg.supervised_model}` {cfg.supervised_args}) | ' + ' | '.join(
        f'{sup:.2f}' for _ in table) + ' |')


if __name__ == '__main__':
    main()
