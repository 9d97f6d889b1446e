"""Smoke test of the benchmark suite (benchmarks/run.py): it runs end to end on the tiny model and writes JSON
of the documented schema plus a Markdown table. Not a timed test: the numbers are not checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
