"""The cpc-models benchmark suite: one command per machine kind, results as JSON + a Markdown table.

    PYTHONPATH=. python -m benchmarks.run --device cpu                  # ~10 min on 2 cores: runs/benchmarks/cpu-<time>/
    PYTHONPATH=. python -m benchmarks.run --device cpu --update-results # the same, into benchmarks/results/
    PYTHONPATH=. python -m benchmarks.run --device cuda --out $OUT     # see benchmarks/gpu_run.sh
    PYTHONPATH=. python -m benchmarks.run --device cpu --smoke --out /tmp/b   # < 30 s, tiny model only

A run writes <name>.json and <name>.md into a new folder unless told otherwise: the committed tables in
benchmarks/results/ (quoted by README.md and docs/benchmarks.md) change only with --update-results.

For every registered variant: patch-grid inference (images/s) and the full training step of cpc_models/train.py
(patchify -> PatchAugment -> normalize -> encoder.forward_patches -> CPCObjective -> backward -> grad clip ->
AdamW; synthetic uint8 images already on the device, no data loading), in several modes: ``base`` (fp32,
contiguous), ``ckpt`` (gradient checkpointing), ``cl`` (channels_last), ``bf16`` (autocast, CUDA only),
``compile`` (torch.compile of the trunk, as train.py) and combinations such as ``bf16+cl+ckpt``. Each row has the
median step time (torch.utils.benchmark), images/s, peak memory, FLOPs (torch.utils.flop_counter) and the
achieved FLOP/s as a fraction of the machine's peak (MFU). Then the naive baselines (benchmarks/baselines.py) and
a torch.profiler breakdown of one training step (benchmarks/profile_step.py). See docs/benchmarks.md.

Big variants run on the CPU at batch 1 on a reduced square grid of the same patches (``--grid``); their
'native-grid estimate' of images/s divides the measured patches/s by the native patch count.
"""
import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, NamedTuple, Optional

import timm
import torch

from benchmarks import baselines as B
from benchmarks.cases import (
    VARIANTS,
    apply_mode,
    build_setup,
    count_flops,
    geometry,
    make_inference,
    make_train_step,
    parse_mode,
)
from benchmarks.common import RESULTS, RUNS, machine_info, matmul_rate, measure
from benchmarks.profile_step import profile_train_step
from benchmarks.roofline import PEAKS
from cpc_models import config as C
from cpc_models.atomic import write_text
from cpc_models.augment import PatchAugmentConfig
from cpc_models.checks import check_device

SCHEMA = 'cpc-models-benchmarks/1'
PROG = 'python -m benchmarks.run'
NEGATIVES = {  # name: (batch, rows, cols, directions, offsets) of the negatives baseline
    'fmnist_tiny preset': (32, 6, 6, 4, (2, 3)),
    'ImageNet, 64 img/GPU': (64, 6, 6, 4, (3,)),
    'fmnist_tiny, 2 img': (2, 6, 6, 4, (2, 3)),
}


@dataclass
class ProfileCase:
    """The training step broken down by torch.profiler."""
    variant: str = 'cpcv2_resnet_tiny'  # encoder
    batch: int = 16  # images per step
    mode: str = 'cl'  # 'base' or '+'-joined cl, ckpt, bf16, compile


@dataclass
class BaselineCases:
    """The naive baselines timed beside the batched code (benchmarks/baselines.py)."""
    loop_tiny_batch: int = 8  # images of the tiny encoder's per-patch loop comparison
    loop_big_variant: str = ''  # a big encoder for the same comparison ('' = none)
    loop_big_batch: int = 1  # its images per step
    loop_big_grid: int = 0  # its reduced R x R grid (0 = native)
    pil_imagenet_images: int = 0  # images of 36 80x80 RGB patches for the PIL augmentation comparison (0 = none)
    negatives: List[str] = field(default_factory=lambda: ['fmnist_tiny preset'])  # cases of NEGATIVES


