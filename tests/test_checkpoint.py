"""cpc_models/checkpoint.py on its own: the folder format, atomic writes (a save killed half-way leaves no step
folder, only a temporary one that remove_partial deletes), pruning, what resolve_checkpoint accepts, safe loading
(weights_only) and the error messages. The resume tests in test_train.py run it inside cpc-train."""
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import cpc_models
from cpc_models.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_config,
    remove_partial,
    resolve_checkpoint,
    save_checkpoint,
)

PACKAGE_ROOT = Path(cpc_models.__file__).resolve().parent.parent  # the cpc_models this test imported


def _modules(seed: int):
    torch.manual_seed(seed)
    return nn.Linear(3, 2), nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4))


def _save(out, step, seed=0, **kwargs):
    enc, obj = _modules(seed)
    state = dict(step=step, rng=torch.arange(3))
    return save_checkpoint(out, step, enc, obj, state, dict(model='m', lr=0.5, note='é'), dict(loss=1.5), **kwargs)


def test_save_writes_the_five_files_and_load_restores_them(tmp_path):
    folder = _save(tmp_path, 7, seed=1)
    assert folder == tmp_path / 'checkpoints' / 'step_00000007'
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'encoder.safetensors', 'metrics.json',
                                                        'objective.safetensors', 'state.pt']
    # config and metrics are indented JSON, for people to read
    assert (folder / 'config.json').read_text() == json.dumps(dict(model='m', lr=0.5, note='é'), indent=2)
    assert (folder / 'metrics.json').read_text() == json.dumps(dict(loss=1.5), indent=2)
    assert read_config(folder) == dict(model='m', lr=0.5, note='é')
    enc, obj = _modules(2)
    state = load_checkpoint(folder, enc, obj)  # the default device: the CPU
    ref_enc, ref_obj = _modules(1)
    for a, b in zip([*enc.state_dict().values(), *obj.state_dict().values()],
                    [*ref_enc.state_dict().values(), *ref_obj.state_dict().values()]):
        assert torch.equal(a, b)
    assert state['step'] == 7 and torch.equal(state['rng'], torch.arange(3))


def test_keep_last_prunes_the_oldest_and_zero_keeps_all(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path / 'all', step)  # the default keeps every checkpoint
    assert [p.name for p in sorted((tmp_path / 'all' / 'checkpoints').iterdir())] == [
        'step_00000001', 'step_00000002', 'step_00000003']
    for step in (1, 2, 3):
        _save(tmp_path / 'one', step, keep_last=1)
    assert [p.name for p in (tmp_path / 'one' / 'checkpoints').iterdir()] == ['step_00000003']
    for step in (1, 2, 3):
        _save(tmp_path / 'two', step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / 'two' / 'checkpoints').iterdir()) == ['step_00000002', 'step_00000003']
    # something that is not a folder where an old checkpoint would be: pruning skips it instead of failing the save
    (tmp_path / 'two' / 'checkpoints' / 'step_00000000').write_text('not a checkpoint')
    _save(tmp_path / 'two', 4, keep_last=2)
    assert latest_checkpoint(tmp_path / 'two') == tmp_path / 'two' / 'checkpoints' / 'step_00000004'


def test_a_save_killed_half_way_leaves_no_step_folder_and_its_leftover_is_removed(tmp_path):
    """A process killed (SIGKILL) while writing state.pt leaves only .tmp_step_<step>_<pid>: latest_checkpoint never
    takes it, remove_partial deletes it, and the step folder saved before stays the newest."""
    _save(tmp_path, 5)
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(PACKAGE_ROOT)!r})
        from cpc_models.checkpoint import save_checkpoint

        class Die:
            def __reduce__(self):  # pickled while state.pt is written: after the safetensors files
                os.kill(os.getpid(), signal.SIGKILL)

        save_checkpoint({str(tmp_path)!r}, 7, torch.nn.Linear(3, 2), torch.nn.Linear(2, 2), dict(x=Die()), {{}}, {{}})
        """)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    ckpts = tmp_path / 'checkpoints'
    (left,) = [p for p in ckpts.iterdir() if p.name != 'step_00000005']
    assert left.name.startswith('.tmp_step_00000007_') and (left / 'encoder.safetensors').is_file()
    assert latest_checkpoint(tmp_path) == ckpts / 'step_00000005' == resolve_checkpoint(tmp_path)
    (ckpts / '.tmp_step_stray').write_text('a file, not a folder')  # not removable as a folder: skipped, no error
    remove_partial(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ['.tmp_step_stray', 'step_00000005']


def test_resolve_checkpoint_takes_a_step_folder_or_the_newest_of_a_run(tmp_path):
    run = tmp_path / 'run'
    _save(run, 3)
    _save(run, 12)
    step = run / 'checkpoints' / 'step_00000012'
    assert resolve_checkpoint(run) == step and resolve_checkpoint(step) == step
    assert resolve_checkpoint(str(run)) == step
    (step / 'checkpoints').mkdir()  # a step folder is itself, whatever else it holds
    assert resolve_checkpoint(step) == step
    empty = tmp_path / 'empty'
    (empty / 'checkpoints').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='checkpoints holds no complete checkpoint folder'):
        resolve_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match=r'is not a cpc-train checkpoint: expected a step folder .* run folder'):
        resolve_checkpoint(tmp_path)


def test_loading_refuses_pickled_objects_and_says_what_a_checkpoint_is(tmp_path):
    folder = _save(tmp_path, 1)
    torch.save(dict(step=1, obj=Path('anything')), folder / 'state.pt')  # an arbitrary object: not plain tensors
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(folder, *_modules(0))
    (folder / 'state.pt').unlink()
    with pytest.raises(FileNotFoundError, match=r'not a training checkpoint folder \(no state.pt\)'):
        load_checkpoint(folder, *_modules(0))
    with pytest.raises(FileNotFoundError, match='config.json not found: a cpc-train checkpoint folder holds'):
        read_config(tmp_path)
    (folder / 'config.json').write_text('{"model": ')
    with pytest.raises(ValueError, match='is not valid JSON .*the checkpoint is incomplete or was edited'):
        read_config(folder)
