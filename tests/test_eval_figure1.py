"""Figure 1's runner and report on the Fashion-MNIST subset shipped in tests/data (2,000 training images): the run plan
(one run at 100% for arms whose seed only draws the labels), resuming, merging split parts, the best CPC arm picked
on the selection half, every target's PASS/MISS, the README/model-card section, and ``cpc-eval probe``."""
import json
import shutil

import numpy as np
import pytest

from cpc_models.evaluate import (
    ARMS,
    EvalConfig,
    check_config,
    check_targets,
    main,
    pick_best_cpc,
    plan_runs,
    summarize,
)
from cpc_models.evaluate.probe import ProbeConfig, run_probe
from cpc_models.evaluate.report import SECTION, format_table, replace_section


@pytest.fixture(scope='module')
def train_only_dir(tmp_path_factory, fmnist_dir):
    """The shipped subset's training files without a test set: whatever reads it fails."""
    root = tmp_path_factory.mktemp('train-only')
    for f in fmnist_dir.glob('train-*'):
        (root / f.name).write_bytes(f.read_bytes())
    return root


FAST = ['--val-size', '200', '--seeds', '0', '--linear-max-iter', '30', '--no-progress', '--threads', '1']


def _run(out, data_dir, *extra):
    assert main(['figure1', '--checkpoint', 'random', '--out', str(out), '--data-dir', str(data_dir), *FAST,
                 *extra]) == 0
    return json.loads((out / 'results.json').read_text())


# ---------------- the run plan ----------------

def test_arms_whose_seed_only_draws_labels_run_once_at_100_percent():
    cfg = EvalConfig(arms=('cpc_linear', 'cpc_frozen'), fractions=(0.1, 1.0), seeds=(0, 1, 2))
    plan = plan_runs(cfg)
    assert [(a, f, s) for a, f, s in plan if f == 1.0] == [('cpc_linear', 1.0, 0)] + [
        ('cpc_frozen', 1.0, s) for s in (0, 1, 2)]
    assert len(plan) == 3 + 1 + 3 + 3
    cfg.arm_fractions = {'cpc_frozen': [0.5]}
    assert plan_runs(cfg) == [('cpc_linear', 0.1, s) for s in (0, 1, 2)] + [('cpc_linear', 1.0, 0)] + [
        ('cpc_frozen', 0.5, s) for s in (0, 1, 2)]
    for bad in ({'cpc_frozen': [2.0]}, {'cpc_frozen': []}, {'cpc_frozen': '0.1'}):
        with pytest.raises(ValueError, match='arm_fractions'):
            EvalConfig(arm_fractions=bad).validate()
    with pytest.raises(ValueError, match='bogus'):
        check_config(EvalConfig(arm_fractions={'bogus': [0.1]}))
    assert not ARMS['cpc_linear'].seeded and ARMS['cpc_frozen'].seeded and ARMS['supervised'].seeded
    assert {a for a, spec in ARMS.items() if spec.cpc} >= {'cpc_linear', 'cpc_grid_linear', 'cpc_knn', 'cpc_frozen',
                                                           'cpc_finetune'}


def test_with_shots_an_arm_runs_up_to_its_cap_and_at_least_at_the_smallest_count():
    cfg = EvalConfig(arms=('cpc_linear', 'cpc_finetune'), shots=(1, 5, 10, 50), seeds=(0, 1))
    assert cfg.arm_max_shots == {'cpc_finetune': 10}  # the default: the CPC side of the 5x/2x/5x targets
    plan = plan_runs(cfg)
    assert plan == [('cpc_linear', float(k), s) for k in (1, 5, 10, 50) for s in (0, 1)] + [
        ('cpc_finetune', float(k), s) for k in (1, 5, 10) for s in (0, 1)]
    cfg.shots = (20, 50)
    assert [(a, k) for a, k, s in plan_runs(cfg) if s == 0] == [('cpc_linear', 20.0), ('cpc_linear', 50.0),
                                                                  ('cpc_finetune', 20.0)]
    cfg.arm_max_shots = {}
    assert len(plan_runs(cfg)) == 2 * 2 * 2
    cfg.arm_max_shots = {'cpc_linear': 20}
    assert [(a, k) for a, k, s in plan_runs(cfg) if s == 0] == [('cpc_linear', 20.0), ('cpc_finetune', 20.0),
                                                                  ('cpc_finetune', 50.0)]
    for bad in ({'cpc_finetune': 0}, {'cpc_finetune': 2.5}, {'cpc_finetune': True}, {'cpc_finetune': '10'}):
        with pytest.raises(ValueError, match='arm_max_shots'):
            EvalConfig(arm_max_shots=bad).validate()
    with pytest.raises(ValueError, match='bogus'):
        check_config(EvalConfig(arm_max_shots={'bogus': 5}))


