"""Generic model tests in timm's manner: every registered aff_zoo model, small inputs."""
import pytest
import timm
import torch

import aff_zoo
from aff_zoo.models import CIFAR_MODELS, IMAGENET_MODELS
from aff_zoo.deploy.export import script

ALL_MODELS = aff_zoo.list_models()
# ImageNet-size models run at 64x64 here (total stride 32 -> 2x2 at the last stage) to keep the suite fast.
IMAGENET_SIZE, CIFAR_SIZE = 64, 32


def _size(name):
    return IMAGENET_SIZE if name in IMAGENET_MODELS else CIFAR_SIZE


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def test_registry_lists_every_model():
    assert len(IMAGENET_MODELS) == 8 and len(CIFAR_MODELS) == 48
    registered = set(timm.list_models())
    assert set(ALL_MODELS) <= registered
    assert set(timm.list_models('*aff*')) >= {m for m in ALL_MODELS if 'aff' in m}
    assert 'aff_resnext50' in timm.list_models('aff_*')
    assert aff_zoo.list_models('iaff_resnet*') == ['iaff_resnet50', 'iaff_resnet101', 'iaff_resnet8', 'iaff_resnet20',
                                                   'iaff_resnet32', 'iaff_resnet56', 'iaff_resnet32_w4', 'iaff_resnet9',
                                                   'iaff_resnet11']


@pytest.mark.parametrize('name', ALL_MODELS)
def test_forward_eval_deterministic_and_default_cfg(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    s = _size(name)
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, cfg['num_classes'])
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    # ImageNet default tags are upcycled from a timm parent and carry its input size (resnet101d.ra2: 256)
    assert cfg['input_size'] == ((3, 256, 256) if name.endswith('resnet101') else (3, 224, 224)
                                 if name in IMAGENET_MODELS else (3, 32, 32))
    for key in ('mean', 'std', 'crop_pct', 'interpolation', 'license'):
        assert cfg.get(key), key
    modules = dict(model.named_modules())
    assert cfg['first_conv'] in modules and cfg['classifier'] in modules
    assert modules[cfg['first_conv']].in_channels == 3
    assert modules[cfg['classifier']] is model.get_classifier()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    # zero_init_last zeroes the last BN of each residual branch (ImageNet) and the last layer of each
    # attention, which blocks gradients at step 0 by design; switch it off here so "every parameter gets a
    # gradient" is a real check (test_zero_init_trains_every_parameter_from_the_second_step covers it on).
    model = _create(name, num_classes=5, zero_init_last=False).train()
    s = _size(name)
    # Three batches, so a ReLU unit that happens to be inactive for one random batch is not reported.
    for _ in range(3):
        model(torch.randn(2, 3, s, s)).logsumexp(1).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f'parameters without gradient: {dead[:10]}'


@pytest.mark.parametrize('name', ['aff_resnet20', 'iaff_resnext20_32x4d', 'sk_resnet8', 'iaff_resnet50'])
def test_batch_size_one_trains(name):
    model = _create(name).train()
    s = _size(name) * 2  # ImageNet models: 128 px keeps 4x4 at the last stage for its local BN
    model(torch.randn(1, 3, s, s)).sum().backward()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_torchscript(name):
    model = _create(name).eval()
    s = _size(name)
    x = torch.randn(1, 3, s, s)
    scripted = script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_torch_compile_smoke():
    model = _create('aff_resnet8').eval()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


# Paper Table 5 parameter counts (1000-class head); ours must land within 2%.
PAPER_PARAMS = {'aff_resnet50': 30.3e6, 'aff_resnext50': 29.9e6, 'iaff_resnet50': 35.1e6, 'iaff_resnext50': 34.7e6}


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_parameter_count_matches_paper(name):
    n = sum(p.numel() for p in _create(name).parameters())
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, f'{name}: {n / 1e6:.2f} M'


def test_plain_addition_peer_is_timm_resnet50d():
    """With every stage adding, our ImageNet model is exactly timm's resnet50d (same parameter count)."""
    ours = _create('aff_resnet50', fusion='add')
    peer = timm.create_model('resnet50d')
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())


def test_timm_kwargs_behave_like_timm_resnets():
    model = _create('aff_resnext50', num_classes=10, in_chans=1, drop_path_rate=0.1, features_only=True)
    feats = model(torch.randn(2, 1, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]

    model = _create('aff_resnet20', num_classes=100, in_chans=1, drop_path_rate=0.1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    model.reset_classifier(7)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, model.num_features)


@pytest.mark.parametrize('name', ['aff_resnet20', 'aff_resnet50'])
def test_grad_checkpointing_gives_the_same_result(name):
    model = _create(name).eval()
    s = _size(name)
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref)


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(RuntimeError, match='No weights exist for aff_resnext101'):  # no plain D-stem parent
        timm.create_model('aff_resnext101', pretrained=True)


