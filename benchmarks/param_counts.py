"""Parameter counts of the registered CPC encoders against the paper (Hénaff et al. 2020), as a Markdown table.

Run: ``python benchmarks/param_counts.py``. Models are built on the meta device: no memory, no compute, about a second.
Counts are of the encoder without a classifier (the registered default, ``num_classes=0``).
"""
import timm
import torch

import cpc_models  # noqa: F401  (registers the architectures)

# Paper: Table 1 (ResNet-161) and Sec. 5 (ResNet-50); the paper gives no count for the others.
PAPER = {'cpcv2_resnet161': '305M', 'cpcv2_resnet50': '24M'}


def main() -> None:
    print('| model | blocks per stack | output channels | patch / stride (px) | parameters (ours) | paper |')
    print('|---|---|---|---|---|---|')
    for name in timm.list_models('cpcv[12]*'):
        with torch.device('meta'):
            m = timm.create_model(name)
        n = sum(p.numel() for p in m.parameters())
        depths = [len(s.blocks) for s in m.stages]
        channels = [info['num_chs'] for info in m.feature_info[1:]]
        print(f'| {name} | {depths} | {channels} | {m.patch_size} / {m.patch_stride} | {n / 1e6:.2f}M | '
              f'{PAPER.get(name, "-")} |')


if __name__ == '__main__':
    main()
