"""Strict loading on every path a checkpoint enters: one renamed key fails with an error naming the key and the file.

One test per path (timm's ``pretrained=True`` from the bundled weights/, ``local-dir:``, ``hf-hub:`` through a real
Hugging Face cache, ``pretrained_cfg_overlay=dict(file=...)``; ``cpc-extract --checkpoint``, ``cpc-eval --checkpoint``,
``python -m cpc_models.hub export``, ``cpc-train`` resume). Each corrupts one key name of a real weights file and
expects the error, naming both the key the model misses and the name the file has instead: so the test fails if the
load goes non-strict (``pretrained_strict=False``, ``strict=False``) and if ``checkpoint_filter_fn`` silently drops
the key it does not know (then only the missing key would be named).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models import extract, hub, train
from cpc_models._weights import WeightsMismatchError
from cpc_models.checkpoint import load_checkpoint
from conftest import write_sample_idx, write_sample_pngs
from cpc_models.encoder import WEIGHTS_DIR
from cpc_models.evaluate import cli as eval_cli
from cpc_models.evaluate.encoders import load_encoder

ROOT = Path(__file__).resolve().parent.parent
ARCH = 'cpcv2_resnet_tiny'
KEY = 'stages.1.blocks.0.conv2.weight'  # a layer in the middle of the trunk
RENAMED = 'stages.1.blocks.0.conv2_renamed.weight'
pytestmark = pytest.mark.timeout(300)


def _rename(src: Path, dst: Path, old: str = KEY, new: str = RENAMED, prefix: str = '') -> Path:
    """Copy the safetensors file ``src`` to ``dst`` with the key ``prefix + old`` renamed to ``prefix + new``."""
    sd = safetensors.torch.load_file(src)
    assert prefix + old in sd, sorted(sd)
    sd[prefix + new] = sd.pop(prefix + old)
    dst.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, dst)
    return dst


def _assert_names_key_and_file(message: str, file: Path, old: str = KEY, new: str = RENAMED) -> None:
    assert f'"{old}"' in message, message  # the key the model misses (a non-strict load says nothing)
    assert f'"{new}"' in message, message  # the name the file has instead (a silent drop would hide it)
    assert str(file) in message, message
    assert 'Nothing was loaded' in message


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """A published folder of a random tiny encoder, and a copy with one key renamed."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH)
    root = tmp_path_factory.mktemp('strict')
    good = hub.export_pretrained(model, root / 'good', tag='test')
    bad = root / 'bad'
    shutil.copytree(good, bad)
    _rename(good / 'model.safetensors', bad / 'model.safetensors')
    return good, bad


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return write_sample_pngs(tmp_path_factory.mktemp('images'), 4)


@pytest.fixture(scope='module')
def fmnist_dir(tmp_path_factory):
    """A Fashion-MNIST IDX folder (train and t10k) holding the bundled 1,000-image sample."""
    return write_sample_idx(tmp_path_factory.mktemp('fmnist'))


# ============ timm's pretrained=True ============

def test_overlay_file(published):
    good, bad = published
    timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(good / 'model.safetensors')))
    with pytest.raises(WeightsMismatchError) as e:
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(bad / 'model.safetensors')))
    _assert_names_key_and_file(str(e.value), bad / 'model.safetensors')


def test_local_dir(published):
    good, bad = published
    timm.create_model(f'local-dir:{good}', pretrained=True)
    with pytest.raises(WeightsMismatchError) as e:
        timm.create_model(f'local-dir:{bad}', pretrained=True)
    _assert_names_key_and_file(str(e.value), bad / 'model.safetensors')


def test_hf_hub_cache(published, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    cache = tmp_path / 'hf'
    hub.add_to_hf_cache(published[0], 'cpc-models/good', cache_dir=cache)
    commit = hub.add_to_hf_cache(published[1], 'cpc-models/bad', cache_dir=cache)
    timm.create_model('hf-hub:cpc-models/good', pretrained=True, cache_dir=cache)
    with pytest.raises(WeightsMismatchError) as e:
        timm.create_model('hf-hub:cpc-models/bad', pretrained=True, cache_dir=cache)
    _assert_names_key_and_file(str(e.value), cache / 'models--cpc-models--bad' / 'snapshots' / commit)
    with pytest.raises(WeightsMismatchError) as e:  # a registered tag's hf_hub_id takes the same path
        timm.create_model(ARCH, pretrained=True, cache_dir=cache,
                          pretrained_cfg_overlay=dict(hf_hub_id='cpc-models/bad', file=''))
    _assert_names_key_and_file(str(e.value), cache / 'models--cpc-models--bad' / 'snapshots' / commit)


def test_head_adapted_still_checks_every_other_key(published):
    """num_classes=10: timm drops the (absent) classifier and loads non-strictly; checkpoint_filter_fn checks then."""
    good, bad = published
    model = timm.create_model(ARCH, pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(good / 'model.safetensors')))
    assert model.num_classes == 10
    with pytest.raises(WeightsMismatchError) as e:
        timm.create_model(ARCH, pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(bad / 'model.safetensors')))
    _assert_names_key_and_file(str(e.value), bad / 'model.safetensors')


