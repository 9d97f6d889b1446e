"""cpc-eval: label subsets, GridClassifier, frozen vs fine-tuned arms, and the whole figure-1 pipeline on a small
subset of real Fashion-MNIST with a random-init encoder standing in for the checkpoint."""
import json

import pytest
import timm
import torch

import cpc_models  # noqa: F401
from cpc_models.classifier import GRID_CLASSIFIER_SIZES, GridClassifier, grid_classifier_kwargs
from cpc_models.evaluate import (
    ARMS,
    ArmInputs,
    EvalConfig,
    balanced_subset,
    features_for,
    load_encoder,
    load_eval_data,
    main,
    run_arm,
    split_halves,
    split_train_val,
)


# ---------------- label subsets ----------------

def test_split_halves_are_seeded_disjoint_halves():
    a, b = split_halves(11, 7)
    assert len(a) == 5 and len(b) == 6 and sorted(torch.cat([a, b]).tolist()) == list(range(11))
    assert torch.equal(a, torch.sort(a).values) and torch.equal(split_halves(11, 7)[0], a)
    assert not torch.equal(split_halves(11, 8)[0], a)


def test_balanced_subset_is_balanced_seeded_and_complete():
    labels = torch.arange(10).repeat_interleave(100)  # 10 classes x 100
    a = balanced_subset(labels, 0.05, seed=0)
    assert torch.bincount(labels[a], minlength=10).tolist() == [5] * 10
    assert torch.equal(a, balanced_subset(labels, 0.05, seed=0))
    assert not torch.equal(a, balanced_subset(labels, 0.05, seed=1))
    assert len(torch.unique(a)) == len(a)
    assert torch.equal(balanced_subset(labels, 1.0, seed=3), torch.arange(1000))
    tiny = balanced_subset(labels, 1e-4, seed=0)  # rounds to 0: still one image per class
    assert torch.bincount(labels[tiny], minlength=10).tolist() == [1] * 10
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match='fraction'):
            balanced_subset(labels, bad, 0)


def test_split_train_val_is_disjoint_and_balanced():
    labels = torch.arange(10).repeat(600)
    pool, val = split_train_val(labels, 500, seed=0)
    assert len(val) == 500 and len(pool) == 5500
    assert not set(pool.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val], minlength=10).tolist() == [50] * 10
    assert torch.equal(val, split_train_val(labels, 500, seed=0)[1])


# ---------------- GridClassifier ----------------

@pytest.mark.parametrize('size', sorted(GRID_CLASSIFIER_SIZES))
def test_grid_classifier_shapes(size):
    kw = grid_classifier_kwargs(size, 256)
    clf = GridClassifier(256, 10, **kw).eval()
    assert len(clf.blocks) == GRID_CLASSIFIER_SIZES[size]['blocks']
    out = clf(torch.randn(3, 256, 6, 6))
    assert out.shape == (3, 10)
    assert clf(torch.randn(2, 256, 4, 7)).shape == (2, 10)  # any grid size
    with pytest.raises(ValueError, match='latent grid'):
        clf(torch.randn(3, 128, 6, 6))


def test_grid_classifier_paper_size_is_eleven_blocks_on_the_encoder_grid():
    enc = timm.create_model('cpcv2_resnet_tiny', num_classes=0)
    clf = GridClassifier(enc.num_features, 10, **grid_classifier_kwargs('paper', enc.num_features))
    assert len(clf.blocks) == 11 and clf.num_features == enc.num_features
    assert clf(enc.forward_features(torch.randn(2, 1, 28, 28))).shape == (2, 10)
    with pytest.raises(ValueError, match='Unknown classifier size'):
        grid_classifier_kwargs('huge', 256)


# ---------------- frozen vs fine-tuned ----------------

