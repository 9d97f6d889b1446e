"""cpc_models.patches: the patch grid against a naive slicing loop, and the input checks' errors."""
import numpy as np
import pytest
import torch

from cpc_models.patches import check_images, grid_size, is_symbolic_tracing, patchify


def naive_grid(h: int, w: int, p: int, s: int) -> tuple[int, int]:
    """Count the top-left corners r * s with r * s + p <= size, one by one."""
    rows = sum(1 for top in range(0, h, s) if top + p <= h)
    cols = sum(1 for left in range(0, w, s) if left + p <= w)
    return rows, cols


def naive_patchify(x: torch.Tensor, p: int, s: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, rows, cols, C, P, P) by slicing every patch out of the image."""
    rows, cols = naive_grid(x.shape[2], x.shape[3], p, s)
    return torch.stack([
        torch.stack([x[:, :, r * s:r * s + p, c * s:c * s + p] for c in range(cols)], dim=1)
        for r in range(rows)], dim=1)


# (H, W, P, S): overlapping (S < P), touching (S = P), gaps (S > P), leftover pixels, one patch, non-square
GEOMETRIES = [(28, 28, 8, 4), (29, 31, 8, 4), (30, 17, 8, 8), (40, 27, 6, 9), (8, 8, 8, 4), (64, 96, 16, 8),
              (9, 20, 9, 5)]


@pytest.mark.parametrize('h, w, p, s', GEOMETRIES)
def test_grid_size_counts_the_patches(h, w, p, s):
    assert grid_size((h, w), p, s) == naive_grid(h, w, p, s)
    assert grid_size([h, w], p, s) == naive_grid(h, w, p, s)
    assert grid_size(torch.Size([h, w]), p, s) == naive_grid(h, w, p, s)
    assert grid_size(h, p, s) == naive_grid(h, h, p, s)  # an int is a square image


def test_grid_size_paper_geometries():
    assert grid_size(256, 64, 32) == (7, 7)  # CPC v1 (van den Oord et al. 2018, Sec. 3.3): 7x7 grid of 64 px
    assert grid_size(260, 80, 36) == (6, 6)  # CPC v2 (Hénaff et al. 2020, Sec. 4.1): 6x6 grid of 80 px
    assert grid_size(28, 8, 4) == (6, 6)  # Fashion-MNIST, cpcv2_resnet_tiny


@pytest.mark.parametrize('size', [(7, 28), (28, 7), 7, (7, 7)])
def test_grid_size_rejects_images_smaller_than_a_patch(size):
    h, w = (size, size) if isinstance(size, int) else size
    with pytest.raises(ValueError) as e:
        grid_size(size, 8, 4)
    assert str(e.value) == (
        f'Image of {h}x{w} px is smaller than one 8x8 patch. Resize the image to at least 8 px per side (the '
        f"model's pretrained cfg gives the expected input size), or build the model with a smaller `patch_size`.")


@pytest.mark.parametrize('h, w, p, s', GEOMETRIES)
def test_patchify_equals_slicing(h, w, p, s):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    patches = patchify(x, p, s)
    ref = naive_patchify(x, p, s)
    assert patches.shape == ref.shape == (2, *naive_grid(h, w, p, s), 3, p, p)
    assert torch.equal(patches, ref)


def test_patchify_is_a_view():
    x = torch.randn(1, 1, 28, 28)
    patches = patchify(x, 8, 4)
    assert patches.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    x[0, 0, 4, 4] = 100.0  # the pixel (4, 4) lies in the patches at (rows, cols) 0..1 x 0..1
    assert int((patches == 100.0).sum()) == 4


def test_patchify_rejects_images_smaller_than_a_patch():
    with pytest.raises(ValueError, match='Image of 7x28 px is smaller than one 8x8 patch'):
        patchify(torch.zeros(1, 1, 7, 28), 8, 4)


def test_check_images_accepts_float_batches():
    for x in (torch.zeros(2, 3, 8, 8), torch.zeros(1, 1, 5, 7, dtype=torch.float64),
              torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16)):
        assert check_images(x, x.shape[1]) is None


@pytest.mark.parametrize('x, in_chans, error, message', [
    (np.zeros((1, 1, 8, 8), dtype=np.float32), 1, TypeError,
     'Expected a torch.Tensor of images (B, C, H, W), got ndarray.'),
    (torch.zeros(1, 8, 8), 1, ValueError,
     'Expected a 4-D batch of images (B, C, H, W), got shape (1, 8, 8). Add a batch dimension with x.unsqueeze(0).'),
    (torch.zeros(1, 1, 1, 8, 8), 1, ValueError,
     'Expected a 4-D batch of images (B, C, H, W), got shape (1, 1, 1, 8, 8).'),
    (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 1, TypeError,
     "Expected floating-point images, got dtype torch.uint8. Convert with x.float() and normalize with the model's "
     'mean/std (timm.data.resolve_model_data_config(model) + timm.data.create_transform).'),
    (torch.zeros(2, 3, 8, 8), 1, ValueError,
     'Expected 1 input channels, got 3 (shape (2, 3, 8, 8)). Convert the images (e.g. PIL .convert("RGB") or "L"), '
     'or create the model with in_chans=3.'),
], ids=['numpy', '3-D', '5-D', 'uint8', 'channels'])
def test_check_images_errors_say_what_to_do(x, in_chans, error, message):
    with pytest.raises(error) as e:
        check_images(x, in_chans)
    assert str(e.value) == message


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')
def test_checks_are_eager_only_so_patchify_traces_and_scripts():
    """Under torch.fx tracing shapes are symbolic and TorchScript cannot compile the checks: both skip them."""
    assert is_symbolic_tracing() is False
    seen = []

    def cut(x):
        seen.append(is_symbolic_tracing())
        return patchify(x, 8, 4)

    traced = torch.fx.symbolic_trace(cut)
    assert seen == [True]
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(traced(x), patchify(x, 8, 4))
    assert torch.equal(torch.jit.script(patchify)(x, 8, 4), patchify(x, 8, 4))
    with pytest.raises(ValueError, match='smaller than one 8x8 patch'):  # eager mode keeps the clear error
        patchify(torch.randn(1, 1, 7, 28), 8, 4)
