"""Turn a cpc-train checkpoint into a published folder in weights/, with its evaluation in the model card.

    python weights/publish.py --checkpoint runs/fmnist_tiny/checkpoints/step_00000800 \
        --eval results/fmnist --out weights/cpcv2_resnet_tiny.fmnist --tag fmnist

Also writes golden features of the bundled sample (tests/data/<arch>.<tag>.golden.safetensors) that
tests/test_published.py compares against after loading through timm.
"""
import argparse
import json
import subprocess
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import cpc_models  # noqa: F401
from cpc_models.demo import load_sample
from cpc_models.evaluate.figure1 import section
from cpc_models.evaluate.report import SECTION
from cpc_models.hub import export_checkpoint
from cpc_models.runtime import cpu_model

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='cpc-train checkpoint folder')
    p.add_argument('--eval', default='', help='cpc-eval figure1 output folder (its results go into the card)')
    p.add_argument('--out', required=True, help='weights/<arch>.<tag>')
    p.add_argument('--tag', required=True)
    p.add_argument('--hardware', default=f'{cpu_model()}, 2 cores (shared), no GPU')
    p.add_argument('--note', default='', help='extra text for the Training section of the card')
    args = p.parse_args()

    ckpt = Path(args.checkpoint)
    config = json.loads((ckpt / 'config.json').read_text())
    metrics = json.loads((ckpt / 'metrics.json').read_text())
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout
    evaluation = ''
    if args.eval:  # the same section as `cpc-eval plot DIR --card README.md` writes between these markers
        payload = json.loads((Path(args.eval) / 'results.json').read_text())
        evaluation = '\n'.join([SECTION[0], section(payload, 'figure1.png'), SECTION[1]])
    card = dict(
        dataset='Fashion-MNIST train (60,000 images, labels unused)' if config['data'] == 'fashion-mnist'
        else config['data'],
        hardware=args.hardware,
        wall_time_s=metrics.get('wall_time_s'),
        metrics={k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
        details={'Code': f'cpc-models commit {commit.strip() or "unknown"}'},
        evaluation=evaluation,
    )
    out = export_checkpoint(ckpt, args.out, tag=args.tag, model_card=card, overwrite=True)
    if args.eval and (Path(args.eval) / 'figure1.png').is_file():
        (out / 'figure1.png').write_bytes((Path(args.eval) / 'figure1.png').read_bytes())
    if args.note:
        readme = out / 'README.md'
        readme.write_text(readme.read_text().replace('## Training\n', f'## Training\n\n{args.note}\n', 1))

    # Golden features: the first 16 images of the bundled sample through the published weights.
    arch = config['model']
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    images = load_sample()[0][:16]
    cfg = timm.data.resolve_model_data_config(model)
    x = (images.float() / 255 - torch.tensor(cfg['mean']).view(1, -1, 1, 1)) / torch.tensor(cfg['std']).view(1, -1, 1, 1)
    with torch.no_grad():
        grid = model.forward_features(x)
        pooled = model.forward_head(grid, pre_logits=True)
    golden = ROOT / 'tests' / 'data' / f'{arch}.{args.tag}.golden.safetensors'
    golden.parent.mkdir(parents=True, exist_ok=True)
    save_file({'input': x.contiguous(), 'grid': grid.contiguous(), 'pooled': pooled.contiguous()}, str(golden))
    print(f'published {out}; golden features {golden}')


if __name__ == '__main__':
    main()
