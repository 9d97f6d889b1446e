"""A synthetic ImageNet: an ImageNet-shaped tree of JPEGs for tests, demos and the "Reproduce the paper" commands.

    python -m cpc_models.tools.fake_imagenet OUT --classes 20 --per-class 30 [--val-per-class 10] [--seed 0]

writes ``OUT/train/<wnid>/<wnid>_<i>.JPEG`` and ``OUT/val/<wnid>/ILSVRC2012_val_<k>.JPEG`` (the layout of ImageNet's
train/ and of val/ after the usual sorting into class folders), with WordNet-style ids ``n00000000``,
``n00000001``, ... as class folders.

Sizes imitate ImageNet's spread (ours, stated here, not measured from ImageNet): 80% of the images have a long side
of 500 px, with the aspect ratio 4:3 (45%), 3:4 (20%), 3:2 (10%) or 1:1 (5%) of all images; the other 20% draw the
long side log-uniformly from 150 to 1600 px and the aspect ratio uniformly from 0.5 to 2. So a short side below the
300 px resize of the ImageNet presets occurs, and so do images far larger. Content: smooth random colour fields
(random 1/32-scale noise, upsampled bilinearly) plus a few random rectangles, tinted by a per-class colour, so that
a linear probe can tell classes apart; JPEG quality 90. Deterministic for a given seed. Writes are atomic per file.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_file

__all__ = ['image_size', 'make_image', 'write_tree', 'main']


def image_size(rng: np.random.Generator) -> Tuple[int, int]:
    """(width, height) of one image, from the distribution in the module docstring."""
    u = rng.random()
    if u < 0.8:
        aspect = (4 / 3, 3 / 4, 3 / 2, 1.0)[int(np.searchsorted(np.cumsum([0.45, 0.2, 0.1, 0.05]) / 0.8, u / 0.8,
                                                                    side='right'))]
        long_side = 500
    else:
        aspect = float(rng.uniform(0.5, 2.0))
        long_side = int(round(float(np.exp(rng.uniform(np.log(150), np.log(1600))))))
    if aspect >= 1:
        return long_side, max(1, int(round(long_side / aspect)))
    return max(1, int(round(long_side * aspect))), long_side


def make_image(rng: np.random.Generator, size: Tuple[int, int], tint: np.ndarray) -> Image.Image:
    """A smooth random RGB image of ``size`` (width, height) tinted towards ``tint`` (3 values in [0, 255])."""
    w, h = size
    small = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, max(2, w // 2))), y0 + int(rng.integers(1, max(2, h // 2)))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return Image.blend(img, Image.new('RGB', (w, h), tuple(int(c) for c in tint)), 0.4)


def write_tree(out: Path, classes: int, per_class: int, val_per_class: int = 10, seed: int = 0) -> List[Path]:
    """Write the train/ and val/ trees (see the module docstring); returns the files written."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 256, size=(classes, 3))
    written, val_id = [], 0
    for k in range(classes):
        wnid = f'n{k:08d}'
        for split, count in (('train', per_class), ('val', val_per_class)):
            folder = Path(out) / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if split == 'train':
                    name = f'{wnid}_{i}.JPEG'
                else:
                    val_id += 1
                    name = f'ILSVRC2012_val_{val_id:08d}.JPEG'
                img = make_image(rng, image_size(rng), tints[k])
                with atomic_file(folder / name) as tmp:
                    img.save(tmp, format='JPEG', quality=90)
                written.append(folder / name)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cpc_models.tools.fake_imagenet',
                                     description=__doc__.split('\n\n')[0])
    parser.add_argument('out', help='the folder to write train/ and val/ into')
    parser.add_argument('--classes', type=int, default=20, help='class folders (default 20)')
    parser.add_argument('--per-class', type=int, default=30, help='training images per class (default 30)')
    parser.add_argument('--val-per-class', type=int, default=10, help='validation images per class (default 10)')
    parser.add_argument('--seed', type=int, default=0, help='seed of sizes and content (default 0)')
    args = parser.parse_args(argv)
    for flag, value, low in (('--classes', args.classes, 1), ('--per-class', args.per_class, 1),
                             ('--val-per-class', args.val_per_class, 0)):
        if value < low:
            parser.error(f'{flag} {value}: must be >= {low}')
    files = write_tree(Path(args.out), args.classes, args.per_class, args.val_per_class, args.seed)
    print(f'wrote {len(files)} JPEGs: {args.classes} classes x ({args.per_class} train + {args.val_per_class} val) '
          f'under {args.out}/train and {args.out}/val')
    return 0


if __name__ == '__main__':
    sys.exit(main())
