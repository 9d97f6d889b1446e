"""cpc_models.images on real files written here: EXIF-rotated JPEG, 16-bit PNG, palette PNG with transparency, CMYK
JPEG, and truncated / garbage / empty files; read the same way by pretraining folders and cpc-extract."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import cpc_models  # noqa: F401
from cpc_models import extract
from cpc_models.data import ImageFolderDataset
from cpc_models.images import ImageFiles, collate_readable, find_images, open_image

SIXTEEN_BIT = np.array([[0, 257, 1000, 32896, 65535, 40000]], dtype=np.uint16)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    # stored 40 wide x 20 high, left half white; EXIF orientation 6: shown rotated 90 degrees clockwise (20 x 40,
    # the white half on top)
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / 'a_exif6.jpg', exif=exif, quality=95)
    Image.fromarray(SIXTEEN_BIT).save(root / 'b_16bit.png')
    pal = Image.new('P', (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    pal.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    pal.save(root / 'c_palette.png', transparency=1)
    Image.new('CMYK', (16, 8), (0, 255, 255, 0)).save(root / 'd_cmyk.jpg', quality=95)  # red
    good = (root / 'b_16bit.png').read_bytes()
    (root / 'sub').mkdir()
    (root / 'sub' / 'e_truncated.png').write_bytes(good[:len(good) // 2])
    (root / 'sub' / 'f_garbage.jpg').write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
    (root / 'sub' / 'g_empty.png').write_bytes(b'')
    (root / 'notes.txt').write_text('not an image')
    return root


def test_exif_orientation_is_applied(files):
    img = open_image(files / 'a_exif6.jpg', 3)
    assert img.size == (20, 40)  # (W, H): upright
    arr = np.asarray(img.convert('L'), dtype=float)
    assert arr[:15].mean() > 240 and arr[-15:].mean() < 15  # the white half is on top
    assert np.asarray(open_image(files / 'a_exif6.jpg', 1)).shape == (40, 20)


def test_pretraining_and_extraction_see_the_same_upright_image(files, tmp_path):
    # pretraining folder, centre crop 20 of the upright 20 x 40 image: white rows above black rows (not columns)
    ds = ImageFolderDataset(files, 20, channels=1, train=False)
    x, _, err = ds[ds.paths.index(files / 'a_exif6.jpg')]
    assert err is None and x.shape == (1, 20, 20) and x.dtype == torch.uint8
    rows, cols = x[0].float().mean(1), x[0].float().mean(0)
    assert rows[:8].min() > 200 and rows[-8:].max() < 50 and cols.max() - cols.min() < 30
    # cpc-extract: the EXIF JPEG gives the features of its upright pixels saved without EXIF
    upright = tmp_path / 'upright.png'
    open_image(files / 'a_exif6.jpg', 1).save(upright)
    model = timm.create_model('cpcv2_resnet_tiny').eval()
    feats, kept, skipped = extract.extract_files(model, [files / 'a_exif6.jpg', upright], progress=False)
    assert len(kept) == 2 and not skipped
    torch.testing.assert_close(feats[0], feats[1], rtol=0, atol=0)


def test_sixteen_bit_has_one_rule(files):
    expected = np.round(SIXTEEN_BIT / 257).astype(np.uint8)  # 0 -> 0, 65535 -> 255, 1000 -> 4 (not 3 = 1000 // 256)
    assert Image.open(files / 'b_16bit.png').mode == 'I;16'
    np.testing.assert_array_equal(np.asarray(open_image(files / 'b_16bit.png', 1)), expected)
    rgb = np.asarray(open_image(files / 'b_16bit.png', 3))
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))

def test_sixteen_bit_in_a_pretraining_folder(tmp_path):
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / 'flat.png')
    x, _, err = ImageFolderDataset(tmp_path, 8, channels=1, train=True)[0]
    assert err is None and x.shape == (1, 8, 8) and bool((x == 4).all())  # round(1000 / 257)


def test_palette_with_transparency_and_cmyk(files):
    rgb = np.asarray(open_image(files / 'c_palette.png', 3))
    assert rgb.shape == (2, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(rgb[0, 1], [0, 0, 255])  # transparent pixels keep their colour
    assert open_image(files / 'c_palette.png', 4).mode == 'RGBA'
    assert np.asarray(open_image(files / 'c_palette.png', 4))[0, 1, 3] == 0  # and their transparency
    assert open_image(files / 'c_palette.png', 1).mode == 'L'
    red = np.asarray(open_image(files / 'd_cmyk.jpg', 3), dtype=int)
    assert Image.open(files / 'd_cmyk.jpg').mode == 'CMYK'
    assert red[..., 0].min() > 230 and red[..., 1:].max() < 30
    with pytest.raises(ValueError, match='channels'):
        open_image(files / 'd_cmyk.jpg', 2)


def test_unreadable_files_are_skipped_and_reported(files):
    paths = find_images(files)
    names = [p.name for p in paths]
    assert names == ['a_exif6.jpg', 'b_16bit.png', 'c_palette.png', 'd_cmyk.jpg', 'e_truncated.png',
                     'f_garbage.jpg', 'g_empty.png']  # sorted, recursive, no .txt
    ds = ImageFiles(paths, 1, transform=lambda img: torch.from_numpy(np.asarray(img.resize((8, 8))).copy())[None])
    images, kept, bad = collate_readable([ds[i] for i in range(len(ds))])
    assert images.shape == (4, 1, 8, 8) and kept == [0, 1, 2, 3]
    assert [i for i, _ in bad] == [4, 5, 6] and all(err for _, err in bad)
    assert collate_readable([ds[5]]) == (None, [], [bad[1]])
    with pytest.raises(FileNotFoundError, match='No such image file or folder'):
        find_images([files / 'missing'])
    (files / 'empty_dir').mkdir()
    with pytest.raises(FileNotFoundError, match='No images'):
        find_images(files / 'empty_dir')
    with pytest.raises(ValueError, match='channels'):
        ImageFiles(paths, 2)
