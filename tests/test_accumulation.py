"""Gradient accumulation (--accum-steps) and the batch -> learning-rate rule (--lr-ref-batch, --lr-scaling)."""
import copy
import dataclasses
import math

import pytest
import torch

from cpc_models import config, train
from cpc_models.data import load_fashion_mnist

FAST = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--batch-size', '8', '--objective.context_hidden', '16',
        '--progress', '0']
F32_TOL = 2 ** 8 * torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_accumulated_step_is_the_mean_of_the_micro_batch_gradients():
    """k = 3 micro-batches in one train_step give the mean of the gradients that 3 separate steps from the same
    weights compute on those micro-batches with the same augmentation draws (each micro-batch's InfoNCE contrasts
    its own images only), and their mean loss; one step on all 12 images at once (more negatives) differs."""
    cfg = dataclasses.replace(train.build_config(FAST + ['--seed', '2']), grad_clip=0.0)
    torch.manual_seed(cfg.seed)
    model = train.build_model(cfg, torch.device('cpu'))
    images, _ = load_fashion_mnist('train')
    micro = [images[4 * j:4 * j + 4] for j in range(3)]
    copies = [copy.deepcopy(model) for _ in range(4)]

    setup = train.build_step_setup(cfg, model.encoder, torch.device('cpu'))
    out, norm = train.train_step(model, micro, train.build_optimizer(cfg, model), setup, 1e-3)
    accumulated = _grads(model)

    ref_setup = train.build_step_setup(cfg, model.encoder, torch.device('cpu'))  # the same seed: the same draws
    losses, separate = [], []
    for m, c in zip(micro, copies):
        o, _ = train.train_step(c, m, train.build_optimizer(cfg, c), ref_setup, 1e-3)
        losses.append(o.loss.item())
        separate.append(_grads(c))
    assert torch.equal(setup.generator.get_state(), ref_setup.generator.get_state())
    assert out.loss.item() == pytest.approx(sum(losses) / 3, rel=F32_TOL)
    for k, v in out.metrics.items():
        assert v.ndim == 0, k
    scale = max(float(g.abs().max()) for g in accumulated.values())
    total_sq = 0.0
    for name, g in accumulated.items():
        mean = sum(s[name] for s in separate) / 3
        torch.testing.assert_close(g, mean, rtol=F32_TOL, atol=F32_TOL * scale, msg=name)
        total_sq += float(g.double().pow(2).sum())
    assert float(norm) == pytest.approx(math.sqrt(total_sq), rel=1e-5)  # the norm of the accumulated gradient
    # the whole batch in one micro-batch: 12 x 36 candidates instead of 4 x 36, a higher loss at initialization
    whole, _ = train.train_step(copies[3], torch.cat(micro), train.build_optimizer(cfg, copies[3]),
                                train.build_step_setup(cfg, model.encoder, torch.device('cpu')), 1e-3)
    assert whole.loss.item() - out.loss.item() == pytest.approx(math.log(3), abs=0.2)


def test_lr_follows_the_global_batch_by_the_stated_rule():
    base = train.build_config(FAST + ['--lr', '4e-4', '--lr-ref-batch', '512', '--batch-size', '2048'])
    assert base.lr_scaling == 'sqrt' and train.peak_lr(base) == pytest.approx(8e-4)  # sqrt(4) x
    linear = dataclasses.replace(base, lr_scaling='linear')
    assert train.peak_lr(linear) == pytest.approx(1.6e-3)
    assert train.peak_lr(dataclasses.replace(base, batch_size=128)) == pytest.approx(2e-4)  # sqrt(1/4) x
    assert train.peak_lr(dataclasses.replace(base, lr_ref_batch=0)) == 4e-4  # no reference: --lr as given
    # the schedule peaks at the scaled lr
    cfg = dataclasses.replace(base, warmup_steps=10)
    assert train.lr_at(9, cfg, 100) == pytest.approx(8e-4)
    assert max(train.lr_at(s, cfg, 100) for s in range(100)) == pytest.approx(8e-4)
    with pytest.raises(SystemExit):
        train.build_config(FAST + ['--lr-scaling', 'cubic'])
    with pytest.raises(config.ConfigError, match='--accum-steps 3: the global batch 8 must split evenly into 3'):
        train.check_config(train.build_config(FAST + ['--accum-steps', '3']), world=1)
    with pytest.raises(config.ConfigError, match='--accum-steps 0: must be >= 1'):
        train.check_config(train.build_config(FAST + ['--accum-steps', '0']), world=1)
