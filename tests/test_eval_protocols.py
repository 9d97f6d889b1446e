"""Evaluation protocols against independent references: the linear probe against scikit-learn's
LogisticRegression on the same standardized features, k-NN against a naive loop, the convergence rule on a
problem whose validation curve we control, the supervised baselines' shapes."""
import math

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression

from cpc_models.evaluate import ConvNet, EvalConfig, create_supervised, fit_linear_probe, knn_predict
from cpc_models.evaluate.protocols import train_until_plateau


def _blobs(n, dims, classes, seed, spread=1.0, sample=0):
    """n points around `classes` Gaussian centres (drawn from `seed`); `sample` draws another set of points."""
    centres = 2 * torch.randn(classes, dims, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(classes).repeat(n // classes)
    g = torch.Generator().manual_seed(seed + 1000 * (sample + 1))
    return centres[y] + spread * torch.randn(len(y), dims, generator=g), y


# ---------------- linear probe ----------------

@pytest.mark.parametrize('wd', [1e-3, 1e-1])
def test_linear_probe_matches_sklearn_logistic_regression(wd):
    """Same objective: mean cross-entropy + wd * ||W||^2 (bias free) is sklearn's C = 1 / (2 * wd * n)."""
    x, y = _blobs(200, 12, 4, seed=0, spread=2.0)
    xv, yv = _blobs(80, 12, 4, seed=0, spread=2.0, sample=1)
    probe = fit_linear_probe(x, y, xv, yv, [wd], num_classes=4, max_iter=500)
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    xs = ((x - mu) / sd).double().numpy()
    ref = LogisticRegression(C=1 / (2 * wd * len(y)), tol=1e-10, max_iter=10_000).fit(xs, y.numpy())
    ours = torch.softmax(probe['predict'](xv), 1).double().numpy()
    theirs = ref.predict_proba(((xv - mu) / sd).double().numpy())
    assert np.abs(ours - theirs).max() < 2e-3
    assert probe['wd'] == wd and probe['val_by_wd'][wd] == pytest.approx(float((ours.argmax(1) == yv.numpy()).mean()))


def _penalized_loss(w, b, x, y, wd):
    """The probe's objective in float64: mean cross-entropy + wd * ||W||^2 (the bias is not penalized)."""
    return float(F.cross_entropy(x @ w.T + b, y) + wd * w.pow(2).sum())


def test_linear_probe_matches_sklearn_on_fashion_mnist_pixels():
    """The probe on real data (the Fashion-MNIST subset shipped in tests/data, 10 classes, 7x7 average-pooled
    pixels: 49 features, so that scikit-learn converges in seconds): its solution
    is as good as scikit-learn's lbfgs on the same objective (within 1e-4), the two predict the same classes on
    >= 99% of held-out images, and their accuracies agree within 1 point."""
    data = load_file(Path(__file__).parent / 'data' / 'fashion_mnist_subset.safetensors')
    x = F.avg_pool2d(data['train_images'][:600].float() / 255, 4).flatten(1)
    y = data['train_labels'][:600]
    xv, yv = F.avg_pool2d(data['test_images'][:300].float() / 255, 4).flatten(1), data['test_labels'][:300]
    wd = 1e-3
    probe = fit_linear_probe(x, y, xv, yv, [wd], num_classes=10)  # the default iteration budget, as cpc-eval uses
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs, xvs = ((x - mu) / sd).double(), ((xv - mu) / sd).double()
    ref = LogisticRegression(C=1 / (2 * wd * len(y)), tol=1e-8, max_iter=10_000).fit(xs.numpy(), y.numpy())
    w_ref, b_ref = torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_)
    # the probe's weights, read back from its predictions (predict(x) = W (x - mu) / sd + b)
    eye = torch.cat([torch.zeros(1, x.shape[1]), torch.eye(x.shape[1])]) * sd + mu
    out = probe['predict'](eye).double()
    b_ours, w_ours = out[0], (out[1:] - out[0]).T
    ours, theirs = _penalized_loss(w_ours, b_ours, xs, y, wd), _penalized_loss(w_ref, b_ref, xs, y, wd)
    assert ours <= theirs + 1e-4, (ours, theirs)
    pred_ours = probe['predict'](xv).argmax(1)
    pred_theirs = torch.from_numpy(ref.predict(xvs.numpy()))
    assert (pred_ours == pred_theirs).float().mean() >= 0.99
    acc_ours, acc_theirs = (pred_ours == yv).float().mean(), (pred_theirs == yv).float().mean()
    assert abs(acc_ours - acc_theirs) <= 0.01 and acc_ours > 0.7  # well above chance (0.1)
    assert probe['val_acc'] == pytest.approx(float(acc_ours))


def test_linear_probe_picks_the_penalty_on_the_validation_set():
    """The best penalty on the validation set wins, and the probe returned is the one fitted with it (not the
    last one fitted)."""
    x, y = _blobs(40, 50, 2, seed=2, spread=4.0)  # few, noisy, high-dimensional: a strong penalty helps
    xv, yv = _blobs(400, 50, 2, seed=2, spread=4.0, sample=1)
    probe = fit_linear_probe(x, y, xv, yv, [1e-6, 1.0], num_classes=2)
    assert probe['val_by_wd'][probe['wd']] == max(probe['val_by_wd'].values())
    assert probe['val_acc'] == max(probe['val_by_wd'].values())
    assert probe['wd'] == 1.0 and probe['val_by_wd'][1.0] > probe['val_by_wd'][1e-6]  # 1.0 is fitted first
    alone = fit_linear_probe(x, y, xv, yv, [1.0], num_classes=2)
    torch.testing.assert_close(probe['predict'](xv), alone['predict'](xv), rtol=1e-4, atol=1e-4)
    assert probe['val_acc'] == pytest.approx(float((probe['predict'](xv).argmax(1) == yv).float().mean()))


def test_linear_probe_prefers_the_larger_penalty_on_a_tie():
    """Penalties that reach the same validation accuracy: the larger one (the simpler model) is kept."""
    x, y = _blobs(40, 5, 2, seed=4, spread=0.1)  # well separated: every penalty here classifies all correctly
    xv, yv = _blobs(40, 5, 2, seed=4, spread=0.1, sample=1)
    wds = [1e-5, 1e-3, 1e-4]
    probe = fit_linear_probe(x, y, xv, yv, wds, num_classes=2)
    assert probe['val_by_wd'] == {wd: 1.0 for wd in wds}
    assert probe['wd'] == 1e-3


def test_linear_probe_standardizes_with_the_population_std():
    """Features are standardized with the training set's mean and population (biased) std: on 9 samples the
    unbiased std is sqrt(9/8) = 6% larger, which changes the penalized solution measurably. The same fit by
    scikit-learn on features standardized that way agrees (3 classes: sklearn's multinomial form; with 2 it fits
    one weight vector, another penalty)."""
    x, y = _blobs(9, 3, 3, seed=6, spread=3.0)
    xv, _ = _blobs(42, 3, 3, seed=6, spread=3.0, sample=1)
    wd = 0.05
    probe = fit_linear_probe(x, y, xv, y[:0].new_zeros(42), [wd], num_classes=3, max_iter=500)
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    ref = LogisticRegression(C=1 / (2 * wd * len(y)), tol=1e-10, max_iter=10_000).fit(
        ((x - mu) / sd).double().numpy(), y.numpy())
    ours = torch.softmax(probe['predict'](xv), 1).double().numpy()
    theirs = ref.predict_proba(((xv - mu) / sd).double().numpy())
    assert np.abs(ours - theirs).max() < 2e-3
    # shifted or scaled training features give the same probe (standardization is fitted on them)
    moved = fit_linear_probe(3 * x + 5, y, 3 * xv + 5, y[:0].new_zeros(42), [wd], num_classes=3, max_iter=500)
    torch.testing.assert_close(moved['predict'](3 * xv + 5), probe['predict'](xv), rtol=1e-3, atol=1e-3)


# ---------------- k-NN ----------------

def _knn_loop(train, y_train, queries, k, classes):
    """Naive reference: cosine similarity to every training row, the k largest, similarity-weighted votes."""
    out = []
    for q in queries:
        sims = [float(q @ t) / (float(q.norm()) * float(t.norm())) for t in train]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * classes
        for i in order:
            votes[int(y_train[i])] += sims[i]
        out.append(votes)
    return torch.tensor(out)


@pytest.mark.parametrize('k', [1, 5, 200])
def test_knn_matches_a_naive_loop(k):
    x, y = _blobs(60, 7, 3, seed=3, spread=3.0)
    q, _ = _blobs(30, 7, 3, seed=3, spread=3.0, sample=1)
    votes = knn_predict(x, y, q, k, 3, batch_size=7)  # several query batches; k=200 > 60 rows: all of them
    ref = _knn_loop(x, y, q, min(k, 60), 3)
    assert torch.equal(votes.argmax(1), ref.argmax(1))
    assert torch.allclose(votes, ref.float(), atol=1e-4)


def test_knn_is_scale_invariant_and_finds_the_exact_match():
    x, y = _blobs(30, 5, 3, seed=5)
    votes = knn_predict(x, y, 10 * x, k=1, num_classes=3)  # cosine: scaling a query changes nothing
    assert torch.equal(votes.argmax(1), y)


# ---------------- the convergence rule ----------------

class _Scripted(nn.Module):
    """A model whose 'validation accuracy' is read from a script, round by round; its weight counts the steps."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.steps = 0


def _run_scripted(curve, n=100, batch=10, patience=2, lr_drops=1, max_epochs=100.0, max_steps=0, round_images=0):
    model = _Scripted()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lrs, evals = [], iter(curve)

    def loss_fn(idx):
        lrs.append(opt.param_groups[0]['lr'])
        model.steps += 1
        return -model.w  # d/dw = -1: each step adds the learning rate to w

    def evaluate():
        return next(evals)

    cfg = EvalConfig(patience=patience, lr_drops=lr_drops, round_images=round_images, progress=False)
    info = train_until_plateau(model, opt, n, batch, loss_fn, evaluate, cfg, 0, max_epochs, max_steps, 'test', '--lr')
    return model, info, lrs


def test_plateau_rule_drops_the_rate_then_stops_and_restores_the_best_state():
    curve = [0.5, 0.6, 0.7, 0.65, 0.69, 0.72, 0.71, 0.70, 0.99]  # best 0.7 at round 3; plateau; drop; 0.72; plateau
    model, info, lrs = _run_scripted(curve)
    assert info['stopped'] == 'plateau'
    assert [a for _, a in info['val_curve']] == curve[:8]  # never reached the 0.99 round
    assert info['best_val_acc'] == 0.72 and info['best_epoch'] == 6.0
    assert info['lr_drops_at'] == [5.0]
    assert info['steps'] == 80 and info['images_seen'] == 800 and info['epochs'] == 8.0
    # warm-up over the first round, full rate until the drop, then x0.1
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[49] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.1)
    w_at_best = sum(lrs[:60])  # the state after 6 rounds (60 steps) was restored
    assert model.w.item() == pytest.approx(w_at_best)


def test_plateau_rule_caps_and_rounds():
    _, info, _ = _run_scripted([0.1 * i for i in range(1, 100)], max_epochs=3.5)
    assert info['stopped'] == 'cap' and info['steps'] == 35 and info['epochs'] == 3.5
    assert len(info['val_curve']) == 4  # three full rounds and the cut one
    # rounds of at least round_images items: 100 items, 250-image rounds = 25 steps between validations
    _, info, _ = _run_scripted([0.5] * 10, round_images=250, patience=1, lr_drops=0)
    assert info['stopped'] == 'plateau' and info['steps'] == 50 and info['val_curve'][0][0] == 2.5
    _, info, _ = _run_scripted([0.1 * i for i in range(1, 100)], max_steps=12)
    assert info['stopped'] == 'cap' and info['steps'] == 12


def test_plateau_rule_refuses_a_diverging_loss():
    model = _Scripted()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(FloatingPointError, match='--lr'):
        train_until_plateau(model, opt, 10, 5, lambda idx: model.w * float('nan'), lambda: 0.5,
                            EvalConfig(progress=False), 0, 10, 0, 'test', '--lr')


def test_plateau_rule_learns_a_real_problem():
    """End to end on separable blobs: a linear layer reaches high validation accuracy and stops on a plateau."""
    x, y = _blobs(300, 8, 3, seed=6)
    xv, yv = _blobs(150, 8, 3, seed=6, sample=1)
    torch.manual_seed(0)
    lin = nn.Linear(8, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05)
    info = train_until_plateau(lin, opt, len(x), 32, lambda idx: F.cross_entropy(lin(x[idx]), y[idx]),
                               lambda: float((lin(xv).argmax(1) == yv).float().mean()),
                               EvalConfig(progress=False, round_images=1, patience=2), 0, 200, 0, 'blobs', '--lr')
    assert info['stopped'] == 'plateau' and info['best_val_acc'] > 0.9
    assert float((lin(xv).argmax(1) == yv).float().mean()) == pytest.approx(info['best_val_acc'], abs=1e-5)


# ---------------- supervised baselines ----------------

def test_supervised_candidates_build_and_classify_28px_images():
    x = torch.randn(2, 1, 28, 28)
    net = create_supervised('convnet', 10, 1, dict(widths=[8, 16], depth=1))
    assert isinstance(net, ConvNet) and net(x).shape == (2, 10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 1
    flat = create_supervised('convnet', 10, 1, dict(widths=[8, 16, 4], depth=1, flatten=True))
    assert flat(x).shape == (2, 10) and flat.head[-1].in_features == 4 * 7 * 7
    dense = create_supervised('cpcv2_resnet_tiny', 10, 1, dict(dense=True))
    assert dense(x).shape == (2, 10) and dense.dense
    assert create_supervised('resnet10t', 10, 1)(x).shape == (2, 10)
    with pytest.raises(ValueError, match='timm model name'):
        create_supervised('no_such_net', 10)
    with pytest.raises(ValueError, match='depth'):
        ConvNet(widths=(8,), depth=0)
    assert math.isclose(sum(p.numel() for p in ConvNet(1, 10, (8,), 1, 0.0).parameters()),
                        8 * 9 + 8 * 2 + 8 * 10 + 10)  # conv (no bias) + BN + linear
