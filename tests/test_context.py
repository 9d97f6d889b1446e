"""MaskedContextNet: values against the pseudo-code written out position by position, causality (row r sees only
rows <= r) in every prediction direction, sizes, errors."""
import pytest
import torch

from cpc_models.context import MaskedContextNet, MaskedResidualBlock
from cpc_models.objective import CPCObjective


def _row_dependence(fn, z: torch.Tensor, axis: int, out_index: int) -> torch.Tensor:
    """|d sum(fn(z) at index out_index along axis) / d z| summed over everything but that axis -> (len,)."""
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (grad,) = torch.autograd.grad(out.select(axis, out_index).sum(), z)
    dims = [d for d in range(z.ndim) if d != axis]
    return grad.abs().sum(dims)


def naive_block(block: MaskedResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """The appendix's ``pixelCNN`` block at every position (b, r, j) on its own, in float64:
    h1 = relu(W1 x + b1); h2 = W2 * h1 along the row (1x3, zero outside); h3 = relu(W3[0] h2[r - 1] + W3[1] h2[r] + b3)
    with h2[-1] = 0 (only the row above and the row itself); out = x + W4 h3 + b4."""
    B, C, R, W = x.shape
    w1, w2, w3, w4 = (conv.weight.double() for conv in (block.conv1, block.conv2, block.conv3, block.conv4))
    b1, b2, b3, b4 = (conv.bias.double() for conv in (block.conv1, block.conv2, block.conv3, block.conv4))
    x = x.double()
    zero = x.new_zeros(w1.shape[0])
    h1 = [[[torch.relu(w1[:, :, 0, 0] @ x[b, :, r, j] + b1) for j in range(W)] for r in range(R)] for b in range(B)]
    h2 = [[[b2 + sum(w2[:, :, 0, dj + 1] @ (h1[b][r][j + dj] if 0 <= j + dj < W else zero) for dj in (-1, 0, 1))
            for j in range(W)] for r in range(R)] for b in range(B)]
    out = torch.empty_like(x)
    for b in range(B):
        for r in range(R):
            for j in range(W):
                above = h2[b][r - 1][j] if r > 0 else zero
                h3 = torch.relu(w3[:, :, 0, 0] @ above + w3[:, :, 1, 0] @ h2[b][r][j] + b3)
                out[b, :, r, j] = x[b, :, r, j] + w4[:, :, 0, 0] @ h3 + b4
    return out


@pytest.mark.parametrize('grid', [(4, 5), (1, 1), (3, 1), (1, 3)])
def test_matches_the_pseudo_code_position_by_position(grid):
    torch.manual_seed(0)
    net = MaskedContextNet(4, hidden=6, blocks=2)
    z = torch.randn(2, 4, *grid)
    ref = z.double()
    for block in net.blocks:
        ref = naive_block(block, ref)
    ref = torch.relu(ref)  # a ReLU after the last block
    torch.testing.assert_close(net.double()(z.double()), ref, atol=1e-12, rtol=0)


def test_sizes_follow_the_arguments_and_default_to_the_paper():
    net = MaskedContextNet(32)
    assert len(net.blocks) == 5 and net.channels == 32  # appendix: 5 blocks of width 256
    assert all(b.conv1.out_channels == b.conv2.out_channels == b.conv3.out_channels == 256 for b in net.blocks)
    assert MaskedResidualBlock(8).conv2.out_channels == 256
    net = MaskedContextNet(3, hidden=7, blocks=2)
    assert len(net.blocks) == 2
    for b in net.blocks:
        assert (b.conv1.in_channels, b.conv1.out_channels, b.conv4.out_channels) == (3, 7, 3)
        assert b.conv2.kernel_size == (1, 3) and b.conv3.kernel_size == (2, 1)
    for rows, cols in [(6, 6), (7, 5), (1, 1), (2, 9)]:
        assert net(torch.randn(2, 3, rows, cols)).shape == (2, 3, rows, cols)


@pytest.mark.parametrize('blocks', [1, 3])
def test_row_r_sees_only_rows_up_to_r(blocks):
    torch.manual_seed(0)
    net = MaskedContextNet(4, hidden=8, blocks=blocks).double()
    z = torch.randn(3, 4, 7, 5, dtype=torch.float64)
    for r in range(7):
        dep = _row_dependence(net, z, axis=2, out_index=r)
        assert torch.all(dep[r + 1:] == 0), f'context row {r} depends on rows below it: {dep.tolist()}'
        # Each block reaches exactly one row further up: the receptive field is rows r - blocks .. r.
        assert torch.all(dep[max(r - blocks, 0):r + 1] > 0), f'row {r}: {dep.tolist()}'
        assert torch.all(dep[:max(r - blocks, 0)] == 0)


def test_first_row_sees_only_itself():
    torch.manual_seed(0)
    net = MaskedContextNet(4, hidden=8, blocks=5).double()
    dep = _row_dependence(net, torch.randn(2, 4, 6, 6, dtype=torch.float64), axis=2, out_index=0)
    assert dep[0] > 0 and torch.all(dep[1:] == 0)


# direction -> (axis of the grid it runs along, +1 if context comes from smaller indices else -1)
_AXES = {'down': (2, 1), 'up': (2, -1), 'right': (3, 1), 'left': (3, -1)}


@pytest.mark.parametrize('shared_context', [True, False])
def test_every_direction_is_causal_in_its_frame(shared_context):
    torch.manual_seed(0)
    obj = CPCObjective(4, context_hidden=8, context_blocks=2, offsets=(1,), directions=4,
                       shared_context=shared_context).double()
    z = torch.randn(2, 4, 5, 4, dtype=torch.float64)  # non-square: frames of shape 5x4 and 4x5
    for d in obj.directions:
        axis, sign = _AXES[d]
        length = z.shape[axis]
        for pos in range(length):
            dep = _row_dependence(lambda x, d=d: obj.context_grids(x)[d], z, axis, pos)
            ahead = dep[pos + 1:] if sign > 0 else dep[:pos]
            assert torch.all(ahead == 0), f'{d}: context at {pos} sees latents ahead of it: {dep.tolist()}'
            assert dep[pos] > 0


@pytest.mark.parametrize('z, message', [
    (torch.randn(8, 6, 6), 'MaskedContextNet expects a latent grid (B, C, rows, cols), got shape (8, 6, 6); get one '
                           'from an encoder with model.forward_features(images).'),
    (torch.randn(2, 7, 6, 5), 'MaskedContextNet was built for 8 latent channels, got 7 (shape (2, 7, 6, 5)); build '
                              'it with channels=model.num_features.'),
    (torch.randn(2, 8, 0, 5), 'MaskedContextNet needs a latent grid of at least 1x1, got shape (2, 8, 0, 5).'),
    (torch.randn(2, 8, 5, 0), 'MaskedContextNet needs a latent grid of at least 1x1, got shape (2, 8, 5, 0).'),
], ids=['3-D', 'channels', 'no-rows', 'no-cols'])
def test_bad_latents_raise_clear_errors(z, message):
    net = MaskedContextNet(8, hidden=4, blocks=1)
    with pytest.raises(ValueError) as e:
        net(z)
    assert str(e.value) == message


@pytest.mark.parametrize('name', ['channels', 'hidden', 'blocks'])
def test_sizes_must_be_positive(name):
    kwargs = dict(channels=8, hidden=4, blocks=1)
    kwargs[name] = 0
    with pytest.raises(ValueError) as e:
        MaskedContextNet(**kwargs)
    assert str(e.value) == f'MaskedContextNet: {name} must be a positive integer, got 0.'
    kwargs[name] = 1
    assert MaskedContextNet(**kwargs)(torch.randn(1, kwargs['channels'], 2, 2)).shape == (1, kwargs['channels'], 2, 2)


def test_autocast_casts_all_weights_in_one_copy_each_way():
    """Under bf16 autocast the blocks' weights and biases are cast together (fused_norm.cast_all): the same output
    and fp32 gradients as autocast's per-convolution casts, in two multi-tensor copies instead of a cast per tensor
    and direction."""
    from benchmarks.roofline import OpRecorder
    torch.manual_seed(0)
    net = MaskedContextNet(8, hidden=16, blocks=2)
    z = torch.randn(2, 8, 5, 5)
    out, grads, ops = [], [], []
    for run in (lambda: torch.nn.functional.relu(net.blocks(z)), lambda: net(z)):  # per-op casts, then ours
        net.zero_grad()
        rec = OpRecorder()
        rec.phase = 'forward'
        with rec, torch.autocast('cpu', dtype=torch.bfloat16):
            y = run()
            y.float().sum().backward()
        out.append(y)
        grads.append([p.grad.clone() for p in net.parameters()])
        ops.append([o['op'] for o in rec.ops if o['kernel']])
    assert torch.equal(out[0], out[1])
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-2, atol=1e-3)
    assert ops[1].count('_foreach_copy_') == 2 and ops[0].count('_to_copy') >= 2 * 16 > ops[1].count('_to_copy')
