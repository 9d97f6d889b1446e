"""CPCObjective against a naive per-anchor loop; sanity (init loss, overfitting), autocast, errors, warnings."""
import math
import warnings

import pytest
import torch

from cpc_models import objective
from cpc_models.objective import CPCObjective

# One step along each direction in image coordinates (row, col).
STEP = {'down': (1, 0), 'up': (-1, 0), 'right': (0, 1), 'left': (0, -1)}


def frame_position(direction: str, i: int, j: int, rows: int, cols: int) -> tuple[int, int]:
    """Where image position (i, j) lies in the frame of `direction`, whose rows run along the direction."""
    return {'down': (i, j), 'up': (rows - 1 - i, j), 'right': (j, i), 'left': (cols - 1 - j, i)}[direction]


def naive_contexts(obj: CPCObjective, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Context of every direction in image orientation, built pixel by pixel (not with the module's own frames).

    The frame of a direction is the grid turned so that its rows run along the direction; the masked context
    network runs on each frame on its own, and its output at frame (r, c) is the context of image (i, j).
    """
    B, C, R, W = z.shape
    out = {}
    for d in obj.directions:
        shape = (R, W) if d in ('down', 'up') else (W, R)
        frame = z.new_zeros(B, C, *shape)
        for i in range(R):
            for j in range(W):
                r, c = frame_position(d, i, j, R, W)
                frame[:, :, r, c] = z[:, :, i, j]
        ctx = (obj.context if obj.shared_context else obj.context[d])(frame)
        out[d] = z.new_zeros(B, ctx.shape[1], R, W)
        for i in range(R):
            for j in range(W):
                r, c = frame_position(d, i, j, R, W)
                out[d][:, :, i, j] = ctx[:, :, r, c]
    return out


def own_heads(obj: CPCObjective, seed: int = 0) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """The reference's own predictor of every (direction, offset): a (W, b) pair of fresh float64 leaf tensors,
    drawn independently of the module (so they are distinct whatever the module does)."""
    g = torch.Generator().manual_seed(seed)
    shape = (obj.target_dim, obj.latent_channels)
    return {(d, k): (torch.randn(shape, generator=g, dtype=torch.float64).mul_(0.3).requires_grad_(),
                     torch.randn(shape[0], generator=g, dtype=torch.float64).mul_(0.3).requires_grad_())
            for d in obj.directions for k in obj.offsets}


def load_heads(obj: CPCObjective, heads) -> None:
    """Copy the reference's heads into the module's predictors, by name (``predictors.<d>.k<k>``)."""
    with torch.no_grad():
        for (d, k), (w, b) in heads.items():
            obj.predictors[d][f'k{k}'].weight.copy_(w)
            obj.predictors[d][f'k{k}'].bias.copy_(b)


def naive_cpc(obj: CPCObjective, z: torch.Tensor, contexts: dict[str, torch.Tensor] | None = None, heads=None):
    """The appendix's CPC loss written out anchor by anchor, in image coordinates and float64.

    For every direction d and offset k, each anchor (b, i, j) whose target (b, i + k*di, j + k*dj) is on the grid
    predicts emb_scale * W_dk c_d[b, :, i, j] and is scored against every target vector of the batch; the
    task loss is the mean cross-entropy over its anchors, the loss the mean over tasks.
    `contexts` ({direction: (B, C, R, W)}) defaults to :func:`naive_contexts`; `heads` ({(d, k): (W, b)}, see
    :func:`own_heads`) to the module's own predictors.
    Returns (loss, {task: accuracy}, {(task, b, i, j): the anchor's term of its task's mean}).
    """
    if heads is None:
        heads = {(d, k): (obj.predictors[d][f'k{k}'].weight, obj.predictors[d][f'k{k}'].bias)
                 for d in obj.directions for k in obj.offsets}
    B, _, R, W = z.shape
    contexts = naive_contexts(obj, z) if contexts is None else contexts
    z, contexts = z.double(), {d: c.double() for d, c in contexts.items()}
    positions = [(b, i, j) for b in range(B) for i in range(R) for j in range(W)]
    proj_w, proj_b = obj.target_proj.weight.double(), obj.target_proj.bias.double()
    targets = torch.stack([proj_w @ z[b, :, i, j] + proj_b for b, i, j in positions])
    task_losses, accs, terms = [], {}, {}
    for d in obj.directions:
        di, dj = STEP[d]
        for k in obj.offsets:
            head_w, head_b = heads[d, k]
            losses, hits, keys = [], [], []
            for b, i, j in positions:
                ti, tj = i + k * di, j + k * dj
                if not (0 <= ti < R and 0 <= tj < W):
                    continue
                pred = obj.emb_scale * (head_w.double() @ contexts[d][b, :, i, j] + head_b.double())
                logits = targets @ pred
                label = positions.index((b, ti, tj))
                losses.append(torch.logsumexp(logits, 0) - logits[label])
                hits.append(float(logits.argmax().item() == label))
                keys.append((f'{d}/k{k}', b, i, j))
            task_losses.append(torch.stack(losses).mean())
            accs[f'{d}/k{k}'] = sum(hits) / len(hits)
            terms.update({key: loss / len(losses) for key, loss in zip(keys, losses)})
    return torch.stack(task_losses).mean(), accs, terms


@pytest.mark.parametrize('directions', [1, 2, 4])
@pytest.mark.parametrize('shared_context', [True, False])
def test_matches_naive_loop(directions, shared_context):
    torch.manual_seed(directions + 10 * shared_context)
    obj = CPCObjective(6, context_hidden=8, context_blocks=2, target_dim=5, offsets=(1, 2), directions=directions,
                       shared_context=shared_context, emb_scale=0.7).double()
    z = torch.randn(3, 6, 4, 5, dtype=torch.float64, requires_grad=True)  # non-square grid
    # The reference's predictors are its own tensors, one (W, b) per (direction, offset), loaded into the module by
    # name: a module that shared one W across offsets (or directions) would compute with the last one loaded.
    heads = own_heads(obj, seed=directions)
    load_heads(obj, heads)
    names = [n for n, _ in obj.named_parameters()]
    own = {f'predictors.{d}.k{k}.{part}': t for (d, k), wb in heads.items() for part, t in zip(('weight', 'bias'), wb)}
    assert set(own) <= set(names) and len(own) == 2 * len(obj.directions) * len(obj.offsets)

    out = obj(z)
    grads = torch.autograd.grad(out.loss, [z] + list(obj.parameters()))
    ref_loss, ref_acc, _ = naive_cpc(obj, z, heads=heads)
    ref_params = [own.get(n, p) for n, p in obj.named_parameters()]
    ref_grads = torch.autograd.grad(ref_loss, [z] + ref_params)

    torch.testing.assert_close(out.loss, ref_loss, atol=1e-10, rtol=0)
    for name, g, rg in zip(['z'] + names, grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-10, rtol=0, msg=f'gradient of {name} differs')
    assert set(out.metrics) == {f'acc/{t}' for t in ref_acc} | {'acc'}
    for task, acc in ref_acc.items():
        assert out.metrics[f'acc/{task}'].item() == pytest.approx(acc)
    assert out.metrics['acc'].item() == pytest.approx(sum(ref_acc.values()) / len(ref_acc))


@pytest.mark.parametrize('directions', [1, 4])
def test_every_direction_and_offset_has_its_own_predictor(directions):
    """Paper (appendix A.2, and the CPC v1 pseudo-code): one linear prediction W_k per offset k (and per direction):
    distinct parameter tensors, each with its own initial values and its own gradient."""
    torch.manual_seed(0)
    obj = CPCObjective(6, context_hidden=8, context_blocks=1, target_dim=5, offsets=(1, 2, 3), directions=directions)
    heads = [obj.predictors[d][f'k{k}'] for d in obj.directions for k in obj.offsets]
    assert len(heads) == 3 * directions
    params = [p for h in heads for p in (h.weight, h.bias)]
    assert len({id(p) for p in params}) == len(params)  # no module or tensor shared
    assert len({p.data_ptr() for p in params}) == len(params)  # nor storage
    weights = [h.weight for h in heads]
    for a in range(len(weights)):
        for b in range(a):
            assert not torch.equal(weights[a], weights[b]), (a, b)
    z = torch.randn(2, 6, 5, 5)
    obj(z).loss.backward()
    grads = [h.weight.grad for h in heads]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    for a in range(len(grads)):
        for b in range(a):
            assert not torch.allclose(grads[a], grads[b]), (a, b)  # each offset's task trains its own W


def _capture_context(obj: CPCObjective) -> list:
    """Record every output of the (shared) context network during obj's forward passes."""
    outputs = []
    obj.context.register_forward_hook(lambda module, args, out: outputs.append(out))
    return outputs


@pytest.mark.parametrize('shared_context', [True, False])
def test_context_grids_match_frames_built_pixel_by_pixel(shared_context):
    torch.manual_seed(0)
    obj = CPCObjective(5, context_hidden=6, context_blocks=2, offsets=(1,), directions=4,
                       shared_context=shared_context).double()
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    grids, ref = obj.context_grids(z), naive_contexts(obj, z)
    assert list(grids) == list(ref) == list(objective.DIRECTIONS)
    for d in grids:
        torch.testing.assert_close(grids[d], ref[d], atol=1e-12, rtol=0)


def test_image0_anchors_are_scored_against_the_other_images():
    """Image 0's anchors have image 1's positions among their negatives (Sec. 3.1), checked on their own terms.

    Image 0's context reaches the loss only through image 0's anchors, so the gradient of the loss with respect to
    it is the gradient of those anchors' terms alone: it must equal the naive loop's image-0 terms (scored against
    all targets of the batch) and change when only image 1 changes.
    """
    torch.manual_seed(0)
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, target_dim=6, offsets=(1,), directions=1).double()
    contexts = _capture_context(obj)

    def image0_grad(z):
        contexts.clear()
        (grad,) = torch.autograd.grad(obj(z).loss, contexts[0])
        _, _, terms = naive_cpc(obj, z, {'down': contexts[0]})
        (ref,) = torch.autograd.grad(sum(t for (_, b, _, _), t in terms.items() if b == 0), contexts[0])
        torch.testing.assert_close(grad[0], ref[0], atol=1e-12, rtol=0)
        return grad[0]

    z = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    z_other = z.clone()
    z_other[1] = torch.randn(8, 3, 3, dtype=torch.float64)
    g, g_other = image0_grad(z), image0_grad(z_other)
    assert g[:, :2].abs().min() > 0  # rows 0 and 1 are anchors (offset 1 on 3 rows); row 2 is not
    assert torch.equal(g[:, 2], torch.zeros_like(g[:, 2]))
    assert (g - g_other).abs().max() > 1e-3 * g.abs().max()


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


@pytest.mark.parametrize('latent_dtype', [torch.float32, torch.bfloat16])
def test_bf16_autocast_keeps_targets_and_logits_in_fp32(latent_dtype):
    """Under bf16 autocast the context network's convolutions run in bf16, but targets, predictions and logits
    stay fp32.

    The loss then equals a float64 computation from the same latents and contexts to < 5e-7 (and so does the
    gradient reaching the contexts, relative to its size); with bf16 targets or logits (what autocast gives linear
    and matmul) the loss is off by 1e-4 to 1e-3 and the gradient by ~5e-3, although autocast would still run the
    cross-entropy itself in fp32. emb_scale=1 gives logits of a few units, so their bf16 rounding shows.
    """
    torch.manual_seed(0)
    obj = CPCObjective(32, context_hidden=32, context_blocks=2, target_dim=64, offsets=(1, 2), directions=1,
                       emb_scale=1.0)
    contexts = _capture_context(obj)
    z = torch.randn(4, 32, 5, 6).to(latent_dtype).requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = obj(z)
    assert out.loss.dtype == torch.float32
    ctx = contexts[0].detach().double().requires_grad_(True)
    ref_loss, ref_acc, _ = naive_cpc(obj, z.detach(), {'down': ctx})
    assert abs(out.loss.item() - ref_loss.item()) < 5e-6, (out.loss.item(), ref_loss.item())
    for task, acc in ref_acc.items():
        assert out.metrics[f'acc/{task}'].item() == pytest.approx(acc)
    if latent_dtype == torch.float32:  # fp32 contexts, so an fp32 gradient to compare
        (grad,) = torch.autograd.grad(out.loss, contexts[0], retain_graph=True)
        (ref_grad,) = torch.autograd.grad(ref_loss, ctx)
        assert (grad.double() - ref_grad).abs().max() < 1e-4 * ref_grad.abs().max()
    out.loss.backward()
    assert z.grad.dtype == latent_dtype and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_every_tensor_is_made_on_the_latents_device():
    """With another default device (here 'meta'), CPU latents still give the same CPU loss."""
    torch.manual_seed(0)
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, target_dim=6, offsets=(1, 2), directions=4)
    z = torch.randn(2, 8, 3, 4)
    ref = obj(z)
    with torch.device('meta'):
        out = obj(z)
    assert out.loss.device.type == 'cpu' and torch.equal(out.loss, ref.loss)
    assert all(torch.equal(out.metrics[k], v) for k, v in ref.metrics.items())


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
    with pytest.raises(ValueError) as e:
        obj(torch.randn(2, 8, 4, 4))
    assert str(e.value) == (
        'Latent grid 4x4 is too small for offsets=(5,) with directions=4: predicting 5 steps down needs at least 6 '
        'rows, got 4. Use smaller offsets (at most 3 here), fewer directions, or a larger grid (larger images or a '
        'smaller patch stride).')
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1, 3), directions=4)
    with pytest.raises(ValueError, match=r'offsets=\(1, 3\) .* 3 steps right needs at least 4 cols, got 3\. '
                                         r'Use smaller offsets \(at most 2 here\)'):
        obj(torch.randn(2, 8, 6, 3))
    # Predicting only up and down, 3 columns are enough; rows limit the offsets.
    obj2 = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(3,), directions=2)
    assert torch.isfinite(obj2(torch.randn(2, 8, 6, 3)).loss)
    with pytest.raises(ValueError, match=r'3 steps down needs at least 4 rows, got 3\. .*at most 2 here'):
        CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1, 3), directions=2)(torch.randn(2, 8, 3, 9))
    with pytest.raises(ValueError, match=r'3 steps down needs at least 4 rows, got 3\. .*at most 2 here'):
        CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(3,), directions=1)(torch.randn(2, 8, 3, 1))


