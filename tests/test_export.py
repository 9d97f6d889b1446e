"""Deployment exports round-trip: torch.export.export and ONNX (torch.onnx.export(dynamo=True), run with
onnxruntime), in the grid and the dense mode, with a dynamic batch size, on the published checkpoint."""
import pytest
import timm
import torch
from timm.models._features import FeatureGetterNet
from torch.export import Dim

import cpc_models  # noqa: F401  (registers the architectures)

NAME = 'cpcv2_resnet_tiny.fmnist'
MODES = pytest.mark.parametrize('dense', [False, True], ids=['grid', 'dense'])
BATCH = {'x': {0: Dim('batch', min=1, max=1024)}}


def _model_and_inputs(dense):
    model = timm.create_model(NAME, pretrained=True, dense=dense).eval()
    g = torch.Generator().manual_seed(0)
    shape = model.pretrained_cfg['input_size']
    return model, torch.randn(3, *shape, generator=g), torch.randn(5, *shape, generator=g)  # export at 3, run at 5


@MODES
def test_torch_export_round_trip(dense):
    model, x, x5 = _model_and_inputs(dense)
    program = torch.export.export(model, (x,), dynamic_shapes=BATCH)
    with torch.no_grad():
        expected = model(x5)
        torch.testing.assert_close(program.module()(x5), expected)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
    features = torch.export.export(FeatureGetterNet(model, out_indices=(1, 2, 3)), (x,))  # features_only's wrapper
    with torch.no_grad():
        for a, b in zip(features.module()(x), maps, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
@MODES
def test_onnx_round_trip(dense, tmp_path):
    ort = pytest.importorskip('onnxruntime', reason='the dev extra installs onnxruntime')
    model, x, x5 = _model_and_inputs(dense)
    path = tmp_path / 'model.onnx'
    torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=BATCH, verbose=False).save(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x5.numpy()})
    with torch.no_grad():
        expected = model(x5)
    # onnxruntime's kernels sum in their own order: float32 rounding relative to the output's scale
    tol = 2 ** 8 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=tol, atol=tol * expected.abs().max().item())
