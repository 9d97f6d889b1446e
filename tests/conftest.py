"""Shared fixtures. The suite needs nothing but the repository: the Fashion-MNIST images it trains and evaluates on
are a real subset shipped in tests/data (see make_fashion_mnist_subset.py), written out as IDX files for the real
loader; the full dataset is only needed to reproduce the published results."""
import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

FMNIST_SUBSET = Path(__file__).parent / 'data' / 'fashion_mnist_subset.safetensors'


def worker_env() -> dict:
    """The environment for a launched run (torchrun and its workers): one torch thread, no GPU, unbuffered output,
    and no process-group variables of an enclosing launcher."""
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1')
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    return env


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format of (Fashion-)MNIST (gzipped if the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'wb') as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_sample_idx(root: Path) -> Path:
    """An IDX folder (train and t10k alike) of the 1,000-image sample bundled with the package (cpc_models.demo),
    smaller than the shipped subset: for tests that run cpc-train or cpc-eval and need only a few steps."""
    from cpc_models.demo import load_sample
    images, labels, _ = load_sample()
    for split in ('train', 't10k'):
        write_idx(root / f'{split}-images-idx3-ubyte', images[:, 0].numpy())
        write_idx(root / f'{split}-labels-idx1-ubyte', labels.numpy().astype(np.uint8))
    return root


def write_sample_pngs(root: Path, count: int) -> Path:
    """The first ``count`` images of the bundled 1,000-image sample as 28 px greyscale PNGs ``00.png``, ``01.png``, ...
    in ``root``: a folder of real images for the CLIs."""
    from PIL import Image
    from cpc_models.demo import load_sample
    images = load_sample()[0]
    for i in range(count):
        Image.fromarray(images[i, 0].numpy()).save(root / f'{i:02d}.png')
    return root


def wait_for(proc, cond, timeout: float) -> None:
    """Poll ``cond()`` until it holds, for a run in the subprocess ``proc`` that a test is about to signal: fails
    if ``proc`` ends first (with its output where it was piped) or after ``timeout`` seconds."""
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, (f'the run ended before the signal (rc {proc.returncode})'
                                     + (f': {proc.communicate()}' if proc.stdout is not None else ''))
        assert time.time() - t0 < timeout, f'timed out after {timeout} s waiting for the run'
        time.sleep(0.05)


@pytest.fixture(scope='session', autouse=True)
def fmnist_dir(tmp_path_factory):
    """A Fashion-MNIST IDX folder holding the shipped subset (training files gzipped, test files plain, as both
    occur in the wild), exported as CPC_FASHION_MNIST_DIR for the whole session, subprocesses included."""
    subset = load_file(str(FMNIST_SUBSET))
    root = tmp_path_factory.mktemp('fashion-mnist')
    for split, (images, labels) in {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                                    't10k': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}.items():
        key = 'train' if split == 'train' else 'test'
        write_idx(root / images, subset[f'{key}_images'][:, 0])
        write_idx(root / labels, subset[f'{key}_labels'].astype(np.uint8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CPC_FASHION_MNIST_DIR', str(root))
        yield root


def hub_dataset_cache(splits, cache, repo):
    """The datasets cache that ``load_dataset(repo)`` leaves after a Hub download (``NAMESPACE___NAME/default/VERSION/
    COMMIT``), written by datasets' own parquet builder from ``splits`` (name -> Dataset)."""
    from datasets.packaged_modules.parquet.parquet import Parquet  # the optional extra: imported here
    namespace, name = repo.split('/')
    files = {}
    for split, ds in splits.items():
        files[split] = str(cache.parent / f'{name}-{split}.parquet')
        ds.to_parquet(files[split])
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name='default', hash='0' * 40,
                      data_files=files, features=next(iter(splits.values())).features)
    builder.download_and_prepare()
    (cache / name).rename(cache / f'{namespace}___{name}')
    config, = (cache / f'{namespace}___{name}').glob('default*')  # named by the local files' fingerprint
    config.rename(config.parent / 'default')