@pytest.mark.parametrize('z, message', [
    (torch.randn(2, 8 * 16), 'CPCObjective expects a latent grid (B, C, rows, cols), got (2, 128); get one from the '
                             'encoder with model.forward_features(images) (not forward(), which pools).'),
    ([[1.0]], 'CPCObjective expects a latent grid (B, C, rows, cols), got list; get one from the encoder with '
              'model.forward_features(images) (not forward(), which pools).'),
    (torch.zeros(2, 8, 4, 4, dtype=torch.long), 'CPCObjective expects floating-point latents, got dtype torch.int64.'),
    (torch.randn(2, 9, 4, 5), 'CPCObjective was built for 8 latent channels, got 9 (shape (2, 9, 4, 5)); build it '
                              'with CPCObjective(model.num_features, ...).'),
    (torch.randn(0, 8, 4, 4), 'CPCObjective got an empty batch (shape (0, 8, 4, 4)).'),
], ids=['flat', 'list', 'int', 'channels', 'empty'])
def test_bad_latents_raise_clear_errors(z, message):
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1,))
    with pytest.raises(ValueError) as e:
        obj(z)
    assert str(e.value) == message


@pytest.mark.parametrize('kwargs, message', [
    (dict(directions=3), 'directions must be 1 (top-to-bottom), 2 (+ bottom-to-top) or 4 (+ left/right), got 3.'),
    (dict(offsets=(0, 1)), 'offsets must be a non-empty sequence of distinct positive integers (rows ahead to '
                           "predict), got (0, 1); e.g. offsets=(3,) as in the paper's pseudo-code."),
    (dict(offsets=()), 'offsets must be a non-empty sequence of distinct positive integers'),
    (dict(offsets=(2, 2)), 'offsets must be a non-empty sequence of distinct positive integers'),
    (dict(offsets=(1.5,)), 'offsets must be a non-empty sequence of distinct positive integers'),
    (dict(offsets=-1), 'offsets must be a non-empty sequence of distinct positive integers'),
    (dict(latent_channels=0), 'latent_channels (0) and target_dim (64) must be positive; pass '
                              'latent_channels=model.num_features.'),
    (dict(target_dim=0), 'latent_channels (8) and target_dim (0) must be positive'),
    (dict(emb_scale=0.0), 'emb_scale must be positive (0.1 in the paper), got 0.0.'),
    (dict(emb_scale=-0.1), 'emb_scale must be positive'),
], ids=['directions', 'offset-0', 'no-offsets', 'duplicate', 'fraction', 'negative-int', 'channels', 'target-dim',
        'emb-scale-0', 'emb-scale-negative'])
