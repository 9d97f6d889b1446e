"""The file index of an image folder: built once, cached on disk, shared by every process of a run.

Walking and stat-ing 1.28M ImageNet files on every rank at every start costs tens of seconds per rank, and a list of
``Path`` objects costs ~0.5 GB per process. :class:`FileIndex` walks the folder once (``os.scandir``, no stat per
file) and stores

* ``paths.npy``: the relative paths, UTF-8 (``os.fsencode``), concatenated into one uint8 blob;
* ``offsets.npy``: int64 (N + 1,), path i is ``blob[offsets[i]:offsets[i + 1]]``;
* ``labels.npy``: int32 (N,), the ImageFolder class of each file (index into ``classes``; -1 for files directly in
  the root);
* ``meta.json``: format version, root, the fingerprint below, the class names (the top-level folders holding images,
  sorted, as ``torchvision.datasets.ImageFolder`` numbers them: ``train/n01440764/*.JPEG`` is class 0).

The arrays are opened with ``np.load(mmap_mode='r')``: a process maps them and pages in only what it reads, and the
page cache is shared by the processes of a machine, so memory per process does not grow with the dataset.

**Order**: the files of :func:`cpc_models.images.find_images` (image extensions, case-insensitive), in the same
order (depth first, names sorted at every level); the index's own folders are skipped.

**Cache and invalidation**: the index lives beside the data, in ``<root>.cpc_file_index/`` (a sibling of the folder:
inside it, torchvision's ``ImageFolder`` would take it for a class), or in a folder you give (cpc-train: the run
folder when the data's parent is read-only). It is reused when its format version and its root's fingerprint match:
a hash of the root's top-level entries (names, and the mtime of each folder). Adding or removing a class folder or
a file in the root changes the names; adding or removing a file directly in a class folder changes that folder's
mtime; either triggers a rebuild (on a file system with coarse timestamps, e.g. 1 s, a file added within the same
tick as the folder's previous change is not seen). A change deeper down (a file added in ``root/a/b/``) does not:
rebuild by hand with ``python -m cpc_models.file_index build ROOT --rebuild``. Writes are atomic (``cpc_models.atomic``): a reader sees the old index or the new one. Builders that
run at once (the first process of each node, on a shared file system) do not replace each other's fresh index: the
first to finish saves it, the others read it.

Command line::

    python -m cpc_models.file_index build /data/imagenet/train     # build (or check) the cache; prints a summary
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_dir
from .images import IMAGE_EXTENSIONS

__all__ = ['FileIndex', 'PathList', 'INDEX_DIRNAME', 'INDEX_VERSION', 'fingerprint', 'default_index_dir']

PathLike = Union[str, os.PathLike]
INDEX_DIRNAME = '.cpc_file_index'  # the suffix of the default location, <root>.cpc_file_index
INDEX_VERSION = 1
_ARRAYS = ('paths', 'offsets', 'labels')


def _skipped(name: str) -> bool:
    """The index folders (and atomic_dir's temporary siblings of them), wherever they are."""
    return INDEX_DIRNAME in name


def fingerprint(root: PathLike) -> str:
    """What the cache is checked against: a SHA-256 of the root's top-level entries, sorted (name, is a folder, and
    for folders their mtime in ns; files directly in the root are not stat-ed, so a flat folder of a million files
    costs one listing)."""
    with os.scandir(root) as it:
        entries = sorted((e.name, e.is_dir(), e.stat().st_mtime_ns if e.is_dir() else 0)
                         for e in it if not _skipped(e.name))
    return hashlib.sha256(json.dumps(entries).encode('utf-8', 'surrogateescape')).hexdigest()


def default_index_dir(root: PathLike) -> Path:
    """``<root>.cpc_file_index``, beside the folder (e.g. /data/imagenet/train.cpc_file_index)."""
    root = Path(root).resolve()
    return root.with_name(root.name + INDEX_DIRNAME)


def _walk(folder: str, prefix: bytes, out: List[bytes]) -> None:
    """Append the image files under ``folder`` (relative paths with ``prefix``), depth first, names sorted."""
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not _skipped(e.name)), key=lambda e: e.name)
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            continue
        name = os.fsencode(e.name)
        if is_dir:
            _walk(e.path, prefix + name + b'/', out)
        elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
            try:
                if e.is_file():
                    out.append(prefix + name)
            except OSError:
                pass


