"""features_only and forward_intermediates for every model, with timm's semantics.

Small inputs (32x32 for CIFAR models, 64x64 for ImageNet ones) keep the whole file in seconds.
"""
import pytest
import timm
import torch

import aff_zoo
from aff_zoo.models import IMAGENET_MODELS
from aff_zoo.deploy.export import script

ALL_MODELS = aff_zoo.list_models()


def _input(name: str) -> torch.Tensor:
    size, batch = (64, 1) if name in IMAGENET_MODELS else (32, 2)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _create(name: str, **kwargs):
    torch.manual_seed(0)  # same seed -> same weights for the classifier and its features_only twin
    return timm.create_model(name, **kwargs).eval()


def test_every_model_is_covered():
    assert len(ALL_MODELS) == len(set(ALL_MODELS)) >= 38
    assert set(timm.list_models('*aff*')) >= {m for m in ALL_MODELS if 'aff' in m}


@pytest.mark.parametrize('name', ALL_MODELS)
@torch.no_grad()
def test_features(name):
    x = _input(name)
    model = _create(name)
    info = model.feature_info
    n = len(info)
    assert n == (5 if name in IMAGENET_MODELS else 4)

    # forward_intermediates: every level, channels and reductions as declared, final feeds the head.
    final, feats = model.forward_intermediates(x)
    assert len(feats) == n
    for f, i in zip(feats, info):
        assert f.shape[:2] == (x.shape[0], i['num_chs'])
        assert (x.shape[2] // f.shape[2], x.shape[3] // f.shape[3]) == (i['reduction'], i['reduction'])
    assert final.shape[1] == model.num_features
    assert torch.equal(model.forward_head(final), model(x))  # forward = head(forward_features)

    # features_only (default out_indices = every level), same weights -> same tensors.
    fmodel = _create(name, features_only=True)
    assert fmodel.feature_info.channels() == [i['num_chs'] for i in info]
    assert fmodel.feature_info.reduction() == [i['reduction'] for i in info]
    out = fmodel(x)
    assert len(out) == n and all(torch.equal(a, b) for a, b in zip(out, feats))


@pytest.mark.parametrize('name', ['aff_resnet20', 'iaff_resnext20_32x4d', 'iaff_resnet50'])
@torch.no_grad()
def test_intermediates_indices(name):
    x = _input(name)
    model = _create(name)
    final, feats = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    # int = last n, negative indices count from the end, stop_early changes nothing taken.
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(last2) == 2 and all(torch.equal(a, b) for a, b in zip(last2, feats[-2:]))
    some = model.forward_intermediates(x, indices=[1, -1], stop_early=True, intermediates_only=True)
    assert torch.equal(some[0], feats[1]) and torch.equal(some[1], feats[-1])
    early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)[1]
    assert torch.equal(early[0], feats[0]) and torch.equal(early[1], feats[1])
    with pytest.raises(Exception, match='out of range'):
        model.forward_intermediates(x, indices=len(feats) + 1)


@pytest.mark.parametrize('name', ['aff_resnet20', 'iaff_resnext20_32x4d', 'iaff_resnet50'])
@torch.no_grad()
def test_features_only_out_indices(name):
    x = _input(name)
    feats = _create(name).forward_intermediates(x, intermediates_only=True)
    fmodel = _create(name, features_only=True, out_indices=(1, -1))
    assert fmodel.feature_info.channels() == [feats[1].shape[1], feats[-1].shape[1]]
    out = fmodel(x)
    assert torch.equal(out[0], feats[1]) and torch.equal(out[1], feats[-1])
    # a shallow out_indices prunes the deeper stages and the head away
    shallow = _create(name, features_only=True, out_indices=(0, 1))
    assert sum(p.numel() for p in shallow.parameters()) < sum(p.numel() for p in fmodel.parameters())
    out = shallow(x)
    assert torch.equal(out[0], feats[0]) and torch.equal(out[1], feats[1])


@pytest.mark.parametrize('name,size,stride', [('aff_resnet8', 32, 4), ('aff_resnet50', 64, 32)])
def test_clear_input_errors(name, size, stride):
    for kwargs in ({}, dict(features_only=True)):
        model = _create(name, **kwargs)
        with pytest.raises(ValueError, match=r'got shape \[2, 1, .*in_chans='):
            model(torch.randn(2, 1, size, size))
        with pytest.raises(ValueError, match=r'got shape \[3, 32, 32\]'):
            model(torch.randn(3, 32, 32))
        small = stride - 1
        with pytest.raises(ValueError, match=rf'{small}x{size} pixels is smaller than .*total stride \({stride}\)'):
            model(torch.randn(2, 3, small, size))
    model = _create(name)
    with pytest.raises(ValueError, match='total stride'):
        model.forward_intermediates(torch.randn(2, 3, size, stride - 1))
    # in_chans adapts the stem, and the check follows it
    assert _create(name, in_chans=1)(torch.randn(2, 1, size, size)).shape == (2, model.num_classes)


def test_in_chans_with_features_torchscript():
    """The input check lives in forward_features and must stay TorchScript-compatible."""
    model = _create('aff_resnet8', in_chans=4)
    scripted = script(model)
    x = torch.randn(2, 4, 32, 32)
    assert torch.equal(scripted(x), model(x))
    with pytest.raises(Exception, match='in_chans'):
        scripted(torch.randn(2, 3, 32, 32))
