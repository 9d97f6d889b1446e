"""The command lines as a new user meets them: every mistake gets one line that says what to change and exit status 2
(no traceback), checked before any work; every suggested command works; output appears as the work goes.

Real components throughout: the CLIs' own main functions (or their subprocesses), real timm models, real image files
(the Fashion-MNIST sample bundled with the package), a Fashion-MNIST IDX folder written from that sample (so nothing
here needs the Debian dataset), a real Hugging Face cache folder in offline mode, a real interpreter without torch.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

import cpc_models  # noqa: F401  (registers the architectures)
from benchmarks import run as bench
from cpc_models import checks, extract, hub, train
from conftest import write_sample_idx, write_sample_pngs
from cpc_models.demo import load_sample
from cpc_models.evaluate import cli as eval_cli

ROOT = Path(__file__).resolve().parent.parent
ARCH = 'cpcv2_resnet_tiny'
pytestmark = pytest.mark.timeout(300)


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONUNBUFFERED='1', **extra)
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    return env


@pytest.fixture(scope='module')
def fmnist_dir(tmp_path_factory):
    """A Fashion-MNIST IDX folder (train and t10k) holding the bundled 1,000-image sample."""
    return write_sample_idx(tmp_path_factory.mktemp('fmnist'))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """48 real 28 px PNGs."""
    return write_sample_pngs(tmp_path_factory.mktemp('images'), 48)


def _one_error_line(err: str, prog: str) -> str:
    """The error line of ``err`` (after an optional usage line); there must be exactly one, and no traceback."""
    assert 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith('usage:')]
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), err
    return lines[0]


# ============ cpc-train ============

TRAIN = ['--device', 'cpu', '--progress', '0']


@pytest.mark.parametrize('argv, message', [
    (['--batch-size', '0'], '--batch-size 0: must be >= 1'),  # was: ZeroDivisionError in StepSampler
    (['--max-steps', '-5'], '--max-steps -5: must be >= 0'),  # was: exit 0 after doing nothing
    (['--model', 'cpcv2_resnet_tny'], 'unknown model (did you mean cpcv2_resnet_tiny'),  # was: RuntimeError
    (['--objective', '{"foo": 1}'], 'unknown option --objective.foo; the objective group has'),  # was: TypeError
    (['--lr', '-1e-3'], '--lr -0.001: must be > 0'),  # was: argparse's "expected one argument", then AdamW's error
    (['--lr=-1e-3'], '--lr -0.001: must be > 0'),
    (['--epochs', '0'], '--epochs 0: must be > 0'),
    (['--betas', '0.9,1.5'], '--betas [0.9, 1.5]: must be in [0, 1)'),
    (['--objective.directions', '3'], '--objective: directions must be 1'),
    (['--model_args', '{"bogus": 1}'], '--model_args {"bogus": 1}: cpcv2_resnet_tiny does not take them'),
    (['--image-size', '64'], '--image-size 64: Fashion-MNIST images are 28 px'),
    (['--model', 'cpcv2_resnet_small'],  # was: "Latent grid 2x2 is too small" after loading the data
     "--model cpcv2_resnet_small on Fashion-MNIST's 28 px images: Latent grid 2x2 is too small"),
    (['--resume', 'no/such/run'], '--resume: no/such/run is not a cpc-train checkpoint'),
    (['--data', 'no/such/folder'], '--data no/such/folder: no such folder'),
    (['--device', 'gpu'], '--device gpu: not a device; use auto, cpu, cuda, cuda:N or mps'),
])
def test_cpc_train_bad_config_is_one_line_and_status_2(argv, message, fmnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    t0 = time.monotonic()
    rc = train.main(TRAIN + ['--out-dir', str(tmp_path / 'run')] + argv)
    line = _one_error_line(capsys.readouterr().err, 'cpc-train')
    assert rc == 2 and message in line, line
    assert not (tmp_path / 'run').exists()  # checked before any work: nothing written
    assert time.monotonic() - t0 < 60


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a machine without a GPU')
def test_cpc_train_cuda_without_gpu(fmnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    rc = train.main(['--device', 'cuda', '--out-dir', str(tmp_path / 'run')])
    line = _one_error_line(capsys.readouterr().err, 'cpc-train')
    assert rc == 2 and '--device cuda: this machine has no usable CUDA GPU' in line and '--device cpu' in line


def test_cpc_train_geometry_of_a_folder(images, tmp_path, capsys):
    rc = train.main(TRAIN + ['--model', 'cpcv2_resnet_small', '--data', str(images), '--image-size', '28',
                             '--out-dir', str(tmp_path / 'run')])
    line = _one_error_line(capsys.readouterr().err, 'cpc-train')
    assert rc == 2 and '--model cpcv2_resnet_small on the 28 px crops of 28 px images: Latent grid 2x2' in line


@pytest.mark.slow
def test_no_published_weights_suggests_a_command_that_works(tmp_path, capsys, monkeypatch):
    """Was: the message suggested `cpc-train --model cpcv2_resnet_small ...`, which failed on the default
    Fashion-MNIST data. Now the suggested command, run as given (on a folder of 64 px images), trains, and the
    suggested create_model call loads what it wrote."""
    with pytest.raises(RuntimeError, match='No pretrained weights are published') as e:
        timm.create_model('cpcv2_resnet_small', pretrained=True)
    command = re.search(r'`(cpc-train [^`]+)`', str(e.value)).group(1)
    load = re.search(r'timm\.create_model\((.+)\), or create', str(e.value)).group(1)
    folder = tmp_path / 'FOLDER'
    folder.mkdir()
    x = load_sample()[0]
    for i in range(32):  # cpc-train's default batch
        Image.fromarray(x[i, 0].numpy()).resize((64, 64)).convert('RGB').save(folder / f'{i:02d}.png')
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]
    assert train.main(argv + ['--max-steps', '1', '--progress', '0', '--device', 'cpu']) == 0, capsys.readouterr()
    step = next(Path('runs/cpcv2_resnet_small/checkpoints').iterdir()).name
    model = eval(f'timm.create_model({load.replace("step_N", step)})')  # noqa: S307  (the message's own call)
    assert model.grid_size(64) == (7, 7)


# ============ cpc-extract ============

def test_cpc_extract_checkpoint_kinds(images, tmp_path, capsys):
    """Was: a garbage file gave `IndexError: pop from empty list` from torch's unpickler (or a weights_only message);
    a safetensors file named .pt gave the misleading 'non-allowlisted globals' message."""
    garbage = tmp_path / 'garbage.pt'
    garbage.write_bytes(b'\x00not a checkpoint' * 10)
    named_pt = tmp_path / 'encoder.pt'
    safetensors.torch.save_file(timm.create_model(ARCH).state_dict(), named_pt)
    for ckpt, message in ((garbage, 'is not a weights file: neither safetensors nor a torch.save checkpoint'),
                          (named_pt, 'is a safetensors file named .pt; rename it to encoder.safetensors')):
        rc = extract.main(['--model', ARCH, '--checkpoint', str(ckpt), str(images), '--out', str(tmp_path / 'f.safetensors')])
        line = _one_error_line(capsys.readouterr().err, 'cpc-extract')
        assert rc == 2 and message in line, line
    # and the renamed file loads
    renamed = named_pt.rename(tmp_path / 'encoder.safetensors')
    assert extract.main(['--model', ARCH, '--checkpoint', str(renamed), str(images), '--out', str(tmp_path / 'f.safetensors'),
                         '--no-progress']) == 0


def test_cpc_extract_out_folder_is_refused_before_any_work(images, tmp_path, capsys):
    """Was: IsADirectoryError after extracting every image."""
    rc = extract.main(['--model', f'{ARCH}.fmnist', str(images), '--out', str(tmp_path)])
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, 'cpc-extract')
    assert rc == 2 and f'--out {tmp_path}: is a folder; give a file name' in line
    assert 'img/s' not in captured.err  # no image was read


def test_cpc_extract_tag_typo_names_the_tags(images, tmp_path, capsys):
    """Was: "Invalid pretrained tag (fmnst)" without the valid tags."""
    rc = extract.main(['--model', f'{ARCH}.fmnst', str(images), '--out', str(tmp_path / 'f.safetensors')])
    line = _one_error_line(capsys.readouterr().err, 'cpc-extract')
    assert rc == 2 and f'{ARCH} has no tag "fmnst" (did you mean fmnist?); its tags: fmnist' in line


def test_cpc_extract_progress_counts_images(images, tmp_path, capsys):
    """Was: the bar counted batches (48 images showed as 1/1)."""
    assert extract.main(['--model', f'{ARCH}.fmnist', str(images), '--out', str(tmp_path / 'f.safetensors')]) == 0
    err = capsys.readouterr().err
    assert '48/48' in err and 'img' in err and '1/1 ' not in err


def test_cpc_extract_help_is_grouped():
    text = extract._parser().format_help()
    for group in ('data:', 'model:', 'output:', 'runtime:'):
        assert f'\n{group}\n' in text
    options = re.findall(r'^  (--[\w-]+)', text, re.MULTILINE)
    assert len(options) == len(set(options))
    assert all('(default' in block or '(required)' in block for block in re.split(r'\n  (?=--)', text)[1:])


# ============ models by name: Hub and local folders ============

def test_offline_hub_repo_not_cached_names_the_repo(images, tmp_path, capsys, monkeypatch):
    """Was: a raw LocalEntryNotFoundError; docs/hub.md promises a RuntimeError naming the repo and what to do."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(LocalEntryNotFoundError):  # timm itself reads config.json before any code of the package
        timm.create_model('hf-hub:someone/uncached', pretrained=True, cache_dir=str(tmp_path / 'hf'))
    with pytest.raises(RuntimeError, match='from the Hugging Face Hub repo "someone/uncached": the machine is offline'
                                           ) as e:
        checks.create_model('hf-hub:someone/uncached', pretrained=True, cache_dir=str(tmp_path / 'hf'))
    assert 'python -m cpc_models.hub cache FOLDER someone/uncached' in str(e.value)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
    rc = extract.main(['--model', 'hf-hub:someone/uncached', str(images), '--out', str(tmp_path / 'f.safetensors')])
    line = _one_error_line(capsys.readouterr().err, 'cpc-extract')
    assert rc == 2 and '"someone/uncached"' in line and 'offline' in line


