"""cpc-extract on real PNG/JPEG files of several modes and sizes, a corrupt file, and a checkpoint (image modes,
EXIF and bit depth in detail: tests/test_images.py)."""
import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from PIL import Image

import cpc_models  # noqa: F401
from cpc_models import extract
from cpc_models.images import find_images, open_image

ARCH = 'cpcv2_resnet_tiny'


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    m = timm.create_model(ARCH).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Grayscale, RGB JPEG, RGBA, palette, 16-bit and odd-sized images, a corrupt file and a text file."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    (root / 'sub').mkdir()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), 'L').save(root / 'a_gray.png')
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), 'RGB').save(root / 'b_rgb.jpg', quality=90)
    Image.fromarray(rng.integers(0, 256, (33, 31, 4), dtype=np.uint8), 'RGBA').save(root / 'c_rgba.png')
    rgb = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), 'RGB')
    rgb.convert('P').save(root / 'sub' / 'd_p.png')
    Image.fromarray(rng.integers(0, 65536, (29, 45), dtype=np.uint16)).save(root / 'sub' / 'e_16bit.png')
    Image.fromarray(rng.integers(0, 256, (7, 201), dtype=np.uint8), 'L').save(root / 'f_odd.png')
    (root / 'sub' / 'g_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
    (root / 'notes.txt').write_text('not an image')
    return root


def test_open_image_modes(images):
    assert Image.open(images / 'sub' / 'e_16bit.png').mode.startswith('I')
    for name in ('a_gray.png', 'b_rgb.jpg', 'c_rgba.png', 'sub/d_p.png', 'sub/e_16bit.png'):
        assert open_image(images / name, 1).mode == 'L'
        assert open_image(images / name, 3).mode == 'RGB'
    arr = np.asarray(open_image(images / 'sub' / 'e_16bit.png', 1))
    assert arr.max() > 200 and arr.min() < 50  # 16-bit range scaled, not clipped to 255


def test_extract_features_pooled_grid_and_skips(model, images):
    paths = find_images([images])
    assert len(paths) == 7 and not any(p.suffix == '.txt' for p in paths)
    feats, kept, skipped = extract.extract_files(model, paths, batch_size=3, progress=False)
    assert feats.shape == (6, model.num_features) and feats.dtype == torch.float32
    assert [s[0] for s in skipped] == [str(images / 'sub' / 'g_corrupt.png')]
    assert 'g_corrupt' not in ' '.join(kept) and len(kept) == 6
    # same numbers as the model's own preprocessing + forward, one image at a time
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg)
    for i in (0, 5):
        x = tf(open_image(kept[i], 1)).unsqueeze(0)
        with torch.no_grad():
            torch.testing.assert_close(feats[i], model(x)[0], rtol=1e-4, atol=1e-5)
    grid, kept_g, _ = extract.extract_files(model, paths, batch_size=4, grid=True, progress=False)
    assert grid.shape == (6, model.num_features, 6, 6) and kept_g == kept
    torch.testing.assert_close(grid.mean((2, 3)), feats, rtol=1e-4, atol=1e-5)


def test_extract_three_channel_model(images):
    model = timm.create_model(ARCH, in_chans=3).eval()
    feats, kept, _ = extract.extract_files(model, [images / 'a_gray.png', images / 'c_rgba.png'], progress=False)
    assert feats.shape == (2, model.num_features) and torch.isfinite(feats).all()


