"""Same-run speed comparison of cpc-train against a baseline revision: alternating rounds, ratios, spread and load.

    PYTHONPATH=. python -m benchmarks.compare --against a58a1bb           # writes results/compare_a58a1bb_cpu.*
    PYTHONPATH=. python -m benchmarks.compare --against self --base-args=--channels-last,off --loss-steps 0

The baseline is checked out in a temporary git worktree (``--against self``: this tree again, e.g. to time one switch
with ``--base-args``); "ours" is this working tree as it is (or, with ``--ours REV``, another revision: the two
commits around one change time that change alone). Both run their own ``cpc_models.train.main`` (what
``cpc-train`` runs) on the same Fashion-MNIST IDX files, each run in a fresh process (benchmarks/compare_worker.py),
which records when every optimizer step ends: a step's time is everything one cpc-train step of that tree costs
(data, augmentation, forward, backward, optimizer, logging), whatever its internals, so revisions from before
``train_step`` existed are timed the same way. Per torch thread count, ``--rounds`` rounds each run both trees
(``--warmup`` untimed steps, then ``--steps`` timed ones); which tree goes first alternates. Each round gives the
ratio of the median step times (baseline / ours = our images/s over theirs); the table has the median ratio over the
rounds with its spread (min-max, quartiles), the ratio of process CPU time (less sensitive to other jobs), and the
1-min load average around every run. Then both trees train ``--loss-steps`` steps from the same seed and their loss
curves are compared (and the baseline's against itself with ``--reference-args``, the float noise of a layout
change), so a faster tree that computes something else shows up.
"""
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

from benchmarks.common import cpu_model, markdown_header, save_results, spread
from cpc_models import config as C
from cpc_models.data import fashion_mnist_dir
from cpc_models.train import build_config

SCHEMA = 'cpc-models-compare/1'
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'
WORKER = Path(__file__).resolve().parent / 'compare_worker.py'
PROG = 'python -m benchmarks.compare'


@dataclass
class CompareConfig:
    """One comparison of this tree's cpc-train step with a baseline's."""
    # ---- trees ----
    against: str = 'a58a1bb'  # the baseline: a git revision (a temporary worktree), or 'self' (this tree)
    ours: str = ''  # our side: '' = this working tree as it is, or a git revision (to time one past change)
    base_args: List[str] = field(default_factory=list)  # extra cpc-train options of the baseline (--base-args=--a,1)
    ours_args: List[str] = field(default_factory=list)  # extra cpc-train options of this tree
    # ---- the step ----
    preset: str = 'fmnist_tiny'  # the cpc-train preset both run
    device: str = 'cpu'  # --device of both runs
    data_dir: str = ''  # Fashion-MNIST IDX folder ('' = the installed one, else synthetic images of that format)
    # ---- timing ----
    threads: List[int] = field(default_factory=lambda: [1, 2])  # torch threads; each count has its own rounds
    rounds: int = 6  # rounds per thread count; each runs both trees, the first one alternating
    warmup: int = 3  # untimed steps at the start of every run
    steps: int = 8  # timed steps per run
    target: float = 0.0  # the speed-up to report PASS/MISS against (0 = none)
    # ---- loss curves ----
    loss_steps: int = 50  # steps of the loss-curve check (1 thread; 0 = skip)
    loss_rtol: float = 1e-3  # largest relative difference of a step's loss that passes
    reference_args: List[str] = field(default_factory=lambda: ['--channels-last', 'off'])  # the baseline again
    # ---- output ----
    out: str = str(RESULTS)  # folder for <name>.json and <name>.md
    name: str = ''  # file stem ('' = compare_<against>_<device>)


# ------------------------------------------------------------------ trees and runs
def _git(*args, cwd=ROOT) -> str:
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def describe_tree(root: Path, rev: Optional[str] = None) -> Dict:
    """The commit of a tree (and whether this working tree has uncommitted changes)."""
    commit = _git('rev-parse', f'{rev or "HEAD"}^{{commit}}', cwd=root)
    subject = _git('log', '-1', '--format=%s', commit, cwd=root)
    if rev is not None:
        return dict(rev=rev, commit=commit, subject=subject, dirty=False)
    return dict(rev='working tree', commit=commit, subject=subject,
                dirty=bool(_git('status', '--porcelain', '--untracked-files=no', cwd=root)))


