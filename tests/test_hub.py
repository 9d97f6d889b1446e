"""Published folders, the Hub cache and loading errors, through timm's and huggingface_hub's real code paths.

No network and no mocks: the Hub is a Hugging Face cache written by ``add_to_hf_cache`` in tmp_path, read with
offline mode on (``huggingface_hub.constants.HF_HUB_OFFLINE`` monkeypatched, or ``HF_HUB_OFFLINE=1`` in a subprocess).
"""
import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models import hub

ARCH = 'cpcv2_resnet_tiny'
REPO = 'cpc-models/cpcv2_resnet_tiny.test'


def _random_model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model(ARCH, **kwargs)
    with torch.no_grad():  # zero-init conv3 weights would hide a wrong load: make every tensor random
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope='module')
def model():
    return _random_model(stem_chs=16)  # a non-default arg that config.json must carry


@pytest.fixture(scope='module')
def published(model, tmp_path_factory):
    out = tmp_path_factory.mktemp('pub') / f'{ARCH}.test'
    return hub.export_pretrained(model, out, tag='test', model_card=dict(
        description='Test weights.', training_command='cpc-train --preset tiny', metrics={'loss': 1.25},
        wall_time_s=3725, tags=['fashion-mnist']))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


def test_export_pretrained_writes_timm_folder(published):
    assert sorted(p.name for p in published.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in published.parent.iterdir() if p.name.startswith('.')]  # no temp folders left
    cfg = json.loads((published / 'config.json').read_text())
    assert cfg['architecture'] == ARCH
    assert cfg['model_args']['stem_chs'] == 16
    assert cfg['pretrained_cfg']['tag'] == 'test'
    assert cfg['pretrained_cfg']['input_size'] == [1, 28, 28]
    assert 'file' not in cfg['pretrained_cfg'] and 'hf_hub_id' not in cfg['pretrained_cfg']
    readme = (published / 'README.md').read_text()
    front = readme.split('---')[1]
    for line in ('library_name: timm', 'license: apache-2.0', '- timm', '- fashion-mnist'):
        assert line in front
    for text in ('import cpc_models', f"timm.create_model('hf-hub:{REPO}'", 'cpc-train --preset tiny',
                 '| loss | 1.25 |', '1:02:05', 'Test weights.'):
        assert text in readme