@dataclass
class BenchConfig:
    """One run of the suite. Its presets are the machine kinds (--device cpu | cuda), plus --smoke on top."""
    # ---- run ----
    device: Literal['cpu', 'cuda'] = 'cpu'  # machine kind; picks the preset
    smoke: bool = False  # tiny model only, few repeats (< 30 s): a schema check for the tests, not a measurement
    out: str = ''  # folder for <name>.json and <name>.md ('' = a new runs/benchmarks/<name>-<UTC time>/)
    update_results: bool = False  # write into benchmarks/results/ instead: the committed tables the docs quote
    name: str = ''  # file name stem ('' = the device, '<device>_smoke' in smoke runs)
    variants: List[str] = field(default_factory=list)  # subset of the registered variants ([] = those in order)
    order: List[str] = field(default_factory=list)  # variants and the phases BASELINES, PROFILE, COMPILE, in order
    # ---- cases ----
    batch: Dict[str, int] = field(default_factory=dict)  # images per step, per variant (--batch.VARIANT N)
    grid: Dict[str, int] = field(default_factory=dict)  # reduced R x R grid per variant (0 or absent = native)
    infer_modes: List[str] = field(default_factory=lambda: ['base'])  # 'base' or '+'-joined cl, ckpt, bf16, compile
    train_modes: List[str] = field(default_factory=lambda: ['base'])  # as infer_modes, for the training step
    variant_infer_modes: Dict[str, List[str]] = field(default_factory=dict)  # per-variant infer_modes
    variant_train_modes: Dict[str, List[str]] = field(default_factory=dict)  # per-variant train_modes
    compile_variants: List[str] = field(default_factory=list)  # variants also timed with torch.compile, last
    compile_infer_mode: str = 'compile'  # the inference mode of those rows
    compile_train_mode: str = 'compile'  # the training mode of those rows
    profile: ProfileCase = field(default_factory=ProfileCase)  # the profiled training step
    baselines: BaselineCases = field(default_factory=BaselineCases)  # the naive baselines
    skip_baselines: bool = False  # leave the baselines out
    skip_profile: bool = False  # leave the profile out
    # ---- timing ----
    threads: int = 1  # torch threads
    extra_threads: int = 0  # also time the first variant's first row at this many threads (0 = no)
    min_run_time: float = 1.0  # seconds per measurement (torch.utils.benchmark blocked_autorange)
    repeats: int = 1  # timed calls for steps slower than a third of min_run_time
    time_budget: float = 660.0  # seconds; work not started by then is skipped and recorded as skipped
    compile_min_left: float = 60.0  # seconds of the budget a torch.compile row needs left to start
    flops_from: str = ''  # reuse FLOP counts of an earlier results JSON ('' = on CUDA, results/cpu.json if present)


