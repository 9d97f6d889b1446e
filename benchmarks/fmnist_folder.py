"""Write the Fashion-MNIST subset shipped in tests/data as a PNG ImageFolder: a labelled folder of real images for
``cpc-eval figure1 --data FOLDER`` (2,000 training and 500 test images, ``train/<class>/<row>.png`` and
``test/<class>/<row>.png``; rows zero-padded, so the folder keeps the subset's order and seeded draws).

Usage (from the repository root): python -m benchmarks.fmnist_folder /tmp/fmnist-folder
"""
import argparse
import re
from pathlib import Path

from PIL import Image
from safetensors.numpy import load_file

from cpc_models.data import FASHION_MNIST_CLASSES

SUBSET = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'fashion_mnist_subset.safetensors'


def class_dir(label: int) -> str:
    """'0_T-shirt-top', ...: sorted like the labels, safe as a folder name."""
    return f'{label}_' + re.sub('[^A-Za-z]+', '-', FASHION_MNIST_CLASSES[label])


def write_folder(root: Path) -> int:
    subset = load_file(str(SUBSET))
    n = 0
    for split in ('train', 'test'):
        for i, (img, y) in enumerate(zip(subset[f'{split}_images'], subset[f'{split}_labels'], strict=True)):
            d = root / split / class_dir(int(y))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(d / f'{i:05d}.png')
            n += 1
    return n


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', type=Path)
    print(f'wrote {write_folder(p.parse_args().out)} images to {p.parse_args().out}')