def test_frozen_keeps_and_finetune_changes_encoder_weights(fmnist_dir):
    cfg = EvalConfig(val_size=100, train_subset=200, frozen_max_steps=3, e2e_max_steps=3, e2e_batch=16,
                     frozen_batch=32, progress=False)
    data = load_eval_data(cfg)
    enc, _ = load_encoder('random', 'cpcv2_resnet_tiny', random_seed=0)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    feats = features_for(enc, data, True, 'extract', cfg)
    inputs = ArmInputs(data, cfg, cpc_encoder=enc, cpc_features=feats)
    rec = run_arm('cpc_frozen', 0.5, 0, inputs)
    assert 0 <= rec['accuracy'] <= 1 and rec['config']['steps'] == 3
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())

    rec = run_arm('cpc_finetune', 0.5, 0, inputs)
    tuned = rec['model'].encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], tuned[k])]
    assert len(changed) > len(before) // 2, changed  # the encoder itself was trained ...
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # ... on a copy
    assert rec['config']['encoder_lr_scale'] == cfg.finetune_encoder_lr_scale

    with pytest.raises(ValueError, match='Unknown arm'):
        run_arm('cpc_magic', 0.5, 0, inputs)
    with pytest.raises(ValueError, match='random_linear needs random_features'):
        run_arm('random_linear', 0.5, 0, inputs)


# ---------------- CLI errors ----------------

def test_cli_rejects_unknown_arm_and_bad_fraction(tmp_path, capsys):
    assert main(['figure1', '--checkpoint', 'random', '--out', str(tmp_path), '--arms', 'cpc_linear,bogus']) == 2
    assert 'bogus' in capsys.readouterr().err
    assert main(['figure1', '--checkpoint', 'random', '--out', str(tmp_path), '--fractions', '0.1,2']) == 2
    assert 'outside (0, 1]' in capsys.readouterr().err
    assert main(['figure1', '--checkpoint', 'random', '--out', str(tmp_path), '--data-dir', str(tmp_path)]) == 2
    assert '--data-dir: Fashion-MNIST IDX files not found' in capsys.readouterr().err  # before any work
    with pytest.raises(FileNotFoundError, match='neither'):
        load_encoder('no_such_thing')


# ---------------- the whole pipeline ----------------

@pytest.mark.slow
def test_figure1_end_to_end_on_fashion_mnist_subset(tmp_path, fmnist_dir):
    out = tmp_path / 'fig'
    argv = ['figure1', '--checkpoint', 'random', '--out', str(out), '--arms', ','.join(ARMS),
            '--train-subset', '1000', '--val-size', '500', '--fractions', '10%,0.5', '--seeds', '0',
            '--frozen-max-steps', '40', '--e2e-max-steps', '6', '--e2e-batch', '32', '--linear-max-iter', '50',
            '--supervised-max-steps', '20', '--arm-fractions', '{"cpc_finetune": [0.1]}', '--no-progress']
    assert main(argv) == 0
    res = json.loads((out / 'results.json').read_text())
    runs = res['runs']
    assert {(r['arm'], r['fraction']) for r in runs} == {
        (a, f) for a in ARMS for f in (0.1, 0.5) if (a, f) != ('cpc_finetune', 0.5)}
    for r in runs:
        assert 0 <= r['accuracy'] <= 1 and r['wall_s'] >= 0 and r['split'] == 'val' and r['n_eval'] == 250
        assert r['select_accuracy'] == r['accuracy']  # with split 'val' the eval split is the selection half
        assert r['n_labels'] == {0.1: 100, 0.5: 500}[r['fraction']]
    acc = {(r['arm'], r['fraction']): r['accuracy'] for r in runs}
    # Even random features carry the class (a linear probe on them is far above the 10% chance level).
    for arm in ('cpc_linear', 'random_linear'):
        assert acc[(arm, 0.1)] > 0.3 and acc[(arm, 0.5)] > 0.4, acc
    assert acc[('cpc_frozen', 0.5)] > 0.15, acc
    assert res['wall_s'] > 0 and res['n_pool'] == 1000 and res['n_val'] == 250
    assert {t['target'] for t in res['targets']} >= {'best CPC@1% >= supervised@2%'}
    assert res['config']['seeds'] == [0]
    table = (out / 'table.md').read_text()
    assert 'Supervised CNN' in table and 'Wall time' in table
    png = (out / 'figure1.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000

    # the labelled subsets are balanced and never touch the validation images
    cfg = EvalConfig(val_size=500, train_subset=1000)
    data = load_eval_data(cfg)
    assert not set(data.pool_index.tolist()) & set(data.val_index.tolist())
    sub = balanced_subset(data.pool_y, 0.1, 0)
    assert torch.bincount(data.pool_y[sub], minlength=10).tolist() == [10] * 10

    (out / 'table.md').unlink()
    assert main(['plot', str(out)]) == 0 and (out / 'table.md').is_file()


def test_loads_training_checkpoint_folder(tmp_path):
    from safetensors.torch import save_file
    enc = timm.create_model('cpcv2_resnet_tiny', num_classes=0)
    ck = tmp_path / 'step_000010'
    ck.mkdir()
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(ck / 'encoder.safetensors'))
    (ck / 'config.json').write_text(json.dumps(dict(model='cpcv2_resnet_tiny', model_args={})))
    loaded, src = load_encoder(str(ck))
    assert src['kind'] == 'folder' and src['model'] == 'cpcv2_resnet_tiny'
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in enc.state_dict().items())
    loaded2, src2 = load_encoder(str(ck / 'encoder.safetensors'), 'cpcv2_resnet_tiny')
    assert src2['kind'] == 'file'
    assert all(torch.equal(v, loaded2.state_dict()[k]) for k, v in enc.state_dict().items())


