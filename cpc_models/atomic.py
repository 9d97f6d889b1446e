"""Atomic writes: a file or folder on disk is either complete or absent.

Everything is written to a hidden temporary sibling, flushed to disk, then renamed over the final name
(``os.replace`` is atomic on POSIX and Windows). A crash or an exception leaves the old content (if any) in place
and at most a temporary sibling behind, which readers never take for the real thing. Used for training
checkpoints, published folders, the Hugging Face cache entries, feature files, metrics logs and results files.
"""
import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = ['atomic_dir', 'atomic_file', 'write_text']

PathLike = Union[str, os.PathLike]


def _fsync(path: Path) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def _file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file: 0o666 less the umask."""
    try:  # Linux: read it without setting it (os.umask sets the umask of every thread)
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _finish(path: Path, mode: int) -> None:
    """Flush ``path`` to disk with the usual permissions (safetensors creates its files 0o600, unreadable to the
    group a shared checkpoint folder is for)."""
    os.chmod(path, mode)
    _fsync(path)


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` when the block succeeds.

    Example::

        with atomic_file('features.safetensors') as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{uuid.uuid4().hex[:8]}')
    try:
        yield tmp
        _finish(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: PathLike, text: str) -> None:
    """Write a text file (UTF-8) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding='utf-8')


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = True, tmp_name: Optional[str] = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` when the block succeeds.

    Args:
        path: the folder to create.
        overwrite: replace an existing ``path`` (else raise FileExistsError before anything is written).
        tmp_name: name of the temporary folder (default ``.<name>.tmp-<random>``); callers that clean up folders
            left by a killed process choose a name they can recognise.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f'{path} already exists; choose another --out or pass overwrite=True.')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (tmp_name or f'.{path.name}.tmp-{uuid.uuid4().hex[:8]}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        mode = _file_mode()
        for f in tmp.rglob('*'):
            if f.is_file():
                _finish(f, mode)
        if overwrite and path.exists():
            old = path.parent / f'.{path.name}.old-{uuid.uuid4().hex[:8]}'
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:  # without overwrite, a folder another process created meanwhile stays: OSError (not empty)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