def test_local_dir_missing_folder(images, tmp_path, capsys):
    """Was: timm's FileNotFoundError traceback."""
    rc = extract.main(['--model', f'local-dir:{tmp_path / "nope"}', str(images), '--out', str(tmp_path / 'f.safetensors')])
    line = _one_error_line(capsys.readouterr().err, 'cpc-extract')
    assert rc == 2 and f'local-dir:{tmp_path / "nope"}: {tmp_path / "nope"} is not a folder' in line


# ============ python -m cpc_models.hub ============

def test_hub_export_needs_a_tag_and_writes_no_inherited_one(tmp_path, capsys):
    """Was: without --tag, config.json got "tag": "fmnist", the registered default's tag (other weights)."""
    ckpt = tmp_path / 'step_00000001'
    ckpt.mkdir()
    safetensors.torch.save_file(timm.create_model(ARCH, num_classes=0).state_dict(), ckpt / 'encoder.safetensors')
    (ckpt / 'config.json').write_text(json.dumps(dict(model=ARCH, model_args={})))
    with pytest.raises(SystemExit) as e:
        hub.main(['export', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'pub')])
    assert e.value.code == 2 and 'the following arguments are required: --tag' in capsys.readouterr().err
    assert not (tmp_path / 'pub').exists()
    out = hub.export_checkpoint(ckpt, tmp_path / 'pub')  # the Python API without a tag: none is written
    assert 'tag' not in json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert hub.main(['export', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'pub2'), '--tag', 'mine']) == 0
    assert json.loads((tmp_path / 'pub2' / 'config.json').read_text())['pretrained_cfg']['tag'] == 'mine'