def test_bad_config_raises_clear_errors(kwargs, message):
    kwargs = {'latent_channels': 8, **kwargs}
    with pytest.raises(ValueError) as e:
        CPCObjective(**kwargs)
    assert str(e.value).startswith(message)


def test_smallest_valid_config_and_int_offset():
    obj = CPCObjective(1, context_hidden=1, context_blocks=1, target_dim=1, offsets=2, directions=1, emb_scale=1e-3)
    assert obj.offsets == (2,)
    assert torch.isfinite(obj(torch.randn(2, 1, 3, 1)).loss)


def test_defaults_are_the_papers():
    """Appendix pseudo-code: 5 residual blocks of width 256, 64-d targets, emb_scale 0.1, one offset of 3 rows;
    Sec. 4.1: four directions. One shared context network, gathering across ranks."""
    obj = CPCObjective(16)
    assert obj.offsets == (3,) and obj.directions == objective.DIRECTIONS and obj.emb_scale == 0.1
    assert obj.shared_context and obj.gather_distributed
    assert len(obj.context.blocks) == 5 and all(b.conv2.out_channels == 256 for b in obj.context.blocks)
    assert obj.target_dim == 64 and obj.target_proj.out_features == 64
    assert all(h.out_features == 64 for heads in obj.predictors.values() for h in heads.values())
    assert obj.extra_repr() == (
        "offsets=(3,), directions=('down', 'up', 'right', 'left'), shared_context=True, "
        'emb_scale=0.1, gather_distributed=True, logits_dtype=float32')