# Per machine kind: batch (and on the CPU a reduced grid) per variant, modes, order of the work.
PRESETS: Dict[str, Dict] = {
    'cpu': dict(
        # 1 thread: on a shared 2-core machine under load, 2 OpenMP threads ran ~5x slower than 1 (their barriers
        # wait for a descheduled thread); extra_threads re-times one row at 2 threads to show it.
        threads=1, extra_threads=2, compile_min_left=60.0, min_run_time=1.0, repeats=1, time_budget=660.0,
        batch={'cpcv2_resnet161': 1, 'cpcv2_resnet50': 1, 'cpcv1_resnet101': 1, 'cpcv2_resnet_small': 4,
               'cpcv2_resnet_tiny': 16},
        grid={'cpcv2_resnet161': 2, 'cpcv2_resnet50': 3, 'cpcv1_resnet101': 3},
        variant_infer_modes={'cpcv2_resnet161': ['base'], 'cpcv2_resnet50': ['base', 'cl'],
                             'cpcv1_resnet101': ['base']},
        variant_train_modes={'cpcv2_resnet161': ['base', 'ckpt'], 'cpcv2_resnet50': ['base', 'ckpt', 'cl'],
                             'cpcv1_resnet101': ['base', 'ckpt']},
        order=['cpcv2_resnet_tiny', 'cpcv2_resnet_small', 'BASELINES', 'PROFILE', 'cpcv2_resnet50',
               'cpcv2_resnet161', 'cpcv1_resnet101', 'COMPILE'],
        infer_modes=['base', 'cl'], train_modes=['base', 'ckpt', 'cl'],
        compile_variants=['cpcv2_resnet_tiny'], compile_infer_mode='compile', compile_train_mode='compile',
        profile=dict(variant='cpcv2_resnet_tiny', batch=16, mode='cl'),  # cpc-train's default: channels_last
        baselines=dict(loop_tiny_batch=8, loop_big_variant='cpcv2_resnet50', loop_big_batch=1, loop_big_grid=3,
                       pil_imagenet_images=4, negatives=['fmnist_tiny preset', 'ImageNet, 64 img/GPU']),
    ),
    'cuda': dict(
        threads=8, extra_threads=0, compile_min_left=150.0, min_run_time=1.5, repeats=3, time_budget=420.0,
        batch={'cpcv2_resnet161': 32, 'cpcv2_resnet50': 64, 'cpcv1_resnet101': 64, 'cpcv2_resnet_small': 128,
               'cpcv2_resnet_tiny': 256},
        order=['cpcv2_resnet161', 'cpcv2_resnet50', 'BASELINES', 'PROFILE', 'cpcv1_resnet101',
               'cpcv2_resnet_small', 'cpcv2_resnet_tiny', 'COMPILE'],
        infer_modes=['base', 'cl', 'bf16', 'bf16+cl'],
        train_modes=['bf16+cl', 'bf16+cl+ckpt', 'base', 'ckpt', 'cl', 'bf16'],
        compile_variants=['cpcv2_resnet161', 'cpcv2_resnet50'], compile_infer_mode='bf16+cl+compile',
        compile_train_mode='bf16+cl+compile',
        profile=dict(variant='cpcv2_resnet161', batch=32, mode='bf16+cl'),
        baselines=dict(loop_tiny_batch=32, loop_big_variant='cpcv2_resnet50', loop_big_batch=4, loop_big_grid=0,
                       pil_imagenet_images=16, negatives=['fmnist_tiny preset', 'ImageNet, 64 img/GPU']),
    ),
}
SMOKE = dict(
    min_run_time=0.05, repeats=1, time_budget=25.0, extra_threads=0, compile_min_left=0.0,
    order=['cpcv2_resnet_tiny', 'BASELINES', 'PROFILE'],
    infer_modes=['base', 'cl'], train_modes=['base', 'ckpt'], compile_variants=[],
    profile=dict(variant='cpcv2_resnet_tiny', batch=2, mode='base'),
    baselines=dict(loop_tiny_batch=1, loop_big_variant='', pil_imagenet_images=0, negatives=['fmnist_tiny, 2 img']),
)