def test_training_prefixes_are_mapped_not_dropped(published, tmp_path):
    """The known aliases (encoder./module./_orig_mod.) load; an unknown prefix is named, never dropped."""
    good = published[0] / 'model.safetensors'
    sd = safetensors.torch.load_file(good)
    safetensors.torch.save_file({f'module.encoder.{k}': v for k, v in sd.items()}, tmp_path / 'ddp.safetensors')
    loaded = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'ddp.safetensors')))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    safetensors.torch.save_file({f'backbone.{k}': v for k, v in sd.items()}, tmp_path / 'other.safetensors')
    with pytest.raises(WeightsMismatchError, match=r'33 key\(s\) of the model missing.*33 key\(s\) in the file .*"backbone\.'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'other.safetensors')))


def test_bundled_weights(tmp_path):
    """The bundled weights/ copy of a published tag (resolved through $CPC_MODELS_WEIGHTS_DIR, in a subprocess since
    the folder is read at import)."""
    tag = f'{ARCH}.fmnist'
    bad = _rename(WEIGHTS_DIR / tag / 'model.safetensors', tmp_path / tag / 'model.safetensors')
    code = ('import timm, cpc_models\n'
            f'timm.create_model("{tag}", pretrained=True)\n')
    env = dict(os.environ, CPC_MODELS_WEIGHTS_DIR=str(tmp_path), OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    res = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('cpc_models._weights.WeightsMismatchError: '), res.stderr
    _assert_names_key_and_file(last, bad)


# ============ the command lines ============

def test_cpc_extract_checkpoint(published, images, tmp_path, capsys):
    bad = published[1] / 'model.safetensors'
    rc = extract.main(['--model', ARCH, '--checkpoint', str(bad), str(images), '--out',
                       str(tmp_path / 'f.safetensors'), '--no-progress'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith('cpc-extract: error: '), err
    _assert_names_key_and_file(err[0], bad)
    assert not (tmp_path / 'f.safetensors').exists()


def test_cpc_eval_checkpoint(published, fmnist_dir, tmp_path, capsys):
    bad = published[1]
    with pytest.raises(WeightsMismatchError) as e:  # a published folder, and the file itself
        load_encoder(str(bad))
    _assert_names_key_and_file(str(e.value), bad / 'model.safetensors')
    with pytest.raises(WeightsMismatchError) as e:
        load_encoder(str(bad / 'model.safetensors'), ARCH)
    _assert_names_key_and_file(str(e.value), bad / 'model.safetensors')
    rc = eval_cli.main(['probe', '--checkpoint', str(bad), '--data-dir', str(fmnist_dir), '--seeds', '0', '--val-size', '200',
                        '--progress', 'false'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith('cpc-eval probe: error: '), err
    _assert_names_key_and_file(err[0], bad / 'model.safetensors')


def test_hub_export(published, tmp_path, capsys):
    ckpt = tmp_path / 'run' / 'checkpoints' / 'step_00000010'
    _rename(published[0] / 'model.safetensors', ckpt / 'encoder.safetensors')
    (ckpt / 'config.json').write_text(json.dumps(dict(model=ARCH, model_args={})))
    rc = hub.main(['export', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'pub'), '--tag', 't'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    _assert_names_key_and_file(err[0], ckpt / 'encoder.safetensors')
    assert not (tmp_path / 'pub').exists()


FAST = ['--preset', 'fmnist_tiny', '--device', 'cpu', '--batch-size', '8', '--objective.context_hidden', '16',
        '--warmup-steps', '5', '--progress', '0', '--num-workers', '0', '--objective.directions', '1']


@pytest.fixture(scope='module')
def one_step_run(fmnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('resume') / 'run'
    mp = pytest.MonkeyPatch()
    mp.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    try:
        assert train.main(FAST + ['--max-steps', '1', '--out-dir', str(out)]) == 0
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize('file', ['encoder.safetensors', 'objective.safetensors'])
def test_train_resume(file, one_step_run, fmnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    out = tmp_path / 'run'
    shutil.copytree(one_step_run, out)
    ckpt = out / 'checkpoints' / 'step_00000001'
    old = KEY if file == 'encoder.safetensors' else sorted(safetensors.torch.load_file(ckpt / file))[-1]
    new = old.rsplit('.', 1)[0] + '_renamed.' + old.rsplit('.', 1)[1]
    _rename(ckpt / file, ckpt / file, old, new)
    rc = train.main(FAST + ['--max-steps', '2', '--out-dir', str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith('cpc-train: error: '), err
    _assert_names_key_and_file(err[0], ckpt / file, old, new)
    assert not (out / 'checkpoints' / 'step_00000002').exists()


def test_load_checkpoint_shape_names_key_and_file(one_step_run, tmp_path):
    ckpt = tmp_path / 'step'
    shutil.copytree(one_step_run / 'checkpoints' / 'step_00000001', ckpt)
    sd = safetensors.torch.load_file(ckpt / 'encoder.safetensors')
    sd[KEY] = sd[KEY][:1].clone()
    safetensors.torch.save_file(sd, ckpt / 'encoder.safetensors')
    model = train.build_model(train.build_config(FAST + ['--out-dir', str(tmp_path / 'x')]), torch.device('cpu'))
    with pytest.raises(WeightsMismatchError, match=rf'encoder\.safetensors does not fit .*"{KEY}" has shape'):
        load_checkpoint(ckpt, model.encoder, model.objective)


# ============ the pieces: the key check, its message, torch's strict-load error ============

def test_the_message_names_at_most_three_keys_of_each_kind():
    from cpc_models._weights import _names, mismatch_message
    assert _names(['a']) == '"a"'
    assert _names(['a', 'b', 'c']) == '"a", "b", "c"'
    assert _names(['a', 'b', 'c', 'd', 'e']) == '"a", "b", "c" and 2 more'
    text = mismatch_message('f.safetensors', 'Net', ['a', 'b', 'c', 'd'], ['x'])
    assert text.startswith('f.safetensors does not fit Net: 4 key(s) of the model missing from the file: "a", "b", '
                           '"c" and 1 more; 1 key(s) in the file that the model does not have: "x". Nothing was loaded.')


def test_check_keys_wants_exactly_the_models_keys():
    from cpc_models._weights import check_keys
    check_keys(['b', 'a'], ['a', 'b'], 'f', 'Net')  # the same keys, in any order
    with pytest.raises(WeightsMismatchError, match=r'^f does not fit Net: 1 key\(s\) of the model missing from the '
                                                   r'file: "b"\. Nothing'):
        check_keys(['a'], ['a', 'b'], 'f', 'Net')
    with pytest.raises(WeightsMismatchError, match=r'^f does not fit Net: 1 key\(s\) in the file that the model does '
                                                   r'not have: "c"\. Nothing'):
        check_keys(['a', 'b', 'c'], ['a', 'b'], 'f', 'Net')


def test_load_state_dict_strict_loads_all_or_nothing():
    from cpc_models._weights import load_state_dict_strict
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(2, 3))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    good = {k: torch.randn_like(v) for k, v in before.items()}
    for bad, message in (({'0.weight': good['0.weight']}, r'Sequential: 1 key\(s\) of the model missing.*"0\.bias"'),
                         ({**good, '1.weight': good['0.weight']}, r'Sequential: 1 key\(s\) in the file .*"1\.weight"'),
                         ({**good, '0.bias': torch.zeros(4)},
                          r'Sequential: key "0\.bias" has shape \(4,\) in the file but \(3,\) in the model')):
        with pytest.raises(WeightsMismatchError, match=r'^w\.safetensors does not fit ' + message):
            load_state_dict_strict(module, bad, Path('w.safetensors'))
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # nothing was loaded
    load_state_dict_strict(module, good, 'w.safetensors')
    assert all(torch.equal(v, good[k]) for k, v in module.state_dict().items())


def _torch_error(state_dict) -> Exception:
    module = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with pytest.raises(RuntimeError) as e:
        module.load_state_dict(state_dict)
    return e.value


def test_torch_strict_error_is_read_back_into_keys():
    from cpc_models._weights import _torch_strict_error
    w, b = torch.zeros(3, 2), torch.zeros(3)
    assert _torch_strict_error(_torch_error({'0.weight': w})) == {'Missing': ['0.bias'], 'Unexpected': []}
    assert _torch_strict_error(_torch_error({'0.weight': w, '0.bias': b, 'x.y': b})) == {
        'Missing': [], 'Unexpected': ['x.y']}
    assert _torch_strict_error(_torch_error({'0.weight': w, '0.bia': b})) == {
        'Missing': ['0.bias'], 'Unexpected': ['0.bia']}
    assert _torch_strict_error(_torch_error({'0.weight': w, '0.bias': torch.zeros(4)})) is None  # shapes only
    assert _torch_strict_error(RuntimeError('something else')) is None
    assert _torch_strict_error(ValueError('Error(s) in loading state_dict for X:\n\tMissing key(s) in state_dict: '
                                          '"a". ')) is None  # only torch's RuntimeError
