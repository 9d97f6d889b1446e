"""Smoke test of the benchmark suite (benchmarks/run.py): it runs end to end on the tiny model and writes JSON
of the documented schema plus a Markdown table. Not a timed test: the numbers are not checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_suite_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.run', '--device', 'cpu', '--smoke', '--threads', '1', '--out', str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / 'cpu_smoke.json').read_text())
    md = (tmp_path / 'cpu_smoke.md').read_text()

    assert doc['schema'] == 'cpc-models-benchmarks/1' and doc['device'] == 'cpu' and doc['smoke'] is True
    for key in ('cpu', 'logical_cores', 'threads', 'torch', 'load_average_at_start'):
        assert key in doc['machine']
    assert len(doc['load_average_at_end']) == 3
    assert doc['peak']['reference_flops'] > 0 and doc['peak']['measured_flops'] > 0

    flops = [f for f in doc['flops'] if f['variant'] == 'cpcv2_resnet_tiny' and f['native']]
    assert flops and 0 < flops[0]['fwd_flops_per_image'] < flops[0]['train_flops_per_image']

    kinds = {(r['kind'], r['mode']) for r in doc['results']}
    assert {('inference', 'base'), ('train', 'base'), ('train', 'ckpt')} <= kinds, (kinds, doc['errors'])
    for r in doc['results']:
        assert r['variant'] == 'cpcv2_resnet_tiny' and r['batch'] == 2 and (r['rows'], r['cols']) == (6, 6)
        assert r['median_s'] > 0 and r['images_per_s'] > 0 and 0 < r['mfu']
        assert r['peak_mem_mb'] > 0 and r['flops_per_step'] > 0
        assert 'load_before' in r and 'load_after' in r

    groups = {r['group'].split(':')[0] for r in doc['baselines']}
    assert groups == {'encoder', 'augmentation', 'negatives'}
    for r in doc['baselines']:
        assert r['median_s'] > 0 and r['ours_speedup_vs_this'] > 0
        assert r['naive'] or r['ours_speedup_vs_this'] == 1.0  # 'time / ours' of our own row

    buckets = {b['bucket']: b for b in doc['profile']['buckets']}
    assert 'encoder convolutions' in buckets and 'context network' in buckets
    assert abs(sum(b['share'] for b in buckets.values()) - 1) < 1e-6
    assert not doc['errors'], doc['errors']

    assert '## Throughput' in md and '## Naive baselines' in md and 'Load average' in md


def _module(tmp_path, *argv, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _git_checkout() -> bool:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _git_checkout(), reason='needs a git checkout (the baseline is a git worktree)')
def test_compare_times_a_baseline_revision_and_checks_the_loss_curves(tmp_path):
    """benchmarks.compare end to end against HEAD in a temporary worktree: both trees train through their own
    cpc_models.train.main, their step times and loss curves land in the JSON and the Markdown."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.compare import write_synthetic_fashion_mnist
    data = write_synthetic_fashion_mnist(tmp_path / 'data', n=64)
    small = '--batch-size,4'
    _module(tmp_path, 'benchmarks.compare', '--against', 'HEAD', '--rounds', '2', '--threads', '1', '--warmup', '1',
            '--steps', '2', '--loss-steps', '3', '--reference-args', '[]', '--data-dir', str(data), '--target', '1',
            f'--ours-args={small}', f'--base-args={small}', '--out', str(tmp_path), '--name', 'c')
    doc = json.loads((tmp_path / 'c.json').read_text())
    assert doc['schema'] == 'cpc-models-compare/1' and doc['batch'] == 4
    assert doc['base']['rev'] == 'HEAD' and len(doc['base']['commit']) == 40 and doc['data']['kind'] == 'given'
    (timing,) = doc['timing']
    assert timing['threads'] == 1 and [r['order'] for r in timing['rounds']] == [['base', 'ours'], ['ours', 'base']]
    for r in timing['rounds']:
        assert len(r['base']['wall_s']) == len(r['ours']['wall_s']) == 2 and r['ratio'] > 0 and r['cpu_ratio'] > 0
    assert timing['ratio']['n'] == 2 and timing['ratio']['min'] <= timing['ratio']['median'] <= timing['ratio']['max']
    assert 'passed' in timing and timing['load']['n'] == 4
    loss = doc['loss']
    assert len(loss['curves']['base']) == len(loss['curves']['ours']) == 3 and loss['passed']
    worktrees = subprocess.run(['git', 'worktree', 'list'], cwd=ROOT, capture_output=True, text=True).stdout
    assert not Path(doc['base']['tree']).exists() and doc['base']['tree'] not in worktrees  # removed afterwards
    md = (tmp_path / 'c.md').read_text()
    assert 'speed-up: median' in md and 'Loss curves over 3 steps' in md and '**PASS**' in md