# ---------------- report: summary, best CPC arm, targets ----------------

def _rec(arm, f, seed, acc, sel=None, **kw):
    return dict(arm=arm, fraction=f, seed=seed, accuracy=acc, select_accuracy=acc if sel is None else sel, **kw)


def test_deterministic_cells_say_so_instead_of_a_zero_std():
    runs = [_rec('cpc_linear', 1.0, 0, 0.8, deterministic=True), _rec('cpc_linear', 0.1, 0, 0.7),
            _rec('cpc_linear', 0.1, 1, 0.72), _rec('cpc_frozen', 1.0, 0, 0.9), _rec('cpc_frozen', 1.0, 1, 0.9)]
    s = summarize(runs)
    assert s['cpc_linear'][1.0] == (0.8, None, 1)
    assert s['cpc_frozen'][1.0] == (0.9, 0.0, 2)  # seeded runs that happen to agree still show their std
    table = format_table(s, ['cpc_linear', 'cpc_frozen'], {})
    assert '80.00 (deterministic)' in table and '90.00 ± 0.00' in table and '71.00 ± 1.41' in table


def test_best_cpc_arm_is_picked_on_the_selection_half_not_on_the_eval_split():
    runs = [_rec('cpc_linear', 0.01, s, 0.90, sel=0.70) for s in (0, 1)] + \
           [_rec('cpc_frozen', 0.01, s, 0.80, sel=0.75) for s in (0, 1)] + \
           [_rec('cpc_knn', 0.02, 0, 0.5, sel=0.6), _rec('supervised', 0.01, 0, 0.99, sel=0.99)]
    best = pick_best_cpc(runs, ['cpc_linear', 'cpc_frozen', 'cpc_knn'])
    assert best == {0.01: 'cpc_frozen', 0.02: 'cpc_knn'}  # the higher eval accuracy of cpc_linear is not looked at
    table = format_table(summarize(runs), ['cpc_linear', 'cpc_frozen'], {}, best)
    assert "| **Best CPC arm, picked on val** | 80.00 ± 0.00 `cpc_frozen` | 50.00 ± 0.00 (n=1) `cpc_knn` |" in table


def _summary(**cells):
    """{arm: {fraction: (mean, 0, 3)}} from arm=[(fraction, accuracy %), ...]."""
    return {a: {f: (v / 100, 0.0, 3) for f, v in fv} for a, fv in cells.items()}


