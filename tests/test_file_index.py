"""The cached file index of an image folder (cpc_models/file_index.py): the same files in the same order as
find_images, torchvision ImageFolder's classes, the cache's invalidation rule, memory-mapped reading, pickling and
the command line."""
import os
import pickle
import time

import numpy as np
import pytest
import torchvision
from PIL import Image

from cpc_models.data import ImageFolderDataset
from cpc_models.file_index import INDEX_DIRNAME, FileIndex, main
from cpc_models.images import find_images
from conftest import worker_env


def _tree(root):
    """An ImageFolder-shaped tree with the awkward cases: names that sort differently as strings and as path parts
    ('a-b' < 'a/' as strings), nested folders, upper-case extensions, non-images, a file in the root."""
    files = ['a/x.jpg', 'a-b/y.png', 'a.b/z.JPEG', 'a/sub/deep.jpg', 'a/sub-2/q.webp', 'c/w.bmp', 'c/notes.txt',
             'root.jpg', 'd/empty.csv', 'b/' + 'é.jpg']
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(('.txt', '.csv')):
            p.write_text('not an image')
        else:
            Image.new('RGB', (8, 6), (10, 20, 30)).save(p, format={'.png': 'PNG', '.bmp': 'BMP', '.webp': 'WEBP'}.get(
                p.suffix.lower(), 'JPEG'))
    return root


def test_index_lists_find_images_files_in_order_with_imagefolder_classes(tmp_path):
    root = _tree(tmp_path / 'train')
    index = FileIndex.open(root)
    assert list(index.paths) == find_images(root)  # the same files, the same order
    assert index.location == tmp_path / f'train{INDEX_DIRNAME}' and (index.location / 'meta.json').is_file()
    assert not any(INDEX_DIRNAME in p.name for p in root.iterdir())  # nothing written into the data folder
    # classes: torchvision's ImageFolder on the class folders holding images
    tv = torchvision.datasets.ImageFolder(str(root), allow_empty=True)
    assert index.classes == [c for c in tv.classes if c != 'd']  # 'd' holds no image
    by_path = dict(zip(map(str, index.paths), index.labels.tolist()))
    assert by_path[str(root / 'root.jpg')] == -1
    for path, target in tv.samples:
        assert index.classes[by_path[path]] == tv.classes[target], path
    assert index.relpath(-1) == 'root.jpg' and index.path(0) == root / 'a' / 'sub' / 'deep.jpg'
    with pytest.raises(IndexError):
        index.relpath(len(index))
    # read back memory-mapped: nothing of the size of the data is copied into the process
    assert all(isinstance(a, np.memmap) for a in (index._blob, index._offsets, index.labels))
    ds = ImageFolderDataset(root, 4, index=index)
    assert ds.paths[3] == index.path(3) and ds.labels is index.labels and ds.classes == index.classes
    assert ds.paths.index(root / 'c' / 'w.bmp') == list(index.paths).index(root / 'c' / 'w.bmp')
    image, i, err = ds[0]
    assert err is None and image.shape == (3, 4, 4) and i == 0


def test_cache_is_reused_until_the_fingerprint_changes(tmp_path):
    root = _tree(tmp_path / 'train')
    FileIndex.open(root)
    LOC = tmp_path / f'train{INDEX_DIRNAME}'
    meta = LOC / 'meta.json'
    built = meta.stat().st_mtime_ns
    time.sleep(0.01)
    assert FileIndex.is_fresh(LOC, root)
    assert len(FileIndex.open(root)) == 8 and meta.stat().st_mtime_ns == built  # reused, not rebuilt
    # a file added in a class folder changes that folder's mtime: rebuilt on the next open
    Image.new('RGB', (8, 8)).save(root / 'c' / 'new.jpg')
    assert not FileIndex.is_fresh(LOC, root)
    index = FileIndex.open(root)
    assert len(index) == 9 and root / 'c' / 'new.jpg' in list(index.paths)
    # a new class folder too, and a file in the root
    (root / 'e').mkdir()
    Image.new('RGB', (8, 8)).save(root / 'e' / 'f.jpg')
    assert FileIndex.open(root).classes[-1] == 'e'
    Image.new('RGB', (8, 8)).save(root / 'top.jpg')
    assert not FileIndex.is_fresh(LOC, root)
    (root / 'top.jpg').unlink()
    assert FileIndex.is_fresh(LOC, root)  # back to the indexed state
    # deeper changes are not seen (the stated rule): a rebuild by hand picks them up
    Image.new('RGB', (8, 8)).save(root / 'a' / 'sub' / 'deeper.jpg')
    os.utime(root / 'a', ns=(os.stat(root / 'a').st_atime_ns, os.stat(root / 'a').st_mtime_ns))
    assert len(FileIndex.open(root)) == 10
    assert len(FileIndex.open(root, rebuild=True)) == 11
    # an index inside the folder (--index-dir ROOT/...) is not indexed itself
    assert len(FileIndex.open(root, root / INDEX_DIRNAME)) == 11 and len(FileIndex.open(root)) == 11
    # an index of another format version is rebuilt
    meta.write_text(meta.read_text().replace('"version": 1', '"version": 0'))
    assert not FileIndex.is_fresh(LOC, root)
    with pytest.raises(FileNotFoundError, match='no up-to-date file index'):
        FileIndex.open(root, build=False)