@pytest.mark.parametrize('shared_context', [True, False])
def test_context_width_and_depth_follow_the_config(shared_context):
    obj = CPCObjective(6, context_hidden=12, context_blocks=3, target_dim=5, offsets=(1, 2), directions=2,
                       shared_context=shared_context)
    nets = [obj.context] if shared_context else [obj.context[d] for d in ('down', 'up')]
    assert shared_context or set(obj.context) == {'down', 'up'}
    for net in nets:
        assert len(net.blocks) == 3
        assert all(b.conv1.out_channels == 12 and b.conv4.out_channels == 6 for b in net.blocks)
    assert set(obj.predictors) == {'down', 'up'}
    assert all(set(heads) == {'k1', 'k2'} for heads in obj.predictors.values())


@pytest.mark.parametrize('leading', [(), (3,), (2, 3, 1)])
@pytest.mark.parametrize('direction', objective.DIRECTIONS)
def test_to_frame_turns_the_grid_along_the_direction(direction, leading):
    """Frame (r, c) holds image (i, j) at :func:`frame_position`, for any leading dimensions; from_frame undoes it."""
    R, W = 3, 4
    x = torch.arange(math.prod(leading) * R * W).view(*leading, R, W)
    frame = objective.to_frame(x, direction)
    assert frame.shape == (*leading, *((R, W) if direction in ('down', 'up') else (W, R)))
    for i in range(R):
        for j in range(W):
            r, c = frame_position(direction, i, j, R, W)
            assert torch.equal(frame[..., r, c], x[..., i, j])
    assert torch.equal(objective.from_frame(frame, direction), x)