@pytest.mark.slow
def test_peer_and_layout_smoke(tmp_path):
    """benchmarks.peer (every part, with the bolts-like peer) and benchmarks.layout run and write their tables; numbers are not checked."""
    _module(tmp_path, 'benchmarks.peer', '--parts', 'norm,encoder,step', '--rounds', '1', '--reps', '1',
            '--threads', '1', '--batch', '1', '--out', str(tmp_path))
    doc = json.loads((tmp_path / 'peer_cpu.json').read_text())
    parts = {r['part'] for r in doc['rows']}
    assert {'norm_backward', 'norm_forward', 'norm_backward_vs_groupnorm'} <= parts
    assert any(p.startswith('encoder') for p in parts) and any(p.startswith('step') for p in parts), parts
    assert all(r['ratio']['median'] > 0 for r in doc['rows']) and 'target' in doc['rows'][0]
    _module(tmp_path, 'benchmarks.layout', '--kinds', 'inference', '--modes', 'base,cl', '--rounds', '1', '--reps',
            '1', '--threads', '1', '--infer-batch', '2', '--out', str(tmp_path))
    rows = json.loads((tmp_path / 'layout_cpu.json').read_text())['rows']
    assert [(r['kind'], r['mode']) for r in rows] == [('inference', 'base'), ('inference', 'cl')]
    assert rows[0]['speedup']['median'] == 1.0 and '| inference | cl |' in (tmp_path / 'layout_cpu.md').read_text()
    _module(tmp_path, 'benchmarks.ceiling', '--batch', '2', '--rounds', '1', '--reps', '1', '--profile-steps', '1',
            '--peak-n', '128', '--peak-time', '0.05', '--threads', '1', '--out', str(tmp_path))
    rows = json.loads((tmp_path / 'ceiling_cpu.json').read_text())['rows']
    assert [(r['precision'], r['threads']) for r in rows] == [('fp32', 1), ('bf16', 1)]
    assert all(0 < r['at_rate_ms'] and 0 < r['kernels_ms'] for r in rows)
    assert 'baseline' not in rows[0]  # the committed compare timed batch 32: no ratio for another step
    assert '(no compare result)' in (tmp_path / 'ceiling_cpu.md').read_text()


