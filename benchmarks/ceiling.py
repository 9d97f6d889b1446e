"""How far cpc-train's step is from the machine's arithmetic: the bounds behind a speed-up target.

    PYTHONPATH=. python -m benchmarks.ceiling          # writes benchmarks/results/ceiling_cpu.{json,md}

For each precision (``fp32``, the CPU default; ``bf16``, ``cpc-train --bf16-cpu``) and torch thread count, in one
process on the CPU:

* the machine's matmul rate in fp32 and in bf16 (common.matmul_rate, as benchmarks.run measures its peak);
* the step: cpc-train's ``train_step`` on the preset's batch of synthetic images (benchmarks.cases), the CPU's
  default layout, the median of ``rounds`` rounds of ``reps`` calls (common.alternate);
* its FLOPs by input dtype (torch.utils.flop_counter's formulas: convolutions and matrix products, forward and
  backward, 2 per multiply-add);
* a profile of ``profile_steps`` steps: time inside those matrix kernels (outermost convolution, convolution_backward,
  mm, addmm, bmm, baddbmm calls, their children included) against the whole step.

Two lower bounds on the step's time follow, neither reachable: **kernels only** (everything but the matrix kernels
free, the kernels at their measured speed) and **at the matmul rate** (every FLOP at the machine's matmul rate for
its dtype, nothing else). With the speed-up over the baseline commit that benchmarks.compare measured (its committed
result for the same precision and thread count; another run) each bound is also stated as a speed-up over the
baseline, beside ``--target``, and so is the share of the matmul rate the whole step would need to reach it.
"""
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.cases import PRESET_OF, apply_mode, build_setup, make_train_step
from benchmarks.common import alternate, cpu_model, markdown_header, matmul_rate, save_results
from cpc_models import config as C
from cpc_models.runtime import channels_last_default

RESULTS = Path(__file__).resolve().parent / 'results'
PROG = 'python -m benchmarks.ceiling'
PRECISIONS = ('fp32', 'bf16')
# The compare result behind each precision's speed-up over the baseline (benchmarks.compare --name ...).
COMPARE = {'fp32': 'compare_a58a1bb_cpu', 'bf16': 'compare_a58a1bb_cpu_bf16'}
MATRIX_OPS = frozenset({'aten::convolution', 'aten::convolution_backward', 'aten::mm', 'aten::addmm', 'aten::bmm',
                        'aten::baddbmm'})


@dataclass
class CeilingConfig:
    """One measurement of the step against the machine's matmul rate."""
    variant: str = 'cpcv2_resnet_tiny'  # encoder (with its cpc-train preset)
    batch: int = 32  # images per step (the fmnist_tiny preset's batch)
    precisions: List[Literal[PRECISIONS]] = field(default_factory=lambda: list(PRECISIONS))  # fp32, bf16 (--bf16-cpu)
    threads: List[int] = field(default_factory=lambda: [1, 2])  # torch threads
    rounds: int = 9  # timed rounds of the step per precision and thread count
    reps: int = 5  # steps per round (the round's median is its time)
    profile_steps: int = 3  # profiled steps (their mean is the row's kernel time)
    peak_n: int = 2048  # side of the square matmul timed for the machine's rate
    peak_time: float = 2.0  # seconds of timing it per dtype (torch.utils.benchmark's median)
    target: float = 2.0  # the speed-up over the baseline that the bounds are set against
    compare_dir: str = str(RESULTS)  # where the benchmarks.compare results (COMPARE) are read
    out: str = str(RESULTS)  # folder for <name>.json and <name>.md
    name: str = 'ceiling_cpu'  # file stem


class FlopsByDtype(TorchDispatchMode):
    """FLOPs of every op with a torch.utils.flop_counter formula, summed by the dtype of its first tensor input."""

    def __init__(self):
        super().__init__()
        self.flops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            key = str(dtype).removeprefix('torch.')
            self.flops[key] = self.flops.get(key, 0) + formula(*args, **kwargs, out_val=out)
        return out


def kernel_seconds(prof) -> float:
    """CPU time inside the outermost matrix-kernel calls (MATRIX_OPS, children included) of a profile."""
    total = 0.0
    for e in prof.events():
        if e.name not in MATRIX_OPS:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name not in MATRIX_OPS:
            parent = parent.cpu_parent
        if parent is None:
            total += e.cpu_time_total / 1e6
    return total


def baseline_ratio(cfg: CeilingConfig, precision: str, threads: int) -> Optional[Dict]:
    """The committed benchmarks.compare speed-up over its baseline for this precision and thread count, if any."""
    path = Path(cfg.compare_dir) / f'{COMPARE[precision]}.json'
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    row = next((t for t in doc['timing'] if t['threads'] == threads), None)
    if row is None or doc['batch'] != cfg.batch or doc['config']['preset'] != PRESET_OF[cfg.variant]:
        return None  # another step than the one measured here
    return dict(source=path.name, against=doc['config']['against'], ratio=row['ratio']['median'])


