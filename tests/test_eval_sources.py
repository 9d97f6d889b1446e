"""``cpc-eval --data``: any labelled source. The shipped Fashion-MNIST subset written out as a PNG ImageFolder gives the
same accuracies as the IDX (tensor) path; a Hugging Face dataset of the same images the same again; shots per class;
the seeded stratified split of a folder without splits; every bad input one line and exit status 2."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from cpc_models.data import FASHION_MNIST_CLASSES
from cpc_models.evaluate import main
from cpc_models.evaluate.probe import ProbeConfig, run_probe
from cpc_models.evaluate.sources import list_image_folder, stratified_holdout

from conftest import FMNIST_SUBSET, hub_dataset_cache

FAST = ['--seeds', '0', '--linear-max-iter', '30', '--no-progress', '--threads', '1']


def _class_dir(label: int) -> str:
    return f'{label}_' + re.sub('[^A-Za-z]+', '-', FASHION_MNIST_CLASSES[label])


@pytest.fixture(scope='module')
def subset():
    return load_file(str(FMNIST_SUBSET))


@pytest.fixture(scope='module')
def fmnist_folder(tmp_path_factory, subset):
    """The shipped subset as PNG files: train/<class>/<row>.png and test/<class>/<row>.png (rows zero-padded, so
    the folder's order is the IDX files' order)."""
    root = tmp_path_factory.mktemp('fmnist-folder')
    for split in ('train', 'test'):
        for i, (img, y) in enumerate(zip(subset[f'{split}_images'], subset[f'{split}_labels'], strict=True)):
            d = root / split / _class_dir(int(y))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0]).save(d / f'{i:05d}.png')
    return root


def _small_folder(root, subset, classes=(0, 1, 2), per_class=12, start=0):
    """A folder of class subfolders holding real Fashion-MNIST PNGs (no splits)."""
    y = subset['train_labels']
    for c in classes:
        d = root / _class_dir(c)
        d.mkdir(parents=True, exist_ok=True)
        for i in np.nonzero(y == c)[0][start:start + per_class]:
            Image.fromarray(subset['train_images'][i, 0]).save(d / f'{i:05d}.png')
    return root


def _fig(out, *args):
    code = main(['figure1', '--out', str(out), *FAST, *args])
    return code, (json.loads((out / 'results.json').read_text()) if code == 0 else None)


def _one_line_error(capsys, code, *needles):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    errors = [ln for ln in lines if 'error:' in ln]
    assert len(errors) == 1 and 'Traceback' not in captured.err, captured.err
    assert all(ln.startswith('usage:') for ln in lines if ln not in errors), captured.err  # argparse's usage line
    err = errors[0]
    for n in needles:
        assert n in err, err
    return err


# ---------------- the target: the folder path equals the tensor path ----------------

@pytest.mark.slow
def test_a_png_folder_of_fashion_mnist_gives_the_accuracies_of_the_idx_files(tmp_path, fmnist_folder, fmnist_dir):
    common = ['--checkpoint', 'cpcv2_resnet_tiny.fmnist', '--arms',
              'pixels_linear,pixels_knn,cpc_linear,cpc_grid_linear,cpc_knn,random_linear',
              '--fractions', '0.05,1', '--seeds', '0,1', '--split', 'test', '--train-subset', '400',
              '--eval-limit', '200']
    code, tensor = _fig(tmp_path / 'idx', *common, '--data-dir', str(fmnist_dir), '--val-size', '200')
    assert code == 0
    code, folder = _fig(tmp_path / 'folder', *common, '--data', str(fmnist_folder), '--val-fraction', '0.1')
    assert code == 0
    assert (folder['n_pool'], folder['n_val'], folder['n_eval']) == (tensor['n_pool'], tensor['n_val'],
                                                                     tensor['n_eval']) == (400, 100, 200)
    key = [(r['arm'], r['fraction'], r['seed'], r['n_labels']) for r in tensor['runs']]
    assert [(r['arm'], r['fraction'], r['seed'], r['n_labels']) for r in folder['runs']] == key and len(key) == 18
    for a, b in zip(tensor['runs'], folder['runs'], strict=True):
        assert b['accuracy'] == pytest.approx(a['accuracy'], abs=1e-6), a['arm']
        assert b['select_accuracy'] == pytest.approx(a['select_accuracy'], abs=1e-6), a['arm']
        assert b['per_class'] == pytest.approx(a['per_class'], abs=1e-6), a['arm']
    assert folder['classes'] == [_class_dir(c) for c in range(10)] and folder['data_name'] == str(fmnist_folder)
    assert 'val: a class-balanced 10% of train (200 images' in folder['splits_note']
    table = (tmp_path / 'folder' / 'table.md').read_text()
    assert 'Classes (10): 0_T-shirt-top, 1_Trouser' in table and '| 9_Ankle-boot |' in table
    assert (tmp_path / 'folder' / 'figure1.png').stat().st_size > 0

    # the probe (val split only) through the folder equals the probe through the IDX files
    kw = dict(checkpoint='cpcv2_resnet_tiny.fmnist', features=('pooled', 'pixels'), fraction=0.05, seeds=(0,),
              linear_max_iter=30, progress=False)
    a = run_probe(ProbeConfig(**kw, data_dir=str(fmnist_dir), val_size=200))
    b = run_probe(ProbeConfig(**kw, data=str(fmnist_folder), val_fraction=0.1))
    for kind in ('pooled', 'pixels'):
        assert b['results'][kind]['mean'] == pytest.approx(a['results'][kind]['mean'], abs=1e-6)
    assert b['classes'][1] == '1_Trouser' and a['classes'][1] == 'Trouser'


def test_a_hugging_face_dataset_gives_the_accuracies_of_the_folder(tmp_path, subset, fmnist_folder, capsys,
                                                                   monkeypatch):
    datasets = pytest.importorskip('datasets')
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(
        names=[_class_dir(c) for c in range(10)]))
    splits = {}
    for split in ('train', 'test'):
        images = [Image.fromarray(x[0]) for x in subset[f'{split}_images']]
        splits[split] = datasets.Dataset.from_dict(
            dict(image=images, label=subset[f'{split}_labels'].tolist()), features=features)
    saved = tmp_path / 'saved'
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    common = ['--checkpoint', 'random', '--arms', 'pixels_linear,pixels_knn', '--fractions', '0.1',
              '--split', 'test', '--train-subset', '300', '--eval-limit', '100']
    code, from_disk = _fig(tmp_path / 'hf', *common, '--data', str(saved))
    assert code == 0
    code, folder = _fig(tmp_path / 'folder', *common, '--data', str(fmnist_folder))
    assert code == 0
    assert [r['accuracy'] for r in from_disk['runs']] == pytest.approx([r['accuracy'] for r in folder['runs']],
                                                                      abs=1e-6)
    assert from_disk['classes'] == folder['classes'] and from_disk['n_pool'] == 300
    # the same splits by Hub name (hf:NAME), from the datasets cache a Hub download leaves, offline
    hub_dataset_cache(splits, tmp_path / 'hf-cache', 'someone/fmnist_subset')
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', str(tmp_path / 'hf-cache'))
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    code, by_name = _fig(tmp_path / 'hub', *common, '--data', 'hf:someone/fmnist_subset')
    assert code == 0
    assert [r['accuracy'] for r in by_name['runs']] == [r['accuracy'] for r in from_disk['runs']]
    assert by_name['classes'] == from_disk['classes']
    capsys.readouterr()
    code = main(['figure1', '--out', str(tmp_path / 'y'), '--checkpoint', 'random', '--arms', 'pixels_linear',
                 '--data', 'hf:someone/not_cached'])
    _one_line_error(capsys, code, '--data hf:someone/not_cached: could not load the dataset')
    # a dataset without an image column is refused before any work
    datasets.Dataset.from_dict(dict(text=['a', 'b'], label=[0, 1])).save_to_disk(str(tmp_path / 'text'))
    capsys.readouterr()
    code = main(['figure1', '--out', str(tmp_path / 'x'), '--checkpoint', 'random', '--arms', 'pixels_linear',
                 '--data', str(tmp_path / 'text')])
    _one_line_error(capsys, code, '--data', 'Image column')


# ---------------- the README's three commands ----------------

def test_readme_own_data_commands_run_on_colour_photos(tmp_path, subset, capsys):
    """"Evaluate on your own data", as the README writes it: pretrain on an unlabelled folder of colour JPEGs (a few
    steps), then figure1 with that run folder on the labelled folder, then the plot and table are there."""
    from pathlib import Path
    from cpc_models import train
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    block = readme[readme.index('## Evaluate on your own data'):]
    block = block[block.index('```bash') + 8:block.index('```', block.index('```bash') + 8)]
    step1, step2 = (' '.join(line.split('#')[0].split()) for line in block.replace('\\\n', '').splitlines()[:2])
    assert step1.startswith('cpc-train --preset stl10_small --data photos/unlabelled --out-dir runs/photos')
    assert step2.startswith('cpc-eval figure1 --checkpoint runs/photos --data photos/labelled --shots 1,5,10,50')
    tints = np.array([[1, 0.6, 0.3], [0.3, 1, 0.6], [0.6, 0.3, 1]])
    y = subset['train_labels']
    for c in range(3):
        for i in np.nonzero(y == c)[0][:12]:
            grey = np.asarray(Image.fromarray(subset['train_images'][i, 0]).resize((80, 80)), dtype=np.float32)
            photo = Image.fromarray((grey[..., None] * tints[c]).clip(0, 255).astype(np.uint8))
            for d in (tmp_path / 'photos' / 'unlabelled', tmp_path / 'photos' / 'labelled' / _class_dir(c)):
                d.mkdir(parents=True, exist_ok=True)
                photo.save(d / f'{i:05d}.jpg')
    def here(step):  # the command's arguments, its relative folders under tmp_path
        return [f'{tmp_path}/{w}' if w.startswith(('photos/', 'runs/', 'results/')) else w for w in step.split()[1:]]
    assert train.main(here(step1) + ['--max-steps', '2', '--batch-size', '4', '--num-workers', '0',
                                     '--progress', 'false']) == 0
    code = main(here(step2.replace('--shots 1,5,10,50', '--shots 1,2')) + ['--arms', 'pixels_linear,cpc_linear',
                                                                          *FAST])
    assert code == 0
    out = tmp_path / 'results' / 'photos'
    res = json.loads((out / 'results.json').read_text())
    assert res['checkpoint']['model'] == 'cpcv2_resnet_small' and res['classes'] == [_class_dir(c) for c in range(3)]
    assert len(res['runs']) == 4 and all(0 <= r['accuracy'] <= 1 for r in res['runs'])
    assert (out / 'figure1.png').stat().st_size > 0 and '| arm | 1/class | 2/class |' in (out / 'table.md').read_text()


# ---------------- splits, shots ----------------

def test_a_folder_without_splits_is_split_stratified_and_says_so(tmp_path, subset, capsys):
    root = _small_folder(tmp_path / 'three', subset, per_class=20)
    listing = list_image_folder(root)
    assert listing.classes == [_class_dir(c) for c in range(3)] and set(listing.splits) == {'all'}
    code, res = _fig(tmp_path / 'out', '--data', str(root), '--checkpoint', 'random', '--arms',
                     'pixels_linear,pixels_knn', '--shots', '1,2,4', '--split', 'test', '--seeds', '0,1',
                     '--arm-max-shots', '{"pixels_knn": 2}')
    assert code == 0
    out = capsys.readouterr().out
    assert '10 runs to do (0 done before): 2 arm(s), shots per class [1, 2, 4], seeds [0, 1]' in out
    assert 'a seeded class-stratified 20% of every class held out as the test split (12 images' in out
    assert 'val: a class-balanced 10% of train' in out
    # 20 per class: 4 held out for test; of the other 48, 10% (5, rounded to 2 of each class) for val
    assert res['n_eval'] == 12 and res['n_pool'] == 42 and res['n_val'] == 3
    assert sorted({(r['fraction'], r['n_labels']) for r in res['runs']}) == [(1.0, 3), (2.0, 6), (4.0, 12)]
    assert len(res['runs']) == 3 * 2 + 2 * 2  # every shot count runs every seed (no 100% shortcut), up to the cap
    assert sorted({r['fraction'] for r in res['runs'] if r['arm'] == 'pixels_knn'}) == [1.0, 2.0]
    assert not any(r.get('deterministic') for r in res['runs'])  # 1 shot per class is not 100% of the labels
    table = (tmp_path / 'out' / 'table.md').read_text()
    assert '| arm | 1/class | 2/class | 4/class |' in table and 'deterministic' not in table
    assert 'against labelled images per class' in table
    targets = {t['target'] for t in res['targets']}
    assert 'cpc_knn > pixels_knn at every amount' in targets  # the generic targets, not Fashion-MNIST's
    assert not any('91%' in t for t in targets)
    labels = torch.tensor([0] * 10 + [1] * 5)
    keep, held = stratified_holdout(labels, 0.2, 0)
    assert torch.bincount(labels[held]).tolist() == [2, 1] and len(keep) == 12
    assert torch.equal(held, stratified_holdout(labels, 0.2, 0)[1])


# ---------------- bad input: one line, exit 2, nothing run ----------------

def test_a_folder_without_class_subfolders_is_refused(tmp_path, subset, capsys):
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(3):
        Image.fromarray(subset['train_images'][i, 0]).save(flat / f'{i}.png')
    code = main(['figure1', '--out', str(tmp_path / 'o'), '--checkpoint', 'random', '--arms', 'pixels_linear',
                 '--data', str(flat)])
    _one_line_error(capsys, code, '--data', '3 image(s) but no class subfolders')
    assert not (tmp_path / 'o').exists()  # refused before any work: no output folder
    code = main(['figure1', '--out', str(tmp_path / 'o'), '--arms', 'pixels_linear',
                 '--data', str(tmp_path / 'missing')])
    _one_line_error(capsys, code, '--data', 'no such folder')


def test_a_single_class_is_refused(tmp_path, subset, capsys):
    root = _small_folder(tmp_path / 'one', subset, classes=(4,))
    code = main(['figure1', '--out', str(tmp_path / 'o'), '--checkpoint', 'random', '--arms', 'pixels_linear',
                 '--data', str(root)])
    _one_line_error(capsys, code, '--data', 'only one class (4_Coat)')
    assert not (tmp_path / 'o').exists()  # refused before any work: no output folder


def test_a_class_with_fewer_images_than_the_shots_is_refused(tmp_path, subset, capsys):
    root = _small_folder(tmp_path / 'few', subset, per_class=30)
    for p in sorted((root / _class_dir(1)).iterdir())[8:]:
        p.unlink()  # 8 images of class 1: 5 stay labelled (2 go to test, 1 to val)
    code = main(['figure1', '--out', str(tmp_path / 'o'), '--checkpoint', 'random', '--arms', 'pixels_linear',
                 '--data', str(root), '--shots', '1,10', '--no-progress'])
    _one_line_error(capsys, code, '--shots 10', 'class "1_Trouser"', 'has 5 labelled image(s)')
    assert not (tmp_path / 'o').exists()  # refused before any work: no output folder
    code = main(['figure1', '--out', str(tmp_path / 'o'), '--checkpoint', 'random', '--arms', 'pixels_linear',
                 '--data', str(root), '--fractions', '0.05', '--no-progress'])
    _one_line_error(capsys, code, '--fractions 0.05', 'class "1_Trouser"')


def test_colour_images_for_a_greyscale_model_are_refused(tmp_path, subset, capsys):
    root = _small_folder(tmp_path / 'rgb', subset, per_class=10)
    victim = sorted((root / _class_dir(2)).iterdir())[0]
    grey = np.asarray(Image.open(victim))
    Image.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).save(victim)  # a real colour image
    args = ['figure1', '--out', str(tmp_path / 'o'), '--checkpoint', 'random', '--arms', 'pixels_linear',
            '--data', str(root), '--shots', '1', '--no-progress', *FAST]
    _one_line_error(capsys, main(args), '1 colour image(s)', victim.name, '1 channel(s)', '--convert-colour')
    assert not (tmp_path / 'o').exists()  # refused before any work: no output folder
    assert main([*args, '--convert-colour']) == 0  # asked for: read as greyscale


def test_unreadable_files_are_listed_skipped_and_counted(tmp_path, subset, capsys):
    root = _small_folder(tmp_path / 'bad', subset, per_class=10)
    (root / _class_dir(0) / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    (root / _class_dir(1) / 'empty.jpg').write_bytes(b'')
    code, res = _fig(tmp_path / 'o', '--checkpoint', 'random', '--arms', 'pixels_linear', '--data', str(root),
                     '--shots', '2')
    assert code == 0
    out = capsys.readouterr().out
    assert 'skipped 2 unreadable image(s)' in out and 'broken.png' in out and 'empty.jpg' in out
    assert sorted(r['path'].rsplit('/', 1)[1] for r in res['skipped']) == ['broken.png', 'empty.jpg']
    assert res['n_pool'] + res['n_val'] * 2 + (res['n_eval'] if res['config']['split'] == 'test' else 0) <= 30
    assert 'Unreadable images skipped: 2.' in (tmp_path / 'o' / 'table.md').read_text()


def test_an_earlier_results_json_without_the_new_settings_still_resumes(tmp_path, fmnist_dir):
    out = tmp_path / 'r'
    args = ['--checkpoint', 'random', '--arms', 'pixels_linear', '--fractions', '0.2', '--val-size', '200',
            '--data-dir', str(fmnist_dir)]
    code, res = _fig(out, *args)
    assert code == 0
    for key in ('data', 'shots', 'val_fraction', 'test_fraction', 'convert_colour'):
        del res['config'][key]  # as written before --data existed
    (out / 'results.json').write_text(json.dumps(res))
    code, again = _fig(out, *args)
    assert code == 0 and again['runs'] == res['runs']
    shutil.rmtree(out)


# ---------------- the supervised baseline, picked on val ----------------

def test_supervised_baseline_is_picked_on_val_among_its_candidates(tmp_path, subset, capsys):
    from cpc_models.evaluate import EvalConfig
    from cpc_models.evaluate.data import EvalData
    from cpc_models.evaluate.figure1 import supervised_networks
    big = EvalData(torch.zeros(4, 3, 96, 96, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), None, None, None,
                   None, 'val')
    small = EvalData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), None, None, None,
                     None, 'val')
    cfg = EvalConfig(data='folder')
    assert [n for n, _ in supervised_networks(cfg, big)] == ['convnet', 'resnet18']  # 'auto': sized to the data
    assert [n for n, _ in supervised_networks(cfg, small)] == ['convnet']
    assert [n for n, _ in supervised_networks(EvalConfig(), big)] == ['convnet']  # Fashion-MNIST: as published

    root = _small_folder(tmp_path / 'three', subset, per_class=30)
    code, res = _fig(tmp_path / 'o', '--data', str(root), '--arms', 'supervised', '--shots', '5',
                     '--supervised-args', '{"widths": [4], "depth": 1}', '--supervised-candidates', 'convnet',
                     '--supervised-max-epochs', '3', '--round-images', '30', '--patience', '1', '--lr-drops', '0')
    assert code == 0
    c = res['runs'][0]['config']
    assert [(t['model'], t['args']) for t in c['candidates']] == [('convnet', {'widths': [4], 'depth': 1}),
                                                                  ('convnet', {})]
    picked = max(c['candidates'], key=lambda t: t['best_val_acc'])  # the first of equals
    assert (c['model'], c['args'], c['best_val_acc']) == (picked['model'], picked['args'], picked['best_val_acc'])
    capsys.readouterr()
    code = main(['figure1', '--out', str(tmp_path / 'x'), '--arms', 'supervised', '--data', str(root),
                 '--supervised-candidates', 'resnet19'])
    _one_line_error(capsys, code, '--supervised-candidates resnet19', 'did you mean')


def test_other_sources_are_checked_against_the_2x_fewer_labels_claim():
    from cpc_models.evaluate import check_targets
    cells = {'cpc_frozen': {1.0: (0.60, 0, 3), 2.0: (0.70, 0, 3), 3.0: (0.74, 0, 3), 6.0: (0.80, 0, 3)},
             'supervised': {1.0: (0.40, 0, 3), 2.0: (0.62, 0, 3), 3.0: (0.69, 0, 3), 6.0: (0.85, 0, 3)}}
    best = {f: 'cpc_frozen' for f in (1.0, 2.0, 3.0, 6.0)}
    got = {t['target']: t['status'] for t in check_targets(cells, best, generic=True, shots=True)}
    # each amount against the smallest amount run that is >= 2x it (2 -> 6, not 3); 6 has no such partner
    assert got == {'best CPC@1/class >= supervised@2/class (2x the labels)': 'MISS',
                   'best CPC@2/class >= supervised@6/class (3x the labels)': 'MISS',
                   'best CPC@3/class >= supervised@6/class (2x the labels)': 'MISS',
                   'best CPC >= supervised at every amount': 'MISS',
                   'cpc_knn > pixels_knn at every amount': 'n/a'}
    cells['cpc_frozen'][3.0] = (0.86, 0, 3)
    cells['cpc_frozen'][1.0] = (0.62, 0, 3)
    got = {t['target']: t['status'] for t in check_targets(cells, best, generic=True, shots=True)}
    assert got['best CPC@3/class >= supervised@6/class (2x the labels)'] == 'PASS'
    assert got['best CPC@1/class >= supervised@2/class (2x the labels)'] == 'PASS'  # ties pass
    fractions = {a: {f / 100: c for f, c in d.items()} for a, d in cells.items()}
    got = {t['target'] for t in check_targets(fractions, {f / 100: a for f, a in best.items()}, generic=True)}
    assert 'best CPC@3% >= supervised@6% (2x the labels)' in got
