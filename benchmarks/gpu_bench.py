"""The one device call of docs/benchmarks.md: the training step of this tree against a base revision, each change on
and off, MFU, img/s, peak memory, the largest batch that fits 80 GB, and the top kernels; ``benchmarks/gpu_run.sh``
runs it.

    PYTHONPATH=. python -m benchmarks.gpu_bench --base runs/gpu_base --out $OUT      # on the GPU, ~7 min
    PYTHONPATH=. python -m benchmarks.gpu_bench --dry --base self --out /tmp/g       # the same code on the CPU, tiny

Both trees run in this one process: the base revision's ``cpc_models`` (a copy made by ``gpu_run.sh --prepare``
with ``git archive``, carried to the device as an ignored folder) is imported as ``cpc_models_base``, and timm's
registry entries of the encoders are switched to the tree whose model is being built. Both models stay resident and
are timed in alternating rounds (the order reversed every other round): a ratio from one run, on one GPU.

Rows, in this order (a row starts only while the time budget lasts; the rest is listed as skipped), each written to
``cuda.json`` and ``cuda.md`` as soon as it is measured:

1. the bf16 matmul rate (8192^3), the measured peak beside the datasheet's (benchmarks.roofline.PEAKS);
2. ResNet-161 and ResNet-50 training steps (cpc-train's ``train_step`` with the preset, bf16 + channels_last, batch
   32): ours against the base, alternating; MFU = model FLOPs (convolutions and matrix products of the step,
   torch.utils.flop_counter) / step time / peak, against both peaks;
3. each change on and off, ours, alternating with ours as it is: the fused norm-act (+ residual add, one cast of the
   weights; off is the eager path, as with ``CPC_FUSED_NORM=0``), ``cudnn.benchmark``, gradient checkpointing, the objective's logits in
   bf16 (``logits_dtype``; off is the default fp32);
4. the top 15 CUDA kernels of one ResNet-161 step by time (torch.profiler), ours;
5. the largest ResNet-161 batch whose step fits 80 GB (``set_per_process_memory_fraction``), with and without
   checkpointing, ours;
6. inference (``forward_features``) in bf16 against fp32, channels_last, ResNet-161 and ResNet-50, ours.
"""
import argparse
import contextlib
import importlib.util
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.common import machine_info, matmul_rate
from benchmarks.roofline import PEAKS
from cpc_models.atomic import write_text

SCHEMA = 'cpc-models-gpu-bench/1'
PRESET_OF = {'cpcv2_resnet161': 'imagenet_r161', 'cpcv2_resnet50': 'imagenet_r50', 'cpcv2_resnet_tiny': 'fmnist_tiny',
             'cpcv2_resnet_small': 'stl10_small'}
MEMORY_CAP = 80e9  # the H100's memory: "fits 80 GB"


# ---------------------------------------------------------------- the two trees

