"""Pooled features of a large labelled image set, extracted once to disk in chunks (the paper's linear evaluation on
ImageNet-size data: 1.28M x 4096 features would take 21 GB of RAM in fp32).

A store is a folder::

    store.json             format, n, dim, chunk_rows, classes, the model and its data config, a fingerprint
    labels.npy             int64 (n,): the class of every row
    paths.txt              the image of every row, one per line
    chunk_000000.npy       float16 (rows, dim): rows [k * chunk_rows, ...) -- read memory-mapped
    chunk_000000.json      {"rows", "skipped": [[row, path, error], ...]}: unreadable images (their rows are zero)

Every chunk is written to a temporary file and renamed (``.json`` first, ``.npy`` last), so a chunk whose ``.npy``
exists is complete: an extraction killed at any point (``kill -9``) and started again computes only the chunks that
are missing. Under ``torchrun`` every rank extracts the chunks ``k`` with ``k % world_size == rank``.
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_file, write_text
from ..config import ConfigError
from ..images import ImageFiles, collate_readable

__all__ = ['FORMAT', 'StoreSpec', 'FeatureStore', 'create_store', 'extract_to_store', 'write_chunk', 'chunk_file']

FORMAT = 'cpc-feature-store/1'


@dataclass
class StoreSpec:
    """What store.json holds."""
    n: int
    dim: int
    chunk_rows: int
    classes: List[str]
    model: str
    data_config: Dict
    fingerprint: str
    format: str = FORMAT

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk_rows - 1) // self.chunk_rows

    def rows(self, k: int) -> range:
        return range(k * self.chunk_rows, min(self.n, (k + 1) * self.chunk_rows))


def chunk_file(root: Path, k: int, suffix: str = '.npy') -> Path:
    return Path(root) / f'chunk_{k:06d}{suffix}'


def _fingerprint(paths: Sequence[str], labels: Sequence[int], model: str, chunk_rows: int, dim: int) -> str:
    h = hashlib.sha256(f'{model}\n{chunk_rows}\n{dim}\n'.encode())
    for p, y in zip(paths, labels, strict=True):
        h.update(f'{p}\t{int(y)}\n'.encode())
    return h.hexdigest()


def create_store(root: os.PathLike, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str], model: str,
                 dim: int, data_config: Dict, chunk_rows: int = 4096) -> StoreSpec:
    """Write store.json, labels.npy and paths.txt (atomically), or check that the store already at ``root`` was
    made from the same images, labels, model and chunking (ConfigError naming --features if not). Returns the spec."""
    root = Path(root)
    spec = StoreSpec(len(paths), int(dim), int(chunk_rows), list(classes), model, dict(data_config),
                     _fingerprint(paths, labels, model, chunk_rows, dim))
    meta = root / 'store.json'
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old.get('fingerprint') != spec.fingerprint:
            raise ConfigError(f'--features {root}: holds features of other images, labels, model or chunking '
                              f'({old.get("n")} images of {old.get("model")}); give another folder or delete it')
        return spec
    root.mkdir(parents=True, exist_ok=True)
    with atomic_file(root / 'labels.npy') as tmp, open(tmp, 'wb') as f:
        np.save(f, np.asarray(labels, dtype=np.int64))
    write_text(root / 'paths.txt', ''.join(f'{p}\n' for p in paths))
    write_text(meta, json.dumps(vars(spec) | dict(format=FORMAT), indent=1))  # last: the store exists
    return spec


def write_chunk(root: os.PathLike, k: int, feats: np.ndarray, skipped: Sequence = ()) -> None:
    """Write chunk k (float16 (rows, dim); ``skipped``: [row, path, error] of its unreadable images): the .json
    first, the .npy renamed last, so that a chunk whose .npy exists is complete."""
    write_text(chunk_file(root, k, '.json'), json.dumps(dict(rows=len(feats), skipped=[list(s) for s in skipped])))
    with atomic_file(chunk_file(root, k)) as tmp, open(tmp, 'wb') as f:
        np.save(f, np.ascontiguousarray(feats, dtype=np.float16))


def _clean_temporaries(root: Path) -> int:
    """Remove the temporary files a killed extraction left (``.chunk_*.tmp-*``); returns how many."""
    stale = list(root.glob('.chunk_*.tmp-*'))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


@torch.inference_mode()
def extract_to_store(model: torch.nn.Module, root: os.PathLike, paths: Sequence[str], labels: Sequence[int],
                     classes: Sequence[str], model_name: str, chunk_rows: int = 4096, batch_size: int = 256,
                     num_workers: int = 0, device='cpu', progress: bool = True, rank: int = 0,
                     world_size: int = 1) -> Dict:
    """Extract the pooled features (``forward_head(forward_features(x), pre_logits=True)``) of ``paths`` into the
    store at ``root``, preprocessed with the model's own data config; chunks already on disk are kept. This rank
    does the chunks ``k % world_size == rank``. Returns dict(chunks, computed, kept, skipped) of this rank."""
    import torch.distributed as dist
    root = Path(root)
    data_config = timm.data.resolve_model_data_config(model)
    model = model.eval().to(device)
    dim = int(getattr(model, 'num_features'))
    if rank == 0:
        spec = create_store(root, paths, labels, classes, model_name, dim, data_config, chunk_rows)
        _clean_temporaries(root)
    if world_size > 1:
        dist.barrier()  # the store exists and no temporary file of a killed run is left before anyone writes
    spec = create_store(root, paths, labels, classes, model_name, dim, data_config, chunk_rows)
    transform = timm.data.create_transform(**data_config, is_training=False)
    channels = int(data_config['input_size'][0])
    mine = [k for k in range(spec.n_chunks) if k % world_size == rank]
    todo = [k for k in mine if not chunk_file(root, k).is_file()]
    bar = tqdm(total=sum(len(spec.rows(k)) for k in todo), desc=f'extract (rank {rank})', unit='img',
               disable=not progress, file=sys.stderr)
    skipped_total = 0
    for k in todo:
        rows = spec.rows(k)
        feats = np.zeros((len(rows), dim), dtype=np.float16)
        skipped = []
        loader = DataLoader(ImageFiles([paths[i] for i in rows], channels, transform), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=collate_readable)
        for images, idx, bad in loader:
            bar.update(len(idx) + len(bad))
            skipped += [[rows[i], str(paths[rows[i]]), err] for i, err in bad]
            if images is None:
                continue
            z = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
            feats[idx] = z.float().cpu().numpy().astype(np.float16)
        write_chunk(root, k, feats, skipped)
        skipped_total += len(skipped)
    bar.close()
    if world_size > 1:
        dist.barrier()
    return dict(chunks=len(mine), computed=len(todo), kept=len(mine) - len(todo), skipped=skipped_total)


class FeatureStore:
    """A finished store, read one chunk at a time (memory-mapped, released after use): RAM stays bounded by a chunk
    whatever the number of rows."""

    def __init__(self, root: os.PathLike):
        self.root = Path(root)
        meta = self.root / 'store.json'
        if not meta.is_file():
            raise ConfigError(f'--features {self.root}: no store.json; extract the features first')
        d = json.loads(meta.read_text())
        if d.get('format') != FORMAT:
            raise ConfigError(f'--features {self.root}: format {d.get("format")!r}, not {FORMAT}')
        d.pop('format')
        self.spec = StoreSpec(**d)
        self.labels = np.load(self.root / 'labels.npy')
        missing = [k for k in range(self.spec.n_chunks) if not chunk_file(self.root, k).is_file()]
        if missing:
            raise ConfigError(f'--features {self.root}: {len(missing)} of {self.spec.n_chunks} chunks missing (e.g. '
                              f'{chunk_file(self.root, missing[0]).name}); run the extraction again to finish it')

    @property
    def n(self) -> int:
        return self.spec.n

    @property
    def dim(self) -> int:
        return self.spec.dim

    def skipped(self) -> List[Tuple[int, str, str]]:
        out = []
        for k in range(self.spec.n_chunks):
            out += [tuple(s) for s in json.loads(chunk_file(self.root, k, '.json').read_text())['skipped']]
        return out

    def chunk(self, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features float16 (rows, dim) memory-mapped, labels (rows,), valid mask (rows,)) of chunk k."""
        rows = self.spec.rows(k)
        feats = np.load(chunk_file(self.root, k), mmap_mode='r')
        valid = np.ones(len(rows), dtype=bool)
        for row, _, _ in json.loads(chunk_file(self.root, k, '.json').read_text())['skipped']:
            valid[row - rows.start] = False
        return feats, self.labels[rows.start:rows.stop], valid

    def chunks(self, order: Optional[Sequence[int]] = None) -> Iterator[Tuple[int, np.ndarray, np.ndarray,
                                                                              np.ndarray]]:
        for k in (range(self.spec.n_chunks) if order is None else order):
            feats, y, valid = self.chunk(k)
            yield k, feats, y, valid
            del feats  # unmapped before the next chunk is mapped
