"""Write tests/data/fashion_mnist_subset.safetensors: the real Fashion-MNIST images the test suite trains and
evaluates on, so that it needs nothing but the repository.

    python tests/data/make_fashion_mnist_subset.py [--data-dir DIR]     (needs the full dataset once)

The first 200 training images and the first 50 test images of each class, in file order: uint8 images
``{train,test}_images`` (N, 1, 28, 28), int64 ``{train,test}_labels`` (N,) and the rows they come from,
``{train,test}_index``. 2,500 images, 2 MB. The suite writes them back out as IDX files (conftest.py), so the real
loader (``cpc_models.data.load_fashion_mnist``) reads them.
"""
import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from cpc_models.data import FASHION_MNIST_CLASSES, load_fashion_mnist

OUT = Path(__file__).resolve().parent / 'fashion_mnist_subset.safetensors'
PER_CLASS = {'train': 200, 'test': 50}


def first_per_class(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first k images of every class, in file order."""
    keep = torch.cat([torch.nonzero(labels == c, as_tuple=True)[0][:k] for c in range(len(FASHION_MNIST_CLASSES))])
    return keep.sort().values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST IDX folder (default: as cpc-train finds it)')
    parser.add_argument('--out', default=str(OUT))
    args = parser.parse_args()
    tensors = {}
    for split, k in PER_CLASS.items():
        images, labels = load_fashion_mnist(split, args.data_dir)
        index = first_per_class(labels, k)
        tensors.update({f'{split}_images': images[index].contiguous(), f'{split}_labels': labels[index].contiguous(),
                        f'{split}_index': index.contiguous()})
    metadata = dict(
        classes=json.dumps(FASHION_MNIST_CLASSES),
        source='Fashion-MNIST: the first 200 training and the first 50 test (t10k) images of each class',
        license='MIT (Copyright (c) 2017 Zalando SE), https://github.com/zalandoresearch/fashion-mnist')
    tmp = Path(f'{args.out}.tmp-{os.getpid()}')
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, args.out)
    print(f'wrote {args.out}: ' + ', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items()))


if __name__ == '__main__':
    main()