def load_base(path: str):
    """The base tree's ``cpc_models`` as the package ``cpc_models_base`` (its imports are relative); ``self``: ours."""
    import cpc_models
    import cpc_models.config
    import cpc_models.train  # noqa: F401
    if path == 'self':
        return cpc_models
    init = Path(path) / 'cpc_models' / '__init__.py'
    if not init.is_file():
        raise SystemExit(f'gpu_bench: error: --base {path} holds no cpc_models/__init__.py; make it with '
                         f'"bash benchmarks/gpu_run.sh --prepare" (git archive of the base revision) or pass --base self')
    from timm.models import _registry
    ours = dict(_registry._model_entrypoints)
    spec = importlib.util.spec_from_file_location('cpc_models_base', init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules['cpc_models_base'] = module
    with warnings.catch_warnings():  # timm warns that the base's encoders overwrite ours: put back below
        warnings.simplefilter('ignore')
        spec.loader.exec_module(module)
        import cpc_models_base.config
        import cpc_models_base.train  # noqa: F401  (registers the base's encoders, over ours)
    module._entrypoints = {k: v for k, v in _registry._model_entrypoints.items() if v is not ours.get(k)}
    _registry._model_entrypoints.update(ours)  # ours again by default
    return module


@contextlib.contextmanager
def registry(pkg):
    """timm.create_model builds ``pkg``'s encoders within the block."""
    from timm.models import _registry
    theirs = getattr(pkg, '_entrypoints', None)
    if not theirs:
        yield
        return
    saved = {k: _registry._model_entrypoints.get(k) for k in theirs}
    _registry._model_entrypoints.update(theirs)
    try:
        yield
    finally:
        _registry._model_entrypoints.update(saved)


class Case:
    """One tree's training step of a variant at a batch, on synthetic uint8 images already on the device."""

    def __init__(self, pkg, variant: str, batch: int, device: torch.device, ckpt: bool = False, img: int = 0):
        train = pkg.train
        self.pkg, self.variant, self.batch, self.device = pkg, variant, batch, device
        cfg = train.preset_config(PRESET_OF[variant])
        changes = dict(model=variant, channels_last=True, bf16=True, compile=False, grad_checkpointing=ckpt)
        if device.type == 'cpu':
            changes.update(bf16_cpu=True)
        if img:
            changes.update(image_size=img)
        cfg = pkg.config.apply(cfg, changes)
        torch.manual_seed(0)
        with registry(pkg):
            self.model = train.build_model(cfg, device)
        self.cfg = cfg
        self.optimizer = train.build_optimizer(cfg, self.model)
        self.setup = train.build_step_setup(cfg, self.model.encoder, device)
        data_cfg = __import__('timm').data.resolve_model_data_config(self.model.encoder)
        side = cfg.image_size or data_cfg['input_size'][-1]
        g = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randint(0, 256, (batch, data_cfg['input_size'][0], side, side), generator=g,
                                    device=device, dtype=torch.uint8)
        self.lr = train.lr_at(0, cfg, 1)

    def step(self):
        return self.pkg.train.train_step(self.model, self.images, self.optimizer, self.setup, self.lr)

    def free(self):
        del self.model, self.optimizer, self.setup, self.images


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(fn: Callable, device: torch.device, n: int) -> float:
    """Seconds per call over ``n`` calls, synchronized at both ends (the step itself never waits)."""
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def peak_gb(device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == 'cuda' else None


def reset_peak(device):
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def model_flops(case: Case) -> int:
    """Convolution and matrix-product FLOPs of one training step (torch.utils.flop_counter; no recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        case.step()
    return fc.get_total_flops()


@contextlib.contextmanager
def switch(name: str, on: bool, case: Optional[Case] = None):
    """One change of this work, set to ``on`` within the block (ours only)."""
    if name == 'fused_norm':  # off: the eager F.layer_norm path (CPC_FUSED_NORM=0); on: the device's choice
        from cpc_models import fused_norm
        with fused_norm.forced(None if on else False):
            yield
    elif name == 'cudnn_benchmark':
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = on
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = before
    elif name == 'bf16_logits':
        obj = case.model.objective
        before = obj.logits_dtype
        obj.logits_dtype = torch.bfloat16 if on else torch.float32
        try:
            yield
        finally:
            obj.logits_dtype = before
    elif name == 'checkpointing':
        case.model.encoder.set_grad_checkpointing(on)
        try:
            yield
        finally:
            case.model.encoder.set_grad_checkpointing(False)
    else:
        raise ValueError(name)


def alternate(sides: Dict[str, Callable[[], contextlib.AbstractContextManager]], step_of: Dict[str, Callable],
              device, rounds: int, warmup: int, n: int) -> Dict[str, Dict]:
    """Per side: seconds per step in each round (order reversed every other round) and the peak memory."""
    out = {k: dict(times=[], peak_gb=None) for k in sides}
    for k in sides:  # warm-up (cuDNN's autotuning, Triton's compilation, the optimizer's state)
        with sides[k]():
            for _ in range(warmup):
                step_of[k]()
    names = list(sides)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            with sides[k]():
                reset_peak(device)
                out[k]['times'].append(time_steps(step_of[k], device, n))
                peak = peak_gb(device)
                out[k]['peak_gb'] = max(out[k]['peak_gb'] or 0, peak) if peak is not None else None
    return out


def median(xs: List[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


# ---------------------------------------------------------------- the run

class Run:
    def __init__(self, args):
        self.a = args
        self.device = torch.device('cpu' if args.dry else 'cuda')
        self.t0 = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        gpu = 'dry run (CPU)'
        if self.device.type == 'cuda':
            gpu = torch.cuda.get_device_name(self.device)
        self.gpu_key = 'H200' if 'H200' in gpu else 'H100 SXM'
        self.doc = dict(schema=SCHEMA, command='python -m benchmarks.gpu_bench ' + ' '.join(args.argv),
                        dry=args.dry, base=args.base, base_rev=args.base_rev, gpu=gpu,
                        machine=machine_info(self.device, torch.get_num_threads()),
                        peak=dict(datasheet_tflops=PEAKS[self.gpu_key]['bf16_tflops'],
                                  datasheet_source=PEAKS[self.gpu_key]['source'], measured_tflops=None),
                        rows=[], skipped=[], errors=[], started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))
        self.flops: Dict[tuple, int] = {}

    def left(self) -> float:
        return self.a.time_budget - (time.time() - self.t0)

    def log(self, msg: str):
        print(f'[{time.time() - self.t0:6.1f}s] {msg}', flush=True)

    def save(self):
        self.doc['seconds'] = time.time() - self.t0
        write_text(self.out / 'cuda.json', json.dumps(self.doc, indent=1, default=str) + '\n')
        write_text(self.out / 'cuda.md', markdown(self.doc))

    def row(self, **row):
        self.doc['rows'].append(row)
        self.save()
        self.log(json.dumps(row, default=str)[:300])

    def work(self, name: str, need_s: float, fn: Callable[[], None]):
        """Run one work item if ``need_s`` seconds are left; failures (OOM included) are recorded, not fatal."""
        if self.left() < need_s:
            self.doc['skipped'].append(dict(work=name, left_s=round(self.left()), needed_s=need_s))
            self.save()
            self.log(f'skipped {name}: {self.left():.0f} s left, needs {need_s:.0f}')
            return
        self.log(f'start {name}')
        try:
            fn()
        except Exception as e:  # an OOM or a failure of one tree must not lose the rows before it
            self.doc['errors'].append(dict(work=name, error=f'{type(e).__name__}: {str(e)[:500]}',
                                           trace=traceback.format_exc()[-2000:]))
            self.save()
            self.log(f'error in {name}: {type(e).__name__}: {str(e)[:200]}')
        finally:
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()

    def mfu(self, variant: str, batch: int, seconds: float) -> Dict:
        flops = self.flops.get((variant, batch))
        if not flops:
            return {}
        rate = flops / seconds
        out = dict(model_gflop=flops / 1e9, tflops=rate / 1e12, mfu_datasheet=rate / (self.doc['peak']['datasheet_tflops'] * 1e12))
        if self.doc['peak']['measured_tflops']:
            out['mfu_measured_matmul'] = rate / (self.doc['peak']['measured_tflops'] * 1e12)
        return out

    # -- 1
    def matmul(self):
        n = self.a.matmul_n
        rate = matmul_rate(self.device, torch.bfloat16, n, torch.get_num_threads(), 0.5 if not self.a.dry else 0.05)
        self.doc['peak']['measured_tflops'] = rate / 1e12
        self.row(kind='matmul', what=f'{n}^3 bf16 matmul', tflops=rate / 1e12,
                 share_of_datasheet=rate / 1e12 / self.doc['peak']['datasheet_tflops'])

    # -- 2
    def versus_base(self, variant: str):
        """Ours and the base at the run's batch, both resident; on an out-of-memory error the batch is halved
        (down to a quarter) and the row says so."""
        batch = self.a.batch
        while True:
            try:
                return self._versus_base(variant, batch)
            except torch.cuda.OutOfMemoryError as e:
                self.doc['errors'].append(dict(work=f'{variant}: ours vs base at batch {batch}',
                                               error=f'OutOfMemoryError: {str(e)[:300]}'))
                self.cases.pop(variant, None)
                torch.cuda.empty_cache()
                if batch <= self.a.batch // 4:
                    raise
                batch //= 2
                self.log(f'out of memory: {variant} ours vs base again at batch {batch}')

    def _versus_base(self, variant: str, batch: int):
        ours = theirs = None
        try:
            ours = Case(self.ours, variant, batch, self.device, img=self.a.img)
            self.flops.setdefault((variant, batch), model_flops(ours))
            theirs = Case(self.base, variant, batch, self.device, img=self.a.img)
            null = contextlib.nullcontext
            res = alternate({'base': null, 'ours': null}, {'base': theirs.step, 'ours': ours.step}, self.device,
                            self.a.rounds, self.a.warmup, self.a.steps)
        except BaseException:
            for c in (ours, theirs):
                if c is not None:
                    c.free()
            raise
        for side in ('base', 'ours'):
            t = median(res[side]['times'])
            self.row(kind='train', variant=variant, side=side, batch=batch, ms=t * 1e3,
                     ms_rounds=[x * 1e3 for x in res[side]['times']], img_s=batch / t, peak_gb=res[side]['peak_gb'],
                     **self.mfu(variant, batch, t))
        ratios = [b / o for b, o in zip(res['base']['times'], res['ours']['times'])]
        self.row(kind='speedup', variant=variant, batch=batch, speedup=median(ratios), rounds=ratios)
        theirs.free()
        self.cases[variant] = ours

    # -- 3
    def toggles(self, variant: str):
        case = self.cases.get(variant)
        if case is None:
            self.work(f'{variant}: build', 10, lambda: self.cases.update(
                {variant: Case(self.ours, variant, self.a.batch, self.device, img=self.a.img)}))
            case = self.cases.get(variant)
        if case is None:
            return
        for change in ('fused_norm', 'cudnn_benchmark', 'checkpointing', 'bf16_logits'):
            def run(change=change):
                res = alternate({'on': lambda: switch(change, True, case), 'off': lambda: switch(change, False, case)},
                                {'on': case.step, 'off': case.step}, self.device, self.a.rounds, self.a.warmup,
                                self.a.steps)
                row = dict(kind='change', variant=variant, change=change, batch=case.batch)
                for side in ('on', 'off'):
                    t = median(res[side]['times'])
                    row[side] = dict(ms=t * 1e3, img_s=case.batch / t, peak_gb=res[side]['peak_gb'],
                                     **self.mfu(variant, case.batch, t))
                row['off_over_on'] = median([b / a for a, b in zip(res['on']['times'], res['off']['times'])])
                self.row(**row)
            self.work(f'{variant}: {change} on/off', self.a.need_change, run)

    # -- 4
    def profile(self, variant: str):
        from torch.profiler import ProfilerActivity, profile
        case = self.cases.get(variant) or Case(self.ours, variant, self.a.batch, self.device, img=self.a.img)
        case.step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == 'cuda' else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                case.step()
            sync(self.device)
        attr = 'self_device_time_total' if self.device.type == 'cuda' else 'self_cpu_time_total'
        events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
        if self.device.type == 'cuda':  # kernels only: device time of ops with no CPU-side children
            events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
        total = sum(getattr(e, attr) for e in events) or 1
        top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:15]
        self.row(kind='profile', variant=variant, batch=case.batch, steps=2, total_ms=total / 1e3 / 2,
                 top=[dict(name=e.key[:120], calls=e.count // 2, ms_per_step=getattr(e, attr) / 1e3 / 2,
                           share=getattr(e, attr) / total) for e in top])

    # -- 5
    def max_batch(self, variant: str):
        if self.device.type == 'cuda':  # "fits 80 GB", also on a larger card; cuDNN's autotuning off for the search
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP / total), self.device)
        for ckpt in (False, True):
            def run(ckpt=ckpt):
                fits, fails, tried = 0, None, []
                b = self.a.batch
                while (fails is None or fails - fits > max(1, fits // 8)) and len(tried) < self.a.max_tries:
                    ok = self._fits(variant, b, ckpt)
                    tried.append(dict(batch=b, fits=ok))
                    if ok:
                        fits = b
                        b = b * 2 if fails is None else (b + fails) // 2
                    else:
                        fails = b
                        b = (fits + fails) // 2
                    if b <= fits or (fails is not None and b >= fails):
                        break
                self.row(kind='max_batch', variant=variant, checkpointing=ckpt, cap_gb=self.cap / 1e9,
                         largest_fitting=fits, smallest_failing=fails, tried=tried)
            self.work(f'{variant}: largest batch, checkpointing {ckpt}', self.a.need_batch, run)

    def _fits(self, variant: str, batch: int, ckpt: bool) -> bool:
        case = None
        try:
            case = Case(self.ours, variant, batch, self.device, ckpt=ckpt, img=self.a.img)
            with switch('cudnn_benchmark', False):  # no autotuning of every new shape: the search tries many
                case.step()
                case.step()
                sync(self.device)
            if self.device.type == 'cpu':  # dry run: no device memory to exhaust; a stand-in cap on the batch
                return batch <= self.a.dry_cap
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if case is not None:
                case.free()
            del case
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()

    # -- 6
    def inference(self, variant: str):
        case = self.cases.get(variant) or Case(self.ours, variant, self.a.batch, self.device, img=self.a.img)
        enc = case.model.encoder.eval()
        x = (case.images.float() / 255).contiguous(memory_format=torch.channels_last)
        kind = self.device.type

        def mode(bf16):
            @contextlib.contextmanager
            def ctx():
                with torch.inference_mode(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
                    yield
            return ctx
        fn = {'bf16': enc.forward_features, 'fp32': enc.forward_features}
        res = alternate({'bf16': mode(True), 'fp32': mode(False)}, {k: (lambda f=f: f(x)) for k, f in fn.items()},
                        self.device, self.a.rounds, self.a.warmup, self.a.steps)
        row = dict(kind='inference', variant=variant, batch=case.batch)
        for k in ('bf16', 'fp32'):
            t = median(res[k]['times'])
            row[k] = dict(ms=t * 1e3, img_s=case.batch / t)
        row['bf16_speedup'] = row['fp32']['ms'] / row['bf16']['ms']
        self.row(**row)
        enc.train()

    def main(self):
        self.base = load_base(self.a.base)
        import cpc_models
        self.ours = cpc_models
        self.cases: Dict[str, Case] = {}
        self.cap = MEMORY_CAP
        if self.device.type == 'cuda':
            torch.backends.cudnn.benchmark = True  # what cpc-train does on CUDA (runtime.tune_cudnn)
        self.save()
        r161, r50 = self.a.variants
        self.work('matmul peak', 5, self.matmul)
        self.work(f'{r161}: ours vs base', self.a.need_versus, lambda: self.versus_base(r161))
        self.work(f'{r50}: ours vs base', self.a.need_versus / 2, lambda: self.versus_base(r50))
        self.cases.pop(r50, None)
        self.toggles(r161)
        self.work(f'{r161}: top kernels', self.a.need_profile, lambda: self.profile(r161))
        self.cases.clear()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()
        self.max_batch(r161)
        self.work(f'{r161}: inference bf16 vs fp32', self.a.need_change, lambda: self.inference(r161))
        self.cases.clear()
        self.work(f'{r50}: inference bf16 vs fp32', self.a.need_change / 2, lambda: self.inference(r50))
        self.doc['finished'] = True
        self.save()
        self.log(f'done: {len(self.doc["rows"])} rows, {len(self.doc["skipped"])} skipped, '
                 f'{len(self.doc["errors"])} errors')
        return 0


# ---------------------------------------------------------------- Markdown

def _f(v, fmt='{:.1f}'):
    return '' if v is None else fmt.format(v)


def markdown(doc: Dict) -> str:
    pk = doc['peak']
    lines = [f"# CUDA training step: this tree against `{doc['base_rev'] or doc['base']}`", '',
             f"`{doc['command']}` on {doc['gpu']} (torch {doc['machine'].get('torch')}), started {doc['started']}, "
             f"{doc.get('seconds', 0):.0f} s" + (' (**dry run on the CPU: tiny models, not a measurement**)'
                                                  if doc['dry'] else '') + '.', '',
             f"Peaks: datasheet dense bf16 {pk['datasheet_tflops']} TFLOP/s ({pk['datasheet_source']}); measured "
             f"{_f(pk['measured_tflops'])} TFLOP/s (8192^3 bf16 matmul, same run).", '']
    rows = doc['rows']
    train = [r for r in rows if r['kind'] in ('train', 'speedup')]
    if train:
        lines += ['## Training step, ours against the base (alternating rounds)', '',
                  '| variant | side | batch | ms/step (median) | img/s | peak GB | MFU (datasheet) | MFU (measured '
                  'matmul) | speed-up over base |', '|---|---|---:|---:|---:|---:|---:|---:|---:|']
        for r in train:
            if r['kind'] == 'speedup':
                lines.append(f"| {r['variant']} | ours/base | {r['batch']} | | | | | | **{r['speedup']:.2f}x** |")
            else:
                lines.append(f"| {r['variant']} | {r['side']} | {r['batch']} | {r['ms']:.1f} | {r['img_s']:.1f} | "
                             f"{_f(r['peak_gb'])} | {_f(r.get('mfu_datasheet'), '{:.1%}')} | "
                             f"{_f(r.get('mfu_measured_matmul'), '{:.1%}')} | |")
        lines.append('')
    ch = [r for r in rows if r['kind'] == 'change']
    if ch:
        lines += ['## Each change on and off (ours)', '',
                  '| variant | change | on: ms / img/s / peak GB / MFU | off: ms / img/s / peak GB / MFU | off time '
                  '/ on time |', '|---|---|---|---|---:|']
        for r in ch:
            cells = [f"{r[s]['ms']:.1f} / {r[s]['img_s']:.1f} / {_f(r[s]['peak_gb'])} / "
                     f"{_f(r[s].get('mfu_datasheet'), '{:.1%}')}" for s in ('on', 'off')]
            lines.append(f"| {r['variant']} | {r['change']} | {cells[0]} | {cells[1]} | {r['off_over_on']:.2f}x |")
        lines.append('')
    for r in rows:
        if r['kind'] == 'matmul':
            lines += [f"Matmul: {r['what']} at {r['tflops']:.1f} TFLOP/s ({r['share_of_datasheet']:.0%} of the "
                      'datasheet).', '']
        if r['kind'] == 'max_batch':
            cap = 'a stand-in cap of the dry run' if doc['dry'] else f"{r['cap_gb']:.0f} GB"
            lines += [f"Largest `{r['variant']}` batch whose step fits {cap}, checkpointing "
                      f"{'on' if r['checkpointing'] else 'off'}: **{r['largest_fitting']}** (smallest failing: "
                      f"{r['smallest_failing']}; tried {', '.join(str(t['batch']) + ('' if t['fits'] else ' x') for t in r['tried'])}).", '']
        if r['kind'] == 'inference':
            lines += [f"Inference `{r['variant']}`, batch {r['batch']}, channels_last: bf16 {r['bf16']['ms']:.1f} ms, "
                      f"fp32 {r['fp32']['ms']:.1f} ms: bf16 **{r['bf16_speedup']:.2f}x** fp32.", '']
        if r['kind'] == 'profile':
            lines += [f"## Top kernels of one `{r['variant']}` step (ours, batch {r['batch']}, "
                      f"{r['total_ms']:.1f} ms of kernel time per step)", '',
                      '| kernel | calls/step | ms/step | share |', '|---|---:|---:|---:|']
            lines += [f"| `{t['name']}` | {t['calls']} | {t['ms_per_step']:.2f} | {t['share']:.1%} |" for t in r['top']]
            lines.append('')
    if doc['skipped']:
        lines += ['Skipped (time budget): ' + '; '.join(f"{s['work']} ({s['left_s']} s left)" for s in doc['skipped'])
                  + '.', '']
    if doc['errors']:
        lines += ['Errors: ' + '; '.join(f"{e['work']}: {e['error'][:200]}" for e in doc['errors']) + '.', '']
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--base', default='runs/gpu_base', help="folder holding the base revision's cpc_models, or self")
    p.add_argument('--base-rev', default='', help='the base revision (for the tables)')
    p.add_argument('--out', default='runs/benchmarks/cuda')
    p.add_argument('--dry', action='store_true', help='the whole run on the CPU with tiny models (not a measurement)')
    p.add_argument('--time-budget', type=float, default=400.0, help='seconds; work that would not fit is skipped')
    a = p.parse_args(argv)
    a.argv = argv
    if a.time_budget <= 0:
        print(f'gpu_bench: error: --time-budget must be positive, got {a.time_budget}', file=sys.stderr)
        return 2
    if not a.dry and not torch.cuda.is_available():
        print('gpu_bench: error: no CUDA device; run it on a GPU machine, or pass --dry for the CPU dry run',
              file=sys.stderr)
        return 2
    if a.dry:  # every code path, sizes a CPU does in about a minute
        a.variants, a.batch, a.img = ('cpcv2_resnet_tiny', 'cpcv2_resnet_tiny'), 2, 0
        a.rounds, a.warmup, a.steps, a.matmul_n, a.max_tries, a.dry_cap = 2, 1, 1, 256, 3, 4
        a.need_versus = a.need_change = a.need_profile = a.need_batch = 1
    else:
        a.variants, a.batch, a.img = ('cpcv2_resnet161', 'cpcv2_resnet50'), 32, 0
        a.rounds, a.warmup, a.steps, a.matmul_n, a.max_tries, a.dry_cap = 3, 3, 5, 8192, 6, 0
        # seconds a work item needs on an H100 (R-161 step ~0.2-0.6 s; builds, warm-up and cuDNN tuning included)
        a.need_versus, a.need_change, a.need_profile, a.need_batch = 90, 40, 25, 60
    return Run(a).main()


if __name__ == '__main__':
    sys.exit(main())