@pytest.mark.slow
def test_test_split_is_separate_and_limited(fmnist_dir):
    from cpc_models.evaluate import run_figure1
    cfg = EvalConfig(arms=('random_linear',), split='test', eval_limit=300, train_subset=500, val_size=200,
                     fractions=(1.0,), seeds=(0,), progress=False, checkpoint='random')
    res = run_figure1(cfg)
    (run,) = res['runs']
    assert run['split'] == 'test' and run['n_eval'] == 300 and res['n_val'] == 100 and res['n_pool'] == 500
    assert 0.3 < run['accuracy'] <= 1
    assert run['config']['wd'] in cfg.linear_wds


def test_unknown_published_tag_says_what_to_do():
    with pytest.raises(RuntimeError, match='safetensors file'):
        load_encoder('cpcv2_resnet_tiny.no_such_tag')


def test_merge_results_of_parallel_parts():
    from cpc_models.evaluate import merge_results
    cfg = dict(arms=['cpc_linear'], threads=2, progress=False, split='test', seeds=[0], model='cpcv2_resnet_tiny')
    run = dict(arm='cpc_linear', fraction=0.01, seed=0, accuracy=0.5, n_labels=10, wall_s=1.0, cpu_s=1.0)
    a = dict(config=cfg, runs=[run], wall_s=10.0, threads=2, timings={}, command='a')
    b = dict(config=dict(cfg, arms=['scratch'], threads=1), runs=[dict(run, arm='scratch', accuracy=0.4)],
             wall_s=20.0, threads=1, timings={}, command='b')
    merged = merge_results([a, b])
    assert merged['config']['arms'] == ['cpc_linear', 'scratch']
    assert [r['arm'] for r in merged['runs']] == ['cpc_linear', 'scratch']
    assert merged['wall_s'] == 20.0 and set(merged['timings']) == {'part0', 'part1'}
    with pytest.raises(ValueError, match='more than one part'):
        merge_results([a, a])
    with pytest.raises(ValueError, match="different settings: \\['split'\\]"):
        merge_results([a, dict(b, config=dict(b['config'], split='val'))])
    # a setting only some arms read may differ between parts that did not both run such an arm
    sup = dict(arm='supervised', fraction=0.02, seed=0, accuracy=0.7, n_labels=20, wall_s=1.0, cpu_s=1.0)
    c = dict(config=dict(cfg, arms=['supervised'], supervised_args={'depth': 2}), runs=[sup], wall_s=5.0,
             threads=1, timings={}, command='c')
    assert merge_results([a, c])['config']['supervised_args'] == {'depth': 2}
    d = dict(c, config=dict(c['config'], supervised_args={'depth': 1}, arms=['supervised', 'cpc_linear']),
             runs=[dict(sup, fraction=0.01), dict(run, fraction=0.02)])
    with pytest.raises(ValueError, match="\\['supervised_args'\\]"):
        merge_results([d, c])
    # taking only some arms of a part leaves its other runs, and the settings only they read, out of the merge
    m = merge_results([d, c], take=[['cpc_linear'], None])
    assert [(r['arm'], r['fraction']) for r in m['runs']] == [('cpc_linear', 0.02), ('supervised', 0.02)]
    assert m['config']['supervised_args'] == {'depth': 2} and m['config']['arms'] == ['cpc_linear', 'supervised']
    # the merged record names the encoder of the part that loaded one, whichever part comes first
    enc = dict(kind='published', name='cpcv2_resnet_tiny.fmnist')
    m = merge_results([dict(c, checkpoint=dict(kind='none')), dict(d, checkpoint=enc)], take=[None, ['cpc_linear']])
    assert m['checkpoint'] == enc
    with pytest.raises(ValueError, match=r"part 0 gives no runs of arms \['scratch'\]; take arms it has run \(cpc_linear, "
                                         r"supervised\)"):
        merge_results([d, c], take=[['scratch'], None])
    # an arm registered without `reads` depends on every setting
    from cpc_models.evaluate.figure1 import ARMS, _settings_differ
    assert _settings_differ(dict(knn_k=5, split='test'), dict(knn_k=20, split='test'), ['pixels_linear']) == []
    assert _settings_differ(dict(knn_k=5), dict(knn_k=20), ['cpc_knn']) == ['knn_k']
    assert _settings_differ(dict(knn_k=5), dict(knn_k=20), ['an_unregistered_arm']) == ['knn_k']
    assert ARMS['supervised'].reads is not None
    from cpc_models.evaluate import register_arm
    with pytest.raises(ValueError, match='names no EvalConfig setting'):
        register_arm('a_new_arm', 'A new arm', {}, reads=('knn_k', 'no_such_setting'))
    assert 'a_new_arm' not in ARMS