def test_unknown_tag_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown pretrained tag 'nope' for aff_resnet20"):
        timm.create_model('aff_resnet20.nope')


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match='in_chans'):
        _create('aff_resnet8')(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize('arch, widths, res_stages', [('resnet9', [64, 128, 256, 512], (0, 2)),
                                                      ('resnet11', [64, 128, 384, 512], (0, 1, 2))])
def test_resnet9_and_11_are_conv_pool_stages_with_the_fusion_in_their_residual_blocks(arch, widths, res_stages):
    """add_resnet9 against a hand-written forward of Page's DAWNBench ResNet-9 (pool before BN here), add_resnet11
    against airbench96's shape (widths 128/384/512, a residual block in every stage) built from the same pieces;
    aff_* differs only in the fusion of the residual blocks, and keeps max pooling when its head is replaced."""
    import torch.nn.functional as F
    model = _create(f'add_{arch}').eval()
    for m in model.modules():  # non-trivial BN statistics, so that a misplaced BN shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0), m.bias.data.uniform_(-0.2, 0.2)

    def cbr(conv, bn, x):
        return F.relu(bn(conv(x)))
    x = torch.randn(3, 3, 32, 32)
    h = cbr(model.stem.conv, model.stem.bn, x)
    for i, stage in enumerate(model.stages):
        h = F.relu(stage.bn(F.max_pool2d(stage.conv(h), 2)))
        if i in res_stages:
            b = stage.block
            h = h + cbr(b.conv2, b.bn2, cbr(b.conv1, b.bn1, h))
        else:
            assert not hasattr(stage, 'block')
    ref = model.fc(h.amax((2, 3))) * 0.125
    assert [c.shape[1] for c in model.forward_intermediates(x, intermediates_only=True)] == widths
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    aff = _create(f'aff_{arch}')
    fusions = [f'stages.{i}.block.fusion' for i in res_stages]
    assert sorted(n for n, _ in aff.named_modules() if n.endswith('.fusion')) == fusions
    assert all(type(aff.get_submodule(n)).__name__ == 'AFF' for n in fusions)
    aff.reset_classifier(4)
    assert aff.global_pool.pool_type == 'max' and aff(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert timm.create_model(f'aff_{arch}').pretrained_cfg['pool_size'] == (4, 4)


@pytest.mark.parametrize('name', ['aff_resnet20', 'iaff_resnet20', 'sk_resnet8', 'local_resnet8', 'iaff_resnet50'])
def test_zero_init_starts_every_fusion_as_the_addition(name):
    """With the default zero_init_last, each selection fusion computes x + y at initialisation."""
    model = _create(name).train()
    fusions = [m for n, m in model.named_modules() if n.endswith('fusion') and any(True for _ in m.parameters())]
    assert fusions
    seen = []

    def check(m, args, out):
        seen.append(m)
        torch.testing.assert_close(out, args[0] + args[1])

    for m in fusions:
        m.register_forward_hook(check)
    s = _size(name)
    model(torch.randn(2, 3, s, s))
    assert len(seen) == len(fusions)


def test_zero_init_trains_every_parameter_from_the_second_step():
    """Zeroed last layers move at the first step; the layers behind them, and iAFF's inner MS-CAM (whose
    output reaches the loss only through the outer attention's logits), from the second."""
    model = _create('iaff_resnet8', num_classes=5).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        if step == 0:
            assert all('fusion.att' in n for n in dead) and any('att2.local_att.conv1' in n for n in dead), dead
            assert not any(n.endswith('att2.local_att.bn2.weight') for n in dead), dead
        opt.step()
    assert not dead, f'parameters without gradient at step 3: {dead[:10]}'


def test_zero_init_keeps_deep_attention_gradients_at_the_additions_scale():
    """Random attentions in a deep stack multiply the gradient (iaff_resnet32's stem weights grew 400x in
    96 steps); zero-initialised ones start at addition's scale."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def stem_grad(name, **kw):
        torch.manual_seed(1)
        model = _create(name, **kw).train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return float(model.stem.conv.weight.grad.norm())

    add = stem_grad('add_resnet32')
    assert stem_grad('iaff_resnet32') < 1.5 * add
    assert stem_grad('iaff_resnet32', zero_init_last=False) > 4 * add  # what the zero init removes