def test_unknown_direction_raises():
    for fn in (objective.to_frame, objective.from_frame):
        with pytest.raises(ValueError) as e:
            fn(torch.zeros(2, 2), 'diagonal')
        assert str(e.value) == "Unknown direction 'diagonal'; use one of ('down', 'up', 'right', 'left')."


SINGLE_IMAGE_WARNING = (
    'CPCObjective got a batch of ONE image: its only negatives are other positions of the same image, not other '
    "images (Hénaff et al. 2020, Sec. 3.1). Use at least 2 images per step for the paper's objective. "
    '(Warned once per process.)')


def test_single_image_batch_warns_once(monkeypatch):
    monkeypatch.setattr(objective, '_warned_single_image', False)
    obj = CPCObjective(8, context_hidden=8, context_blocks=1, offsets=(1,))

    def warnings_of(batch):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = obj(torch.randn(batch, 8, 3, 3))
        assert torch.isfinite(out.loss)
        return [(w.category, str(w.message)) for w in caught]

    assert warnings_of(2) == []
    assert warnings_of(1) == [(UserWarning, SINGLE_IMAGE_WARNING)]
    assert warnings_of(1) == []  # once per process


def test_info_nce_matches_a_naive_loop_and_its_gradient_is_exact():
    """info_nce against the definition, row by row in float64: -log softmax(row)[label] and whether the row's first
    largest logit is the label's; its backward against numerical derivatives (gradcheck); a retained graph runs its
    backward twice with the same result."""
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64) * 4
    logits[2] = 1.5  # a tie: the first index is the argmax, as logits.argmax(1) says
    labels = torch.tensor([0, 3, 0, 10, 5, 5, 1])
    labels[4] = int(logits[4].argmax())  # at least one hit besides the tie
    ce, hit = objective.info_nce(logits, labels)
    for i in range(len(labels)):
        row = logits[i]
        expected = -(row[labels[i]] - torch.log(torch.exp(row - row.max()).sum()) - row.max())
        assert ce[i].item() == pytest.approx(expected.item(), rel=1e-12)
        first_max = next(j for j in range(len(row)) if row[j] == row.max())
        assert bool(hit[i]) == (first_max == labels[i])
    assert hit[2] and hit[4]
    assert torch.autograd.gradcheck(lambda x: objective.info_nce(x, labels)[0], logits.clone().requires_grad_())
    x = logits.clone().requires_grad_()
    loss = (objective.info_nce(x, labels)[0] * torch.arange(1.0, 8.0, dtype=torch.float64)).sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(g1, g2)
    x32 = logits.float().requires_grad_()
    ce32, hit32 = objective.info_nce(x32, labels)
    ref = torch.nn.functional.cross_entropy(x32, labels, reduction='none')
    assert torch.allclose(ce32, ref, rtol=1e-6, atol=1e-6) and torch.equal(hit32, x32.argmax(1) == labels)


def test_bf16_logits_match_fp32_within_bf16_rounding():
    """logits_dtype='bfloat16': targets, predictions and the logits matmul in bf16, the cross-entropy in fp32; the loss
    and the gradients reaching the latents stay within bf16 rounding of the fp32 objective's."""
    torch.manual_seed(0)
    ref = CPCObjective(32, context_hidden=16, context_blocks=2, offsets=(1, 2))
    low = CPCObjective(32, context_hidden=16, context_blocks=2, offsets=(1, 2), logits_dtype='bfloat16')
    low.load_state_dict(ref.state_dict())
    z = torch.randn(4, 32, 5, 5)
    out = []
    for obj in (ref, low):
        zz = z.clone().requires_grad_()
        res = obj(zz)
        res.loss.backward()
        out.append((res.loss.detach(), zz.grad))
    (l32, g32), (l16, g16) = out
    assert l16.dtype == torch.float32 and l16.item() != l32.item()  # another computation, not the same one
    assert abs(l16.item() - l32.item()) < 1e-2 * abs(l32.item())
    assert ((g16 - g32).abs().max() / g32.abs().max()).item() < 5e-2
    with pytest.raises(ValueError, match='logits_dtype'):
        CPCObjective(32, logits_dtype='float16')
