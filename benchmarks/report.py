"""The speed tables of README.md and docs/benchmarks.md, generated from the committed result files.

    PYTHONPATH=. python -m benchmarks.report            # rewrite the generated blocks after a new measurement
    PYTHONPATH=. python -m benchmarks.report --check    # exit 1 if a block differs from its result files

Each block sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``; everything in it
comes from ``benchmarks/results/*.json`` (benchmarks.compare, benchmarks.peer, benchmarks.layout,
benchmarks.ceiling), so no speed number in the docs is typed by hand. tests/test_benchmarks.py runs the check.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

from benchmarks import ceiling, compare, layout, peer, roofline
from cpc_models.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'benchmarks' / 'results'
COMPARE = RESULTS / 'compare_a58a1bb_cpu.json'
COMPARE_BF16 = RESULTS / 'compare_a58a1bb_cpu_bf16.json'  # the same with cpc-train --bf16-cpu (opt-in)
PEER = RESULTS / 'peer_cpu.json'
LAYOUT = RESULTS / 'layout_cpu.json'
RUN = RESULTS / 'cpu.json'
CEILING = RESULTS / 'ceiling_cpu.json'  # benchmarks.ceiling: the step against the matmul rate
CUDA_RUN = RESULTS / 'cuda.json'
ROOFLINE = RESULTS / 'roofline.json'  # benchmarks.roofline: R-161, batch 32, against 062290c
ROOFLINE_R50 = RESULTS / 'roofline_r50.json'
IMAGENET_IMAGES = 1_281_167


def _load(path: Path) -> Dict:
    return json.loads(path.read_text())


def _measured(doc: Dict) -> str:
    m = doc['machine']
    load = m['load_average_at_start'][0]
    return (f"{m['cpu']}, {m['logical_cores']} cores, 1-min load {load:.1f} at the start, "
            f"{doc.get('elapsed_s', 0) / 60:.0f} min")


def speed_summary() -> str:
    """README: the step against the baseline revision and the matched peer configuration."""
    cmp_doc, peer_doc = _load(COMPARE), _load(PEER)
    lines = [f"`fmnist_tiny` pretraining step (cpc-train, batch {cmp_doc['batch']}) against commit "
             f"`{cmp_doc['config']['against']}`, same run, alternating rounds "
             f"(`{cmp_doc['command']}`; {_measured(cmp_doc)}; "
             f"[{COMPARE.with_suffix('.md').relative_to(ROOT)}]({COMPARE.with_suffix('.md').relative_to(ROOT)})):",
             '', *compare.timing_table(cmp_doc), '']
    if cmp_doc.get('loss'):
        lines += [compare.loss_line(cmp_doc), '']
    lines += [f"Matched lightning-bolts-like configuration, same process (`{peer_doc['command']}`; "
              f"{_measured(peer_doc)}; [{PEER.with_suffix('.md').relative_to(ROOT)}]"
              f"({PEER.with_suffix('.md').relative_to(ROOT)})):", '', *peer.results_table(peer_doc)]
    return '\n'.join(lines)


def _fmt(ratio: Dict) -> str:
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def targets_table() -> str:
    """The targets of the speed work, each with its same-run result; PASS/MISS as the result files say."""
    cmp_doc, peer_doc = _load(COMPARE), _load(PEER)
    lines = ['| target | torch threads | result: speed-up median (min-max) | CPU-time ratio | verdict |',
             '|---|---:|---|---|---|']
    docs = [(cmp_doc, '')] + ([(_load(COMPARE_BF16), ', with `--bf16-cpu` (opt-in)')] if COMPARE_BF16.is_file() else [])
    for doc, how in docs:
        for t in doc['timing']:
            lines.append(f"| `fmnist_tiny` pretraining step{how} >= {t['target']:g}x the images/s of "
                         f"`{doc['config']['against']}` | {t['threads']} | {_fmt(t['ratio'])} | "
                         f"{_fmt(t['cpu_ratio'])} | **{'PASS' if t['passed'] else 'MISS'}** |")
        loss = doc.get('loss')
        if loss:
            lines.append(f"| the same loss curve{how} over {loss['steps']} steps (relative tolerance "
                         f"{loss['rtol']:g}) | 1 | largest relative difference {loss['max_rel_diff']:.1e} (the baseline "
                         f"vs itself with `{' '.join(loss.get('reference_args', []))}`: "
                         f"{loss.get('reference_max_rel_diff', 0):.1e}) | | **{'PASS' if loss['passed'] else 'MISS'}** |")
    for r in peer_doc['rows']:
        if 'target' in r:
            lines.append(f"| {peer.PART_TEXT[r['part']]} >= {r['target']:g}x {r['against']} | {r['threads']} | "
                         f"{_fmt(r['ratio'])} | {_fmt(r['cpu_ratio'])} | **{'PASS' if r['passed'] else 'MISS'}** |")
    if CEILING.is_file():
        doc = _load(CEILING)
        md = CEILING.with_suffix('.md').relative_to(ROOT)
        lines += ['', f"How far the step is from this machine's arithmetic (`{doc['command']}`; {_measured(doc)}; "
                      f"[{md}](../{md})): its convolutions and matrix products (FLOPs by dtype) against the {doc['config']['peak_n']}"
                      f"^3 matmul rate measured in the same run. \"Kernels only\": the step if everything else "
                      "took no time; \"at the matmul rate\": every FLOP at that rate and nothing else. Speed-ups "
                      "over the baseline use the median ratios of the table above (another run).", '',
                  *ceiling.results_table(doc)]
    return '\n'.join(lines)


def layout_table() -> str:
    """docs/benchmarks.md: the measurements behind runtime.py's CPU defaults."""
    doc = _load(LAYOUT)
    return '\n'.join([f"`{doc['command']}` ({_measured(doc)}; {doc['config']['variant']}, training batch "
                      f"{doc['config']['train_batch']}, inference batch {doc['config']['infer_batch']}; speed-up over "
                      f"contiguous eager, median of alternating rounds):", '', *layout.results_table(doc)])


