"""Graph capture of every registered model, in timm's manner: ``torch.fx.symbolic_trace`` (eval and train mode)
and ``torch.export`` with a dynamic batch dimension, each matching the eager model; FX feature extraction
(torchvision's ``create_feature_extractor``, timm's ``feature_cls='fx'``), FX + TorchScript, and ``.pt2`` files.

One model instance serves the FX and the export checks; inputs are small (CIFAR 32 px, ImageNet 64 px)."""
import pytest
import timm
import torch

import aff_zoo
from aff_zoo.cli import main
from aff_zoo.deploy.export import check_exported, convert, export_program, script
from aff_zoo.models import IMAGENET_MODELS

ALL_MODELS = aff_zoo.list_models()
ATOL = 1e-5
LEAVES = {'check_image_batch', 'sigmoid_blend', 'blend', 'check_attention_input'}


def _size(name):
    return 64 if name in IMAGENET_MODELS else 32


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _called_functions(gm: torch.fx.GraphModule):
    return {getattr(n.target, '__name__', str(n.target)) for n in gm.graph.nodes if n.op == 'call_function'}


@pytest.mark.parametrize('name', ALL_MODELS)
def test_fx_and_export_match_eager(name):
    model = _create(name).eval()
    s = _size(name)
    x = torch.randn(2, 3, s, s)

    # FX, eval mode: the input checks and the fused blend stay in the graph as leaves (their Python branches)
    gm = torch.fx.symbolic_trace(model)
    assert 'check_image_batch' in _called_functions(gm)
    if 'aff' in name or 'local' in name:
        assert 'sigmoid_blend' in _called_functions(gm)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=ATOL)

    # torch.export, dynamic batch: exported at batch 2, run at batch 3 and 1
    program = export_program(model, x)
    run = program.module()
    with torch.no_grad():
        for b in (3, 1):
            xb = torch.randn(b, 3, s, s)
            torch.testing.assert_close(run(xb), model(xb), rtol=0, atol=ATOL)

    # FX, train mode (batch statistics; the hand-written backward of the fused blend): forward and backward
    gm = torch.fx.symbolic_trace(model.train())
    out_eager, out_fx = model(x), gm(x)
    torch.testing.assert_close(out_fx, out_eager, rtol=0, atol=ATOL)
    out_fx.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:1] + grads[-1:])  # stem and classifier reached through the graph


def test_traced_graph_keeps_the_input_checks():
    model = _create('aff_resnet8').eval()
    gm = torch.fx.symbolic_trace(model)
    for bad, message in [(torch.randn(1, 1, 32, 32), 'Expected an N x 3 x H x W'), (torch.randn(1, 3, 2, 2), 'smaller')]:
        for m in (model, gm):
            with pytest.raises(ValueError, match=message):
                m(bad)
    with pytest.raises(ValueError, match='MSCAM expects an N x 16'):
        torch.fx.symbolic_trace(model.stages[0][0].fusion.att)(torch.randn(1, 8, 4, 4), )


def test_feature_extraction_through_fx():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = _create('aff_resnet50').eval()
    x = torch.randn(1, 3, 64, 64)
    extractor = create_feature_extractor(model, return_nodes={'layer2': 'c3', 'layer4': 'c5', 'fc': 'logits'})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out['logits'], model(x), rtol=0, atol=ATOL)
        ref = model.forward_intermediates(x, indices=(2, 4), intermediates_only=True)
    assert out['c3'].shape == (1, 512, 8, 8) and out['c5'].shape == (1, 2048, 2, 2)
    torch.testing.assert_close(out['c5'], ref[1], rtol=0, atol=ATOL)

    for name, size in (('aff_resnet50', 64), ('iaff_resnet20', 32)):
        fx_feats = _create(name, features_only=True, feature_cls='fx').eval()
        getter_feats = _create(name, features_only=True).eval()  # timm's default for aff_zoo: forward_intermediates
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            a, b = fx_feats(x), getter_feats(x)
        assert len(a) == len(b) and [f.shape for f in a] == [f.shape for f in b]
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb, rtol=0, atol=ATOL)


def test_fx_graph_scripts():
    """timm's test_model_forward_fx_torchscript: the FX graph (with its leaves) compiles with TorchScript."""
    model = _create('iaff_resnet8').eval()
    scripted = script(torch.fx.symbolic_trace(model))  # script() silences TorchScript's deprecation warning
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=ATOL)


def test_pt2_file_and_cli(tmp_path, capsys):
    model = _create('sk_resnet8').eval()
    (r,) = convert(model, tmp_path, 'sk', formats=('exported',), input_size=(32, 32))
    assert r.path.endswith('sk.pt2') and r.max_abs_diff <= ATOL and r.max_abs_output > 1e-3
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # the check compares against the model it is given
    assert check_exported(model, r.path, (32, 32))[0] > 0.5

    assert main(['convert', '--model', 'aff_resnet8', '--format', 'exported', '--output', str(tmp_path)]) == 0
    assert 'exported' in capsys.readouterr().out
    loaded = torch.export.load(str(tmp_path / 'aff_resnet8.pt2')).module()
    assert loaded(torch.randn(5, 3, 32, 32)).shape == (5, 10)