@contextlib.contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """A side's source tree: a temporary detached worktree of ``rev`` (removed afterwards), or this one ('self' or
    '')."""
    if rev in ('self', ''):
        yield ROOT
        return
    tmp = Path(tempfile.mkdtemp(prefix='cpc-compare-'))
    tree = tmp / 'tree'
    _git('worktree', 'add', '--detach', str(tree), rev)
    try:
        yield tree
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def write_synthetic_fashion_mnist(folder: Path, n: int = 2048, seed: int = 0) -> Path:
    """Random 28x28 uint8 images and labels in Fashion-MNIST's IDX files (for machines without the data set)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    (folder / 'train-images-idx3-ubyte').write_bytes(
        bytes([0, 0, 8, 3]) + np.array([n, 28, 28], '>i4').tobytes() + images.tobytes())
    (folder / 'train-labels-idx1-ubyte').write_bytes(bytes([0, 0, 8, 1]) + np.array([n], '>i4').tobytes()
                                                     + labels.tobytes())
    return folder


def run_tree(tree: Path, argv: List[str], threads: int, work: Path) -> Dict:
    """One cpc-train run of ``tree`` in a fresh process (compare_worker.py); its result with the step marks."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / 'result.json'
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads), PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, str(WORKER), '--root', str(tree), '--threads', str(threads),
                           '--out', str(out), '--', *argv], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f'cpc-train of {tree} {" ".join(argv)} failed (exit {proc.returncode}):\n'
                           f'{proc.stderr[-3000:]}')
    return json.loads(out.read_text())


def step_times(result: Dict, warmup: int) -> Dict[str, List[float]]:
    """Wall and CPU seconds of the steps after the first ``warmup`` (differences of consecutive step marks)."""
    marks = result['marks']
    wall = [b[0] - a[0] for a, b in zip(marks[warmup - 1:], marks[warmup:])] if warmup >= 1 else []
    cpu = [b[1] - a[1] for a, b in zip(marks[warmup - 1:], marks[warmup:])] if warmup >= 1 else []
    return dict(wall=wall, cpu=cpu)