def test_local_dir_and_file_overlay_load(model, published):
    loaded = timm.create_model(f'local-dir:{published}', pretrained=True)
    assert loaded.stem.conv.out_channels == 16
    _assert_same_weights(model, loaded)
    loaded = timm.create_model(ARCH, stem_chs=16, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors')))
    _assert_same_weights(model, loaded)


def test_hf_hub_cache_load_offline(model, published, tmp_path, offline):
    cache = tmp_path / 'hf'
    commit = hub.add_to_hf_cache(published, REPO, cache_dir=cache)
    repo = cache / 'models--cpc-models--cpcv2_resnet_tiny.test'
    assert (repo / 'refs' / 'main').read_text() == commit
    assert (repo / 'snapshots' / commit / 'model.safetensors').is_symlink()
    assert hub.add_to_hf_cache(published, REPO, cache_dir=cache) == commit  # idempotent
    # hf-hub: name -> config.json + weights via hf_hub_download
    loaded = timm.create_model(f'hf-hub:{REPO}', pretrained=True, cache_dir=cache)
    _assert_same_weights(model, loaded)
    loaded = timm.create_model(f'hf-hub:{REPO}@{commit}', pretrained=True, cache_dir=cache)
    _assert_same_weights(model, loaded)
    # the cfg's hf_hub_id (what a registered tag uses): _resolve_pretrained_source -> load_state_dict_from_hf
    loaded = timm.create_model(ARCH, stem_chs=16, pretrained=True, cache_dir=cache,
                               pretrained_cfg_overlay=dict(hf_hub_id=REPO, file=''))
    assert loaded.pretrained_cfg['hf_hub_id'] == REPO
    _assert_same_weights(model, loaded)


@pytest.mark.slow
def test_hf_hub_cache_env_vars_subprocess(model, published, tmp_path):
    cache = tmp_path / 'hf'
    hub.main(['cache', str(published), REPO, '--cache-dir', str(cache)])
    expected = tmp_path / 'expected.safetensors'
    safetensors.torch.save_file(model.state_dict(), expected)
    code = (
        'import sys, timm, torch, safetensors.torch, cpc_models\n'
        f'm = timm.create_model("hf-hub:{REPO}", pretrained=True)\n'
        'ref = safetensors.torch.load_file(sys.argv[1])\n'
        'assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())\n'
        'print("ok")\n')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), OMP_NUM_THREADS='1')
    res = subprocess.run([sys.executable, '-c', code, str(expected)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == 'ok'


def test_export_checkpoint_and_cli(model, tmp_path):
    ckpt = tmp_path / 'step_000010'
    ckpt.mkdir()
    safetensors.torch.save_file({f'encoder.{k}': v for k, v in model.state_dict().items()},
                                ckpt / 'encoder.safetensors')
    config = dict(model=ARCH, model_args=dict(stem_chs=16), preset='tiny', lr=2e-4, batch_size=16,
                  dataset='fashion-mnist', command='cpc-train --preset tiny --steps 10')
    (ckpt / 'config.json').write_text(json.dumps(config))
    (ckpt / 'metrics.json').write_text(json.dumps(dict(step=10, loss=3.5, wall_time_s=42.0)))
    out = tmp_path / 'pub'
    assert hub.main(['export', '--checkpoint', str(ckpt), '--out', str(out), '--tag', 'fmnist']) == 0
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    _assert_same_weights(model, loaded)
    readme = (out / 'README.md').read_text()
    for text in ('cpc-train --preset tiny --steps 10', '| loss | 3.5 |', '0:00:42', '"lr": 0.0002', '- fashion-mnist'):
        assert text in readme
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['tag'] == 'fmnist'
    # an existing folder is not overwritten unless asked
    assert hub.main(['export', '--checkpoint', str(ckpt), '--out', str(out), '--tag', 'fmnist']) == 2
    assert hub.main(['export', '--checkpoint', str(ckpt), '--out', str(out), '--tag', 'fmnist', '--overwrite']) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['pub', 'step_000010']
    # no recorded command line: a cpc-train command reproducing the config goes into the card
    config.pop('command')
    (ckpt / 'config.json').write_text(json.dumps(config))
    hub.export_checkpoint(ckpt, tmp_path / 'pub2')
    readme = (tmp_path / 'pub2' / 'README.md').read_text()
    assert "cpc-train --model cpcv2_resnet_tiny --model_args '{\"stem_chs\": 16}' --preset tiny" in readme


def test_export_failure_leaves_nothing(tmp_path):
    model = timm.create_model(ARCH, act_layer=nn.GELU)  # a class in model_args: config.json cannot hold it
    with pytest.raises(ValueError, match='act_layer'):
        hub.export_pretrained(model, tmp_path / 'out')
    assert list(tmp_path.iterdir()) == []


def test_error_no_published_weights():
    with pytest.raises(RuntimeError, match='No pretrained weights are published for "cpcv2_resnet_small"'):
        timm.create_model('cpcv2_resnet_small', pretrained=True)


def test_error_shape_mismatch_names_key(published):
    with pytest.raises(ValueError, match=r'first mismatching key "stages\.0\.blocks\.0\.'):
        timm.create_model(ARCH, pretrained=True,  # default stem_chs=32, the file has 16
                          pretrained_cfg_overlay=dict(file=str(published / 'model.safetensors')))


def test_error_missing_and_corrupt_file(published, tmp_path):
    missing = tmp_path / 'nope.safetensors'
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    with pytest.raises(FileNotFoundError, match='No model.safetensors in the folder'):
        hub.load_weights(tmp_path)
    bad = tmp_path / 'bad'
    bad.mkdir()
    data = (published / 'model.safetensors').read_bytes()
    (bad / 'model.safetensors').write_bytes(data[:len(data) // 2])  # truncated copy
    (bad / 'config.json').write_bytes((published / 'config.json').read_bytes())
    for load in (lambda: timm.create_model(f'local-dir:{bad}', pretrained=True),
                 lambda: timm.create_model(ARCH, stem_chs=16, pretrained=True,
                                           pretrained_cfg_overlay=dict(file=str(bad / 'model.safetensors'))),
                 lambda: hub.load_weights(bad / 'model.safetensors')):
        with pytest.raises(hub.CorruptWeightsError, match=r'bad/model\.safetensors .*truncated or corrupt'):
            load()


def test_error_hub_cache_corrupt_or_missing(published, tmp_path, offline):
    cache = tmp_path / 'hf'
    commit = hub.add_to_hf_cache(published, REPO, cache_dir=cache)
    overlay = dict(hf_hub_id=REPO, file='')
    blob = (cache / 'models--cpc-models--cpcv2_resnet_tiny.test' / 'snapshots' / commit / 'model.safetensors')
    blob = blob.resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(hub.CorruptWeightsError, match='truncated or corrupt'):
        timm.create_model(ARCH, stem_chs=16, pretrained=True, cache_dir=cache, pretrained_cfg_overlay=overlay)
    with pytest.raises(RuntimeError, match='offline.*add_to_hf_cache'):
        timm.create_model(ARCH, pretrained=True, cache_dir=tmp_path / 'empty', pretrained_cfg_overlay=overlay)


def test_push_to_hub_errors(published, tmp_path, monkeypatch, offline):
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'token'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'stored_tokens'))
    with pytest.raises(RuntimeError, match='No Hugging Face token.*hf auth login'):
        hub.push_to_hub(published, REPO)
    with pytest.raises(RuntimeError, match='Could not push.*network'):
        hub.push_to_hub(published, REPO, token='hf_test')