def test_cli_writes_safetensors(model, images, tmp_path, capsys):
    out = tmp_path / 'feats.safetensors'
    rc = extract.main(['--model', ARCH, '--no-pretrained', '--grid', '--batch-size', '4', '--workers', '1',
                       '--no-progress', str(images / 'a_gray.png'), str(images / 'sub'), '--out', str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert 'skipped 1 unreadable image' in err and 'g_corrupt.png' in err
    feats, paths, meta = extract.read_features(out)
    assert feats.shape == (3, 256, 6, 6)
    assert [p.rsplit('/', 1)[-1] for p in paths] == ['a_gray.png', 'd_p.png', 'e_16bit.png']
    assert meta['skipped'][0]['path'].endswith('g_corrupt.png') and meta['skipped'][0]['error']
    assert meta['format'] == 'cpc-extract/1' and meta['grid'] is True and meta['model'] == ARCH
    assert [p.name for p in tmp_path.iterdir()] == ['feats.safetensors']  # no temp file left


def test_cli_checkpoint(model, images, tmp_path, capsys):
    ckpt = tmp_path / 'encoder.safetensors'
    safetensors.torch.save_file(model.state_dict(), ckpt)
    out = tmp_path / 'feats.safetensors'
    assert extract.main(['--model', ARCH, '--checkpoint', str(ckpt), '--no-progress', str(images / 'a_gray.png'),
                         str(images / 'f_odd.png'), '--out', str(out)]) == 0
    feats, _, meta = extract.read_features(out)
    ref, _, _ = extract.extract_files(model, [images / 'a_gray.png', images / 'f_odd.png'], progress=False)
    torch.testing.assert_close(feats, ref)
    assert meta['checkpoint'] == str(ckpt)
    # truncated checkpoint: named, with what to do; nothing written
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert extract.main(['--model', ARCH, '--checkpoint', str(bad), str(images), '--out', str(tmp_path / 'x.safetensors')]) == 2
    err = capsys.readouterr().err
    assert 'bad.safetensors' in err and 'truncated or corrupt' in err
    assert not (tmp_path / 'x.st').exists()


def test_cli_errors(images, tmp_path, capsys):
    assert extract.main(['--model', 'cpcv2_resnet_tyni', str(images), '--out', str(tmp_path / 'o.safetensors')]) == 2
    err = capsys.readouterr().err
    assert '--model cpcv2_resnet_tyni: unknown model (did you mean cpcv2_resnet_tiny' in err
    no_weights = 'cpcv2_resnet_small'
    assert extract.main(['--model', no_weights, str(images), '--out', str(tmp_path / 'o.safetensors')]) == 2
    assert 'No pretrained weights are published' in capsys.readouterr().err
    assert extract.main(['--model', ARCH, '--no-pretrained', str(tmp_path / 'missing'), '--out', 'o.safetensors']) == 2
    assert 'No such image file or folder' in capsys.readouterr().err
    assert extract.main(['--model', ARCH, '--no-pretrained', str(images / 'sub' / 'g_corrupt.png'),
                         '--out', str(tmp_path / 'o.safetensors')]) == 2
    assert 'none of the 1 image(s) could be read' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_layout_and_compile_switches(model, images):
    """Either memory format (and dynamo-captured forward_features) gives the same features; the model keeps its
    own memory format and methods afterwards."""
    paths = find_images([images])
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref_files = extract.extract_files(model, paths, channels_last=False, compile=False, progress=False)[0]
    ref_pooled, ref_grid = extract.extract_features(model, x, keep_grid=True, channels_last=False, compile=False,
                                                    progress=False)
    for cl in (True, 'auto'):
        torch.testing.assert_close(extract.extract_files(model, paths, channels_last=cl, progress=False)[0],
                                   ref_files, rtol=1e-4, atol=1e-4)
        pooled, grid = extract.extract_features(model, x, keep_grid=True, channels_last=cl, progress=False)
        torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grid.float(), ref_grid.float(), rtol=1e-2, atol=1e-3)  # float16 grids
        assert all(p.is_contiguous() for p in model.parameters())  # as it was
    torch._dynamo.reset()
    with extract.prepare_inference(model, 'cpu', 1, channels_last=True, compile=True) as m:
        assert 'forward_features' in vars(m) and m.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert 'forward_features' not in vars(model) and model.stem.conv.weight.is_contiguous()
