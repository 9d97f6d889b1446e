"""CPCObjective against a naive per-anchor loop; sanity (init loss, overfitting), autocast, errors, warnings."""
import math
import warnings

import pytest
import torch

from cpc_models import objective
from cpc_models.objective import CPCObjective

# One step along each direction in image coordinates (row, col).
STEP = {'down': (1, 0), 'up': (-1, 0), 'right': (0, 1), 'left': (0, -1)}


def naive_cpc(obj: CPCObjective, z: torch.Tensor):
    """The appendix's CPC loss written out anchor by anchor, in image coordinates.

    For every direction d and offset k, each anchor (b, i, j) whose target (b, i + k*di, j + k*dj) is on the grid
    predicts emb_scale * W_dk c_d[b, :, i, j] and is scored against every target vector of the batch; the
    task loss is the mean cross-entropy over its anchors, the loss the mean over tasks.
    Returns (loss, {task: accuracy}).
    """
    B, _, R, W = z.shape
    contexts = obj.context_grids(z)
    positions = [(b, i, j) for b in range(B) for i in range(R) for j in range(W)]
    targets = torch.stack([obj.target_proj.weight @ z[b, :, i, j] + obj.target_proj.bias for b, i, j in positions])
    task_losses, accs = [], {}
    for d in obj.directions:
        di, dj = STEP[d]
        for k in obj.offsets:
            head = obj.predictors[d][f'k{k}']
            losses, hits = [], []
            for b, i, j in positions:
                ti, tj = i + k * di, j + k * dj
                if not (0 <= ti < R and 0 <= tj < W):
                    continue
                pred = obj.emb_scale * (head.weight @ contexts[d][b, :, i, j] + head.bias)
                logits = targets @ pred
                label = positions.index((b, ti, tj))
                losses.append(torch.logsumexp(logits, 0) - logits[label])
                hits.append(float(logits.argmax().item() == label))
            task_losses.append(torch.stack(losses).mean())
            accs[f'{d}/k{k}'] = sum(hits) / len(hits)
    return torch.stack(task_losses).mean(), accs


@pytest.mark.parametrize('directions', [1, 2, 4])
@pytest.mark.parametrize('shared_context', [True, False])
def test_matches_naive_loop(directions, shared_context):
    torch.manual_seed(directions + 10 * shared_context)
    obj = CPCObjective(6, context_hidden=8, context_blocks=2, target_dim=5, offsets=(1, 2), directions=directions,
                       shared_context=shared_context, emb_scale=0.7).double()
    z = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)  # non-square grid
    params = [z] + list(obj.parameters())

    out = obj(z)
    grads = torch.autograd.grad(out.loss, params)
    ref_loss, ref_acc = naive_cpc(obj, z)
    ref_grads = torch.autograd.grad(ref_loss, params)

    torch.testing.assert_close(out.loss, ref_loss, atol=1e-10, rtol=0)
    for (name, _), g, rg in zip([('z', z)] + list(obj.named_parameters()), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=0, msg=f'gradient of {name} differs')
    assert set(out.metrics) == {f'acc/{t}' for t in ref_acc} | {'acc'}
    for task, acc in ref_acc.items():
        assert out.metrics[f'acc/{task}'].item() == pytest.approx(acc)
    assert out.metrics['acc'].item() == pytest.approx(sum(ref_acc.values()) / len(ref_acc))


def test_loss_depends_on_the_other_images():
    """Negatives include the other images: changing image 1 changes the loss of anchors in image 0."""
    torch.manual_seed(0)
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1,), directions=1).double()
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    z2 = z.clone()
    z2[1] += 1.0
    out, out2 = obj(z), obj(z2)
    assert not torch.allclose(out.loss, out2.loss)


@pytest.mark.parametrize('grid', [(6, 6), (7, 7)])
def test_default_config_initial_loss_is_log_candidates(grid):
    torch.manual_seed(0)
    obj = CPCObjective(256)  # paper sizes, default offsets (3,) and 4 directions
    b = 8
    out = obj(torch.randn(b, 256, *grid))
    n = b * grid[0] * grid[1]
    assert out.loss.item() == pytest.approx(math.log(n), rel=0.02)
    assert sorted(out.metrics) == ['acc', 'acc/down/k3', 'acc/left/k3', 'acc/right/k3', 'acc/up/k3']
    assert all(v.ndim == 0 and not v.requires_grad for v in out.metrics.values())


def test_tiny_batch_can_be_overfitted():
    torch.manual_seed(0)
    obj = CPCObjective(16, context_hidden=32, context_blocks=2, target_dim=16, offsets=(1, 2), directions=4)
    z = torch.nn.Parameter(torch.randn(2, 16, 4, 4))  # learnable latents of 2 images, 32 candidates
    opt = torch.optim.Adam([z, *obj.parameters()], lr=1e-2)
    for _ in range(100):
        out = obj(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.01, out.loss.item()
    assert out.metrics['acc'].item() == 1.0


def test_bf16_autocast_computes_the_loss_in_fp32():
    torch.manual_seed(0)
    obj = CPCObjective(32, context_hidden=32, context_blocks=2, offsets=(1, 2))
    z = torch.randn(4, 32, 5, 6, requires_grad=True)
    ref = obj(z).loss
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = obj(z)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-2)
    out.loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_bf16_matches_cpu():
    torch.manual_seed(0)
    obj = CPCObjective(64, offsets=(2, 3))
    z = torch.randn(8, 64, 6, 7)
    ref = obj(z).loss
    obj, zc = obj.cuda(), z.cuda().requires_grad_(True)
    out = obj(zc)
    torch.testing.assert_close(out.loss.cpu(), ref, atol=1e-3, rtol=1e-3)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = obj(zc)
    assert out.loss.dtype == torch.float32 and out.loss.device.type == 'cuda'
    assert out.loss.item() == pytest.approx(ref.item(), rel=2e-2)
    out.loss.backward()
    assert torch.isfinite(zc.grad).all()


def test_too_small_grid_or_offset_raises():
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(5,))
    with pytest.raises(ValueError, match=r'4x4 is too small .* smaller offsets \(at most 3 here\)'):
        obj(torch.randn(2, 8, 4, 4))
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(3,), directions=4)
    with pytest.raises(ValueError, match='3 steps right needs at least 4 cols, got 3'):
        obj(torch.randn(2, 8, 6, 3))
    # Predicting only up and down, 3 columns are enough.
    obj2 = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(3,), directions=2)
    assert torch.isfinite(obj2(torch.randn(2, 8, 6, 3)).loss)


def test_bad_inputs_and_config_raise():
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1,))
    with pytest.raises(ValueError, match=r'CPCObjective\(model.num_features'):
        obj(torch.randn(2, 9, 4, 4))
    with pytest.raises(ValueError, match='forward_features'):
        obj(torch.randn(2, 8 * 16))
    with pytest.raises(ValueError, match='directions must be 1'):
        CPCObjective(8, directions=3)
    with pytest.raises(ValueError, match='distinct positive integers'):
        CPCObjective(8, offsets=(0, 1))
    with pytest.raises(ValueError, match='distinct positive integers'):
        CPCObjective(8, offsets=())


def test_single_image_batch_warns_once(monkeypatch):
    monkeypatch.setattr(objective, '_warned_single_image', False)
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = obj(torch.randn(1, 8, 3, 3))
        obj(torch.randn(1, 8, 3, 3))
        obj(torch.randn(2, 8, 3, 3))
    assert [str(w.message).startswith('CPCObjective got a batch of ONE image') for w in caught] == [True]
    assert torch.isfinite(out.loss)