def test_generated_speed_tables_match_the_result_files():
    """README.md and docs/benchmarks.md show the committed measurements (benchmarks.report), not typed numbers."""
    proc = subprocess.run([sys.executable, '-m', 'benchmarks.report', '--check'], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert proc.returncode == 0, proc.stderr


def test_ceiling_counts_the_step_flops_by_dtype_and_times_the_matrix_kernels(tmp_path):
    """benchmarks.ceiling: FlopsByDtype sums torch's FLOP formulas like FlopCounterMode, split by dtype (bf16
    autocast moves the convolutions to bfloat16); kernel_seconds counts the matrix kernels' time, not the rest."""
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.ceiling import FlopsByDtype, kernel_seconds
    from benchmarks.cases import build_setup, make_train_step
    from cpc_models import config as C

    s = build_setup('cpcv2_resnet_tiny', torch.device('cpu'), 2)
    step, _ = make_train_step(s)
    step()
    counter = FlopsByDtype()
    with FlopCounterMode(display=False) as fc, counter:  # both see the same step (augmentation draws vary)
        step()
    assert counter.flops == {'float32': fc.get_total_flops()} and fc.get_total_flops() > 0
    s.cfg = C.apply(s.cfg, dict(bf16_cpu=True))
    step, _ = make_train_step(s)
    counter = FlopsByDtype()
    with FlopCounterMode(display=False) as fc, counter:
        step()
    assert counter.flops['bfloat16'] > counter.flops['float32'] > 0  # the objective's logits stay fp32
    assert sum(counter.flops.values()) == fc.get_total_flops()

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    w = torch.randn(8, 3, 3, 3)
    with profile() as prof:
        torch.matmul(a, b)  # aten::matmul -> aten::mm: the mm counts
        torch.nn.functional.conv2d(torch.randn(2, 3, 32, 32), w)  # aten::conv2d -> aten::convolution -> ...
        for _ in range(20):
            torch.exp(a)  # not a matrix kernel
    events = prof.events()
    expected = sum(e.cpu_time_total for e in events if e.name in ('aten::mm', 'aten::convolution')) / 1e6
    assert kernel_seconds(prof) == pytest.approx(expected) and expected > 0
    assert kernel_seconds(prof) < sum(e.cpu_time_total for e in events if e.cpu_parent is None) / 1e6


def test_roofline_counts_ops_bytes_and_bounds_on_fake_tensors(tmp_path):
    """benchmarks.roofline on the tiny model (fake tensors: no memory, no arithmetic): positive counts, the fused
    norm path moves fewer bytes in fewer ops, checkpointing adds ops (its recomputation) but not model FLOPs."""
    from benchmarks import roofline
    assert roofline.main(['--model', 'cpcv2_resnet_tiny', '--batch', '4', '--out', str(tmp_path)]) == 0
    doc = json.loads((tmp_path / 'roofline.json').read_text())
    assert (tmp_path / 'roofline.md').read_text().count('| H100 SXM |') == 4
    rows = {(r['norm'], r['checkpointing']): r for r in doc['counts']}
    assert set(rows) == {('fused', False), ('fused', True), ('eager', False), ('eager', True)}
    for r in rows.values():
        assert r['kernel_ops'] > 100 and r['flops'] > 0 and r['bytes'] > 0
        assert sum(c['ops'] for c in r['by_class'].values()) == r['kernel_ops']
        assert r['by_class']['conv']['flops'] > 0 and r['by_class']['augmentation']['ops'] > 0
        for b in r['bounds'].values():
            assert 0 < b['mfu'] < 1 and b['step_ms'] >= max(b['compute_ms'], b['memory_ms']) * (1 - 1e-9)
    fused, eager = rows[('fused', False)], rows[('eager', False)]
    assert fused['bytes'] < eager['bytes'] and fused['kernel_ops'] < eager['kernel_ops']
    assert fused['by_class']['activation']['ops'] < eager['by_class']['activation']['ops']
    assert fused['flops'] == eager['flops']
    assert 0 < fused['saved_activation_bytes'] < eager['saved_activation_bytes']  # the fused norm saves x, not y
    assert fused['resident_bytes'] == eager['resident_bytes'] > 0
    assert rows[('eager', True)]['kernel_ops'] > eager['kernel_ops']
    # MFU counts model FLOPs: the checkpointed step's recomputation is not useful work
    assert rows[('eager', True)]['bounds']['H200']['model_flops'] == eager['flops']
    assert roofline.main(['--batch', '0', '--out', str(tmp_path)]) == 2


@pytest.mark.slow
def test_gpu_run_dry_run_writes_every_row(tmp_path):
    """benchmarks/gpu_run.sh --dry: the device script's every work item on the CPU with the tiny model (not a
    measurement), cuda.json and cuda.md written, every kind of row there, no errors, nothing skipped."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(['bash', str(ROOT / 'benchmarks' / 'gpu_run.sh'), '--dry'], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    doc = json.loads((tmp_path / 'cuda.json').read_text())
    md = (tmp_path / 'cuda.md').read_text()
    assert doc['dry'] and doc['finished'] and not doc['errors'] and not doc['skipped']
    kinds = [r['kind'] for r in doc['rows']]
    assert kinds.count('matmul') == 1 and kinds.count('train') == 4 and kinds.count('speedup') == 2
    assert {r['change'] for r in doc['rows'] if r['kind'] == 'change'} == {'fused_norm', 'cudnn_benchmark',
                                                                           'checkpointing', 'bf16_logits'}
    assert kinds.count('profile') == 1 and len(next(r for r in doc['rows'] if r['kind'] == 'profile')['top']) == 15
    assert sorted(r['checkpointing'] for r in doc['rows'] if r['kind'] == 'max_batch') == [False, True]
    assert kinds.count('inference') == 2
    for r in doc['rows']:
        if r['kind'] == 'train':
            assert r['ms'] > 0 and r['img_s'] > 0 and 0 < r['mfu_measured_matmul'] and 0 < r['mfu_datasheet'] < 1
    assert 'dry run on the CPU' in md and md.count('| cpcv2_resnet_tiny | ours |') == 2
    assert (tmp_path / 'cuda_log.txt').is_file()