class PathList(Sequence):
    """The files of a :class:`FileIndex` as a read-only sequence of ``Path`` (made on access, none kept).

    Pickles as the index folder's location, so DataLoader workers started by ``spawn`` map the files again instead
    of receiving a copy of the arrays."""

    def __init__(self, index: 'FileIndex'):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._index.path(j) for j in range(*i.indices(len(self)))]
        return self._index.path(i)

    def __iter__(self) -> Iterator[Path]:
        return (self._index.path(i) for i in range(len(self)))


class FileIndex:
    """The image files under ``root`` with their ImageFolder class, in arrays (see the module docstring).

    Build or reuse with :meth:`open` (or :meth:`build`); then ``len(index)``, ``index.path(i)`` (a ``Path``),
    ``index.paths`` (a sequence of them), ``index.labels`` (int32, -1 = no class), ``index.classes`` (names).
    """

    def __init__(self, root: PathLike, blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                 classes: List[str], location: Optional[Path] = None):
        self.root, self.classes, self.location = Path(root), list(classes), location
        self._blob, self._offsets, self.labels = blob, offsets, labels
        self.paths = PathList(self)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def relpath(self, i: int) -> str:
        """The path of file ``i`` relative to the root."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f'file {i} of an index of {len(self)}')
        return os.fsdecode(self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes())

    def path(self, i: int) -> Path:
        return self.root / self.relpath(i)

    def __getstate__(self):
        if self.location is None:  # an index held in memory: pickled whole
            return self.__dict__
        return dict(root=str(self.root), location=str(self.location))

    def __setstate__(self, state):
        if 'location' in state and '_blob' not in state:
            self.__dict__.update(FileIndex.read(state['location'], state['root']).__dict__)
            self.paths = PathList(self)
        else:
            self.__dict__.update(state)

    # ---- building and reading ----

    @classmethod
    def scan(cls, root: PathLike) -> 'FileIndex':
        """Walk ``root`` and return the index, in memory (nothing written).

        Raises:
            FileNotFoundError: ``root`` is not a folder, or holds no image file.
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'No such image folder: {root}')
        rel: List[bytes] = []
        _walk(str(root), b'', rel)
        if not rel:
            raise FileNotFoundError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) found in {root}.')
        lengths = np.fromiter((len(p) for p in rel), dtype=np.int64, count=len(rel))
        offsets = np.zeros(len(rel) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = np.frombuffer(b''.join(rel), dtype=np.uint8)
        # class = the first path component of files below a top-level folder
        tops = [p.split(b'/', 1)[0] if b'/' in p else None for p in rel]
        classes = sorted({t for t in tops if t is not None})
        number = {c: k for k, c in enumerate(classes)}
        labels = np.fromiter((number[t] if t is not None else -1 for t in tops), dtype=np.int32, count=len(rel))
        return cls(root, blob, offsets, labels, [os.fsdecode(c) for c in classes])

    def save(self, location: PathLike, fp: Optional[str] = None, overwrite: bool = True) -> Path:
        """Write the index to the folder ``location`` atomically (``overwrite``: replacing one there; else OSError
        if one is there, even one that appears while this one is written); returns it."""
        location = Path(location)
        with atomic_dir(location, overwrite=overwrite) as tmp:
            for name, arr in zip(_ARRAYS, (self._blob, self._offsets, self.labels)):
                np.save(tmp / f'{name}.npy', np.ascontiguousarray(arr))
            meta = dict(version=INDEX_VERSION, root=str(self.root.resolve()), files=len(self), classes=self.classes,
                        fingerprint=fp if fp is not None else fingerprint(self.root))
            (tmp / 'meta.json').write_text(json.dumps(meta))
        return location

    @classmethod
    def read(cls, location: PathLike, root: Optional[PathLike] = None) -> 'FileIndex':
        """Open a saved index (memory-mapped)."""
        location = Path(location)
        meta = json.loads((location / 'meta.json').read_text())
        arrays = [np.load(location / f'{name}.npy', mmap_mode='r') for name in _ARRAYS]
        return cls(root or meta['root'], *arrays, meta['classes'], location=location)

    @staticmethod
    def is_fresh(location: PathLike, root: PathLike) -> bool:
        """Whether the index saved at ``location`` is valid for ``root`` now (version and fingerprint match)."""
        try:
            meta = json.loads((Path(location) / 'meta.json').read_text())
        except (OSError, ValueError):
            return False
        return (meta.get('version') == INDEX_VERSION and all((Path(location) / f'{n}.npy').is_file() for n in _ARRAYS)
                and fingerprint(root) == meta.get('fingerprint'))

    @classmethod
    def build(cls, root: PathLike, location: Optional[PathLike] = None, rebuild: bool = False) -> 'FileIndex':
        """Scan ``root`` and save the index to ``location`` (default ``<root>.cpc_file_index``) unless a fresh one
        is there by then (``rebuild``: replace it anyway); returns it, memory-mapped from disk."""
        location = Path(location) if location else default_index_dir(root)
        fp = fingerprint(root)  # before the walk: a change during the walk makes the next start rebuild
        index = cls.scan(root)
        # Nodes sharing a file system build at once (one process per node): a missing index is created by the
        # first to finish, never replaced by the others (a fresh index is not pulled away from its readers); they
        # read the saved one (same files: same fingerprint). A stale one is replaced.
        if rebuild or not cls.is_fresh(location, root):
            try:
                index.save(location, fp, overwrite=rebuild or location.exists())
            except OSError:  # another builder's index landed first
                if not cls.is_fresh(location, root):
                    raise
        return cls.read(location, root)

    @classmethod
    def open(cls, root: PathLike, location: Optional[PathLike] = None, build: bool = True,
             rebuild: bool = False) -> 'FileIndex':
        """The index of ``root``: read from ``location`` (default ``<root>.cpc_file_index``) when fresh, else built
        and saved there (``build``), else FileNotFoundError. Where the location cannot be written (read-only data),
        the index is built in memory."""
        location = Path(location) if location else default_index_dir(root)
        if not rebuild and cls.is_fresh(location, root):
            try:
                return cls.read(location, root)
            except FileNotFoundError:  # replaced by a rebuild on another node while being read: once more
                pass
        if not build:
            raise FileNotFoundError(f'{location}: no up-to-date file index of {root}; build it with `python -m '
                                    f'cpc_models.file_index build {root}`.')
        try:
            return cls.build(root, location, rebuild)
        except PermissionError:
            return cls.scan(root)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m cpc_models.file_index', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    b = sub.add_parser('build', help='build the index of an image folder (or check that the cached one is fresh)')
    b.add_argument('root', help='the image folder, e.g. /data/imagenet/train')
    b.add_argument('--index-dir', default='', help='where to keep it (default: ROOT.cpc_file_index, beside ROOT)')
    b.add_argument('--rebuild', action='store_true', help='build even if the cached index is fresh')
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        parser.error(f'{args.root}: no such folder; give the image folder (e.g. /data/imagenet/train)')
    location = Path(args.index_dir) if args.index_dir else default_index_dir(args.root)
    t0 = time.perf_counter()
    fresh = not args.rebuild and FileIndex.is_fresh(location, args.root)
    try:
        index = FileIndex.open(args.root, location, rebuild=args.rebuild)
    except FileNotFoundError as e:
        print(f'python -m cpc_models.file_index: error: {e}', file=sys.stderr)
        return 2
    n_labelled = int((np.asarray(index.labels) >= 0).sum())
    print(f'{"reused" if fresh else "built"} {index.location or "(in memory: the location is not writable)"}: '
          f'{len(index)} files, {len(index.classes)} classes ({n_labelled} files in a class folder) in '
          f'{time.perf_counter() - t0:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
