"""The fast paths compute what the plain ones do: BN folding, the benchmark's port structure,
TorchScript and torch.compile (no graph breaks). Speed itself is measured by scripts/benchmark.py."""
import pytest
import timm
import torch
import torch.nn as nn

import aff_zoo  # noqa: F401  (registers the models)
from aff_zoo.deploy.benchmark import PortAFF, PortiAFF, benchmark_fusions, benchmark_models, port_from_fusion
from aff_zoo.layers.fusion import blend, create_fusion, fuse_for_inference
from aff_zoo.models import AFFResNet
from aff_zoo.deploy.export import script


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding them is actually checked."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.3, generator=g)
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.normal_(0, 0.3, generator=g)
    return module


def _tiny_imagenet_net(fusion: str) -> AFFResNet:
    return AFFResNet(layers=(1, 1, 1, 1), fusion=fusion, stem_width=8, stem_type='deep', avg_down=True,
                     cardinality=4, base_width=4, num_classes=7)


@pytest.mark.parametrize('fusion', ['aff', 'iaff', 'local'])
def test_fused_model_equals_unfused_in_eval(fusion):
    torch.manual_seed(0)
    model = _randomise(_tiny_imagenet_net(fusion)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        fuse_for_inference(model)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) < n_bn
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        fuse_for_inference(model)  # a second call is a no-op
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_fuse_refuses_a_training_module():
    with pytest.raises(ValueError, match='eval'):
        fuse_for_inference(create_fusion('aff', 16, 4).train())


