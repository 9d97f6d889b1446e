"""Fine-tune a CPC v2 backbone on your own labelled images (plain PyTorch + timm).

DATA is an ImageFolder tree: one subfolder per class. If DATA/train (and DATA/val) exist they are used, otherwise
--val-frac of DATA is held out for validation. The model's own preprocessing is used (its pretrained cfg: input
size, mean/std, crop), with timm's training augmentation; images are read by cpc_models.images (EXIF orientation,
any mode or bit depth, converted to the model's channels).

    python examples/finetune.py DATA --model cpcv2_resnet_tiny.fmnist --epochs 10 --out runs/ft
    python examples/finetune.py DATA --model cpcv2_resnet_tiny --no-pretrained   # no published weights needed

The fine-tuned weights go to OUT/model.safetensors; load them with
``timm.create_model(NAME, num_classes=K).load_state_dict(safetensors.torch.load_file(PATH))`` after
``import cpc_models``.
"""
import argparse
import json
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import create_transform, resolve_model_data_config
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

import cpc_models  # noqa: F401  registers the cpc models with timm
from cpc_models.images import open_image
from cpc_models.schedule import warmup_cosine


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('data', type=Path, help='ImageFolder root (class subfolders), or a folder with train/ and val/')
    p.add_argument('--model', default='cpcv2_resnet_tiny.fmnist', help='timm name[.tag] of a cpc backbone')
    p.add_argument('--no-pretrained', action='store_true', help='start from random weights')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--max-steps', type=int, default=0, help='stop after this many steps (0: no limit)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--val-frac', type=float, default=0.1)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', type=Path, default=Path('finetuned'))
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    has_split = (args.data / 'train').is_dir()
    classes = ImageFolder(args.data / 'train' if has_split else args.data).classes
    model = timm.create_model(args.model, pretrained=not args.no_pretrained, num_classes=len(classes))
    cfg = resolve_model_data_config(model)
    loader = partial(open_image, channels=cfg['input_size'][0])

    def folder(root, train):
        return ImageFolder(root, create_transform(**cfg, is_training=train), loader=loader)

    if has_split:
        train_set = folder(args.data / 'train', True)
        val_set = folder(args.data / 'val', False) if (args.data / 'val').is_dir() else None
    else:  # hold out a random part of DATA, seen through the eval transform
        perm = torch.randperm(len(ImageFolder(args.data)), generator=torch.Generator().manual_seed(args.seed))
        n_val = int(round(args.val_frac * len(perm)))
        train_set = Subset(folder(args.data, True), perm[n_val:].tolist())
        val_set = Subset(folder(args.data, False), perm[:n_val].tolist()) if n_val else None
    train_dl = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=False)
    val_dl = DataLoader(val_set, args.batch_size * 2, num_workers=args.workers) if val_set else None
    print(f'{args.model}: {len(classes)} classes, {len(train_set)} train / {len(val_set) if val_set else 0} val '
          f'images, input {cfg["input_size"]}')

    steps = args.epochs * len(train_dl)
    steps = min(steps, args.max_steps) if args.max_steps else steps
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total_steps=steps, warmup_steps=warmup,
                                                           decay_during_warmup=True))
    model.to(memory_format=torch.channels_last)
    step, history = 0, []
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, n = 0.0, 0
        for x, y in train_dl:
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'non-finite loss at step {step}; lower --lr')
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n, step = total + loss.item() * len(y), n + len(y), step + 1
            if step >= steps:
                break
        acc = float('nan')
        if val_dl is not None:
            model.eval()
            correct = seen = 0
            with torch.no_grad():
                for x, y in val_dl:
                    correct += (model(x).argmax(1) == y).sum().item()
                    seen += len(y)
            acc = correct / seen
        history.append(dict(epoch=epoch, step=step, train_loss=total / max(n, 1), val_acc=acc))
        print(f'epoch {epoch}: step {step} train loss {total / max(n, 1):.4f} val acc {acc:.4f}', flush=True)
        if step >= steps:
            break

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / 'model.safetensors'))
    arch = args.model.split('.')[0]
    (args.out / 'finetune.json').write_text(json.dumps(
        dict(model=arch, source=args.model, pretrained=not args.no_pretrained, classes=classes, history=history),
        indent=1))
    print(f'saved {args.out / "model.safetensors"} (timm.create_model("{arch}", num_classes={len(classes)}))')
    return history


if __name__ == '__main__':
    main()