# ---------------- the arm registry ----------------

def test_an_arm_is_one_registered_function(tmp_path):
    """A new line of the figure: one function, registered; runs and reports need nothing else."""
    from cpc_models.evaluate import register_arm
    from cpc_models.evaluate.data import EvalData, Features
    from cpc_models.evaluate.figure1 import report

    @register_arm('nearest_mean', 'CPC, nearest class mean', dict(color='tab:green', marker='x'),
                  needs=('cpc_features',), cost=0)
    def nearest_mean(inputs, labelled, seed, desc):
        feats, y = inputs.cpc_features.pool[labelled], inputs.data.pool_y[labelled]
        means = torch.stack([feats[y == c].mean(0) for c in range(inputs.data.num_classes)])
        pred = torch.cdist(inputs.cpc_features.eval, means).argmin(1)
        return dict(accuracy=float((pred == inputs.data.eval_y).float().mean()), config=dict(metric='euclidean'))

    try:
        g = torch.Generator().manual_seed(0)
        y = torch.arange(4).repeat(25)
        centres = 3 * torch.randn(4, 8, generator=g)
        x = centres[y] + torch.randn(100, 8, generator=g)  # 4 separable classes
        data = EvalData(torch.zeros(100, 1, 28, 28, dtype=torch.uint8), y, x[:0], y[:0], x[:0], y, 'val', 4)
        inputs = ArmInputs(data, EvalConfig(progress=False), cpc_features=Features(x, x[:0], x))
        rec = run_arm('nearest_mean', 0.2, 0, inputs)
        assert rec['arm'] == 'nearest_mean' and rec['n_labels'] == 20 and rec['accuracy'] > 0.9
        assert rec['config'] == dict(metric='euclidean')
        payload = dict(config=dict(arms=['nearest_mean'], split='val', model='m', seeds=[0], val_size=0),
                       runs=[rec], checkpoint={})
        assert '| CPC, nearest class mean (`nearest_mean`) |' in report(tmp_path, payload)
        assert (tmp_path / 'figure1.png').is_file() and (tmp_path / 'table.md').is_file()
    finally:
        ARMS.pop('nearest_mean', None)