# ============ cpc-eval ============

def test_cpc_eval_merge_part_without_results(tmp_path, capsys):
    """Was: FileNotFoundError traceback."""
    (tmp_path / 'part').mkdir()
    rc = eval_cli.main(['merge', str(tmp_path / 'merged'), str(tmp_path / 'part')])
    line = _one_error_line(capsys.readouterr().err, 'cpc-eval merge')
    assert rc == 2 and f'{tmp_path / "part"}: it has no results.json' in line
    assert not (tmp_path / 'merged').exists()


@pytest.mark.parametrize('argv, message', [
    (['--checkpoint', f'{ARCH}.fmnst'], f'--checkpoint {ARCH}.fmnst: {ARCH} has no tag "fmnst"'),
    (['--checkpoint', 'no/such.safetensors'], '--checkpoint: Weights file not found: no/such.safetensors'),
    (['--checkpoint', 'random', '--model', 'cpcv2_resnet_tny'], 'unknown model (did you mean cpcv2_resnet_tiny'),
    (['--checkpoint', 'random', '--arms', 'scrach'], "Unknown arm(s) ['scrach'] (did you mean scratch?)"),
    (['--checkpoint', 'random', '--threads', '-1'], '--threads -1: must be >= 0'),
    (['--checkpoint', 'random', '--extract-batch', '0'], '--extract-batch 0: must be >= 1'),
    (['--checkpoint', 'random', '--train-subset', '-5'], '--train-subset -5: must be >= 0'),
    (['--checkpoint', 'random', '--data-dir', 'no/such/dir'], '--data-dir: Fashion-MNIST IDX files not found'),
])
def test_cpc_eval_bad_config_is_one_line_and_status_2(argv, message, fmnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    rc = eval_cli.main(['figure1', '--out', str(tmp_path / 'out'), '--no-progress', *argv])
    line = _one_error_line(capsys.readouterr().err, 'cpc-eval figure1')
    assert rc == 2 and message in line, line
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_cpc_eval_prints_each_run_and_saves_after_it_without_progress_bars(fmnist_dir, tmp_path):
    """Was: `figure1 --arms scratch --no-progress` printed nothing for minutes (stdout buffered in a pipe) and the
    user could not tell that results.json is rewritten after each run. Now a line before and after every run comes
    out as it happens, and the file holds the finished runs when the line says so."""
    out = tmp_path / 'out'
    proc = subprocess.Popen(
        [sys.executable, '-m', 'cpc_models.evaluate', 'figure1', '--checkpoint', 'random', '--arms', 'scratch',
         '--fractions', '0.1', '--seeds', '0,1', '--no-progress', '--data-dir', str(fmnist_dir), '--val-size', '100',
         '--train-subset', '200', '--eval-limit', '50', '--e2e-max-steps', '3', '--e2e-batch', '8',
         '--classifier-size', 'tiny', '--out', str(out)],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_done = None
    for line in proc.stdout:
        if line.startswith('[1/2] scratch 10.00% seed 0: val acc') and first_done is None:
            first_done = json.loads((out / 'results.json').read_text())['runs']
    proc.wait(timeout=240)
    stdout_rest, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert first_done and first_done[0]['arm'] == 'scratch' and first_done[0]['seed'] == 0
    assert len(json.loads((out / 'results.json').read_text())['runs']) == 2


@pytest.mark.slow
def test_cpc_eval_figure1_help_is_grouped():
    proc = subprocess.run([sys.executable, '-m', 'cpc_models.evaluate', 'figure1', '--help'], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    groups = [line[:-1] for line in proc.stdout.splitlines() if re.fullmatch(r'[a-zA-Z -]+:', line)]
    assert groups[:3] == ['encoder', 'runs', 'data']
    flags = re.findall(r'^  (--[\w.-]+)', proc.stdout, re.MULTILINE)
    assert len(flags) == len(set(flags)) > 20
    assert re.search(r'^  --e2e-batch INT +cpc_finetune, scratch: images per step \(default: 64\)', proc.stdout, re.MULTILINE)


# ============ cpc-demo ============

@pytest.mark.slow
def test_demo_prints_as_it_goes(tmp_path):
    """Was: nothing for 10 minutes on a loaded machine (stdout buffered in make's pipe). The first lines arrive while
    the features are still being extracted, each table row when it is ready."""
    proc = subprocess.Popen([sys.executable, '-m', 'cpc_models.demo', '--shots', '1', '2', '--repeats', '1'],
                            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    running_after_first_line = proc.poll() is None
    rows = []
    for line in proc.stdout:
        if re.match(r'\s+[12] \|', line):
            rows.append(line)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert first.startswith('backbone: cpcv2_resnet_tiny_wide.fmnist') and running_after_first_line
    assert len(rows) == 2
    assert '1000/1000' in err  # the extraction bar counts images


@pytest.mark.parametrize('argv, message', [(['--shots', '0'], '--shots must be in [1, 89]'),
                                           (['--model', f'{ARCH}.fmnst'], 'has no tag "fmnst"')])
def test_demo_bad_input(argv, message, capsys):
    from cpc_models.demo import main as demo_main
    with pytest.raises(SystemExit) as e:
        demo_main(argv)
    assert e.value.code == 2 and message in _one_error_line(capsys.readouterr().err, 'cpc-demo')


# ============ benchmarks ============

def test_benchmarks_write_a_fresh_folder_unless_told_to_update(capsys):
    """Was: `python -m benchmarks.run --device cpu` overwrote the committed benchmarks/results/cpu.*."""
    cfg = bench.parse_config(['--device', 'cpu'])
    assert Path(cfg.out).parent == bench.RUNS and Path(cfg.out).name.startswith('cpu-')
    assert Path(bench.parse_config(['--device', 'cpu', '--update-results']).out) == bench.RESULTS
    assert bench.parse_config(['--device', 'cpu', '--out', 'x']).out == 'x'
    for argv, message in ((['--update-results', '--out', 'x'], '--update-results writes benchmarks/results/'),
                          (['--threads', '0'], '--threads 0: must be >= 1'),
                          (['--batch.cpcv2_resnet_tiny', '0'], '--batch.VARIANT must be >= 1')):
        with pytest.raises(SystemExit) as e:
            bench.parse_config(['--device', 'cpu', *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_choices_are_checked_before_any_work(capsys):
    """benchmarks.peer --parts and benchmarks.ceiling --precisions take only their listed values, with one line."""
    from benchmarks import ceiling, peer
    for mod, argv, message in ((peer, ['--parts', 'norm,steps'], '--parts: invalid choice "steps" (choose from norm, '
                                                                  'encoder, step)'),
                               (ceiling, ['--precisions', 'fp16'], '--precisions: invalid choice "fp16" (choose from '
                                                                   'fp32, bf16)')):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_run_script_needs_an_interpreter_with_torch(tmp_path):
    """Was: it ran the system python3, which has no torch there. Now: $PYTHON, else the project's .venv, else
    python3; one without torch is refused with what to do."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(tmp_path / 'bare')], check=True, timeout=120)
    bare = tmp_path / 'bare' / 'bin' / 'python'
    res = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_run.sh')], env=_env(PYTHON=str(bare)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert f'gpu_run.sh: error: {bare} cannot import torch' in res.stderr and 'PYTHON=' in res.stderr
    # an interpreter with torch gets past the check; on a machine without a GPU benchmarks.run then says so
    res = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_run.sh')],
                         env=_env(PYTHON=sys.executable, OUT=str(tmp_path / 'out')), capture_output=True, text=True,
                         timeout=300)
    assert f'gpu_run.sh: {sys.executable}, base ' in res.stdout
    assert f'writing {tmp_path / "out"}/cuda.json' in res.stdout
    if not torch.cuda.is_available():
        assert res.returncode == 2 and 'gpu_bench: error: no CUDA device' in res.stdout


# ============ issue 24: one behaviour for every command line ============
# Each test names the rough edge (1-11) it covers and what happened before.

def _rc_err(main, argv, capsys):
    """(exit status, stderr) of a main that returns its status or raises SystemExit (argparse, config.fail)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _demo(argv):
    from cpc_models.demo import main as demo_main
    return demo_main(argv)


@pytest.mark.parametrize('main, argv, prog, message', [
    # 6: was five lines of usage without the typo, nothing suggested, or a prefix taken for a flag
    (extract.main, ['--modle', ARCH, 'x.png', '--out', 'f.safetensors'], 'cpc-extract',
     'unknown option --modle (did you mean --model?)'),
    (extract.main, ['--model', ARCH, 'x.png', '--out', 'f.safetensors', '--no-progres'], 'cpc-extract',
     'unknown option --no-progres (did you mean --no-progress?)'),
    (extract.main, ['--mod', ARCH, 'x.png', '--out', 'f.safetensors'], 'cpc-extract', 'unknown option --mod'),
    (train.main, ['--learning-rate', '1e-3'], 'cpc-train', 'unknown option --learning-rate (did you mean --lr?)'),
    (train.main, ['--batch', '8'], 'cpc-train', 'unknown option --batch (did you mean --batch-size'),
    (_demo, ['--thread', '2'], 'cpc-demo', 'unknown option --thread (did you mean --threads?)'),
    (hub.main, ['export', '--checkpoint', 'c', '--out', 'o', '--tag', 't', '--overwrit'], 'python -m cpc_models.hub',
     'unknown option --overwrit (did you mean --overwrite?)'),
    (hub.main, ['export', '--check', 'c', '--out', 'o', '--tag', 't'], 'python -m cpc_models.hub export',
     'unknown option --check (did you mean --checkpoint?)'),
    (eval_cli.main, ['figure1', '--checkpoint', 'random', '--out', 'o', '--fraction', '0.1'], 'cpc-eval figure1',
     'unknown option --fraction (did you mean --fractions'),
    (eval_cli.main, ['probe', '--checkpoint', 'random', '--seed', '1'], 'cpc-eval probe',
     'unknown option --seed (did you mean --seeds'),
    (eval_cli.main, ['plot', 'dir', '--readm', 'x.md'], 'cpc-eval', 'unknown option --readm (did you mean --readme?)'),
    # 4: was "invalid choice: 'prob' (choose from 'plot', 'merge')"
    (eval_cli.main, ['prob'], 'cpc-eval', "unknown command 'prob' (did you mean probe?); choose from figure1, probe, "
                                          "linear, plot, merge"),
    (eval_cli.main, ['linaer'], 'cpc-eval', "unknown command 'linaer' (did you mean linear?)"),
    (eval_cli.main, ['figure'], 'cpc-eval', "unknown command 'figure' (did you mean figure1?)"),
    (eval_cli.main, [], 'cpc-eval', 'give a command: figure1, probe, linear, plot, merge'),
    (hub.main, [], 'python -m cpc_models.hub', 'the following arguments are required: cmd'),
    (hub.main, ['exprt'], 'python -m cpc_models.hub', "unknown command 'exprt' (did you mean export?); choose from "
                                                     "export, push, cache"),
])
def test_a_typo_is_named_with_a_suggestion_in_one_line(main, argv, prog, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _rc_err(main, argv, capsys)
    line = _one_error_line(err, prog)
    assert rc == 2 and message in line, line
    assert not list(tmp_path.iterdir())  # before any work


def test_no_prefix_abbreviation_in_any_parser():
    """6: `cpc-demo --thread 2` was taken as --threads 2 (argparse's allow_abbrev)."""
    from cpc_models.config import ArgumentParser
    p = ArgumentParser(prog='x')
    p.add_argument('--threads', type=int)
    with pytest.raises(SystemExit):
        p.parse_args(['--thread', '2'])
    assert extract._parser().allow_abbrev is False


def test_cpc_train_out_dir_that_is_a_file(fmnist_dir, tmp_path, capsys, monkeypatch):
    """1: was the config printed, then a FileExistsError traceback, exit 1."""
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    afile = tmp_path / 'afile.txt'
    afile.write_text('mine')
    for out_dir in (afile, afile / 'run'):
        rc, err = _rc_err(train.main, TRAIN + ['--out-dir', str(out_dir)], capsys)
        line = _one_error_line(err, 'cpc-train')
        assert rc == 2 and f'--out-dir {out_dir}: is' in line and 'give a folder' in line, line
    assert afile.read_text() == 'mine' and sorted(p.name for p in tmp_path.iterdir()) == ['afile.txt']


def test_plot_paths_name_the_extra_when_matplotlib_is_missing(fmnist_dir, tmp_path, capsys, monkeypatch):
    """2: was `ModuleNotFoundError: No module named 'matplotlib'` with a traceback, for figure1 only at the end."""
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # what `import matplotlib` sees without the [plot] extra
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    (tmp_path / 'res').mkdir()
    (tmp_path / 'res' / 'results.json').write_text('{}')
    for argv, prog in ((['plot', str(tmp_path / 'res')], 'cpc-eval plot'),
                       (['merge', str(tmp_path / 'merged'), str(tmp_path / 'res')], 'cpc-eval merge'),
                       (['figure1', '--checkpoint', 'random', '--out', str(tmp_path / 'fig')], 'cpc-eval figure1')):
        rc, err = _rc_err(eval_cli.main, argv, capsys)
        line = _one_error_line(err, prog)
        assert rc == 2 and "pip install 'cpc-models[plot]'" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['res']  # nothing written, no run started
    readme = (ROOT / 'README.md').read_text()
    assert "pip install 'cpc-models[plot]'" in readme  # the README names the extra


def test_cpc_extract_takes_a_step_folder_like_cpc_eval_and_resume(images, tmp_path, capsys):
    """3: was refused, with a hint to export into the checkpoint folder itself."""
    run = tmp_path / 'run'
    step = run / 'checkpoints' / 'step_00000020'
    step.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(ARCH, stem_chs=16)
    safetensors.torch.save_file(model.state_dict(), step / 'encoder.safetensors')
    (step / 'config.json').write_text(json.dumps(dict(model=ARCH, model_args=dict(stem_chs=16))))
    for ckpt in (step, run):  # the step folder, and the run folder (its newest step)
        out = tmp_path / f'{ckpt.name}.safetensors'
        assert extract.main(['--model', ARCH, '--checkpoint', str(ckpt), str(images), '--out', str(out),
                             '--no-progress']) == 0, capsys.readouterr().err
        assert safetensors.torch.load_file(out)['features'].shape == (48, model.num_features)
    capsys.readouterr()
    (tmp_path / 'empty').mkdir()
    rc = extract.main(['--model', ARCH, '--checkpoint', str(tmp_path / 'empty'), str(images), '--out',
                       str(tmp_path / 'f.safetensors')])
    assert rc == 2 and 'not a cpc-train checkpoint' in _one_error_line(capsys.readouterr().err, 'cpc-extract')
    from cpc_models._weights import check_weights_file
    with pytest.raises(FileNotFoundError) as e:
        check_weights_file(step)
    assert f'--checkpoint {step} --out NEW_FOLDER' in str(e.value)  # was: --out <the checkpoint folder itself>


def test_errors_are_phrased_in_flags(images, tmp_path, capsys, monkeypatch):
    """5: was pretrained=False for --no-pretrained, overwrite=True for --overwrite, token=... for --token."""
    rc, err = _rc_err(extract.main, ['--model', 'cpcv2_resnet_small', str(images), '--out',
                                     str(tmp_path / 'f.safetensors')], capsys)
    line = _one_error_line(err, 'cpc-extract')
    assert rc == 2 and '--no-pretrained' in line and 'pretrained=False' not in line, line
    ckpt = tmp_path / 'step_00000001'
    ckpt.mkdir()
    safetensors.torch.save_file(timm.create_model(ARCH).state_dict(), ckpt / 'encoder.safetensors')
    (ckpt / 'config.json').write_text(json.dumps(dict(model=ARCH, model_args={})))
    (tmp_path / 'pub').mkdir()
    rc, err = _rc_err(hub.main, ['export', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'pub'), '--tag', 't'],
                      capsys)
    line = _one_error_line(err, 'python -m cpc_models.hub')
    assert rc == 2 and '--overwrite' in line and 'overwrite=True' not in line, line
    import huggingface_hub.constants
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'token'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'stored_tokens'))
    hub.main(['export', '--checkpoint', str(ckpt), '--out', str(tmp_path / 'pub2'), '--tag', 't'])
    rc, err = _rc_err(hub.main, ['push', str(tmp_path / 'pub2'), 'someone/x'], capsys)
    line = _one_error_line(err, 'python -m cpc_models.hub')
    assert rc == 2 and '--token TOKEN' in line and 'token=...' not in line, line


def test_worker_counts_are_capped_to_the_cores(images, fmnist_dir, tmp_path, monkeypatch, capsys):
    """7: was 4 DataLoader workers on a 2-core CPU (the stl10_small preset): torch warned twice, 2 steps took 2m39s.
    More workers than cores are asked for; no 'worker processes in total' warning comes, and the cap follows the
    cores this process may use."""
    import warnings
    from cpc_models import runtime
    cores = runtime.available_cores()
    assert runtime.cap_workers(0) == 0 and runtime.cap_workers(cores + 3) == cores
    assert train.PRESETS['stl10_small']['num_workers'] > 2  # the preset of the report, beyond this machine's cores
    model = timm.create_model(f'{ARCH}.fmnist', pretrained=True).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _, kept, _ = extract.extract_files(model, sorted(images.iterdir())[:4], batch_size=2, num_workers=cores + 3,
                                           progress=False)
    assert len(kept) == 4
    assert not [w for w in caught if 'worker processes in total' in str(w.message)], [str(w.message) for w in caught]
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))  # and cpc-train's loader
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert train.main(TRAIN + ['--batch-size', '8', '--objective.context_hidden', '16', '--max-steps', '1',
                                   '--num-workers', str(cores + 3), '--out-dir', str(tmp_path / 'run')]) == 0
    assert not [w for w in caught if 'worker processes in total' in str(w.message)], [str(w.message) for w in caught]


def test_final_line_says_what_was_written_with_progress_off(fmnist_dir, images, tmp_path, capsys, monkeypatch):
    """8: `cpc-train --progress false` printed nothing after the header, and never where its last checkpoint is."""
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    out = tmp_path / 'run'
    argv = TRAIN + ['--batch-size', '8', '--objective.context_hidden', '16', '--num-workers', '0', '--max-steps', '1',
                    '--progress', 'false', '--out-dir', str(out)]
    assert train.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f'cpc-train: done at step 1; last checkpoint {out / "checkpoints" / "step_00000001"}; metrics in '
                    f'{out / "metrics.jsonl"}'), last
    assert (out / 'checkpoints' / 'step_00000001' / 'encoder.safetensors').is_file()


def test_cpc_extract_out_suffix_and_missing_folder(images, fmnist_dir, tmp_path, capsys, monkeypatch):
    """9: `--out f.npy` silently wrote safetensors under that name; a missing --out folder was created silently."""
    for name, hint in (('f.npy', 'f.safetensors'), ('features', 'features.safetensors')):
        rc, err = _rc_err(extract.main, ['--model', f'{ARCH}.fmnist', str(images), '--out', str(tmp_path / name)],
                          capsys)
        line = _one_error_line(err, 'cpc-extract')
        assert rc == 2 and 'name it .safetensors' in line and str(tmp_path / hint) in line, line
    assert not list(tmp_path.iterdir())
    out = tmp_path / 'new' / 'deeper' / 'f.safetensors'  # decided: created, and the final line says so
    assert extract.main(['--model', f'{ARCH}.fmnist', str(images), '--out', str(out), '--no-progress']) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f'cpc-extract: wrote features (48, 256) of 48 image(s) to {out} (created the folder {tmp_path / "new"})'
    monkeypatch.setenv('CPC_FASHION_MNIST_DIR', str(fmnist_dir))
    rc, err = _rc_err(eval_cli.main, ['probe', '--checkpoint', 'random', '--out', str(tmp_path / 'p.txt')], capsys)
    assert rc == 2 and 'name it .json' in _one_error_line(err, 'cpc-eval probe')
