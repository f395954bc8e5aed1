"""Each fusion against a hand-written computation of its formula, plus the properties the
existing implementations get wrong (unused iAFF branch, the x2 factor, batch size 1)."""
import pytest
import torch
import torch.nn as nn

from aff_zoo.layers.fusion import (
    AFF, FUSIONS, MSCAM, AddFusion, LocalFusion, SEFusion, SKFusion, bottleneck_width, create_fusion,
    fuse_for_inference, iAFF,
)
from aff_zoo.deploy.export import script

C, R = 16, 4


def _pw(x, weight, bias=None):
    """1x1 convolution by hand: sum over input channels."""
    out = torch.einsum('oc,nchw->nohw', weight[:, :, 0, 0], x)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _bn(x, bn, training):
    """BatchNorm by hand: batch statistics (biased variance) in training, running ones in eval."""
    if training:
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean, bn.running_var
    xhat = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    return xhat * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _relu(x):
    return x * (x > 0)


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _local(b, x, training):
    """Paper Eq. 2: L(X) = BN(PWConv2(ReLU(BN(PWConv1(X)))))."""
    h = _relu(_bn(_pw(x, b.conv1.weight), b.bn1, training))
    return _bn(_pw(h, b.conv2.weight), b.bn2, training)


def _layer_norm(h, gn):
    """Normalise each sample's vector over its channels (biased variance), then the affine."""
    mean = h.mean(dim=1, keepdim=True)
    var = ((h - mean) ** 2).mean(dim=1, keepdim=True)
    return (h - mean) / torch.sqrt(var + gn.eps) * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)


def _global(b, x):
    """g(X) on the global average: PWConv2(ReLU(LN(PWConv1(GAP(X)))))."""
    gap = x.sum(dim=(2, 3), keepdim=True) / (x.shape[2] * x.shape[3])
    return _pw(_relu(_layer_norm(_pw(gap, b.conv1.weight), b.norm)), b.conv2.weight, b.conv2.bias)


def _mscam(m, x, training):
    """Paper Eq. 3: M(X) = sigmoid(L(X) + g(X))."""
    z = 0
    if m.local_att is not None:
        z = z + _local(m.local_att, x, training)
    if m.global_att is not None:
        z = z + _global(m.global_att, x)
    return _sigmoid(z)


def _aff(att, x, y, s, training):
    """Paper Eq. 4 with output scale s: s * (M(X+Y) X + (1 - M(X+Y)) Y)."""
    w = _mscam(att, x + y, training)
    return s * (w * x + (1 - w) * y)


def _randomise(module):
    """Non-trivial BN affine parameters and running statistics, so the references test them too."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g) * 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def _inputs(n=3, c=C, h=5, w=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64), torch.randn(n, c, h, w, generator=g, dtype=torch.float64)


@pytest.fixture(params=[True, False], ids=['train', 'eval'])
def training(request):
    return request.param


def _prep(module, training):
    torch.manual_seed(0)
    module = _randomise(module).double()
    return module.train(training)


def test_bottleneck_width():
    assert bottleneck_width(64, 4) == 16
    assert bottleneck_width(1024, 16) == 64
    assert bottleneck_width(16, 16) == 4   # floor
    assert bottleneck_width(2, 16) == 2    # never wider than the input
    with pytest.raises(ValueError, match='positive'):
        bottleneck_width(0, 4)


@pytest.mark.parametrize('use_local,use_global', [(True, True), (True, False), (False, True)])
def test_mscam_matches_equations(use_local, use_global, training):
    m = _prep(MSCAM(C, R, use_local=use_local, use_global=use_global), training)
    x, _ = _inputs()
    torch.testing.assert_close(m(x), _mscam(m, x, training), rtol=1e-10, atol=1e-12)
    assert m.local_att is None or m.local_att.conv1.out_channels == C // R


def test_mscam_needs_a_branch_and_right_channels():
    with pytest.raises(ValueError, match='at least one'):
        MSCAM(C, R, use_local=False, use_global=False)
    with pytest.raises(ValueError, match=f'N x {C} x H x W'):
        MSCAM(C, R)(torch.randn(2, C + 1, 4, 4))


@pytest.mark.parametrize('scale', [1.0, 2.0])
def test_aff_matches_eq4(scale, training):
    m = _prep(AFF(C, R, scale=scale), training)
    x, y = _inputs()
    torch.testing.assert_close(m(x, y), _aff(m.att, x, y, scale, training), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('scale', [1.0, 2.0])
def test_iaff_matches_eq5(scale, training):
    m = _prep(iAFF(C, R, scale=scale), training)
    x, y = _inputs()
    xi = _aff(m.att1, x, y, scale, training)                 # first stage replaces X + Y
    w2 = _mscam(m.att2, xi, training)                        # second MS-CAM, its own local AND global branch
    expected = scale * (w2 * x + (1 - w2) * y)
    torch.testing.assert_close(m(x, y), expected, rtol=1e-10, atol=1e-12)


def test_iaff_second_stage_uses_its_own_global_branch():
    """The existing PyTorch port computes stage 2 with stage 1's global branch; changing att2's global
    branch must change our output, and changing att1's must too (both are live)."""
    m = _prep(iAFF(C, R), False)
    x, y = _inputs()
    base = m(x, y)
    for branch in (m.att2.global_att, m.att1.global_att, m.att2.local_att):
        with torch.no_grad():
            branch.conv2.weight.mul_(1.5)
        assert not torch.allclose(m(x, y), base)
        base = m(x, y)