def measure_row(cfg: CeilingConfig, precision: str, threads: int, log) -> Dict:
    torch.set_num_threads(threads)
    device = torch.device('cpu')
    s = build_setup(cfg.variant, device, cfg.batch)
    apply_mode(s, frozenset({'cl'}) if channels_last_default(device, 'train') else frozenset())
    s.cfg = C.apply(s.cfg, dict(bf16_cpu=precision == 'bf16'))
    step, _ = make_train_step(s)
    for _ in range(2):
        step()
    rounds = [r['wall_s'] for r in alternate({'step': step}, cfg.rounds, cfg.reps, device)['step']]
    step_s = statistics.median(rounds)
    counter = FlopsByDtype()
    with counter:
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(cfg.profile_steps):
            step()
    kernels_s = kernel_seconds(prof) / cfg.profile_steps
    rates = {str(dt).removeprefix('torch.'): matmul_rate(device, dt, cfg.peak_n, threads, cfg.peak_time)
             for dt in (torch.float32, torch.bfloat16)}
    unknown = set(counter.flops) - set(rates)
    if unknown:
        raise RuntimeError(f'matrix FLOPs in dtypes without a measured rate: {sorted(unknown)}')
    at_rate_s = sum(f / rates[d] for d, f in counter.flops.items())
    row = dict(precision=precision, threads=threads, batch=cfg.batch, step_ms=step_s * 1e3,
               round_ms=[r * 1e3 for r in rounds], images_per_s=cfg.batch / step_s, flops=counter.flops,
               matmul_rates=rates, achieved_flops=sum(counter.flops.values()) / step_s,
               kernels_ms=kernels_s * 1e3, at_rate_ms=at_rate_s * 1e3, share_of_rate=at_rate_s / step_s,
               load=os.getloadavg()[0])
    base = baseline_ratio(cfg, precision, threads)
    if base:
        # baseline step time = ours * ratio; the target asks for baseline time / target
        target_ms = row['step_ms'] * base['ratio'] / cfg.target
        row.update(baseline=base, kernels_only_vs_base=base['ratio'] * step_s / kernels_s,
                   at_rate_vs_base=base['ratio'] * step_s / at_rate_s, target_ms=target_ms,
                   share_needed=row['at_rate_ms'] / target_ms)
    log(f"{precision}, {threads} thread(s): step {row['step_ms']:.1f} ms, {sum(counter.flops.values()) / 1e9:.2f} "
        f"GFLOP, kernels {row['kernels_ms']:.1f} ms, at the matmul rate {row['at_rate_ms']:.1f} ms")
    return row


def run(cfg: CeilingConfig, command: str) -> Dict:
    t0 = time.monotonic()

    def log(msg):
        print(f'[{time.monotonic() - t0:6.0f}s] {msg}', flush=True)

    doc = dict(command=command, config=C.to_dict(cfg), rows=[],
               machine=dict(cpu=cpu_model(), logical_cores=os.cpu_count(), torch=torch.__version__,
                            bf16_native=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                            load_average_at_start=list(os.getloadavg())))
    for precision in cfg.precisions:
        for threads in cfg.threads:
            doc['rows'].append(measure_row(cfg, precision, threads, log))
            save_results(doc, Path(cfg.out), cfg.name, render_markdown, t0)
    return doc


def _x(v: Optional[float]) -> str:
    return f'{v:.2f}x' if v is not None else ''


def results_table(doc: Dict) -> List[str]:
    target = doc['config']['target']
    lines = ['| precision | torch threads | step ms: median (min-max of rounds) | img/s | matrix GFLOP (fp32 / bf16) '
             '| matmul rate GFLOP/s (fp32 / bf16) | step at the matmul rate: ms (share now) | matrix kernels ms | '
             'speed-up over the baseline: now / kernels only / at the matmul rate | '
             f'{target:g}x needs the whole step at |',
             '|---|---:|---:|---:|---|---|---|---:|---|---|']
    for r in doc['rows']:
        f32, b16 = r['flops'].get('float32', 0) / 1e9, r['flops'].get('bfloat16', 0) / 1e9
        rates = r['matmul_rates']
        base = r.get('baseline')
        vs = (f"{_x(base['ratio'])} / {_x(r['kernels_only_vs_base'])} / **{_x(r['at_rate_vs_base'])}**"
              if base else '(no compare result)')
        need = f"{r['share_needed']:.0%} of the matmul rate" if base else ''
        lines.append(f"| {r['precision']} | {r['threads']} | {r['step_ms']:,.1f} ({min(r['round_ms']):,.1f}-"
                     f"{max(r['round_ms']):,.1f}) | {r['images_per_s']:,.1f} | "
                     f"{f32:.2f} / {b16:.2f} | {rates['float32'] / 1e9:,.0f} / {rates['bfloat16'] / 1e9:,.0f} | "
                     f"{r['at_rate_ms']:,.1f} ({r['share_of_rate']:.0%}) | {r['kernels_ms']:,.1f} | {vs} | {need} |")
    return lines


def render_markdown(doc: Dict) -> str:
    cfg = doc['config']
    sources = sorted({r['baseline']['source'] for r in doc['rows'] if r.get('baseline')})
    lines = markdown_header(doc, f"The step against the matmul rate: {cfg['variant']}, batch {cfg['batch']}") + [
        f"Step: cpc-train's `train_step` on synthetic images, median of {cfg['rounds']} rounds of {cfg['reps']}. "
        f"Matmul rate: the median time of a {cfg['peak_n']}^3 product per dtype ({cfg['peak_time']:g} s of timing). "
        "\"Kernels only\": the step if everything but its convolutions and matrix products took no time; \"at the "
        "matmul rate\": its FLOPs at the matmul rate of their dtype and nothing else. Speed-ups over the baseline "
        f"use the median ratio of {', '.join(sources) or 'no compare result'} (another run).", '']
    return '\n'.join(lines + results_table(doc)) + '\n'


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = C.parse_args(CeilingConfig(), argv, prog=PROG, description=__doc__.splitlines()[0])
    run(cfg, f'{PROG} ' + ' '.join(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
