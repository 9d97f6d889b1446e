"""The encoder's create path (``encoder._create_cpc_resnetv2``, ``checkpoint_filter_fn``) on its own: the aliases
the filter maps, the layers timm adapts (first conv, classifier), shape errors, the features_only defaults and the
one combination it refuses. Real timm models and real safetensors files throughout."""
import pytest
import safetensors.torch
import timm
import torch

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models._weights import WeightsMismatchError

ARCH = 'cpcv2_resnet_tiny'


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A random 1-channel tiny encoder and its weights file."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp('w') / 'model.safetensors'
    safetensors.torch.save_file(model.state_dict(), path)
    return model.state_dict(), path


def _load(path, **kwargs):
    return timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', 'encoder.', 'module.encoder.', '_orig_mod.encoder.'])
def test_each_training_prefix_is_mapped(prefix, weights, tmp_path):
    sd, _ = weights
    path = tmp_path / 'prefixed.safetensors'
    safetensors.torch.save_file({prefix + k: v for k, v in sd.items()}, path)
    loaded = _load(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_first_conv_and_head_are_left_to_timm(weights):
    """in_chans=3 from 1-channel weights: timm adapts the first conv (the filter must not call its shape a
    mismatch); num_classes=10: timm gives the model a new head; every other tensor is the file's."""
    sd, path = weights
    model = _load(path, in_chans=3, num_classes=10)
    got = model.state_dict()
    assert got['stem.conv.weight'].shape[1] == 3
    torch.testing.assert_close(got['stem.conv.weight'].sum(1), sd['stem.conv.weight'].sum(1))  # timm's adaptation
    assert got['head.fc.weight'].shape[0] == 10
    assert all(torch.equal(got[k], v) for k, v in sd.items() if k != 'stem.conv.weight')


def test_a_mis_shaped_key_is_named_with_both_shapes_and_the_file(weights, tmp_path):
    sd, _ = weights
    key = 'stages.1.blocks.0.conv2.weight'
    bad = dict(sd, **{key: sd[key][:, :-1].contiguous()})
    path = tmp_path / 'bad.safetensors'
    safetensors.torch.save_file(bad, path)
    for kwargs in ({}, {'num_classes': 10}):
        with pytest.raises(WeightsMismatchError) as e:
            _load(path, **kwargs)
        assert str(e.value).startswith(
            f'{path}: Checkpoint does not fit CPCResNetV2: first mismatching key "{key}" has shape '
            f'{tuple(bad[key].shape)} in the checkpoint but {tuple(sd[key].shape)} in the model.'), str(e.value)


def test_head_adapted_message_names_the_file_and_the_model(weights, tmp_path):
    sd, _ = weights
    path = tmp_path / 'renamed.safetensors'
    safetensors.torch.save_file({k.replace('stem.conv', 'stem.cnv'): v for k, v in sd.items()}, path)
    with pytest.raises(WeightsMismatchError) as e:
        _load(path, num_classes=10)
    assert str(e.value).startswith(f'{path} does not fit CPCResNetV2: 1 key(s) of the model missing from the file: '
                                   f'"stem.conv.weight"; 1 key(s) in the file that the model does not have: '
                                   f'"stem.cnv.weight".'), str(e.value)


def test_features_only_defaults():
    """features_only: dense maps of the whole image, the stem and every stack (len(layers) + 1), timm's getter."""
    m = timm.create_model(ARCH, features_only=True)
    assert type(m).__name__ == 'FeatureGetterNet'
    assert m.model.dense and len(m.feature_info) == len(m.model.stages) + 1
    assert len(m(torch.randn(1, 1, 28, 28))) == len(m.model.stages) + 1
    m = timm.create_model(ARCH, features_only=True, out_indices=(1,), feature_cfg=dict(feature_cls='getter'))
    assert len(m(torch.randn(1, 1, 28, 28))) == 1 and type(m).__name__ == 'FeatureGetterNet'


def test_latent_grids_need_the_getter():
    grids = timm.create_model(ARCH, features_only=True, dense=False)  # the getter returns latent grids: allowed
    assert not grids.model.dense
    with pytest.raises(ValueError, match="features_only=True with dense=False returns latent grids, which only "
                                         "feature_cls='getter'.*feature_cls='hook'"):
        timm.create_model(ARCH, features_only=True, dense=False, feature_cls='hook')
    timm.create_model(ARCH, features_only=True, dense=True, feature_cls='hook')  # dense maps: any feature_cls


@pytest.mark.parametrize('prefix', ['module.', '_orig_mod.', 'encoder.'])
def test_prefixes_of_a_state_dict_passed_in_memory(prefix, weights):
    """timm strips `module.` (and `_orig_mod.`) from a file's keys itself; a state dict passed in the pretrained cfg
    reaches the filter as it is, so the filter's own mapping is what loads it."""
    sd, _ = weights
    loaded = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(
        state_dict={prefix + k: v for k, v in sd.items()})).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
