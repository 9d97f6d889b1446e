"""Hugging Face ``datasets`` as a pretraining source (cpc_models.data.HFImageDataset, cpc-train --data hf:...), on a
dataset built here with ``datasets.Dataset.from_dict(...).save_to_disk`` from real Fashion-MNIST images."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpc_models import train
from cpc_models.data import HFImageDataset, load_hf_dataset, load_fashion_mnist

from conftest import hub_dataset_cache

datasets = pytest.importorskip('datasets')

FAST = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--batch-size', '8', '--objective.context_hidden', '16',
        '--warmup-steps', '2', '--progress', '0', '--num-workers', '0']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """40 Fashion-MNIST test images (RGB and grey, sizes 28-34 px) with their labels, saved to disk, plus a
    DatasetDict of it; one record holds bytes that are not an image."""
    images, labels = load_fashion_mnist('test')
    pil = [Image.fromarray(images[i, 0].numpy()).resize((28 + i % 7, 28 + i % 5)) for i in range(40)]
    pil = [p.convert('RGB') if i % 2 else p for i, p in enumerate(pil)]
    features = datasets.Features(img=datasets.Image(), label=datasets.ClassLabel(names=[str(k) for k in range(10)]),
                                 note=datasets.Value('string'))
    ds = datasets.Dataset.from_dict(dict(img=pil, label=labels[:40].tolist(), note=['x'] * 40), features=features)
    root = tmp_path_factory.mktemp('hf')
    ds.save_to_disk(str(root / 'single'))
    datasets.DatasetDict(train=ds, test=ds.select(range(8))).save_to_disk(str(root / 'dict'))
    broken = datasets.Dataset.from_dict(dict(img=[{'bytes': b'not an image', 'path': None}] + pil[:9]),
                                        features=datasets.Features(img=datasets.Image()))
    broken.save_to_disk(str(root / 'broken'))
    return root, images[:40], labels[:40]


def test_hf_dataset_items_are_the_images_and_labels(saved):
    root, images, labels = saved
    ds = HFImageDataset(load_hf_dataset(str(root / 'single')), 28, channels=1, train=False)
    assert ds.image_column == 'img' and len(ds) == 40  # found by its feature type
    assert ds.classes == [str(k) for k in range(10)] and ds.labels.tolist() == labels.tolist()
    x, i, err = ds[0]
    assert err is None and i == 0 and x.dtype == torch.uint8 and x.shape == (1, 28, 28)
    assert torch.equal(x, images[0])  # image 0 is 28x28 grey: read back unchanged
    x, _, _ = HFImageDataset(load_hf_dataset(str(root / 'single')), 24, channels=3, resize=28, train=True)[3]
    assert x.shape == (3, 24, 24)
    test = load_hf_dataset(str(root / 'dict'), 'test')
    assert len(test) == 8
    with pytest.raises(ValueError, match="splits train, test, not 'val'"):
        load_hf_dataset(str(root / 'dict'), 'val')
    with pytest.raises(ValueError, match="no column 'image'"):
        HFImageDataset(test, 28, image_column='image')
    with pytest.raises(ValueError, match='no image column'):
        HFImageDataset(test.select_columns(['label']), 28)
    image, _, err = HFImageDataset(load_hf_dataset(str(root / 'broken')), 28, channels=1)[0]
    assert image is None and 'UnidentifiedImageError' in err  # reported, not raised


def test_cpc_train_on_an_hf_dataset(saved, tmp_path, capsys):
    root, _, _ = saved
    out = tmp_path / 'run'
    rc = train.main(FAST + ['--data', f'hf:{root / "dict"}', '--data-split', 'train', '--image-size', '28',
                            '--max-steps', '4', '--log-every', '1', '--out-dir', str(out)])
    assert rc == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in log] == [1, 2, 3, 4] and all(math.isfinite(m['loss']) for m in log)
    assert np.isclose(log[0]['loss'], math.log(8 * 36), atol=0.3)  # InfoNCE at chance over 8 images x 36 patches
    # resumed on other data (8 images): the run says that the image order differs from the interrupted run's
    rc = train.main(FAST + ['--data', f'hf:{root / "dict"}', '--data-split', 'test', '--image-size', '28',
                            '--max-steps', '5', '--out-dir', str(out)])
    assert rc == 0 and 'the data has 8 images, the checkpoint\'s run had 40' in capsys.readouterr().err
    rc = train.main(FAST + ['--data', 'hf:', '--out-dir', str(out)])
    assert rc == 2 and '--data hf:: give a Hub dataset name' in capsys.readouterr().err
    rc = train.main(FAST + ['--data', f'hf:{root / "dict"}', '--data-split', 'val', '--out-dir', str(tmp_path / 'x')])
    assert rc == 2 and "not 'val'; pass --data-split" in capsys.readouterr().err


def test_cpc_train_on_a_hub_dataset_by_name_from_the_cache(saved, tmp_path, capsys, monkeypatch):
    """``--data hf:NAME``: the Hub is unreachable here, so ``load_dataset(NAME)`` runs offline on the datasets cache
    a Hub download leaves (built by the test from the saved splits)."""
    root, _, labels = saved
    splits = datasets.load_from_disk(str(root / 'dict'))
    hub_dataset_cache(dict(splits), tmp_path / 'cache', 'someone/fmnist40')
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    by_name = load_hf_dataset('someone/fmnist40', 'train')
    assert by_name['label'] == labels.tolist() and by_name[5]['img'].size == splits['train'][5]['img'].size
    assert len(load_hf_dataset('someone/fmnist40', 'test')) == 8
    out = tmp_path / 'run'
    rc = train.main(FAST + ['--data', 'hf:someone/fmnist40', '--image-size', '28', '--max-steps', '2',
                            '--out-dir', str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [json.loads(line)['step'] for line in (out / 'metrics.jsonl').read_text().splitlines()][-1] == 2