def test_every_target_passes_and_misses_on_its_own_numbers():
    base = dict(pixels_linear=[(0.01, 76.0)], random_linear=[(0.01, 63.0)],
                cpc_linear=[(0.01, 79.0)], cpc_grid_linear=[(0.01, 84.0)],
                cpc_frozen=[(f, 85.0) for f in (0.01, 0.02, 0.04, 0.05, 0.1, 0.2)],
                supervised=[(0.01, 70.0), (0.02, 80.0), (0.04, 84.0), (0.05, 84.5), (0.1, 85.0), (0.2, 85.0),
                            (1.0, 91.5)],
                cpc_knn=[(0.01, 70.0), (1.0, 80.0)], pixels_knn=[(0.01, 69.0), (1.0, 79.9)])
    best = {f: 'cpc_frozen' for f in (0.01, 0.02, 0.04, 0.05, 0.1, 0.2)}
    t = {x['target']: x['status'] for x in check_targets(_summary(**base), best)}
    assert t == {'cpc_linear@1% >= pixels_linear@1% + 3': 'PASS', 'cpc_linear@1% >= random_linear@1% + 10': 'PASS',
                 'cpc_grid_linear@1% >= pixels_linear@1% + 8': 'PASS', 'best CPC@1% >= supervised@2%': 'PASS',
                 'best CPC@2% >= supervised@4%': 'PASS', 'best CPC@5% >= supervised@10%': 'PASS',
                 'best CPC >= supervised at every fraction <= 20%': 'PASS',
                 'cpc_knn > pixels_knn at every fraction': 'PASS',
                 'supervised@100% >= 91% (the baseline is trained)': 'PASS'}
    flips = [('cpc_linear', [(0.01, 78.9)], 'cpc_linear@1% >= pixels_linear@1% + 3'),
             ('random_linear', [(0.01, 69.5)], 'cpc_linear@1% >= random_linear@1% + 10'),
             ('cpc_grid_linear', [(0.01, 83.9)], 'cpc_grid_linear@1% >= pixels_linear@1% + 8'),
             ('cpc_frozen', [(0.01, 79.9)] + base['cpc_frozen'][1:], 'best CPC@1% >= supervised@2%'),
             ('cpc_frozen', [(0.01, 85.0), (0.02, 83.9)] + base['cpc_frozen'][2:], 'best CPC@2% >= supervised@4%'),
             ('supervised', base['supervised'][:5] + [(0.2, 85.2), (1.0, 91.5)],
              'best CPC >= supervised at every fraction <= 20%'),
             ('pixels_knn', [(0.01, 69.0), (1.0, 80.0)], 'cpc_knn > pixels_knn at every fraction'),  # ties miss
             ('supervised', base['supervised'][:-1] + [(1.0, 90.9)],
              'supervised@100% >= 91% (the baseline is trained)')]
    for arm, cells, target in flips:
        t = {x['target']: x['status'] for x in check_targets(_summary(**dict(base, **{arm: cells})), best)}
        assert [k for k, v in t.items() if v == 'MISS'] == [target], (arm, t)
    t = {x['target']: x['status'] for x in check_targets(_summary(cpc_linear=[(0.01, 0.8)]))}
    assert set(t.values()) == {'n/a'}


def test_replace_section_keeps_the_rest_of_the_file(tmp_path):
    md = tmp_path / 'README.md'
    md.write_text('# Title\n\nintro\n')
    replace_section(md, 'first')
    replace_section(md, 'second\ntable')
    text = md.read_text()
    assert text.startswith('# Title\n\nintro\n') and text.count(SECTION[0]) == 1
    assert f'{SECTION[0]}\nsecond\ntable\n{SECTION[1]}' in text and 'first' not in text


# ---------------- the runner on the shipped subset ----------------

def test_the_title_names_the_architecture_of_the_loaded_checkpoint():
    """A published checkpoint's own architecture names the encoder, not --model's default."""
    from cpc_models.evaluate.report import _title
    payload = dict(config=dict(model='cpcv2_resnet_tiny', split='test', seeds=[0]),
                   checkpoint=dict(kind='timm', name='cpcv2_resnet_tiny_wide.fmnist', model='cpcv2_resnet_tiny_wide'))
    assert _title(payload).startswith('cpcv2_resnet_tiny_wide (cpcv2_resnet_tiny_wide.fmnist), Fashion-MNIST test')
    payload['checkpoint'] = dict(kind='none')  # a supervised-only table loads no encoder
    assert _title(payload).startswith('cpcv2_resnet_tiny (none)')