def test_blend_formula_and_dtypes():
    x, y, w = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3), torch.rand(2, 8, 1, 1)
    torch.testing.assert_close(blend(x, y, w, 2.0), 2.0 * (w * x + (1 - w) * y))
    # mixed dtypes (no autocast) promote instead of failing
    out = blend(x.double(), y, w, 1.0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, (w * x + (1 - w) * y).double())
    # reuse_w: same numbers, written into w's memory (inference), inputs untouched
    x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    w = torch.rand(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    ref, x0, y0 = 2.0 * (w * x + (1 - w) * y), x.clone(), y.clone()
    out = blend(x, y, w, 2.0, reuse_w=True)
    assert out.data_ptr() == w.data_ptr()
    torch.testing.assert_close(out, ref)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    # a w of another layout or a broadcast w gets a fresh output instead
    w = torch.rand(2, 8, 3, 3)
    assert blend(x, y, w, 2.0, reuse_w=True).data_ptr() != w.data_ptr()
    w = torch.rand(2, 8, 1, 1)
    torch.testing.assert_close(blend(x, y, w, 2.0, reuse_w=True), 2.0 * (w * x + (1 - w) * y))


@pytest.mark.parametrize('fusion', ['aff', 'iaff'])
def test_port_structure_equals_ours(fusion):
    torch.manual_seed(0)
    ours = _randomise(create_fusion(fusion, 32, 4)).eval()
    port = port_from_fusion(ours)
    assert isinstance(port, PortAFF if fusion == 'aff' else PortiAFF)
    x, y = torch.randn(3, 32, 6, 6), torch.randn(3, 32, 6, 6)
    with torch.no_grad():
        ref = ours(x, y)
        torch.testing.assert_close(port(x, y), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fuse_for_inference(ours)(x, y), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match='AFF or iAFF'):
        port_from_fusion(create_fusion('se', 32, 4))


@pytest.mark.parametrize('fused', [False, True])
def test_scripted_model_equals_eager(fused):
    torch.manual_seed(0)
    model = _randomise(timm.create_model('iaff_resnet8')).eval()
    if fused:
        fuse_for_inference(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(script(model)(x), model(x))


@pytest.mark.parametrize('train', [False, True])
def test_no_graph_breaks(train):
    """torch.compile sees one graph: no Python-side branching on data, no unsupported ops."""
    torch._dynamo.reset()
    model = timm.create_model('iaff_resnet8').train(train)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_gradients_unchanged_by_in_place_ops():
    """The in-place sigmoid/add/scale do not corrupt autograd: gradients match a plain re-computation."""
    torch.manual_seed(0)
    m = _randomise(create_fusion('iaff', 16, 4)).train()
    x, y = torch.randn(2, 16, 5, 5, requires_grad=True), torch.randn(2, 16, 5, 5, requires_grad=True)
    out = m(x, y)
    gx, gy = torch.autograd.grad(out.square().sum(), [x, y])

    def mscam(att, s):
        la, ga = att.local_att, att.global_att
        loc = la.bn2(la.conv2(torch.relu(la.bn1(la.conv1(s)))))
        return torch.sigmoid(loc + ga(s))

    m.zero_grad()
    w1 = mscam(m.att1, x + y)
    xi = 2 * (w1 * x + (1 - w1) * y)
    w2 = mscam(m.att2, xi)
    ref = 2 * (w2 * x + (1 - w2) * y)
    rx, ry = torch.autograd.grad(ref.square().sum(), [x, y])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gy, ry, rtol=1e-4, atol=1e-4)


def test_benchmark_smoke(tmp_path):
    rows = benchmark_models(['add_resnet8', 'aff_resnet8'], batch_size=2, img_size=32, num_classes=10,
                            repeats=1, iters=1, warmup=1, progress=False)
    assert [r['model'] for r in rows] == ['add_resnet8', 'aff_resnet8']
    for r in rows:
        assert r['infer_img_s'] > 0 and r['train_img_s'] > 0 and r['gmacs'] > 0
    assert rows[1]['params_m'] > rows[0]['params_m']
    assert rows[1]['saved_mb'] > rows[0]['saved_mb'] > 0  # AFF keeps more activations for backward
    from aff_zoo.deploy.benchmark import _saved_mb
    model, x = timm.create_model('aff_resnet8').train(), torch.randn(2, 3, 32, 32)
    full = _saved_mb(model, x)
    model.set_grad_checkpointing(True)
    assert 0 < _saved_mb(model, x) < full
    fusion_rows = benchmark_fusions(shapes=(('iaff', 16, 4, 4),), batch_size=2, repeats=1, iters=1, progress=False)
    assert {r['name'] for r in fusion_rows} >= {'port (NCHW)', 'ours fused (channels_last)'}


def test_benchmark_cli_writes_tables(tmp_path, capsys):
    from aff_zoo.cli import main
    out = tmp_path / 'b'
    assert main(['benchmark', '--suite', 'cifar', '--cifar-models', 'add_resnet8', 'aff_resnet8',
                 '--cifar-baseline', 'add_resnet8', '--cifar-batch-size', '2', '--repeats', '1', '--iters', '1',
                 '--out', str(out)]) == 0
    text = (tmp_path / 'b-cifar.md').read_text()
    assert 'aff_resnet8' in text and 'train_img_s_x' in text
    assert (tmp_path / 'b-cifar.json').exists() and (tmp_path / 'b-cifar.csv').exists()
    assert main(['benchmark', '--suite', 'cifar', '--cifar-models', 'aff_resnet8', '--cifar-baseline', 'nope',
                 '--cifar-batch-size', '2', '--repeats', '1', '--iters', '1', '--out', str(out)]) == 2
    assert "--cifar-baseline 'nope' is not in --cifar-models" in capsys.readouterr().err


def test_ratios_pair_models_within_rounds():
    from aff_zoo.deploy.benchmark import add_ratios
    # round 2 ran under load for both models: paired ratios 0.5, 0.5, 0.6 -> 0.5; the ratio of medians would be 0.6
    rows = [dict(model='base', gmacs=4.0, infer_img_s=10.0, infer_rounds=[10.0, 4.0, 10.0]),
            dict(model='ours', gmacs=5.0, infer_img_s=5.0, infer_rounds=[5.0, 2.0, 6.0]),
            dict(model='old', gmacs=2.0, infer_img_s=20.0)]  # no rounds: ratio of the figures
    add_ratios(rows, 'base', ('infer_img_s',))
    assert [r['infer_img_s_x'] for r in rows] == [1.0, 0.5, 2.0]
    assert [r['gmacs_bound_x'] for r in rows] == [1.0, 0.8, 2.0]
    with pytest.raises(ValueError, match="baseline 'nope'"):
        add_ratios(rows, 'nope', ('infer_img_s',))


def test_interleaved_rates_times_each_call_in_turn():
    from aff_zoo.deploy.benchmark import interleaved_rates
    now, order = [0.0], []
    cost = {'a': 2.0, 'b': 4.0}  # seconds per call on a fake clock that only the calls advance

    def fn(k):
        order.append(k)
        now[0] += cost[k]
    rates = interleaved_rates({k: (lambda k=k: fn(k)) for k in cost}, items=8, rounds=3, clock=lambda: now[0])
    assert order == ['a', 'b'] * 3
    assert rates == {'a': [4.0] * 3, 'b': [2.0] * 3}


@pytest.mark.parametrize('scale', [1.0, 2.0])
def test_sigmoid_blend_backward_is_exact(scale):
    """The hand-written backward of the fused sigmoid-and-blend, against numerical differentiation."""
    from aff_zoo.layers.fusion import _SigmoidBlend
    g = torch.Generator().manual_seed(0)
    x, y, logits = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: _SigmoidBlend.apply(a, b, c, scale), (x, y, logits))
    torch.testing.assert_close(_SigmoidBlend.apply(x, y, logits, scale),
                               scale * (torch.sigmoid(logits) * x + (1 - torch.sigmoid(logits)) * y))


def test_plain_stages_compute_timms_resnet50d():
    """With every stage adding, our ImageNet model runs timm's own resnet50d computation (same weights,
    same outputs), so benchmark ratios against resnet50d measure the fusion and nothing else."""
    torch.manual_seed(0)
    peer = timm.create_model('resnet50d', num_classes=5).eval()
    ours = timm.create_model('aff_resnet50', fusion='add', num_classes=5).eval()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x))
