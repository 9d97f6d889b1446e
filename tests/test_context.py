"""MaskedContextNet: shapes, causality (row r sees only rows <= r) in every prediction direction, errors."""
import pytest
import torch

from cpc_models.context import MaskedContextNet
from cpc_models.objective import CPCObjective


def _row_dependence(fn, z: torch.Tensor, axis: int, out_index: int) -> torch.Tensor:
    """|d sum(fn(z) at index out_index along axis) / d z| summed over everything but that axis -> (len,)."""
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (grad,) = torch.autograd.grad(out.select(axis, out_index).sum(), z)
    dims = [d for d in range(z.ndim) if d != axis]
    return grad.abs().sum(dims)


def test_shape_and_default_size():
    net = MaskedContextNet(32)
    assert len(net.blocks) == 5 and net.blocks[0].conv1.out_channels == 256
    for rows, cols in [(6, 6), (7, 5), (1, 1), (2, 9)]:
        assert net(torch.randn(2, 32, rows, cols)).shape == (2, 32, rows, cols)


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


def test_errors_say_what_to_do():
    net = MaskedContextNet(8, hidden=4, blocks=1)
    with pytest.raises(ValueError, match='forward_features'):
        net(torch.randn(8, 6, 6))
    with pytest.raises(ValueError, match='channels=model.num_features'):
        net(torch.randn(2, 7, 6, 6))
    with pytest.raises(ValueError, match='blocks must be a positive'):
        MaskedContextNet(8, blocks=0)