def parse_config(argv=None) -> BenchConfig:
    """Defaults, the device's preset (and SMOKE with --smoke), then the command line (cpc_models.config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    kind = C.parse_args(BenchConfig(), [a for a in argv if a not in ('-h', '--help')], prog=PROG)
    base = C.apply(BenchConfig(), PRESETS[kind.device])
    if kind.smoke:
        # only the tiny model: its batch alone, no reduced grids or per-variant modes
        base = dataclasses.replace(C.apply(base, SMOKE), batch={'cpcv2_resnet_tiny': 2}, grid={},
                                   variant_infer_modes={}, variant_train_modes={})
    cfg = C.parse_args(base, argv, prog=PROG, description=__doc__.splitlines()[0])
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        C.fail(PROG, f'--variants: unknown {sorted(unknown)}; choose from {", ".join(VARIANTS)}')
    for mode in [*cfg.infer_modes, *cfg.train_modes, cfg.profile.mode, *sum(cfg.variant_infer_modes.values(), []),
                 *sum(cfg.variant_train_modes.values(), [])]:
        try:
            parse_mode(mode)
        except ValueError as e:
            C.fail(PROG, str(e))
    for key, low, low_open in (('threads', 1, False), ('extra_threads', 0, False), ('min_run_time', 0, True),
                               ('repeats', 1, False), ('time_budget', 0, True), ('compile_min_left', 0, False)):
        try:
            C.check_range(cfg, key, low, low_open=low_open)
        except C.ConfigError as e:
            C.fail(PROG, str(e))
    bad = {k: v for d in (cfg.batch, cfg.grid) for k, v in d.items() if v < (1 if d is cfg.batch else 0)}
    if bad:
        C.fail(PROG, f'--batch.VARIANT must be >= 1 and --grid.VARIANT >= 0, got {bad}')
    try:
        check_device(cfg.device)
    except C.ConfigError as e:
        C.fail(PROG, str(e))
    if cfg.update_results and cfg.out:
        C.fail(PROG, '--update-results writes benchmarks/results/; leave out --out (or drop --update-results)')
    chosen = cfg.variants or [v for v in cfg.order if v in VARIANTS]
    variants = [v for v in cfg.order if v in chosen] + [v for v in chosen if v not in cfg.order]
    missing = [v for v in variants if v not in cfg.batch]
    if missing:
        C.fail(PROG, f'no batch size for {missing}; give --batch.VARIANT N')
    name = cfg.name or (f'{cfg.device}_smoke' if cfg.smoke else cfg.device)
    fresh = RUNS / f'{name}-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}'
    out = cfg.out or str(RESULTS if cfg.update_results else fresh)
    return dataclasses.replace(cfg, variants=variants, compile_variants=[v for v in cfg.compile_variants
                                                                         if v in variants], name=name, out=out)


def peak_flops(device: torch.device, threads: int, smoke: bool) -> Dict:
    """Measured dense matmul rate (fp32 on the CPU, bf16 on CUDA) on random data, and the reference peak."""
    if device.type == 'cuda':
        n, dtype = (1024 if smoke else 8192), torch.bfloat16
    else:
        n, dtype = (256 if smoke else 2048), torch.float32
    measured = matmul_rate(device, dtype, n, threads, min_run_time=0.2 if smoke else 2.0)
    out = dict(matmul=f'{n}x{n}x{n} {str(dtype).split(".")[-1]}', measured_flops=measured,
               load_avg=os.getloadavg()[0])
    if device.type == 'cuda':  # the datasheet's dense bf16 peak (H100 SXM and H200 alike; benchmarks.roofline.PEAKS)
        gpu = 'H200' if 'H200' in torch.cuda.get_device_name(device) else 'H100 SXM'
        out.update(reference_flops=PEAKS[gpu]['bf16_tflops'] * 1e12,
                   reference=f"datasheet dense bf16 peak of an {gpu} ({PEAKS[gpu]['bf16_tflops']} TFLOP/s, "
                             f"{PEAKS[gpu]['source'].split(' ')[0]}; measured matmul given beside it)")
    else:
        out.update(reference_flops=measured, reference=f'measured fp32 matmul ({out["matmul"]}, {threads} threads)')
    return out


class Context(NamedTuple):
    """What every measurement of a run shares (benchmarks/baselines.py takes it too)."""
    device: torch.device
    threads: int
    min_run_time: float
    repeats: int


class Suite:
    def __init__(self, cfg: BenchConfig, command: str = ''):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + cfg.time_budget
        self.out = Path(cfg.out)
        self.ctx = Context(self.device, cfg.threads, cfg.min_run_time, cfg.repeats)
        self.doc = dict(schema=SCHEMA, device=cfg.device, smoke=cfg.smoke, command=command,
                        machine=machine_info(self.device, cfg.threads), config=C.to_dict(cfg),
                        peak={}, flops=[], results=[], baselines=[], profile=None, skipped=[], errors=[])

    def log(self, msg: str) -> None:
        print(f'[{time.monotonic() - self.t0:6.1f}s] {msg}', flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.doc['elapsed_s'] = time.monotonic() - self.t0
        self.doc['load_average_at_end'] = list(os.getloadavg())
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(self.out / f'{self.cfg.name}.json', json.dumps(self.doc, indent=2, default=str) + '\n')
        write_text(self.out / f'{self.cfg.name}.md', render_markdown(self.doc))

    # ---------------------------------------------------------------- phases
    def run(self) -> Dict:
        torch.set_num_threads(self.cfg.threads)
        self.log(f'peak: timing a large matmul on {self.device}')
        self.doc['peak'] = peak_flops(self.device, self.cfg.threads, self.cfg.smoke)
        self.log(f"  {self.doc['peak']['matmul']}: {self.doc['peak']['measured_flops'] / 1e12:.3f} TFLOP/s")
        self.count_all_flops()
        self.save()
        for item in self.cfg.order:
            if item == 'BASELINES' and not self.cfg.skip_baselines:
                self.baselines()
            elif item == 'PROFILE' and not self.cfg.skip_profile:
                self.profile()
            elif item == 'COMPILE':
                for v in self.cfg.compile_variants:
                    self.variant(v, [], [], compile_phase=True)
            elif item in self.cfg.variants:
                self.variant(item, self.cfg.variant_infer_modes.get(item, self.cfg.infer_modes),
                             self.cfg.variant_train_modes.get(item, self.cfg.train_modes),
                             extra_threads=self.cfg.extra_threads if item == self.cfg.variants[0] else None)
            self.save()
        for v in self.cfg.variants:  # variants named on the command line but absent from the order
            if v not in self.cfg.order:
                self.variant(v, self.cfg.infer_modes, self.cfg.train_modes)
        if self.device.type == 'cpu' and not self.cfg.smoke:
            # The shared CPU's matmul rate drifts with the load: the peak is the faster of the two measurements.
            pk = self.doc['peak']
            pk['measured_flops_at_end'] = peak_flops(self.device, self.cfg.threads, False)['measured_flops']
            pk['reference_flops'] = max(pk['measured_flops'], pk['measured_flops_at_end'])
            pk['reference'] = (f"faster of two measured fp32 matmuls ({pk['matmul']}, {self.cfg.threads} "
                               f"thread(s)), at the start and at the end of the run")
            for r in self.doc['results']:
                r['mfu'] = r['achieved_flops'] / pk['reference_flops']
        self.save()
        self.log(f'wrote {self.out / self.cfg.name}.json and .md')
        return self.doc

    def _earlier_flops(self) -> List[Dict]:
        path = self.cfg.flops_from
        if not path and self.device.type == 'cuda' and not self.cfg.smoke:
            path = RESULTS / 'cpu.json'
        if not path or not Path(path).is_file():
            return []
        earlier = json.loads(Path(path).read_text()).get('flops', [])
        self.log(f'FLOP counts: reusing {len(earlier)} from {path} where the shapes match')
        return earlier

    def count_all_flops(self) -> None:
        ref = PRESETS['cuda']['batch']  # FLOPs per image are reported at the CUDA batch, on the native grid
        earlier = self._earlier_flops()
        for v in self.cfg.variants:
            t = time.monotonic()
            ref_batch = self.cfg.batch[v] if self.cfg.smoke else ref[v]
            shapes = sorted({(ref_batch, 0), (self.cfg.batch[v], self.cfg.grid.get(v) or 0)})
            found = {(f['batch'], f['grid_arg']): f for f in earlier if f['variant'] == v}
            if all(k in found for k in shapes):
                for k in shapes:
                    self.doc['flops'].append(dict(found[k], reference=k == (ref_batch, 0), source=str(
                        self.cfg.flops_from or RESULTS / 'cpu.json')))
                continue
            counts = count_flops(v, shapes)
            with torch.device('meta'):
                params = sum(p.numel() for p in timm.create_model(v, num_classes=0).parameters())
            for (batch, grid), c in sorted(counts.items()):
                self.doc['flops'].append(dict(variant=v, params=params, grid_arg=grid, native=grid == 0,
                                              reference=(batch, grid) == (ref_batch, 0), source='counted', **c))
            nat = counts[(ref_batch, 0)]  # noqa
            self.log(f"flops {v}: {nat['fwd_flops_per_image'] / 1e9:.2f} GFLOP/img inference, "
                     f"{nat['train_flops_per_image'] / 1e9:.2f} GFLOP/img training ({time.monotonic() - t:.1f}s)")

    def _flops(self, variant: str, batch: int, grid: int) -> Dict:
        return next(f for f in self.doc['flops'] if f['variant'] == variant and f['batch'] == batch
                    and f['grid_arg'] == (grid or 0))

    def variant(self, v: str, infer_modes, train_modes, compile_phase: bool = False,
                extra_threads: Optional[int] = None) -> None:
        batch, grid = self.cfg.batch[v], self.cfg.grid.get(v)
        tasks = [('inference', m) for m in infer_modes] + [('train', m) for m in train_modes]
        if compile_phase:
            tasks = [('train', self.cfg.compile_train_mode), ('inference', self.cfg.compile_infer_mode)]
        tasks.sort(key=lambda t: 'compile' in parse_mode(t[1]))  # compiling is one-way: those rows last
        tasks = [(k, m, self.cfg.threads) for k, m in tasks if not ('bf16' in parse_mode(m) and self.device.type != 'cuda')]
        if extra_threads and tasks and extra_threads != self.cfg.threads:
            tasks.insert(1, (tasks[0][0], tasks[0][1], extra_threads))  # the same row at another thread count
        if self.left() <= 0:
            for kind, mode, _ in tasks:
                self.doc['skipped'].append(dict(variant=v, kind=kind, mode=mode, why='time budget spent'))
            self.log(f'skipped {v}: time budget spent')
            return
        self.log(f'{v}: building (batch {batch}, grid {grid or "native"})')
        try:
            s = build_setup(v, self.device, batch, grid)
        except Exception as e:  # noqa: BLE001
            self._error(v, 'build', '', e)
            return
        native = geometry(v)
        for kind, mode, threads in tasks:
            if self.left() <= 0 or ('compile' in mode and self.left() < self.cfg.compile_min_left):
                why = 'time budget spent' if self.left() <= 0 else \
                    f'less than {self.cfg.compile_min_left:.0f} s of the time budget left for compiling'
                self.doc['skipped'].append(dict(variant=v, kind=kind, mode=mode, why=why))
                self.log(f'  skipped {kind} {mode}: {why}')
                continue
            flags = parse_mode(mode)
            try:
                apply_mode(s, flags)
                fn = make_train_step(s)[0] if kind == 'train' else make_inference(s)
                torch.set_num_threads(threads)
                m = measure(fn, self.device, threads, self.cfg.min_run_time, self.cfg.repeats,
                            label=f'{v} {kind} {mode}', warmup=2 if 'compile' in flags else 1)
            except Exception as e:  # noqa: BLE001  (OOM, compile failure: recorded, the suite goes on)
                self._error(v, kind, mode, e)
                if self.device.type == 'cuda':
                    torch.cuda.empty_cache()
                continue
            finally:
                apply_mode(s, frozenset())
                torch.set_num_threads(self.cfg.threads)
            f = self._flops(v, batch, grid or 0)
            step_flops = f['train_flops'] if kind == 'train' else f['fwd_flops']
            ppi = s.patches_per_image
            ips = batch / m['median_s']
            row = dict(variant=v, kind=kind, mode=mode, flags=sorted(flags), threads=threads, batch=batch, rows=s.geo['rows'],
                       cols=s.geo['cols'], img_size=s.geo['img_size'], patch=s.geo['patch'],
                       reduced=s.geo['reduced'], patches_per_image=ppi, images_per_s=ips,
                       patches_per_s=ips * ppi,
                       images_per_s_native_est=ips * ppi / (native['rows'] * native['cols']),
                       flops_per_step=step_flops, achieved_flops=step_flops / m['median_s'],
                       mfu=step_flops / m['median_s'] / self.doc['peak']['reference_flops'],
                       compile_s=m['first_call_s'] if 'compile' in flags else None, **m)
            self.doc['results'].append(row)
            self.log(f"  {kind:9s} {mode:16s} {threads}t {m['median_s'] * 1e3:9.1f} ms  {ips:9.2f} img/s  "
                     f"MFU {row['mfu'] * 100:5.1f}%  peak {m['peak_mem_mb']:8.0f} MB  "
                     f"load {m['load_before']:.1f}->{m['load_after']:.1f}")
            self.save()
        del s

    def _error(self, v, kind, mode, e) -> None:
        msg = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
        self.doc['errors'].append(dict(variant=v, kind=kind, mode=mode, error=msg,
                                       traceback=traceback.format_exc()[-2000:]))
        self.log(f'  {kind} {mode}: ERROR {msg}')

    def baselines(self) -> None:
        self.log('baselines')
        b = self.cfg.baselines
        ctx = self.ctx
        plan = []
        if 'cpcv2_resnet_tiny' in VARIANTS:
            plan.append(lambda: B.encoder_loop('cpcv2_resnet_tiny', b.loop_tiny_batch, None, False, ctx))
            if not self.cfg.smoke:
                plan.append(lambda: B.encoder_loop('cpcv2_resnet_tiny', b.loop_tiny_batch, None, True, ctx))
        if b.loop_big_variant:
            plan.append(lambda: B.encoder_loop(b.loop_big_variant, b.loop_big_batch, b.loop_big_grid or None, False,
                                               ctx))
        plan.append(lambda: B.augmentation(64 if not self.cfg.smoke else 2, 36, 1, 8, PatchAugmentConfig(jitter=1),
                                           ctx))
        if b.pil_imagenet_images:
            plan.append(lambda: B.augmentation(b.pil_imagenet_images, 36, 3, 80, PatchAugmentConfig(), ctx))
        for label in b.negatives:
            bs, r, c, d, offs = NEGATIVES[label]
            plan.append(lambda label=label, bs=bs, r=r, c=c, d=d, offs=offs:
                        B.negatives(label, bs, r, c, d, offs, 64, 16, ctx))
        self.doc['baselines'] = B.run_all(plan, ctx, self.deadline, self.log)

    def profile(self) -> None:
        p = self.cfg.profile
        if self.left() <= 0 or p.variant not in VARIANTS:
            self.doc['skipped'].append(dict(variant=p.variant, kind='profile', mode=p.mode, why='time budget spent'))
            return
        self.log(f"profile: one {p.variant} training step, batch {p.batch}, mode {p.mode}")
        try:
            s = build_setup(p.variant, self.device, p.batch, self.cfg.grid.get(p.variant))
            flags = frozenset(f for f in parse_mode(p.mode) if not (f == 'bf16' and self.device.type != 'cuda'))
            apply_mode(s, flags)
            res = profile_train_step(s)
        except Exception as e:  # noqa: BLE001
            self._error(p.variant, 'profile', p.mode, e)
            return
        res.update(variant=p.variant, batch=p.batch, mode=p.mode, load_avg=os.getloadavg()[0])
        self.doc['profile'] = res
        for r in res['buckets']:
            self.log(f"  {r['bucket']:48s} fwd {r['forward_ms']:8.1f} ms  bwd {r['backward_ms']:8.1f} ms  "
                     f"{r['share'] * 100:5.1f}%")


# -------------------------------------------------------------------- markdown
def _fmt_flops(x) -> str:
    return f'{x / 1e9:,.2f}' if x < 1e12 else f'{x / 1e12:,.2f} T'


def render_markdown(doc: Dict) -> str:
    m, st, pk = doc['machine'], doc['config'], doc['peak'] or {}
    dev = doc['device']
    lines = [f"# cpc-models benchmarks: {dev}{' (smoke run, not a measurement)' if doc['smoke'] else ''}", '',
             f"Command: `{doc['command']}` (elapsed {doc.get('elapsed_s', 0):.0f} s).", '']
    hw = f"CPU {m['cpu']} ({m['logical_cores']} logical cores), {m.get('mem_total_gb') or 0:.0f} GiB RAM"
    if dev == 'cuda':
        hw = (f"GPU {m.get('gpu')} ({m.get('gpu_mem_gb', 0):.0f} GiB, {m.get('gpu_sms')} SMs, driver "
              f"{m.get('driver')}, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')}); host " + hw)
    la0, la1 = m['load_average_at_start'], doc.get('load_average_at_end') or [float('nan')] * 3
    lines += [f"Machine: {hw}; torch {m['torch']}, torchvision {m['torchvision']}, timm {m['timm']}, "
              f"Python {m['python']}; {st['threads']} torch threads.", '',
              f"Load average (1/5/15 min) at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, at end "
              f"{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}; each row gives the 1-min load before -> after its "
              f"measurement. A load above the core count means the cores were shared with other processes and "
              f"every time here is inflated by that contention.", '']
    if pk:
        ref = pk['reference_flops'] / 1e12
        lines += [f"Peak for MFU: {pk['reference']} = {ref:.3f} TFLOP/s (matmul {pk['matmul']} measured at "
                  f"{pk['measured_flops'] / 1e12:.3f} TFLOP/s"
                  + (f" at the start, {pk['measured_flops_at_end'] / 1e12:.3f} at the end"
                     if pk.get('measured_flops_at_end') else '')
                  + '). MFU = FLOPs of the step (torch.utils.flop_counter: convolutions and matrix products, '
                  '2 per multiply-add, forward + backward without the recomputation of gradient checkpointing) / '
                  'median step time / peak.', '']
    lines += ['Timing: torch.utils.benchmark, median; synthetic uint8 images already on the device (no data '
              'loading or JPEG decoding). Training step = patchify + PatchAugment (the preset\'s config) + '
              'normalize + encoder + CPCObjective (the preset\'s) + backward + grad clip + AdamW, as '
              'cpc_models/train.py. Peak memory: ' + ('CUDA max_memory_allocated.' if dev == 'cuda' else
              'the process\'s peak RSS (VmHWM, reset per row via /proc/self/clear_refs), with the RSS before '
              'the row in brackets.'), '']
    if doc['flops']:
        lines += ['## FLOPs per image (native grid, at the CUDA benchmark batch; objective cost grows with the '
                  'batch)', '', '| variant | params | image px | grid | patches/img | batch | GFLOP/img inference '
                  '| GFLOP/img training (fwd+bwd) |', '|---|---:|---:|---|---:|---:|---:|---:|']
        for f in doc['flops']:
            if f.get('reference'):
                lines.append(f"| {f['variant']} | {f['params'] / 1e6:.1f}M | {f['img_size']} | {f['rows']}x{f['cols']} "
                             f"| {f['rows'] * f['cols']} | {f['batch']} | {f['fwd_flops_per_image'] / 1e9:,.2f} | "
                             f"{f['train_flops_per_image'] / 1e9:,.2f} |")
        lines.append('')
    if doc['results']:
        lines += ['## Throughput', '', 'Reduced rows (R) run a smaller grid of the same patches; "img/s native '
                  '(est.)" = measured patches/s / native patches per image.', '',
                  '| variant | step | mode | batch x grid (px) | ms/step (IQR, runs) | img/s | img/s native (est.) | '
                  'TFLOP/s | MFU | peak mem MB | load before->after |',
                  '|---|---|---|---|---:|---:|---:|---:|---:|---:|---|']
        for r in doc['results']:
            mem = f"{r['peak_mem_mb']:,.0f}" + (f" ({r['mem_before_mb']:,.0f})" if dev == 'cpu' else '')
            comp = f", compile+1st {r['compile_s']:.0f}s" if r.get('compile_s') else ''
            if r.get('threads') != st['threads']:
                comp += f", {r['threads']} threads"
            lines.append(
                f"| {r['variant']} | {r['kind']} | {r['mode']}{comp} | {r['batch']} x {r['rows']}x{r['cols']} "
                f"({r['img_size']}){' R' if r['reduced'] else ''} | {r['median_s'] * 1e3:,.1f} "
                f"({r['iqr_s'] * 1e3:,.1f}, {r['runs']}) | {r['images_per_s']:,.2f} | {r['images_per_s_native_est']:,.2f} | "
                f"{r['achieved_flops'] / 1e12:.3f} | {r['mfu'] * 100:.1f}% | {mem} | "
                f"{r['load_before']:.1f}->{r['load_after']:.1f} |")
        lines.append('')
    if doc['baselines']:
        lines += ['## Naive baselines, same run', '', '"time / ours": the row\'s time over the batched (ours) row of '
                  'its case; above 1 = ours is faster.', '',
                  '| comparison | case | method | ms | items/s | time / ours | load |', '|---|---|---|---:|---:|---:|---|']
        for r in doc['baselines']:
            ratio = f"{r['ours_speedup_vs_this']:.1f}x" if r['naive'] else '(ours)'
            lines.append(f"| {r['group']} | {r['case']} | {r['method']} | {r['median_s'] * 1e3:,.1f} | "
                         f"{r['items_per_s']:,.0f} {r['unit']} | {ratio} | {r['load_before']:.1f}->"
                         f"{r['load_after']:.1f} |")
        lines.append('')
    p = doc.get('profile')
    if p:
        lines += [f"## Where a training step's time goes ({p['variant']}, batch {p['batch']}, mode {p['mode']}; "
                  f"torch.profiler, {p['time_kind']}, total {p['total_ms']:.1f} ms, load {p['load_avg']:.1f})", '',
                  '| bucket | forward ms | backward ms | share |', '|---|---:|---:|---:|']
        for r in p['buckets']:
            lines.append(f"| {r['bucket']} | {r['forward_ms']:.1f} | {r['backward_ms']:.1f} | "
                         f"{r['share'] * 100:.1f}% |")
        lines.append('')
    if doc['skipped'] or doc['errors']:
        lines += ['## Not measured', '']
        lines += [f"- skipped {s['variant']} {s['kind']} {s['mode']}: {s['why']}" for s in doc['skipped']]
        lines += [f"- error {e['variant']} {e['kind']} {e['mode']}: {e['error']}" for e in doc['errors']]
        lines.append('')
    return '\n'.join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    warnings.filterwarnings('ignore', message='CPCObjective got a batch of ONE image')
    print(f'{PROG}: writing {Path(cfg.out) / cfg.name}.json and .md (rewritten after every row)', flush=True)
    Suite(cfg, 'PYTHONPATH=. python -m benchmarks.run ' + ' '.join(argv)).run()
    return 0


if __name__ == '__main__':
    sys.exit(main())
