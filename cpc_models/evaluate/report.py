"""Reporting a Figure-1 run: mean ± std per arm and fraction, the label-efficiency checks, table.md, figure1.png."""
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_file, write_text

__all__ = ['summarize', 'check_targets', 'format_table', 'plot_figure1', 'write_report', 'write_results']

# The paper's claim (Fig. 1): CPC needs 2-5x fewer labels. (CPC fraction, scratch fraction) pairs checked.
TARGET_PAIRS = ((0.01, 0.02), (0.05, 0.1), (0.1, 0.2))


def summarize(results: List[Dict]) -> Dict[str, Dict[float, Tuple[float, float, int]]]:
    """{arm: {fraction: (mean, std, n)}} of the accuracies (std over seeds, ddof=1; 0 for one seed)."""
    acc: Dict[str, Dict[float, List[float]]] = {}
    for r in results:
        acc.setdefault(r['arm'], {}).setdefault(float(r['fraction']), []).append(r['accuracy'])
    return {a: {f: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
                for f, v in sorted(d.items())} for a, d in acc.items()}


def headline_cpc_arm(arms: Sequence[str]) -> Optional[str]:
    """The CPC arm compared with scratch: fine-tuned if run, else frozen, else linear."""
    return next((a for a in ('cpc_finetune', 'cpc_frozen', 'cpc_linear') if a in arms), None)


def check_targets(summary: Dict) -> List[Dict]:
    """The paper's label-efficiency claim on mean accuracies: CPC@1% >= scratch@2%, @5% >= @10%, @10% >= @20%;
    and the linear probe on CPC features above the same probe on a random encoder."""
    out = []
    cpc = headline_cpc_arm(list(summary))
    for fc, fs in TARGET_PAIRS:
        name = f'CPC@{fc:.0%} >= scratch@{fs:.0%}'
        if cpc is None or 'scratch' not in summary or fc not in summary[cpc] or fs not in summary['scratch']:
            out.append(dict(target=name, status='n/a', detail='fractions or arms not run'))
            continue
        a, b = summary[cpc][fc][0], summary['scratch'][fs][0]
        out.append(dict(target=name, status='PASS' if a >= b else 'MISS',
                        detail=f'{cpc} {100 * a:.2f} vs scratch {100 * b:.2f}'))
    name = 'CPC linear > random linear at every fraction'
    if 'cpc_linear' in summary and 'random_linear' in summary:
        common = sorted(set(summary['cpc_linear']) & set(summary['random_linear']))
        fails = [f for f in common if summary['cpc_linear'][f][0] <= summary['random_linear'][f][0]]
        detail = ', '.join(f'{f:.0%}: {100 * summary["cpc_linear"][f][0]:.1f} vs '
                           f'{100 * summary["random_linear"][f][0]:.1f}' for f in common)
        out.append(dict(target=name, status='PASS' if common and not fails else 'MISS', detail=detail))
    else:
        out.append(dict(target=name, status='n/a', detail='cpc_linear and random_linear not both run'))
    return out


def format_table(summary: Dict, arms: Sequence[str], labels: Dict[str, str]) -> str:
    """Markdown: one row per arm (``labels``: arm -> row title), one column per fraction, mean ± std (%)."""
    fracs = sorted({f for d in summary.values() for f in d})
    n_max = max((v[2] for d in summary.values() for v in d.values()), default=0)
    lines = ['| arm | ' + ' | '.join(f'{f:.0%}' for f in fracs) + ' |', '|---|' + '---|' * len(fracs)]
    for a in arms:
        if a not in summary:
            continue
        cells = []
        for f in fracs:
            m = summary[a].get(f)
            partial = '' if m is None or m[2] == n_max else f' (n={m[2]})'  # fewer seeds than the other cells
            cells.append('' if m is None else f'{100 * m[0]:.2f} ± {100 * m[1]:.2f}{partial}')
        lines.append(f'| {labels.get(a, a)} (`{a}`) | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_figure1(summary: Dict, arms: Sequence[str], path: Path, labels: Dict[str, str], styles: Dict[str, Dict],
                 title: str = '', split: str = 'test') -> None:
    """Accuracy against the labelled fraction (log x), one line per arm, mean ± std error bars (paper Fig. 1)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    fracs = sorted({f for d in summary.values() for f in d})
    for a in arms:
        if a not in summary:
            continue
        fs = sorted(summary[a])
        ax.errorbar([100 * f for f in fs], [100 * summary[a][f][0] for f in fs],
                    yerr=[100 * summary[a][f][1] for f in fs], label=labels.get(a, a), capsize=3,
                    **styles.get(a, {}))
    ax.set_xscale('log')
    ax.set_xticks([100 * f for f in fracs])
    ax.set_xticklabels([f'{100 * f:g}%' for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel('Percentage of labelled images (log scale)')
    ax.set_ylabel(f'{split} accuracy (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='best')
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


def write_report(out: Path, payload: Dict, labels: Dict[str, str], styles: Dict[str, Dict]) -> str:
    """Write table.md and figure1.png from a results.json payload (adds its ``targets``); returns the markdown."""
    arms = payload['config']['arms']
    summary = summarize(payload['runs'])
    targets = check_targets(summary)
    payload['targets'] = targets
    split = payload['config']['split']
    wall = payload.get('wall_s')
    src = payload.get('checkpoint', {})
    title = (f"{payload['config']['model']} ({src.get('name') or src.get('path') or src.get('kind', '')}), "
             f"Fashion-MNIST {split}, seeds {list(payload['config']['seeds'])}")
    md = [f'# Fashion-MNIST, {split} accuracy (%) against labelled fraction, mean ± std over seeds', '',
          f'Encoder: {title}', '', format_table(summary, arms, labels), '',
          '## Targets (paper: 2-5x fewer labels)', '', '| target | status | detail |', '|---|---|---|']
    md += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in targets]
    parts = 'longest of the parallel parts' if 'part0' in payload.get('timings', {}) else 'whole command'
    md += ['', (f"Labelled pool: {payload.get('n_pool')} images (train minus {payload['config']['val_size']} "
                f"val); evaluated on {payload.get('n_eval')} {split} images."),
           (f"Wall time of the {parts}: {wall if wall is None else f'{wall / 60:.1f} min'} "
            f"({payload.get('threads')} threads, {payload.get('host', '')})."),
           f"Cost (s, wall / CPU): {json.dumps(payload.get('timings', {}))}",
           '', f"Command: `{payload.get('command', '')}`", '']
    text = '\n'.join(md)
    write_text(out / 'table.md', text)
    plot_figure1(summary, arms, out / 'figure1.png', labels, styles, title, split)
    return text
