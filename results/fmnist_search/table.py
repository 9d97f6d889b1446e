"""Write table.md, the pretraining search's table, from search.jsonl (written by search.py).

    python results/fmnist_search/table.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
CPU = 'CPU, 2 cores'
GPU = 'H200 (gpu_session.sh)'
# name in search.jsonl -> (encoder, recipe beyond the fmnist_tiny preset, images seen, where it was trained)
RUNS = {
    'ref_pixels': ('raw pixels', '-', 0, '-'),
    'ref_random': ('cpcv2_resnet_tiny, random init', '-', 0, '-'),
    'ref_published': ('cpcv2_resnet_tiny.fmnist (previous)', 'preset, lr 2e-3, 800 steps', 800 * 32, CPU),
    'base': ('cpcv2_resnet_tiny', 'preset (lr 2e-3)', 937 * 32, CPU),
    'aug_strong': ('cpcv2_resnet_tiny', 'jitter 2, elastic 0.3, 2 ops, magnitude 9', 937 * 32, CPU),
    'aug_off': ('cpcv2_resnet_tiny', 'no augmentation', 937 * 32, CPU),
    'p12s4': ('cpcv2_resnet_tiny', '12 px patches, stride 4', 937 * 32, CPU),
    'p16s4': ('cpcv2_resnet_tiny', '16 px patches, stride 4', 937 * 32, CPU),
    'lr4e-3': ('cpcv2_resnet_tiny', 'lr 4e-3', 937 * 32, CPU),
    'long_lr4_s1000': ('cpcv2_resnet_tiny', 'lr 4e-3, 5,625-step schedule, stopped at 1,000', 1000 * 32, CPU),
    'long_w512_lr4_s1000': ('512-d last stack', 'lr 4e-3, 5,625-step schedule, stopped at 1,000', 1000 * 32, CPU),
    'gpu_A_w512_b32_3ep': ('512-d last stack', 'lr 4e-3, batch 32, 5,625 steps', 5625 * 32, GPU),
    'gpu_B_w512_b128_10ep': ('512-d last stack', 'lr 4e-3, batch 128, 4,688 steps (published)', 4688 * 128, GPU),
    'gpu_C_w512_b128_6ep_lr6': ('512-d last stack', 'lr 6e-3, batch 128, 2,813 steps', 2813 * 128, GPU),
    'gpu_D_w1024_b128_6ep': ('1024-d last stack', 'lr 4e-3, batch 128, 2,813 steps', 2813 * 128, GPU),
    'gpu_E_w512_b256_10ep': ('512-d last stack', 'lr 6e-3, batch 256, stopped at 1,443 of 2,344 steps', 1443 * 256,
                             GPU),
    'gpu_F_w1024_b256_6ep': ('1024-d last stack', 'lr 4e-3, batch 256, 1,407 steps', 1407 * 256, GPU),
}


def _fmt(d: dict) -> str:
    return f'{100 * d["mean"]:.1f}% ({", ".join(f"{100 * a:.1f}" for a in d["per_seed"])})'


def main() -> None:
    rows = {}
    for line in (HERE / 'search.jsonl').read_text().splitlines():
        r = json.loads(line)
        if r['name'] in RUNS:
            rows[r['name']] = r['probe']  # the last line of a name wins
    out = ['| run | encoder | recipe (else the fmnist_tiny preset) | epochs | trained on | val probe, pooled | '
           'val probe, grid |', '|---|---|---|---:|---|---:|---:|']
    for name, (enc, recipe, images, where) in RUNS.items():
        if name not in rows:
            continue
        p = rows[name]
        pooled = p.get('pooled', p.get('pixels'))
        grid = p.get('grid')
        out.append(f'| {name} | {enc} | {recipe} | {images / 60000:.2f} | {where} | {_fmt(pooled)} | '
                   f'{_fmt(grid) if grid else "-"} |')
    note = ('Validation linear probe (results/fmnist_search/search.py): 5,000 training images held out as val '
            '(class-balanced, seed 0), 1% of the rest labelled (3 seeds), L2 penalty chosen on half A of val, '
            'accuracy on half B; mean (per seed). The test set is not used here.')
    (HERE / 'table.md').write_text(note + '\n\n' + '\n'.join(out) + '\n')
    print('\n'.join(out))


if __name__ == '__main__':
    main()