# ------------------------------------------------------------------ the comparison
class Comparison:
    def __init__(self, cfg: CompareConfig, command: str):
        self.cfg = cfg
        self.t0 = time.monotonic()
        self.out = Path(cfg.out)
        self.name = cfg.name or f'compare_{cfg.against}_{cfg.device}'
        batch = build_config(['--preset', cfg.preset, *cfg.ours_args]).batch_size
        self.doc = dict(schema=SCHEMA, command=command, config=C.to_dict(cfg), batch=batch,
                        machine=dict(cpu=cpu_model(), logical_cores=os.cpu_count(), python=sys.version.split()[0],
                                     load_average_at_start=list(os.getloadavg())),
                        ours=describe_tree(ROOT, cfg.ours) if cfg.ours else describe_tree(ROOT), base=None,
                        data=None, timing=[], loss=None)

    def log(self, msg: str) -> None:
        print(f'[{time.monotonic() - self.t0:6.0f}s] {msg}', flush=True)

    def save(self) -> None:
        save_results(self.doc, self.out, self.name, render_markdown, self.t0)

    def argv(self, data_dir: Path, steps: int, run_dir: Path, extra: List[str]) -> List[str]:
        return ['--preset', self.cfg.preset, '--data-dir', str(data_dir), '--device', self.cfg.device,
                '--max-steps', str(steps), '--out-dir', str(run_dir), '--resume', 'none', '--progress', 'false',
                '--save-every', '1000000000', *extra]

    def run(self) -> Dict:
        cfg = self.cfg
        with tempfile.TemporaryDirectory(prefix='cpc-compare-runs-') as tmp, source_tree(cfg.against) as base, \
                source_tree(cfg.ours) as ours:
            tmp = Path(tmp)
            self.doc['base'] = dict(describe_tree(ROOT) if cfg.against == 'self' else describe_tree(ROOT, cfg.against),
                                    tree=str(base))
            data_dir = self.data(tmp)
            self.doc['ours']['tree'] = str(ours)
            sides = {'base': (base, cfg.base_args), 'ours': (ours, cfg.ours_args)}
            for threads in cfg.threads:
                self.timing(sides, threads, data_dir, tmp)
            if cfg.loss_steps:
                self.loss_curves(sides, data_dir, tmp)
        self.save()
        return self.doc

    def data(self, tmp: Path) -> Path:
        if self.cfg.data_dir:
            folder, kind = Path(self.cfg.data_dir), 'given'
        else:
            try:
                folder, kind = fashion_mnist_dir(None), 'Fashion-MNIST train'
            except FileNotFoundError:
                folder, kind = write_synthetic_fashion_mnist(tmp / 'synthetic'), 'synthetic (random images)'
        self.doc['data'] = dict(folder=str(folder), kind=kind)
        self.log(f'data: {kind} ({folder})')
        return folder

    def timing(self, sides, threads: int, data_dir: Path, tmp: Path) -> None:
        cfg = self.cfg
        rounds = []
        entry = dict(threads=threads, rounds=rounds)
        self.doc['timing'].append(entry)
        for r in range(cfg.rounds):
            order = ('base', 'ours') if r % 2 == 0 else ('ours', 'base')
            row = dict(order=list(order))
            for side in order:
                tree, extra = sides[side]
                work = tmp / f't{threads}_r{r}_{side}'
                res = run_tree(tree, self.argv(data_dir, cfg.warmup + cfg.steps, work / 'run', extra), threads, work)
                times = step_times(res, cfg.warmup)
                row[side] = dict(wall_s=times['wall'], cpu_s=times['cpu'], median_wall_s=statistics.median(
                    times['wall']), median_cpu_s=statistics.median(times['cpu']), load_before=res['load_before'][0],
                    load_after=res['load_after'][0], printed=res['printed'])
            row['ratio'] = row['base']['median_wall_s'] / row['ours']['median_wall_s']
            row['cpu_ratio'] = row['base']['median_cpu_s'] / row['ours']['median_cpu_s']
            rounds.append(row)
            self.log(f"{threads} thread(s), round {r + 1}/{cfg.rounds}: base {row['base']['median_wall_s'] * 1e3:.0f} "
                     f"ms, ours {row['ours']['median_wall_s'] * 1e3:.0f} ms per step -> {row['ratio']:.2f}x "
                     f"(CPU time {row['cpu_ratio']:.2f}x); load {row['base']['load_before']:.1f}")
            entry.update(summarize(rounds, self.doc['batch'], cfg.target))
            self.save()

    def loss_curves(self, sides, data_dir: Path, tmp: Path) -> None:
        cfg = self.cfg
        curves = {}
        runs = [('base', *sides['base']), ('ours', *sides['ours'])]
        if cfg.reference_args:
            runs.append(('base_reference', sides['base'][0], [*sides['base'][1], *cfg.reference_args]))
        for name, tree, extra in runs:
            work = tmp / f'loss_{name}'
            self.log(f'loss curve: {name}, {cfg.loss_steps} steps')
            run_tree(tree, self.argv(data_dir, cfg.loss_steps, work / 'run', [*extra, '--log-every', '1']), 1, work)
            lines = [json.loads(x) for x in (work / 'run' / 'metrics.jsonl').read_text().splitlines()]
            curves[name] = [x['loss'] for x in lines]
        base, ours = np.array(curves['base']), np.array(curves['ours'])
        rel = np.abs(ours - base) / np.abs(base)
        over = rel > cfg.loss_rtol
        loss = dict(steps=cfg.loss_steps, rtol=cfg.loss_rtol, curves=curves,
                    max_abs_diff=float(np.abs(ours - base).max()), max_rel_diff=float(rel.max()),
                    first_step_over=int(np.argmax(over)) + 1 if over.any() else None,
                    passed=bool(len(ours) == len(base) and not over.any()))
        if 'base_reference' in curves:
            ref = np.array(curves['base_reference'])
            loss.update(reference_args=cfg.reference_args,
                        reference_max_rel_diff=float((np.abs(ref - base) / np.abs(base)).max()))
        self.doc['loss'] = loss
        self.log(f"loss curves over {cfg.loss_steps} steps: max relative difference {loss['max_rel_diff']:.2e} "
                 f"({'PASS' if loss['passed'] else 'MISS'} at rtol {cfg.loss_rtol:g})")


def summarize(rounds: List[Dict], batch: int, target: float) -> Dict:
    ratios = [r['ratio'] for r in rounds]
    out = dict(ratio=spread(ratios), cpu_ratio=spread([r['cpu_ratio'] for r in rounds]),
               base_images_per_s=batch / statistics.median(r['base']['median_wall_s'] for r in rounds),
               ours_images_per_s=batch / statistics.median(r['ours']['median_wall_s'] for r in rounds),
               load=spread([r[s]['load_before'] for r in rounds for s in ('base', 'ours')]))
    if target:
        out['target'] = target
        out['passed'] = out['ratio']['median'] >= target
    return out


