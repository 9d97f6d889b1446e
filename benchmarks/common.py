"""Shared pieces of the benchmark suite: machine description, memory probes and a timing wrapper.

Timing is torch.utils.benchmark (median over runs; CUDA is synchronized by its timer). Memory: CUDA
``max_memory_allocated`` after ``reset_peak_memory_stats``; CPU the process's peak resident set size (VmHWM from
/proc/self/status, reset before each measurement by writing 5 to /proc/self/clear_refs; where that is not
possible, ``resource.getrusage`` ru_maxrss, which never goes down and is then marked ``peak_mem_resettable=False``).
"""
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils import benchmark

from cpc_models.atomic import write_text
from cpc_models.runtime import cpu_model  # the benchmarks import it from here

RESULTS = Path(__file__).resolve().parent / 'results'  # the committed tables (README.md, docs/benchmarks.md quote them)
RUNS = Path(__file__).resolve().parent.parent / 'runs' / 'benchmarks'  # fresh output folders (git-ignored)


def machine_info(device: torch.device, threads: int) -> Dict:
    import timm
    import torchvision
    info = dict(
        cpu=cpu_model(), logical_cores=os.cpu_count(), threads=threads, python=platform.python_version(),
        torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
        platform=platform.platform(), load_average_at_start=list(os.getloadavg()),
        mem_total_gb=_meminfo_gb('MemTotal'))
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_mem_gb=p.total_memory / 2 ** 30,
                    gpu_sms=p.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=_nvidia_smi('driver_version'),
                    allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    allow_tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def _meminfo_gb(key: str) -> Optional[float]:
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        out = subprocess.run(['nvidia-smi', f'--query-gpu={field}', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(key + ':'):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False when the CPU peak cannot be reset (then it is the process's peak)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def memory_now_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.memory_allocated(device) / 2 ** 20
    kb = _proc_status_kb('VmRSS')
    return kb / 1024 if kb is not None else float('nan')


def memory_peak_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kb = _proc_status_kb('VmHWM')
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return kb / 1024


def measure(fn: Callable[[], object], device: torch.device, threads: int, min_run_time: float,
            repeats: int, label: str = '', warmup: int = 1) -> Dict:
    """Warm up (first call timed on its own: compilation, allocation), then time with torch.utils.benchmark.

    Calls that take more than a third of ``min_run_time`` are timed ``repeats`` times one by one
    (``Timer.timeit(1)``); faster ones with ``Timer.blocked_autorange(min_run_time)``.
    """
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    load_before = os.getloadavg()[0]
    resettable = reset_peak_memory(device)
    mem_before = memory_now_mb(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    sync(device)
    timer = benchmark.Timer(stmt='fn()', globals=dict(fn=fn), num_threads=threads, label=label)
    if first_call_s * 3 < min_run_time:
        m = timer.blocked_autorange(min_run_time=min_run_time)
    else:
        m = benchmark.Measurement.merge([timer.timeit(1) for _ in range(max(1, repeats))])[0]
    sync(device)
    return dict(
        median_s=m.median, iqr_s=m.iqr, mean_s=m.mean, runs=len(m.times) * m.number_per_run,
        first_call_s=first_call_s, peak_mem_mb=memory_peak_mb(device), mem_before_mb=mem_before,
        peak_mem_resettable=resettable, load_before=load_before, load_after=os.getloadavg()[0])


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, threads: int, min_run_time: float) -> float:
    """Measured FLOP/s of an (n, n) @ (n, n) product in ``dtype`` on random data (torch.utils.benchmark median)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    torch.mm(a, b)
    m = benchmark.Timer('torch.mm(a, b)', globals=dict(a=a, b=b, torch=torch), num_threads=threads) \
        .blocked_autorange(min_run_time=min_run_time)
    return 2 * n ** 3 / m.median


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and quartiles of a few measurements (e.g. the per-round ratios of alternating rounds)."""
    q1, q2, q3 = (float(v) for v in np.percentile(list(values), [25, 50, 75]))
    return dict(median=q2, min=float(min(values)), max=float(max(values)), q1=q1, q3=q3, n=len(values))


def alternate(fns: Dict[str, Callable[[], object]], rounds: int, reps: int, device: torch.device,
              log: Optional[Callable[[str], None]] = None) -> Dict[str, List[Dict]]:
    """Time every function in ``rounds`` rounds, the order reversed every other round; per round and function the
    median wall and process-CPU seconds of ``reps`` calls, and the 1-min load before the round."""
    out: Dict[str, List[Dict]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        load = os.getloadavg()[0]
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = [], []
            for _ in range(reps):
                sync(device)
                t, c = time.perf_counter(), time.process_time()
                fns[name]()
                sync(device)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            out[name].append(dict(wall_s=statistics.median(wall), cpu_s=statistics.median(cpu), load_before=load))
        if log:
            log(f'  round {r + 1}/{rounds}: ' + ', '.join(f'{n} {out[n][-1]["wall_s"] * 1e3:.1f} ms' for n in names)
                + f' (load {load:.1f})')
    return out


def save_results(doc: Dict, out: Path, name: str, render: Callable[[Dict], str], t0: float) -> None:
    """Stamp the elapsed time (since ``t0``, time.monotonic) and the load average at the end on ``doc``, and write
    ``<out>/<name>.json`` and the Markdown ``render(doc)`` as ``<name>.md``."""
    doc['elapsed_s'] = time.monotonic() - t0
    doc['load_average_at_end'] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f'{name}.json', json.dumps(doc, indent=2, default=str) + '\n')
    write_text(out / f'{name}.md', render(doc))


def markdown_header(doc: Dict, title: str) -> List[str]:
    """Title, command with its elapsed time, machine and the load average at start and end."""
    m = doc['machine']
    la0, la1 = m['load_average_at_start'], doc.get('load_average_at_end') or [float('nan')] * 3
    versions = ', '.join(f'{k} {m[k]}' for k in ('torch', 'python') if k in m)
    return [f'# {title}', '', f"Command: `{doc['command']}` (elapsed {doc.get('elapsed_s', 0) / 60:.0f} min).", '',
            f"Machine: {m['cpu']} ({m['logical_cores']} logical cores){', ' + versions if versions else ''}; load "
            f"average (1/5/15 min) at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, at end {la1[0]:.2f}/"
            f"{la1[1]:.2f}/{la1[2]:.2f}.", '']
