"""The layout and compilation defaults of cpc_models/runtime.py, measured: the training step and patch-grid inference
of a variant in every mode, each mode its own model, alternating rounds in one process.

    PYTHONPATH=. python -m benchmarks.layout            # writes benchmarks/results/layout_cpu.{json,md}

Modes: ``base`` (contiguous NCHW, eager), ``cl`` (channels_last), ``compile`` and ``cl+compile`` (torch.compile of
what cpc-train compiles: the encoder trunk and the objective). Every row gives the mode's speed-up over ``base``
(median over rounds of base time / mode time, with min-max), so ``runtime.CPU_CHANNELS_LAST`` and
``runtime.COMPILE_DEVICES`` can be read off the table. The compiled modes also give their first-call (compile) time.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.cases import apply_mode, build_setup, make_inference, make_train_step, parse_mode
from benchmarks.common import alternate, cpu_model, markdown_header, save_results, spread
from cpc_models import config as C

RESULTS = Path(__file__).resolve().parent / 'results'
PROG = 'python -m benchmarks.layout'


@dataclass
class LayoutConfig:
    """One measurement of the layout and compilation modes."""
    variant: str = 'cpcv2_resnet_tiny'  # encoder (with its cpc-train preset)
    train_batch: int = 32  # images per training step (the fmnist_tiny preset's batch)
    infer_batch: int = 64  # images per inference call (cpc-extract's default batch)
    modes: List[str] = field(default_factory=lambda: ['base', 'cl', 'compile', 'cl+compile'])  # 'base' first
    kinds: List[str] = field(default_factory=lambda: ['train', 'inference'])  # what is timed
    threads: List[int] = field(default_factory=lambda: [1, 2])  # torch threads; each count has its own rounds
    rounds: int = 6  # rounds; the order of the modes alternates
    reps: int = 3  # calls per mode and round (their median is the round's time)
    out: str = str(RESULTS)  # folder for <name>.json and <name>.md
    name: str = 'layout_cpu'  # file stem


def run(cfg: LayoutConfig, command: str) -> Dict:
    device = torch.device('cpu')
    t0 = time.monotonic()

    def log(msg):
        print(f'[{time.monotonic() - t0:6.0f}s] {msg}', flush=True)

    doc = dict(command=command, config=C.to_dict(cfg), rows=[],
               machine=dict(cpu=cpu_model(), logical_cores=os.cpu_count(), torch=torch.__version__,
                            load_average_at_start=list(os.getloadavg())))
    for kind in cfg.kinds:
        batch = cfg.train_batch if kind == 'train' else cfg.infer_batch
        fns, first_call = {}, {}
        for mode in cfg.modes:
            s = build_setup(cfg.variant, device, batch)
            apply_mode(s, parse_mode(mode))
            fns[mode] = make_train_step(s)[0] if kind == 'train' else make_inference(s)
            t = time.perf_counter()
            fns[mode]()
            fns[mode]()
            first_call[mode] = time.perf_counter() - t
            log(f'{kind} {mode}: first two calls {first_call[mode]:.1f} s')
        for fn in fns.values():  # a later build's torch._dynamo.reset() drops earlier compiled code: recompile now
            fn()
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            log(f'{kind}, {threads} thread(s)')
            times = alternate(fns, cfg.rounds, cfg.reps, device, log)
            base = times[cfg.modes[0]]
            for mode in cfg.modes:
                ms = [r['wall_s'] * 1e3 for r in times[mode]]
                doc['rows'].append(dict(
                    kind=kind, mode=mode, threads=threads, batch=batch, ms=spread(ms),
                    images_per_s=batch / (spread(ms)['median'] / 1e3), first_two_calls_s=first_call[mode],
                    speedup=spread([b['wall_s'] / r['wall_s'] for b, r in zip(base, times[mode])]),
                    cpu_speedup=spread([b['cpu_s'] / r['cpu_s'] for b, r in zip(base, times[mode])]),
                    load=spread([r['load_before'] for r in times[mode]])))
            save_results(doc, Path(cfg.out), cfg.name, render_markdown, t0)
    return doc


def render_markdown(doc: Dict) -> str:
    cfg = doc['config']
    lines = markdown_header(doc, f"Layout and compilation on the CPU: {cfg['variant']}") + [
             f"Training step: the cpc-train step (`train_step`) of the preset, batch {cfg['train_batch']}; "
             f"inference: `forward_features` under inference_mode, batch {cfg['infer_batch']}. Speed-up over "
             f"`{cfg['modes'][0]}`: median over {cfg['rounds']} alternating rounds (min-max); CPU-time speed-up the "
             f"same with process CPU time.", '']
    return '\n'.join(lines + results_table(doc)) + '\n'


def results_table(doc: Dict) -> List[str]:
    lines = ['| step | mode | torch threads | ms (median) | img/s | speed-up (min-max) | CPU-time speed-up | '
             'first two calls s | load |', '|---|---|---:|---:|---:|---|---|---:|---:|']
    for r in doc['rows']:
        s, c = r['speedup'], r['cpu_speedup']
        lines.append(f"| {r['kind']} | {r['mode']} | {r['threads']} | {r['ms']['median']:,.1f} | "
                     f"{r['images_per_s']:,.1f} | **{s['median']:.2f}x** ({s['min']:.2f}-{s['max']:.2f}) | "
                     f"{c['median']:.2f}x | {r['first_two_calls_s']:.1f} | {r['load']['median']:.1f} |")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = C.parse_args(LayoutConfig(), argv, prog=PROG, description=__doc__.splitlines()[0])
    for mode in cfg.modes:
        try:
            parse_mode(mode)
        except ValueError as e:
            C.fail(PROG, str(e))
    run(cfg, f'{PROG} ' + ' '.join(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