# ------------------------------------------------------------------ markdown
def _side(d: Dict, args: List[str]) -> str:
    dirty = ' + uncommitted changes' if d.get('dirty') else ''
    extra = f" with `{' '.join(args)}`" if args else ''
    return f"`{d['rev']}` ({d['commit'][:10]}{dirty}){extra}"


def timing_table(doc: Dict) -> List[str]:
    lines = ['| torch threads | rounds | baseline img/s | ours img/s | speed-up: median (min-max; quartiles) | '
             'CPU-time ratio: median (min-max) | 1-min load: median (min-max) |' + (
                 ' target |' if any(t.get('target') for t in doc['timing']) else ''),
             '|---:|---:|---:|---:|---|---|---|' + ('---|' if any(t.get('target') for t in doc['timing']) else '')]
    for t in doc['timing']:
        if not t.get('rounds'):
            continue
        r, c, ld = t['ratio'], t['cpu_ratio'], t['load']
        row = (f"| {t['threads']} | {r['n']} | {t['base_images_per_s']:.1f} | {t['ours_images_per_s']:.1f} | "
               f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f}; {r['q1']:.2f}-{r['q3']:.2f}) | "
               f"{c['median']:.2f}x ({c['min']:.2f}-{c['max']:.2f}) | {ld['median']:.1f} ({ld['min']:.1f}-"
               f"{ld['max']:.1f}) |")
        if t.get('target'):
            row += f" >= {t['target']:g}x: **{'PASS' if t['passed'] else 'MISS'}** |"
        lines.append(row)
    return lines


def loss_line(doc: Dict) -> str:
    loss = doc.get('loss')
    if not loss:
        return ''
    ref = ''
    if 'reference_max_rel_diff' in loss:
        ref = (f"; the baseline against itself with `{' '.join(loss['reference_args'])}`: "
               f"{loss['reference_max_rel_diff']:.1e}")
    return (f"Loss curves over {loss['steps']} steps from the same seed: largest relative difference "
            f"{loss['max_rel_diff']:.1e} (absolute {loss['max_abs_diff']:.1e}), "
            f"**{'PASS' if loss['passed'] else 'MISS'}** at rtol {loss['rtol']:g}{ref}.")


def render_markdown(doc: Dict) -> str:
    cfg = doc['config']
    ours = f"`{cfg['ours']}`" if cfg.get('ours') else 'this tree'
    lines = markdown_header(doc, f"cpc-train step: {ours} vs `{cfg['against']}`") + [
             f"Baseline: {_side(doc['base'] or dict(rev=cfg['against'], commit='?'), cfg['base_args'])}; "
             f"ours: {_side(doc['ours'], cfg['ours_args'])}. Preset `{cfg['preset']}` (batch {doc['batch']}) on "
             f"{cfg['device']}, data: {(doc.get('data') or {}).get('kind', '?')}.", '',
             f"Each round runs both trees in fresh processes ({cfg['warmup']} untimed + {cfg['steps']} timed steps "
             f"each, first tree alternating); speed-up = baseline's median step time / ours (= our images/s over "
             f"theirs) per round, then the median over rounds. CPU-time ratio: the same with process CPU time, less "
             f"sensitive to other jobs on the cores.", '']
    lines += timing_table(doc) + ['']
    if doc.get('loss'):
        lines += [loss_line(doc), '']
    printed = {s: r[s]['printed'] for t in doc['timing'] for r in t['rounds'][:1] for s in ('base', 'ours')}
    for side, text in printed.items():
        if text:
            lines.append(f"{side} printed: `{' / '.join(text)}`")
    return '\n'.join(lines) + '\n'


def parse_config(argv=None) -> CompareConfig:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = C.parse_args(CompareConfig(), argv, prog=PROG, description=__doc__.splitlines()[0])
    if cfg.rounds < 1 or cfg.steps < 1 or cfg.warmup < 1:
        C.fail(PROG, '--rounds, --steps and --warmup must be at least 1')
    return cfg


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(argv)
    Comparison(cfg, f'{PROG} ' + ' '.join(argv)).run()
    return 0


if __name__ == '__main__':
    sys.exit(main())