def run_summary() -> str:
    """README: benchmarks.run on the CPU and on CUDA, FLOPs and the naive baselines of the same run, every method
    of a case beside ours (including those faster than ours)."""
    lines = []
    for path in (RUN, CUDA_RUN):
        doc = _load(path)
        m = doc['machine']
        where = (f"{m.get('gpu', m.get('cpu'))}" if doc['device'] == 'cuda' else f"{m['cpu']}, {m['threads']} thread")
        lines += [f"`{doc['command']}` ({where}; 1-min load {m['load_average_at_start'][0]:.1f} at the start; "
                  f"[{path.with_suffix('.md').relative_to(ROOT)}]({path.with_suffix('.md').relative_to(ROOT)})):", '',
                  '| case | method | ms | time / ours |', '|---|---|---:|---:|']
        by_case: Dict[str, List[Dict]] = {}
        for b in doc['baselines']:
            by_case.setdefault(b['case'], []).append(b)
        for case, rows in by_case.items():
            ours = next(r for r in rows if not r['naive'])
            for r in rows:
                ratio = '(ours)' if r is ours else f"{r['median_s'] / ours['median_s']:.2f}x"
                lines.append(f"| {case} | {r['method']} | {1000 * r['median_s']:,.1f} | {ratio} |")
        lines.append('')
    return '\n'.join(lines).rstrip()


def roofline_summary() -> str:
    """docs/benchmarks.md: the roofline of the R-161 step and the GPU-hours of the ImageNet presets at its bounds."""
    from cpc_models.train import PRESETS
    doc = _load(ROOFLINE)
    lines = [roofline.markdown(doc).rstrip(), '',
             f"GPU-hours of the ImageNet presets **at these bounds** (not measurements: a step can only be slower), "
             f"{IMAGENET_IMAGES:,} images per epoch, batch 32 per GPU, no checkpointing, perfect scaling over 8 GPUs "
             f"(`{ROOFLINE_R50.relative_to(ROOT)}`: `{_load(ROOFLINE_R50)['command']}`):", '',
             '| preset | model | GPU | kernels | img/s per GPU (bound) | GPU-hours (bound) | wall-clock on 8 GPUs '
             '(bound) |', '|---|---|---|---|---:|---:|---:|']
    for preset, path in (('imagenet_r161', ROOFLINE), ('imagenet_r50', ROOFLINE_R50)):
        d = _load(path)
        epochs = PRESETS[preset]['epochs']
        for gpu in roofline.PEAKS:
            for r in d['counts']:
                if r['checkpointing']:
                    continue
                img_s = r['batch'] / r['bounds'][gpu]['step_ms'] * 1e3
                hours = epochs * IMAGENET_IMAGES / img_s / 3600
                lines.append(f"| `{preset}` ({epochs} epochs) | `{d['model']}` | {gpu} | {r['norm']} | {img_s:,.0f} | "
                             f"{hours:,.0f} | {hours / 8:,.0f} h ({hours / 8 / 24:.1f} days) |")
    return '\n'.join(lines)


BLOCKS: Dict[str, Callable[[], str]] = {'speed': speed_summary, 'targets': targets_table, 'layout': layout_table,
                                        'run': run_summary, 'roofline': roofline_summary}
FILES = {'README.md': ['speed', 'run'], 'docs/benchmarks.md': ['speed', 'targets', 'layout', 'roofline']}


def render(text: str, names: List[str]) -> str:
    """``text`` with each named generated block replaced by its current rendering."""
    for name in names:
        pattern = re.compile(rf'(<!-- BEGIN generated: {name} -->\n)(?:.*?\n)?(<!-- END generated: {name} -->)', re.S)
        if not pattern.search(text):
            raise ValueError(f'no generated block "{name}" (<!-- BEGIN generated: {name} --> ... <!-- END '
                             f'generated: {name} -->)')
        body = BLOCKS[name]()
        text = pattern.sub(lambda m: m.group(1) + body + '\n' + m.group(2), text)
    return text


def stale() -> List[str]:
    """The files whose generated blocks differ from the result files."""
    return [f for f, names in FILES.items() if render((ROOT / f).read_text(), names) != (ROOT / f).read_text()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.report', description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='only check; exit 1 if a block is out of date')
    args = parser.parse_args(argv)
    out_of_date = stale()
    if args.check:
        for f in out_of_date:
            print(f'{f}: generated speed tables differ from benchmarks/results; run python -m benchmarks.report',
                  file=sys.stderr)
        return 1 if out_of_date else 0
    for f in out_of_date:
        write_text(ROOT / f, render((ROOT / f).read_text(), FILES[f]))
        print(f'updated {f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
