"""Fashion-MNIST from IDX files (cpc_models.data), read back from the real subset the repository ships, and the
errors a machine without the full dataset gets from cpc-train and cpc-eval."""
import gzip
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FMNIST_SUBSET
from cpc_models import evaluate, train
from cpc_models.data import fashion_mnist_dir, load_fashion_mnist, read_idx

INSTALL_HINT = r'apt-get install dataset-fashion-mnist.*FashionMNIST\(ROOT, download=True\)'


def test_loader_reads_the_shipped_subset(fmnist_dir):
    subset = load_file(str(FMNIST_SUBSET))
    assert fashion_mnist_dir() == fmnist_dir  # found through $CPC_FASHION_MNIST_DIR
    for split, per_class in (('train', 200), ('test', 50)):
        images, labels = load_fashion_mnist(split)  # train from .gz files, test from plain ones
        assert images.dtype == torch.uint8 and images.shape == (10 * per_class, 1, 28, 28)
        assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [per_class] * 10
        assert torch.equal(images, subset[f'{split}_images']) and torch.equal(labels, subset[f'{split}_labels'])
        assert images.float().std() > 50  # real photographs of clothes, not blank or constant images
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist('val')


def test_torchvision_download_layout(fmnist_dir, tmp_path):
    raw = tmp_path / 'FashionMNIST' / 'raw'  # what torchvision.datasets.FashionMNIST(tmp_path, download=True) leaves
    shutil.copytree(fmnist_dir, raw)
    assert fashion_mnist_dir(tmp_path) == raw
    assert torch.equal(load_fashion_mnist('test', tmp_path)[1], load_fashion_mnist('test')[1])


def test_bad_idx_files_say_redownload(fmnist_dir, tmp_path):
    data = (fmnist_dir / 't10k-labels-idx1-ubyte').read_bytes()
    (tmp_path / 'truncated').write_bytes(data[:-10])
    (tmp_path / 'not-idx').write_bytes(b'\x89PNG' + data[4:])
    with gzip.open(tmp_path / 'labels.gz', 'wb') as f:
        f.write(data)
    assert torch.equal(torch.from_numpy(read_idx(tmp_path / 'labels.gz').copy()),
                       torch.from_numpy(read_idx(fmnist_dir / 't10k-labels-idx1-ubyte').copy()))
    with pytest.raises(ValueError, match='truncated.*re-download'):
        read_idx(tmp_path / 'truncated')
    with pytest.raises(ValueError, match='bad magic number.*re-download'):
        read_idx(tmp_path / 'not-idx')


def test_without_the_dataset_cli_says_how_to_install(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        fashion_mnist_dir(empty)
    rc = train.main(['--preset', 'fmnist_tiny', '--data-dir', str(empty), '--out-dir', str(tmp_path / 'run'),
                     '--device', 'cpu', '--progress', '0'])
    assert rc == 2 and 'dataset-fashion-mnist' in capsys.readouterr().err  # refused before any work
    rc = evaluate.main(['figure1', '--checkpoint', 'random', '--out', str(tmp_path / 'fig'), '--data-dir', str(empty)])
    assert rc == 2 and 'dataset-fashion-mnist' in capsys.readouterr().err
    assert not (tmp_path / 'fig').exists()
