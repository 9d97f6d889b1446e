"""cpc_models.tools.fake_imagenet: ImageNet's layout, the stated size distribution, determinism, bad arguments."""
import numpy as np
import pytest
import torchvision
from PIL import Image

from cpc_models.tools.fake_imagenet import image_size, main


def test_sizes_follow_the_stated_distribution():
    rng = np.random.default_rng(0)
    sizes = [image_size(rng) for _ in range(4000)]
    long500 = [s for s in sizes if max(s) == 500]
    assert len(long500) / len(sizes) == pytest.approx(0.8, abs=0.03)  # at least: others may draw 500 too
    share = {a: sum(1 for w, h in long500 if round(w / h, 2) == a) / len(sizes) for a in (1.33, 0.75, 1.5, 1.0)}
    assert share == pytest.approx({1.33: 0.45, 0.75: 0.2, 1.5: 0.1, 1.0: 0.05}, abs=0.03)
    others = [s for s in sizes if max(s) != 500]
    assert min(max(s) for s in others) >= 150 and max(max(s) for s in others) <= 1600
    assert any(min(s) < 300 for s in sizes) and any(max(s) > 1000 for s in sizes)


def test_tree_is_imagenet_shaped_and_deterministic(tmp_path, capsys):
    assert main([str(tmp_path / 'a'), '--classes', '3', '--per-class', '2', '--val-per-class', '1', '--seed', '5']) == 0
    assert 'wrote 9 JPEGs: 3 classes x (2 train + 1 val)' in capsys.readouterr().out
    train = torchvision.datasets.ImageFolder(str(tmp_path / 'a' / 'train'))
    assert train.classes == ['n00000000', 'n00000001', 'n00000002'] and len(train) == 6
    assert sorted(p.name for p in (tmp_path / 'a' / 'val').rglob('*.JPEG')) == [
        f'ILSVRC2012_val_{k:08d}.JPEG' for k in (1, 2, 3)]
    assert Image.open(train.samples[0][0]).format == 'JPEG' and Image.open(train.samples[0][0]).mode == 'RGB'
    main([str(tmp_path / 'b'), '--classes', '3', '--per-class', '2', '--val-per-class', '1', '--seed', '5'])
    for f in (tmp_path / 'a').rglob('*.JPEG'):
        assert f.read_bytes() == (tmp_path / 'b' / f.relative_to(tmp_path / 'a')).read_bytes()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / 'c'), '--classes', '0'])
    assert e.value.code == 2 and '--classes 0: must be >= 1' in capsys.readouterr().err
