"""The published checkpoint in weights/: it loads through timm (bundled file and Hub path) and reproduces its golden
features; the main job (the demo) runs on it and the CPC features beat a random encoder's."""
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import load_file

import cpc_models  # noqa: F401
from cpc_models import hub
from cpc_models.demo import few_shot_accuracy, few_shot_split, load_sample, main as demo_main
from cpc_models.encoder import WEIGHTS_DIR
from cpc_models.evaluate import extract_features

NAME = 'cpcv2_resnet_tiny.fmnist'  # the demo's
PUBLISHED = [NAME, 'cpcv2_resnet_tiny_wide.fmnist']
FOLDER = WEIGHTS_DIR / NAME
published = pytest.mark.parametrize('name', PUBLISHED)


@published
def test_published_folder_is_complete(name):
    folder = WEIGHTS_DIR / name
    assert {'model.safetensors', 'config.json', 'README.md'} <= {p.name for p in folder.iterdir()}
    card = (folder / 'README.md').read_text()
    for section in ('## Training', '## Evaluation', 'cpc-train', 'Wall time'):
        assert section in card
    assert name in timm.list_pretrained('cpcv2_resnet_tiny*')
    assert f'`{name.split(".")[0]}`' in card


@published
def test_loads_bundled_weights_and_matches_golden(name):
    model = timm.create_model(name, pretrained=True).eval()
    assert Path(model.pretrained_cfg['file']) == WEIGHTS_DIR / name / 'model.safetensors'
    golden = load_file(Path(__file__).parent / 'data' / f'{name}.golden.safetensors')
    with torch.no_grad():
        grid = model.forward_features(golden['input'])
        pooled = model.forward_head(grid, pre_logits=True)
    torch.testing.assert_close(grid, golden['grid'], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, golden['pooled'], rtol=1e-4, atol=1e-4)


@published
def test_same_weights_through_the_hub_path(name, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    cache = tmp_path / 'hub'
    hub.add_to_hf_cache(WEIGHTS_DIR / name, f'cpc-models/{name}', cache_dir=cache)
    via_hub = timm.create_model(name, pretrained=True, cache_dir=cache, pretrained_cfg_overlay=dict(file=''))
    via_hf_name = timm.create_model(f'hf-hub:cpc-models/{name}', pretrained=True, cache_dir=cache)
    expected = load_file(WEIGHTS_DIR / name / 'model.safetensors')
    for model in (via_hub, via_hf_name):
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


@pytest.mark.slow
@published
def test_cpc_grid_beats_random_encoder_few_shot(name):
    images, labels, _ = load_sample()
    cpc = timm.create_model(name, pretrained=True).eval()
    rnd = timm.create_model(name.split('.')[0], pretrained=False, num_classes=0).eval()
    cpc_grid = extract_features(cpc, images, keep_grid=True, progress=False)[1].float().flatten(1)
    rnd_grid = extract_features(rnd, images, keep_grid=True, progress=False)[1].float().flatten(1)
    cpc_acc = sum(few_shot_accuracy(cpc_grid, labels, shots=10, repeats=2)) / 2
    rnd_acc = sum(few_shot_accuracy(rnd_grid, labels, shots=10, repeats=2)) / 2
    assert cpc_acc > rnd_acc + 0.03, (cpc_acc, rnd_acc)


def test_demo_sample_and_few_shot_protocol():
    images, labels, classes = load_sample()
    assert images.dtype == torch.uint8 and images.shape == (1000, 1, 28, 28) and len(classes) == 10
    assert torch.bincount(labels).tolist() == [100] * 10
    train, val, test = few_shot_split(labels, shots=5, val_per_class=10, seed=0)
    assert torch.bincount(labels[train]).tolist() == [5] * 10 and torch.bincount(labels[val]).tolist() == [10] * 10
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == 1000  # disjoint, and all of them
    (acc,) = few_shot_accuracy(images.flatten(1).float() / 255, labels, shots=5, repeats=1)
    assert 0.4 < acc < 0.9  # pixels with 5 labels per class: far above chance (10%), far below the full data


@pytest.mark.slow
def test_demo_runs(capsys):
    assert demo_main(['--shots', '2', '--repeats', '1']) == 0
    out = capsys.readouterr().out
    assert 'CPC grid' in out and 'raw pixels' in out and '%' in out
