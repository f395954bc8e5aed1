"""AFFFPN: torchvision's FPN interface, AFF/iAFF top-down merge with the paper's roles (x = lateral, y = top-down)."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from aff_zoo.layers.fpn import AFFFPN
from aff_zoo.deploy.export import script

IN_CHANNELS = [8, 16, 32]


def _features(batch=2):
    g = torch.Generator().manual_seed(0)
    return OrderedDict([
        ('feat0', torch.randn(batch, 8, 16, 16, generator=g)),
        ('feat1', torch.randn(batch, 16, 8, 8, generator=g)),
        ('feat3', torch.randn(batch, 32, 3, 3, generator=g)),  # odd size: upsampling goes by shape, not by 2
    ])


def _randomize_bn(module):
    """Non-trivial BatchNorm statistics so that eval-mode outputs depend on them."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module


@pytest.mark.parametrize('extra', [None, 'pool', 'p6p7'])
def test_add_fusion_is_torchvision_fpn(extra):
    """fusion='add' is torchvision's FPN: its state dict loads strictly and the outputs are identical."""
    def extra_block():
        return {None: None, 'pool': LastLevelMaxPool(), 'p6p7': LastLevelP6P7(32, 12)}[extra]
    torch.manual_seed(0)
    ref = FeaturePyramidNetwork(IN_CHANNELS, 12, extra_blocks=extra_block()).eval()
    ours = AFFFPN(IN_CHANNELS, 12, extra_blocks=extra_block(), fusion='add').eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _features()
    a, b = ref(x), ours(x)
    assert list(a.keys()) == list(b.keys())
    assert len(a) == 3 + {None: 0, 'pool': 1, 'p6p7': 2}[extra]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('fusion', ['aff', 'iaff'])
def test_top_down_merge_matches_hand_computation(fusion):
    """Each merge is ``fusion(x=lateral, y=upsampled top-down)``, written out by hand here."""
    fpn = _randomize_bn(AFFFPN(IN_CHANNELS, 12, fusion=fusion)).eval()
    x = _features()
    feats = list(x.values())
    with torch.no_grad():
        out = fpn(x)
        lat = [blk(f) for blk, f in zip(fpn.inner_blocks, feats)]
        p2 = lat[2]
        p1 = fpn.fusions[1](lat[1], F.interpolate(p2, size=lat[1].shape[-2:], mode='nearest'))
        p0 = fpn.fusions[0](lat[0], F.interpolate(p1, size=lat[0].shape[-2:], mode='nearest'))
        expected = [fpn.layer_blocks[i](p) for i, p in enumerate((p0, p1, p2))]
        swapped = fpn.layer_blocks[1](
            fpn.fusions[1](F.interpolate(p2, size=lat[1].shape[-2:], mode='nearest'), lat[1]))
    assert list(out.keys()) == ['feat0', 'feat1', 'feat3']
    for got, exp in zip(out.values(), expected):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    # the roles matter (M weighs x, 1 - M weighs y): the swapped call gives a different pyramid
    assert not torch.allclose(out['feat1'], swapped, atol=1e-4)
    # shapes: out_channels everywhere, input resolutions kept
    for (k, f), o in zip(x.items(), out.values()):
        assert o.shape == (2, 12, *f.shape[-2:])


def test_aff_differs_from_add_and_fusion_modules_exist():
    add = AFFFPN(IN_CHANNELS, 12, fusion='add')
    aff = _randomize_bn(AFFFPN(IN_CHANNELS, 12, fusion='aff'))
    missing, unexpected = aff.load_state_dict(add.state_dict(), strict=False)  # same convs, fusions differ
    assert not unexpected and missing and all(k.startswith('fusions.') for k in missing)
    assert sum(p.numel() for p in add.parameters()) < sum(p.numel() for p in aff.parameters())
    assert len(aff.fusions) == len(IN_CHANNELS) - 1
    x = _features()
    a, b = add.eval()(x), aff.eval()(x)
    assert torch.equal(a['feat3'], b['feat3'])  # the top level has no merge
    assert not torch.allclose(a['feat0'], b['feat0'], atol=1e-3)


@pytest.mark.parametrize('fusion', ['aff', 'iaff'])
def test_every_parameter_gets_a_gradient(fusion):
    torch.manual_seed(0)  # (a tiny global branch can have all its ReLUs off for a few random samples)
    fpn = AFFFPN(IN_CHANNELS, 12, extra_blocks=LastLevelP6P7(12, 12), fusion=fusion).train()
    out = fpn(_features(batch=4))
    sum(o.square().mean() for o in out.values()).backward()
    for n, p in fpn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_torchscript():
    fpn = _randomize_bn(AFFFPN(IN_CHANNELS, 12, extra_blocks=LastLevelMaxPool(), fusion='iaff')).eval()
    scripted = script(fpn)
    x = _features()
    a, b = fpn(x), scripted(x)
    assert list(a.keys()) == list(b.keys())
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_clear_errors():
    fpn = AFFFPN(IN_CHANNELS, 12)
    x = _features()
    x['feat1'] = torch.randn(2, 15, 8, 8)
    with pytest.raises(ValueError, match=r'feat1 has shape \[2, 15, 8, 8\] but the pyramid expects 16 channels'):
        fpn(x)
    with pytest.raises(ValueError, match='built for 3 levels, got 2'):
        fpn(OrderedDict(list(_features().items())[:2]))
    with pytest.raises(ValueError, match='Unknown fusion'):
        AFFFPN(IN_CHANNELS, 12, fusion='concat')
    with pytest.raises(ValueError, match='positive channel counts'):
        AFFFPN([8, 0], 12)
    with pytest.raises(TypeError, match='ExtraFPNBlock'):
        AFFFPN(IN_CHANNELS, 12, extra_blocks=torch.nn.Identity())