def test_add_se_sk_local_match_their_formulas(training):
    x, y = _inputs()
    torch.testing.assert_close(AddFusion(C)(x, y), x + y)

    se = _prep(SEFusion(C, R), training)
    torch.testing.assert_close(se(x, y), x + y * _mscam(se.att, y, training), rtol=1e-10, atol=1e-12)

    local = _prep(LocalFusion(C, R, scale=2.0), training)
    w = _mscam(local.att, x + y, training)
    torch.testing.assert_close(local(x, y), 2 * (w * x + (1 - w) * y), rtol=1e-10, atol=1e-12)

    sk = _prep(SKFusion(C, R, scale=2.0), training)
    a = sk.att
    logits = _global(a, x + y)
    lx, ly = logits[:, :C], logits[:, C:]
    wx = torch.exp(lx) / (torch.exp(lx) + torch.exp(ly))      # softmax over the two inputs
    torch.testing.assert_close(sk(x, y), 2 * (wx * x + (1 - wx) * y), rtol=1e-10, atol=1e-12)


def test_default_scale_is_two_everywhere_and_equals_addition_at_half():
    """One documented default: selection fusions at w = 0.5 reproduce x + y (scale 2)."""
    x, y = _inputs()
    for name in ('aff', 'iaff', 'sk', 'local'):
        m = create_fusion(name, C, R).double().eval()
        assert m.scale == 2.0, name
        for p in m.parameters():
            nn.init.zeros_(p)      # zero logits -> w = 0.5 (BN weight 0 too)
        torch.testing.assert_close(m(x, y), x + y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', list(FUSIONS))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    m = create_fusion(name, C, R)
    x, y = (t.float().requires_grad_() for t in _inputs())
    m(x, y).square().sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'{name}.{pname} got no gradient'
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


@pytest.mark.parametrize('name', list(FUSIONS))
def test_batch_size_one_trains(name):
    """BN after global pooling fails at batch size 1 in the authors' code; ours has none there."""
    m = create_fusion(name, C, R).train()
    x, y = torch.randn(1, C, 4, 4, requires_grad=True), torch.randn(1, C, 4, 4)
    m(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unknown_fusion_is_a_clear_error():
    with pytest.raises(ValueError, match='Unknown fusion .*choose one of add, se, sk, local, aff, iaff'):
        create_fusion('gated', C)


@pytest.mark.parametrize('name', ['aff', 'iaff', 'local'])
def test_fuse_for_inference_keeps_the_output(name):
    torch.manual_seed(0)
    m = _randomise(create_fusion(name, 16, 4)).eval()
    x, y = torch.randn(2, 16, 7, 7), torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        ref = m(x, y)
        fused = fuse_for_inference(m)
        assert not any(isinstance(mod, nn.BatchNorm2d) for mod in fused.modules())
        torch.testing.assert_close(fused(x, y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', list(FUSIONS))
def test_fusions_script(name):
    m = create_fusion(name, C, R).eval()
    x, y = torch.randn(2, C, 4, 4), torch.randn(2, C, 4, 4)
    torch.testing.assert_close(script(m)(x, y), m(x, y))


@pytest.mark.parametrize('name', ['aff', 'iaff', 'local', 'sk'])
def test_zero_init_last_makes_the_fusion_the_addition(name):
    from aff_zoo.layers.fusion import zero_init_fusions
    torch.manual_seed(0)
    f = create_fusion(name, 16).train()
    x, y = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    assert (f(x, y) - (x + y)).abs().max() > 1e-2  # random attention: not the addition
    assert zero_init_fusions(nn.Sequential(f, create_fusion('add', 16), create_fusion('se', 16))) == 1
    torch.testing.assert_close(f(x, y), x + y)
