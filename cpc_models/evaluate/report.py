"""Reporting a Figure-1 run: mean ± std per arm and fraction, the best CPC arm of each fraction (picked on the
selection half of val), the targets (PASS/MISS), the trained arms' epochs and compute, table.md, figure1.png, and the
same section for the README and the model card."""
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_file, write_text
from ..config import ConfigError

__all__ = ['summarize', 'pick_best_cpc', 'check_targets', 'format_table', 'format_training', 'format_cost',
           'plot_figure1', 'check_plotting', 'PLOT_EXTRA', 'format_section', 'write_report', 'write_results',
           'replace_section', 'BEST_CPC', 'amount_label', 'target_options', 'format_per_class']

BEST_CPC = 'best_cpc'  # the pseudo-arm: per fraction, the CPC arm with the best selection-half accuracy
BASELINE = 'supervised'
# Targets on test means. Feature quality at 1% of the labels: (arm, baseline arm, margin in points).
FEATURE_TARGETS = (('cpc_linear', 'pixels_linear', 3.0), ('cpc_linear', 'random_linear', 10.0),
                   ('cpc_grid_linear', 'pixels_linear', 8.0))
# The paper's claim at 2x fewer labels: best CPC at the first fraction >= the baseline at the second.
LABEL_EFFICIENCY = ((0.01, 0.02), (0.02, 0.04), (0.05, 0.1))
SAME_FRACTION_UP_TO = 0.2  # best CPC >= the baseline at every fraction up to this one
BASELINE_FLOOR = 0.91  # the baseline at 100% of the labels must reach this, or it is not converged
SECTION = ('<!-- figure1:begin (written by cpc-eval plot; edit outside) -->', '<!-- figure1:end -->')

Cell = Tuple[float, Optional[float], int]  # mean, std over seeds (None: deterministic, every seed is this run), n


