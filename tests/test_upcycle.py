"""Upcycling (aff_zoo.upcycle): an AFF / iAFF model built from a plain peer computes the peer's function
(eval and train mode), training gets past the zero start, and parents that do not fit are refused by name."""
import pytest
import timm
import torch
import torch.nn as nn

import aff_zoo
from aff_zoo.layers.fusion import MSCAM
from aff_zoo.models.upcycle import UpcycleError, plain_keys, upcycle, zero_fusion_logits


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine and statistics everywhere: timm zero-inits each block's last BN gamma, which
    would make every residual branch zero and the equality test trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


PEERS = [('aff_resnet50', 'resnet50d'), ('iaff_resnet50', 'resnet50d'),
         ('aff_resnext50', 'resnext50d_32x4d'), ('iaff_resnext50', 'resnext50d_32x4d'),
         ('aff_resnet101', 'resnet101d'), ('iaff_resnet101', 'resnet101d')]


@pytest.mark.parametrize('peer', sorted({p for _, p in PEERS}))
def test_upcycled_logits_equal_parent(peer):
    """Every AFF/iAFF model with an exact plain peer: logits equal (rel. diff <= 1e-5) in eval and in
    train mode (BatchNorm on batch statistics), at 64 px (train mode at 32 px) to keep it fast. Train mode runs in float64: small batches give
    layer4's BatchNorms a few values per channel, which amplify float32 rounding (``2 * lerp(y, x, 0.5)``
    vs ``x + y``: one ulp) to ~2e-5 after 33 blocks; in float64 the rounding is gone and any real
    difference would still show."""
    torch.manual_seed(0)
    parent = _randomize(timm.create_model(peer, num_classes=7))
    inputs = {False: torch.randn(2, 3, 64, 64), True: torch.randn(4, 3, 32, 32, dtype=torch.float64)}
    for arch in [a for a, p in PEERS if p == peer]:
        model = upcycle(arch, parent)
        assert model.num_classes == 7  # the parent's head size by default
        assert any(isinstance(m, MSCAM) for m in model.modules())
        for train, x in inputs.items():
            parent.train(train).to(x.dtype), model.train(train).to(x.dtype)
            with torch.no_grad():
                ref, out = parent(x), model(x)
            assert ref.abs().max() > 0.1
            assert _rel(out, ref) <= 1e-5, (arch, train, _rel(out, ref))
        # the check above can fail: non-zero attention logits change the output
        parent.eval().float(), model.eval().float()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, MSCAM):
                    m.global_att.conv2.bias.fill_(2.0)
            assert _rel(model(inputs[False]), parent(inputs[False])) > 1e-3


def test_training_gets_past_the_zero_start():
    """Plain SGD (no weight decay, so only gradients move weights): step 1 moves every zeroed tensor (and, the
    other fusion tensors having exactly zero gradient then, nothing else in the fusions); step 2 moves all."""
    torch.manual_seed(0)
    parent = _randomize(timm.create_model('add_resnet20'))
    model = upcycle('iaff_resnet20', parent).train()
    fusion = {n: p for n, p in model.named_parameters() if '.fusion.' in n}
    zeroed = {n for n in fusion if n.endswith(('local_att.bn2.weight', 'local_att.bn2.bias',
                                               'global_att.conv2.weight', 'global_att.conv2.bias'))}
    assert zeroed and all(fusion[n].abs().max() == 0 for n in zeroed)
    assert len(zeroed) == 4 * 2 * 9  # 2 MS-CAMs per iAFF, 9 blocks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    start = {n: p.detach().clone() for n, p in fusion.items()}

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return {n for n, p in fusion.items() if not torch.equal(p, start[n])}
    assert step() == zeroed
    assert step() == set(fusion)


def test_cifar_zoo_tag_parent_and_cfg():
    """A zoo tag as parent (the shipped add_resnet20.cifar10_e12): same logits, and the parent's data config."""
    parent = timm.create_model('add_resnet20.cifar10_e12', pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    for arch in ('aff_resnet20', 'iaff_resnet20'):
        model = upcycle(arch, 'add_resnet20.cifar10_e12').eval()
        with torch.no_grad():
            assert _rel(model(x), parent(x)) <= 1e-5
        assert model.pretrained_cfg['upcycled_from'] == 'add_resnet20.cifar10_e12'
        assert model.pretrained_cfg['label_names'] == parent.pretrained_cfg['label_names']
    assert aff_zoo.upcycle is upcycle


def test_parents_that_do_not_fit_are_named():
    parent = timm.create_model('add_resnet20')
    with pytest.raises(UpcycleError, match=r'shape mismatches: stem.conv.weight|not a plain peer of aff_resnet32'):
        upcycle('aff_resnet32', parent)  # deeper: keys of the child the parent lacks
    with pytest.raises(UpcycleError, match=r"keys of aff_resnet8 the parent lacks: none; parent keys aff_resnet8 has "
                                           r"no plain place for: stages\.0\.1\."):
        upcycle('aff_resnet8', parent)
    with pytest.raises(UpcycleError, match='no plain place for: stages.0.0.fusion'):
        upcycle('aff_resnet20', timm.create_model('aff_resnet20'))  # not a plain parent
    with pytest.raises(UpcycleError, match='SE fusion'):
        upcycle('se_resnet20', parent)
    with pytest.raises(UpcycleError, match='fusion_scale=1'):
        upcycle('aff_resnet20', parent, fusion_scale=1.0)
    with pytest.warns(UserWarning, match=r'head starts fresh'):
        model = upcycle('aff_resnet20', parent, num_classes=3)
    assert model.num_classes == 3
    assert plain_keys(model) == [k for k in timm.create_model('add_resnet20', num_classes=3).state_dict()]
    assert zero_fusion_logits(model) == 9
