"""examples/faster_rcnn.py: Faster R-CNN + FPN on the dense multi-scale features of cpcv2_resnet_tiny."""
import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / 'examples' / 'faster_rcnn.py'


@pytest.fixture(scope='module')
def example():
    spec = importlib.util.spec_from_file_location('faster_rcnn_example', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_and_eval(example):
    torch.manual_seed(0)
    model = example.build_faster_rcnn('cpcv2_resnet_tiny', fpn_channels=32, min_size=64, max_size=64,
                                      rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                                      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    assert model.backbone.out_channels == 32
    assert model.backbone.reductions == [1, 2, 4]
    gen = torch.Generator().manual_seed(0)
    images, targets = example.synthetic_batch(2, 64, 1, gen)
    assert images[0].shape == (1, 64, 64) and targets[0]['boxes'].shape[1] == 4

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = example.train_step(model, optimizer, images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg', 'loss'}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    grads = {n: p.grad for n, p in model.backbone.body.named_parameters() if p.grad is not None}
    assert grads, 'no gradient reached the CPC encoder'
    stem = [g for n, g in grads.items() if 'stem' in n]
    assert stem and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in stem)

    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert set(det) == {'boxes', 'labels', 'scores'}
        assert det['boxes'].ndim == 2 and det['boxes'].shape[1] == 4
        assert det['labels'].shape == det['scores'].shape == det['boxes'].shape[:1]


def test_main_runs(example, capsys):
    example.main(['--steps', '1', '--batch-size', '1', '--image-size', '32', '--fpn-channels', '16'])
    out = capsys.readouterr().out
    assert 'step    1' in out and 'loss_classifier' in out and 'detections' in out


def test_every_command_of_the_docstring_runs(example, capsys):
    """Was: the docstring's `--model cpcv2_resnet50.<tag> --pretrained` named a tag that does not exist."""
    import shlex
    commands = [line.split('#')[0].split() for line in example.__doc__.splitlines()
                if line.strip().startswith('python examples/faster_rcnn.py')]
    assert len(commands) >= 2
    for argv in commands:
        torch.manual_seed(0)
        example.main(argv[2:] + ['--steps', '1', '--batch-size', '1'])
        out = capsys.readouterr().out
        assert 'step    1' in out and 'image 1:' in out, shlex.join(argv)