def summarize(results: List[Dict], key: str = 'accuracy') -> Dict[str, Dict[float, Cell]]:
    """{arm: {fraction: (mean, std, n)}} of ``key`` over seeds (std ddof=1; 0 for one seed; None for a run marked
    deterministic, which stands for every seed)."""
    acc: Dict[str, Dict[float, List]] = {}
    for r in results:
        if r.get(key) is not None:
            acc.setdefault(r['arm'], {}).setdefault(float(r['fraction']), []).append(r)
    out = {}
    for a, d in acc.items():
        out[a] = {}
        for f, rs in sorted(d.items()):
            v = [r[key] for r in rs]
            std = None if all(r.get('deterministic') for r in rs) else (
                float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            out[a][f] = (float(np.mean(v)), std, len(v))
    return out


def pick_best_cpc(results: List[Dict], cpc_arms: Sequence[str]) -> Dict[float, str]:
    """{fraction: the CPC arm with the highest mean accuracy on the selection half of val} (never the eval split)."""
    sel = summarize([r for r in results if r['arm'] in cpc_arms], 'select_accuracy')
    fracs = sorted({f for d in sel.values() for f in d})
    return {f: max((a for a in sel if f in sel[a]), key=lambda a: sel[a][f][0]) for f in fracs}


def _with_best(summary: Dict, best: Dict[float, str]) -> Dict:
    """``summary`` plus the BEST_CPC pseudo-arm: each fraction's picked arm's cell."""
    cells = {f: summary[a][f] for f, a in best.items() if a in summary and f in summary[a]}
    return {**summary, BEST_CPC: cells} if cells else dict(summary)


def _pct(v: float) -> str:
    return f'{100 * v:.2f}'


def amount_label(f: float, shots: bool = False) -> str:
    """A label amount as a column title: '5/class' (shots per class) or '1%' (a fraction of the pool)."""
    return f'{int(f)}/class' if shots else f'{f:.0%}'


def target_options(payload: Dict) -> Dict:
    """check_targets' options of a results payload: Fashion-MNIST fractions get its own targets; any other source, or
    shots per class, the paper's 2x-fewer-labels claim at the amounts run."""
    cfg = payload.get('config', {})
    shots = bool(cfg.get('shots'))
    return dict(generic=shots or cfg.get('data', 'fashion-mnist') != 'fashion-mnist', shots=shots)


def _generic_targets(s: Dict, best: Dict, shots: bool, add, get, who) -> None:
    """The paper's claim (2-5x fewer labels than supervised for the same accuracy) at the amounts run: for every
    amount a, the best CPC arm at a >= the baseline at the smallest amount run that is >= 2a."""
    mine, base = sorted(s.get(BEST_CPC, {})), sorted(s.get(BASELINE, {}))
    for a in mine:
        b = next((x for x in base if x >= 2 * a - 1e-12), None)
        if b is None:
            continue
        ca, cb = get(BEST_CPC, a), get(BASELINE, b)
        add(f'best CPC@{amount_label(a, shots)} >= {BASELINE}@{amount_label(b, shots)} ({b / a:.3g}x the labels)',
            ca >= cb, f'{who(BEST_CPC, a)} {_pct(ca)} vs {_pct(cb)}')
    if not any(b >= 2 * a - 1e-12 for a in mine for b in base):
        add(f'best CPC >= {BASELINE} with 2x fewer labels', None, 'not run (needs amounts a and >= 2a)')
    both = sorted(set(mine) & set(base))
    add(f'best CPC >= {BASELINE} at every amount', all(get(BEST_CPC, f) >= get(BASELINE, f) for f in both)
        if both else None, ', '.join(f'{amount_label(f, shots)}: {_pct(get(BEST_CPC, f))} vs '
                                     f'{_pct(get(BASELINE, f))}' for f in both) or 'not run')
    knn = sorted(set(s.get('cpc_knn', {})) & set(s.get('pixels_knn', {})))
    add('cpc_knn > pixels_knn at every amount', all(get('cpc_knn', f) > get('pixels_knn', f) for f in knn)
        if knn else None, ', '.join(f'{amount_label(f, shots)}: {_pct(get("cpc_knn", f))} vs '
                                    f'{_pct(get("pixels_knn", f))}' for f in knn) or 'not run')


def check_targets(summary: Dict, best: Optional[Dict[float, str]] = None, generic: bool = False,
                  shots: bool = False) -> List[Dict]:
    """PASS / MISS / n/a for every target, on mean accuracies (see docs/evaluation.md). ``generic``: the targets of
    any dataset (the 2x-fewer-labels claim at the amounts run) instead of Fashion-MNIST's; ``shots``: amounts are
    images per class."""
    s = _with_best(summary, best or {})
    out = []

    def add(name, ok, detail):
        out.append(dict(target=name, status='n/a' if ok is None else ('PASS' if ok else 'MISS'), detail=detail))

    def get(arm, f):
        return s.get(arm, {}).get(f, (None,))[0]

    def who(arm, f):
        return f'{arm} ({best[f]})' if arm == BEST_CPC and best and f in best else arm

    if generic:
        _generic_targets(s, best or {}, shots, add, get, who)
        return out
    for arm, base, margin in FEATURE_TARGETS:
        a, b = get(arm, 0.01), get(base, 0.01)
        name = f'{arm}@1% >= {base}@1% + {margin:g}'
        add(name, None if a is None or b is None else 100 * a >= 100 * b + margin,
            'not run' if a is None or b is None else f'{_pct(a)} vs {_pct(b)} (+{100 * (a - b):.2f})')
    for fc, fb in LABEL_EFFICIENCY:
        a, b = get(BEST_CPC, fc), get(BASELINE, fb)
        add(f'best CPC@{fc:.0%} >= {BASELINE}@{fb:.0%}', None if a is None or b is None else a >= b,
            'not run' if a is None or b is None else f'{who(BEST_CPC, fc)} {_pct(a)} vs {_pct(b)}')
    fracs = sorted(f for f in set(s.get(BEST_CPC, {})) & set(s.get(BASELINE, {})) if f <= SAME_FRACTION_UP_TO)
    add(f'best CPC >= {BASELINE} at every fraction <= {SAME_FRACTION_UP_TO:.0%}',
        (all(get(BEST_CPC, f) >= get(BASELINE, f) for f in fracs)) if fracs else None,
        ', '.join(f'{f:.0%}: {_pct(get(BEST_CPC, f))} vs {_pct(get(BASELINE, f))}' for f in fracs) or 'not run')
    fracs = sorted(set(s.get('cpc_knn', {})) & set(s.get('pixels_knn', {})))
    add('cpc_knn > pixels_knn at every fraction',
        (all(get('cpc_knn', f) > get('pixels_knn', f) for f in fracs)) if fracs else None,
        ', '.join(f'{f:.0%}: {_pct(get("cpc_knn", f))} vs {_pct(get("pixels_knn", f))}' for f in fracs) or 'not run')
    a = get(BASELINE, 1.0)
    add(f'{BASELINE}@100% >= {BASELINE_FLOOR:.0%} (the baseline is trained)',
        None if a is None else a >= BASELINE_FLOOR, 'not run' if a is None else _pct(a))
    return out


def _cell(m: Optional[Cell], n_max: int, note: str = '') -> str:
    if m is None:
        return ''
    if m[1] is None:
        return f'{_pct(m[0])} (deterministic){note}'
    partial = '' if m[2] == n_max else f' (n={m[2]})'  # fewer seeds than the other cells
    return f'{_pct(m[0])} ± {_pct(m[1])}{partial}{note}'


def format_table(summary: Dict, arms: Sequence[str], labels: Dict[str, str],
                 best: Optional[Dict[float, str]] = None, shots: bool = False) -> str:
    """Markdown: one row per arm (``labels``: arm -> row title), one column per fraction, mean ± std (%); with
    ``best``, a last row with each fraction's best CPC arm (picked on val) and its accuracy."""
    fracs = sorted({f for d in summary.values() for f in d})
    n_max = max((v[2] for d in summary.values() for v in d.values()), default=0)
    lines = ['| arm | ' + ' | '.join(amount_label(f, shots) for f in fracs) + ' |', '|---|' + '---|' * len(fracs)]
    for a in arms:
        if a in summary:
            cells = [_cell(summary[a].get(f), n_max) for f in fracs]
            lines.append(f'| {labels.get(a, a)} (`{a}`) | ' + ' | '.join(cells) + ' |')
    if best:
        s = _with_best(summary, best)
        cells = [_cell(s.get(BEST_CPC, {}).get(f), n_max, f' `{best[f]}`' if f in best else '') for f in fracs]
        lines.append('| **Best CPC arm, picked on val** | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_training(runs: List[Dict], arms: Sequence[str], labels: Dict[str, str], shots: bool = False) -> str:
    """Markdown: for every arm trained until val stops improving, per fraction the mean best epoch, epochs trained,
    why runs stopped (plateau / cap) and the mean CPU time of a run."""
    rows = []
    for a in arms:
        by_f: Dict[float, List[Dict]] = {}
        for r in runs:
            if r['arm'] == a and 'best_epoch' in r.get('config', {}):
                by_f.setdefault(float(r['fraction']), []).append(r)
        for f, rs in sorted(by_f.items()):
            c = [r['config'] for r in rs]
            stops = ', '.join(f'{k} x{n}' for k, n in sorted(
                {s: sum(x['stopped'] == s for x in c) for s in {x['stopped'] for x in c}}.items()))
            rows.append(f"| {labels.get(a, a)} | {amount_label(f, shots)} | {rs[0]['n_labels']} | "
                        f"{np.mean([x['best_epoch'] for x in c]):.1f} | {np.mean([x['epochs'] for x in c]):.1f} | "
                        f"{np.mean([x['images_seen'] for x in c]):,.0f} | {stops} | "
                        f"{np.mean([r['cpu_s'] for r in rs]):,.0f} |")
    if not rows:
        return ''
    return '\n'.join([f'| arm | {"shots" if shots else "fraction"} | labels | best epoch | epochs trained | images seen | stopped | CPU-s / run |',
                      '|---|---|---|---|---|---|---|---|'] + rows)


def format_cost(payload: Dict, labels: Dict[str, str]) -> str:
    """Markdown: CPU and wall seconds per arm (all its runs) and of feature extraction."""
    cpu: Dict[str, float] = {}
    wall: Dict[str, float] = {}
    for r in payload['runs']:
        cpu[r['arm']] = cpu.get(r['arm'], 0.0) + r.get('cpu_s', 0.0)
        wall[r['arm']] = wall.get(r['arm'], 0.0) + r.get('wall_s', 0.0)
    lines = ['| arm | runs | CPU-s | wall-s |', '|---|---|---|---|']
    for a in cpu:
        n = sum(r['arm'] == a for r in payload['runs'])
        lines.append(f'| {labels.get(a, a)} | {n} | {cpu[a]:,.0f} | {wall[a]:,.0f} |')
    timings = payload.get('timings', {})
    parts = [timings[k] for k in timings if k.startswith('part')] or [timings]
    for what in ('cpc', 'random'):
        c = sum(p.get(f'extract_{what}_cpu_s', 0.0) for p in parts)
        w = sum(p.get(f'extract_{what}_s', 0.0) for p in parts)
        if c or w:
            lines.append(f'| feature extraction, {what} encoder | {sum(f"extract_{what}_s" in p for p in parts)} '
                         f'| {c:,.0f} | {w:,.0f} |')
    return '\n'.join(lines)


PLOT_EXTRA = "pip install 'cpc-models[plot]'"


def check_plotting(what: str = 'figure1.png') -> None:
    """Before any work: matplotlib, which draws ``what``, is installed (it is the optional [plot] extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f'{what} is drawn with matplotlib, which is not installed: {PLOT_EXTRA} (the [plot] extra) '
                          f'or pip install matplotlib') from None


def format_per_class(runs: List[Dict], arms: Sequence[str], classes: Sequence[str], shots: bool = False) -> str:
    """Markdown: one row per class, one column per arm: the mean over seeds of the accuracy on that class's eval
    images, at the smallest label amount each arm ran."""
    cols = []
    for a in arms:
        mine = [r for r in runs if r['arm'] == a and r.get('per_class')]
        if mine:
            f = min(r['fraction'] for r in mine)
            cols.append((a, f, [r['per_class'] for r in mine if r['fraction'] == f]))
    if not cols or not classes:
        return ''
    lines = ['| class | ' + ' | '.join(f'`{a}` {amount_label(f, shots)}' for a, f, _ in cols) + ' |',
             '|---|' + '---|' * len(cols)]
    for c, name in enumerate(classes):
        cells = []
        for _, _, per in cols:
            v = [p[c] for p in per if c < len(p) and p[c] is not None]
            cells.append(_pct(float(np.mean(v))) if v else '')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_figure1(summary: Dict, arms: Sequence[str], path: Path, labels: Dict[str, str], styles: Dict[str, Dict],
                 title: str = '', split: str = 'test', shots: bool = False) -> None:
    """Accuracy against the labelled fraction (log x), one line per arm, mean ± std error bars (paper Fig. 1)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 5.2))
    fracs = sorted({f for d in summary.values() for f in d})
    for a in arms:
        if a not in summary:
            continue
        fs = sorted(summary[a])
        ax.errorbar([f if shots else 100 * f for f in fs], [100 * summary[a][f][0] for f in fs],
                    yerr=[100 * (summary[a][f][1] or 0.0) for f in fs], label=labels.get(a, a), capsize=3,
                    **styles.get(a, {}))
    ax.set_xscale('log')
    ax.set_xticks([f if shots else 100 * f for f in fracs])
    ax.set_xticklabels([f'{f:g}' if shots else f'{100 * f:g}%' for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel('Labelled images per class (log scale)' if shots else 'Percentage of labelled images (log scale)')
    ax.set_ylabel(f'{split} accuracy (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))  # beside the axes: ten lines or more
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format='png')
    plt.close(fig)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_results(out: Path, payload: Dict) -> None:
    """results.json (the resolved config, the checkpoint, every run, timings), written atomically."""
    write_text(out / 'results.json', json.dumps(payload, indent=1, default=_json_default))


def _title(payload: Dict) -> str:
    src = payload.get('checkpoint', {})  # its architecture, not --model's default, names the encoder evaluated
    return (f"{src.get('model') or payload['config']['model']} ({src.get('name') or src.get('path') or src.get('kind', '')}), "
            f"{payload.get('data_name', 'Fashion-MNIST')} {payload['config']['split']}, "
            f"seeds {list(payload['config']['seeds'])}")


def format_section(payload: Dict, labels: Dict[str, str], cpc_arms: Sequence[str], image: str = 'figure1.png',
                   heading: str = '#') -> str:
    """The markdown of a results payload: accuracy table with the best CPC arm, targets, figure, the trained arms'
    epochs and compute, cost, wall time and the command. Sets ``payload['targets']`` and ``payload['best_cpc']``."""
    arms = payload['config']['arms']
    split = payload['config']['split']
    summary = summarize(payload['runs'])
    best = pick_best_cpc(payload['runs'], [a for a in arms if a in cpc_arms])
    payload['best_cpc'] = {str(f): a for f, a in best.items()}
    options = target_options(payload)
    shots = options['shots']
    payload['targets'] = targets = check_targets(summary, best, **options)
    wall = payload.get('wall_s')
    parts = [t for k, t in payload.get('timings', {}).items() if k.startswith('part')]
    name = payload.get('data_name', 'Fashion-MNIST')
    against = 'labelled images per class' if shots else 'labelled fraction'
    if name == 'Fashion-MNIST':
        pool = (f'train minus {payload["config"]["val_size"]} val: half tunes each arm, half picks the best CPC '
                f'arm')
    else:
        pool = (f'{payload.get("n_val")} val images tune each arm, as many pick the best CPC arm; '
                f'{payload.get("splits_note", "")}')
    classes = payload.get('classes') or []
    md = [f'{heading} {name}, {split} accuracy (%) against {against}, mean ± std over seeds', '',
          f'Encoder: {_title(payload)}. Labelled pool: {payload.get("n_pool")} images ({pool}); '
          f'{payload.get("n_eval")} {split} images.'
          + (f' Classes ({len(classes)}): {", ".join(classes)}.' if classes else '')
          + (f' Unreadable images skipped: {len(payload["skipped"])}.' if payload.get('skipped') else ''),
          '', format_table(summary, arms, labels, best, shots), '',
          f'![Figure 1]({image})', '',
          f'{heading}# Targets', '', '| target | status | detail |', '|---|---|---|']
    md += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in targets]
    per_class = format_per_class(payload['runs'], arms, classes, shots)
    if per_class:
        md += ['', f'{heading}# Per class, {split} accuracy (%) at the fewest labels', '', per_class]
    training = format_training(payload['runs'], arms, labels, shots)
    if training:
        md += ['', f'{heading}# Trained arms: epochs and compute (each run stops when val accuracy stops improving)',
               '', training]
    cpu_total = sum(r.get('cpu_s', 0.0) for r in payload['runs'])
    run_wall = sum(r.get('wall_s', 0.0) for r in payload['runs'])
    if parts:  # merged: how the parts shared the machine is the commands' (e.g. lanes of a script), not known here
        threads = sorted({p.get('threads') for p in parts if p.get('threads') is not None})
        cost = (f"Runs: {cpu_total / 3600:.2f} CPU-hours, {run_wall / 3600:.2f} hours of wall time summed over the "
                f"runs, in {len(parts)} parts of {'/'.join(map(str, threads)) or '?'} thread(s) each "
                f"({payload.get('host', '')}).")
    else:
        cost = (f"Wall time of the whole command: {'?' if wall is None else f'{wall / 60:.1f} min'}; runs: "
                f"{cpu_total / 3600:.2f} CPU-hours ({payload.get('threads')} threads, {payload.get('host', '')}).")
    md += ['', f'{heading}# Cost', '', format_cost(payload, labels), '', cost,
           '', f"Command: `{payload.get('command', '')}`", '']
    return '\n'.join(md)


def replace_section(path: Path, text: str) -> None:
    """Put ``text`` between the SECTION markers of the markdown file ``path`` (appended with markers if absent)."""
    doc = path.read_text()
    block = f'{SECTION[0]}\n{text.strip()}\n{SECTION[1]}'
    pattern = re.compile(re.escape(SECTION[0]) + '.*?' + re.escape(SECTION[1]), re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip('\n') + '\n\n' + block + '\n'
    write_text(path, doc)


def write_report(out: Path, payload: Dict, labels: Dict[str, str], styles: Dict[str, Dict],
                 cpc_arms: Sequence[str] = ()) -> str:
    """Write table.md and figure1.png from a results.json payload (adds ``targets``); returns the markdown."""
    text = format_section(payload, labels, cpc_arms)
    write_text(out / 'table.md', text)
    classes = payload.get('classes') or []
    title = _title(payload) + (f'\n{len(classes)} classes: ' + ', '.join(classes)[:150] if classes else '')
    plot_figure1(summarize(payload['runs']), payload['config']['arms'], out / 'figure1.png', labels, styles,
                 title, payload['config']['split'], target_options(payload)['shots'])
    return text