def test_figure1_resumes_merges_and_writes_the_readme_section(tmp_path, fmnist_dir, capsys):
    out = tmp_path / 'a'
    res = _run(out, fmnist_dir, '--arms', 'pixels_linear', '--fractions', '0.2,1')
    assert [(r['arm'], r['fraction'], r.get('deterministic', False)) for r in res['runs']] == [
        ('pixels_linear', 0.2, False), ('pixels_linear', 1.0, True)]
    assert res['n_pool'] == 1800 and res['n_val'] == 100 and res['n_eval'] == 100
    assert all(r['select_accuracy'] == r['accuracy'] for r in res['runs'])
    pixels = {r['fraction']: r['accuracy'] for r in res['runs'] if r['arm'] == 'pixels_linear'}
    assert pixels[0.2] > 0.6 and pixels[1.0] > 0.6  # real Fashion-MNIST: far above the 10% of chance

    # the same command again finds every run done and repeats none
    assert _run(out, fmnist_dir, '--arms', 'pixels_linear', '--fractions', '0.2,1')['runs'] == res['runs']
    # resuming with one more arm keeps the earlier runs as they were and adds only the new ones
    res2 = _run(out, fmnist_dir, '--arms', 'pixels_linear,pixels_knn', '--fractions', '0.2,1')
    assert res2['runs'][:2] == res['runs'] and [r['arm'] for r in res2['runs'][2:]] == ['pixels_knn'] * 2
    # the record names both commands that ran something (the repeat that found everything done is not added)
    first, second = res2['command'].split(' ; ')
    assert first == res['command'] and '--arms pixels_linear,pixels_knn' in second
    # a later command with other arms and fractions into the same folder keeps every earlier run (split sessions)
    res2b = _run(out, fmnist_dir, '--arms', 'pixels_knn', '--fractions', '1', '--arm-fractions',
                 '{"pixels_knn": [0.5]}')
    assert res2b['runs'][:4] == res2['runs'] and [(r['arm'], r['fraction']) for r in res2b['runs'][4:]] == [
        ('pixels_knn', 0.5)]
    assert res2b['config']['arms'] == ['pixels_linear', 'pixels_knn'] and res2b['config']['fractions'] == [
        0.2, 0.5, 1.0]
    # other settings are refused before any work, with one line (status 2), and the file is left as it was
    assert main(['figure1', '--checkpoint', 'random', '--out', str(out), '--data-dir', str(fmnist_dir), *FAST,
                 '--arms', 'pixels_knn', '--knn-k', '5']) == 2
    err = capsys.readouterr().err
    assert 'other settings (knn_k)' in err and '--no-resume' in err and 'Traceback' not in err
    assert json.loads((out / 'results.json').read_text())['runs'] == res2b['runs']
    res3 = _run(out, fmnist_dir, '--arms', 'pixels_knn', '--fractions', '0.2', '--knn-k', '5', '--no-resume')
    assert len(res3['runs']) == 1 and res3['config']['knn_k'] == 5
    # a setting no earlier run reads may change on resuming (the k-NN run ignores the probe's penalties); the file
    # then records the new value
    shutil.copytree(out, tmp_path / 'c')
    res4 = _run(tmp_path / 'c', fmnist_dir, '--arms', 'pixels_linear', '--fractions', '0.2', '--knn-k', '5',
                '--linear-wds', '0.01')
    assert res4['runs'][0] == res3['runs'][0] and [r['arm'] for r in res4['runs']] == ['pixels_knn', 'pixels_linear']
    assert res4['config']['linear_wds'] == [0.01] and res4['runs'][1]['config']['wd'] == 0.01

    # parts that split the fractions merge into one table; the section goes between the README markers
    part = tmp_path / 'b'
    _run(part, fmnist_dir, '--arms', 'pixels_linear', '--fractions', '0.5')
    readme = tmp_path / 'README.md'
    readme.write_text('# Project\n')
    merged = tmp_path / 'merged'
    (tmp_path / 'a2b').mkdir()
    (tmp_path / 'a2b' / 'results.json').write_text(json.dumps(res2b))  # pixels_linear and pixels_knn at k=20
    assert main(['merge', str(merged), str(out), str(tmp_path / 'a2b')]) == 2  # out holds a k-NN run at k=5
    assert "['knn_k']" in capsys.readouterr().err
    # a part's runs of one arm only: its k-NN runs are left out, so k=5 and k=20 never meet in the table
    assert main(['merge', str(merged), str(out), f'{tmp_path / "a2b"}:pixels_linear']) == 0
    m = json.loads((merged / 'results.json').read_text())
    assert sorted((r['arm'], r['fraction']) for r in m['runs']) == [
        ('pixels_knn', 0.2), ('pixels_linear', 0.2), ('pixels_linear', 1.0)]
    assert m['config']['knn_k'] == 5
    capsys.readouterr()
    assert main(['merge', str(merged), str(part), str(part)]) == 2  # the same runs twice
    assert 'more than one part' in capsys.readouterr().err
    b = json.loads((part / 'results.json').read_text())
    (tmp_path / 'a2').mkdir()
    (tmp_path / 'a2' / 'results.json').write_text(json.dumps(res))
    assert main(['merge', str(merged), str(tmp_path / 'a2'), str(part)]) == 0
    m = json.loads((merged / 'results.json').read_text())
    assert m['config']['fractions'] == [0.2, 0.5, 1.0] and len(m['runs']) == len(res['runs']) + len(b['runs'])
    assert main(['plot', str(merged), '--readme', str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith('# Project\n') and SECTION[0] in text and '| 20% | 50% | 100% |' in text
    assert '![Figure 1](merged/figure1.png)' in text and '| target | status | detail |' in text
    assert 'hours of wall time summed over the runs, in 2 parts of 1 thread(s) each' in text


@pytest.mark.slow
def test_figure1_trained_arms_record_their_convergence(tmp_path, fmnist_dir):
    res = _run(tmp_path / 'c', fmnist_dir, '--arms', 'supervised,cpc_frozen', '--fractions', '0.5',
               '--supervised-args', '{"widths": [8, 16], "depth": 1}', '--round-images', '200', '--patience', '1',
               '--lr-drops', '0', '--supervised-max-epochs', '6', '--frozen-max-epochs', '6')
    for r in res['runs']:
        c = r['config']
        assert c['stopped'] in ('plateau', 'cap') and 0 < c['best_epoch'] <= c['epochs'] <= 6
        assert c['images_seen'] == round(c['epochs'] * r['n_labels'])
        assert len(c['val_curve']) >= 1 and c['best_val_acc'] == max(a for _, a in c['val_curve'])
    table = (tmp_path / 'c' / 'table.md').read_text()
    assert '| Supervised CNN (whole image) | 50% | 900 |' in table


# ---------------- cpc-eval probe ----------------

def test_probe_reads_only_the_validation_split_and_matches_figure1(tmp_path, train_only_dir, fmnist_dir, capsys):
    cfg = ProbeConfig(checkpoint='random', features=('pooled', 'grid', 'pixels'), fraction=0.1, seeds=(0, 1),
                      data_dir=str(train_only_dir), val_size=200, linear_max_iter=30, progress=False,
                      out=str(tmp_path / 'probe.json'))
    res = run_probe(cfg)  # no test files in train_only_dir: reading them would fail
    assert res['n_labels'] == 180 and res['n_tune'] == 100 and res['n_select'] == 100
    assert json.loads((tmp_path / 'probe.json').read_text())['results'] == res['results']
    for kind, dims in (('pooled', 256), ('grid', 256 * 36), ('pixels', 784)):
        r = res['results'][kind]
        assert r['dims'] == dims and [p['seed'] for p in r['per_seed']] == [0, 1]
        assert r['mean'] == pytest.approx(np.mean([p['accuracy'] for p in r['per_seed']]))
        assert all(p['wd'] in cfg.linear_wds for p in r['per_seed'])
    # the same protocol as figure1's pixels_linear on the split 'val' (same subsets, same halves, same fit)
    fig = _run(tmp_path / 'f', fmnist_dir, '--arms', 'pixels_linear', '--fractions', '0.1', '--seeds', '0,1',
               '--linear-max-iter', '30')
    assert [r['accuracy'] for r in fig['runs']] == [p['accuracy'] for p in res['results']['pixels']['per_seed']]

    assert main(['probe', '--features', 'pixels', '--fraction', '10%', '--seeds', '0', '--val-size', '200',
                 '--data-dir', str(train_only_dir), '--no-progress']) == 0
    assert 'pixels (784 dims)' in capsys.readouterr().out
    assert main(['probe', '--features', 'pooled,bogus']) == 2
    assert 'bogus' in capsys.readouterr().err
    assert main(['probe', '--features', 'pooled']) == 2
    assert '--checkpoint' in capsys.readouterr().err
    assert main(['probe', '--features', 'pixels', '--data-dir', str(tmp_path / 'nothing')]) == 2
    assert '--data-dir: Fashion-MNIST IDX files not found' in capsys.readouterr().err  # before any work
    assert main(['probe', '--checkpoint', str(tmp_path / 'no.safetensors'), '--data-dir', str(train_only_dir)]) == 2
    assert '--checkpoint' in capsys.readouterr().err