def test_index_elsewhere_pickles_by_location_and_the_command_line(tmp_path, capsys):
    root = _tree(tmp_path / 'train')
    where = tmp_path / 'run' / 'file_index'
    assert main(['build', str(root), '--index-dir', str(where)]) == 0
    assert 'built' in capsys.readouterr().out and not (tmp_path / f'train{INDEX_DIRNAME}').exists()
    assert main(['build', str(root), '--index-dir', str(where)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'reused {where}: 8 files, 5 classes (7 files in a class folder)')
    index = FileIndex.open(root, where)
    blob = pickle.dumps(index)
    assert len(blob) < 1000  # the location, not the arrays
    again = pickle.loads(blob)
    assert list(again.paths) == list(index.paths) and again.labels.tolist() == index.labels.tolist()
    memory = pickle.loads(pickle.dumps(FileIndex.scan(root)))  # an index held in memory travels whole
    assert list(memory.paths) == list(index.paths)
    with pytest.raises(SystemExit) as e:
        main(['build', str(tmp_path / 'missing')])
    assert e.value.code == 2 and 'no such folder' in capsys.readouterr().err
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'a.txt').write_text('x')
    assert main(['build', str(tmp_path / 'junk')]) == 2
    assert 'No images' in capsys.readouterr().err


# Each rank writes its result to a file of its own: the ranks' stdout is one pipe, and with PYTHONUNBUFFERED=1 (set
# in this environment, inherited by the workers) ``print`` writes each argument separately, so two ranks printing at
# once can interleave their lines (seen under load as a 'RESULT RESULT 0 ...' line).
_SHARED = r'''
import json, os, sys
from pathlib import Path
import torch.distributed as dist
from cpc_models.train import shared_file_index  # before the process group: torch._dynamo imported after
dist.init_process_group('gloo')                 # init_process_group can abort the exit (SIGABRT, torch 2.14.1)
out = Path(sys.argv[1])
for folder in sys.argv[2:]:  # one process group for every folder: one torchrun launch
    try:
        index = shared_file_index(folder, out / f'{Path(folder).name}.idx')
        got = dict(files=len(index), first=str(index.path(0)), location=str(index.location))
    except Exception as e:
        got = dict(error=f'{type(e).__name__}: {e}')
    (out / f'{Path(folder).name}.rank{os.environ["RANK"]}.json').write_text(json.dumps(got))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_ranks_share_one_index_built_by_the_first(tmp_path):
    """Two gloo processes under torchrun: local rank 0 builds the index while rank 1 waits, then rank 1 maps the
    saved one; a folder without images fails on both ranks alike, with the builder's message."""
    import json
    import subprocess
    import sys
    script = tmp_path / 'shared.py'
    script.write_text(_SHARED)
    root = _tree(tmp_path / 'train')
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'a.txt').write_text('x')
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          str(script), str(tmp_path), str(root), str(tmp_path / 'junk')],
                         env=worker_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout[-1000:], res.stderr[-3000:])
    got = {(name, r): json.loads((tmp_path / f'{name}.rank{r}.json').read_text())
           for name in ('train', 'junk') for r in (0, 1)}
    assert got['train', 0] == got['train', 1] == dict(files=8, first=str(root / 'a' / 'sub' / 'deep.jpg'),
                                                      location=str(tmp_path / 'train.idx'))
    assert got['junk', 0] == got['junk', 1] and got['junk', 1]['error'].startswith('FileNotFoundError: No images')


def _open_many(root, location, rounds, queue):
    try:
        for k in range(rounds):
            index = FileIndex.open(root, f'{location}{k}')
            queue.put((len(index), str(index.location)))
    except Exception as e:  # reported to the test, not lost in the child
        for _ in range(k, rounds):
            queue.put(f'{type(e).__name__}: {e}')


def test_nodes_building_one_shared_index_at_once_all_get_it(tmp_path):
    """The first process of each node builds the index at the same time when the nodes share the file system
    (the documented multi-node runs): every builder ends with the saved index, none fails on the others' rename."""
    import multiprocessing
    root = _tree(tmp_path / 'train')
    ctx = multiprocessing.get_context('fork')
    queue = ctx.Queue()
    rounds, builders = 40, 4
    procs = [ctx.Process(target=_open_many, args=(root, tmp_path / 'idx', rounds, queue)) for _ in range(builders)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in range(rounds * builders)]
    for p in procs:
        p.join(timeout=60)
    assert all(isinstance(g, tuple) and g[0] == 8 and g[1].startswith(str(tmp_path / 'idx')) for g in got), \
        [g for g in got if not isinstance(g, tuple)][:3]
