"""TorchScript and ONNX export of the classification models, checked against eager PyTorch (onnxruntime for
ONNX): max |difference| <= 1e-4 on the same input, at batch sizes 1 and 3 (the batch dimension is dynamic)."""
import os
import re

import onnx
import pytest
import timm
import torch

import aff_zoo
from aff_zoo.cli import main
from aff_zoo.layers.fusion import LocalFusion
from aff_zoo.deploy.export import check_onnx, convert, export_onnx, script
from aff_zoo.models import IMAGENET_MODELS

ATOL = 1e-4
# Depth variants share every module type, so by default: every fusion at the smallest depth of each block
# type and one AFF and one iAFF ImageNet model. AFF_ZOO_EXPORT_ALL=1 runs them all.
if os.environ.get('AFF_ZOO_EXPORT_ALL'):
    EXPORT_MODELS = aff_zoo.list_models()
else:
    EXPORT_MODELS = (aff_zoo.list_models('*_resnet8') + aff_zoo.list_models('*_resnext20_32x4d')
                     + ['aff_resnet50', 'iaff_resnext50'])


def _size(name):
    return (64, 64) if name in IMAGENET_MODELS else (32, 32)


def _calibrated(name, **kwargs):
    """A random-init model made numerically well-conditioned, so that 1e-4 tests the export, not the init.

    * BatchNorm statistics are estimated on random data, as training would: untrained ones (mean 0, var 1)
      let activations of deep nets grow to ~1e6, where any rounding difference is amplified.
    * Local-only attention (the 'local' fusion) is halved: at the default init local_resnet56 is chaotic,
      its own fp32 and fp64 outputs differ by 1e-2, so no two fp32 backends can agree to 1e-4.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LocalFusion):
                for p in m.parameters():
                    p.mul_(0.5)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.randn(8, model.in_chans, *_size(name)))
    return model.eval()


def test_script_drops_a_stale_builtin_entry_at_a_live_attribute():
    """The failure of one CI run, made on purpose: TorchScript's builtin table holding the id of a Conv2d's
    padding list (as a freed op at that address leaves it) made torch.jit.script fail on local_resnet8."""
    model = _calibrated('local_resnet8')
    pads = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))._reversed_padding_repeated_twice
    table = torch.jit._builtins._get_builtin_table()
    table[id(pads)] = 'aten::pad'
    try:
        scripted = script(model)
    finally:
        table.pop(id(pads), None)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', EXPORT_MODELS)
def test_export_parity(name, tmp_path):
    model = _calibrated(name)
    formats = ('onnx', 'torchscript')  # the .pt2 format of every model: tests/test_graph.py
    results = convert(model, tmp_path, name, formats, input_size=_size(name), exporter='legacy', atol=ATOL)
    assert [r.format for r in results] == list(formats)
    for r in results:
        assert os.path.isfile(r.path)
        assert r.max_abs_diff <= ATOL and r.max_abs_output > 1e-2, r  # outputs are not ~0, so 1e-4 means something
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]  # atomic writes leave nothing behind


def test_dynamo_exporter_and_dynamic_batch(tmp_path):
    model = _calibrated('iaff_resnet8')
    path = export_onnx(model, tmp_path / 'm.onnx', input_size=(32, 32), exporter='dynamo')
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic batch dimension
    diff, scale = check_onnx(model, path, (32, 32), batch_sizes=(1, 3, 5))
    assert diff <= ATOL and scale > 1e-2


def test_parity_check_catches_a_different_model(tmp_path):
    """The check compares against the model it is given: an exported file of other weights fails it."""
    model = _calibrated('aff_resnet8')
    path = export_onnx(model, tmp_path / 'm.onnx', input_size=(32, 32), exporter='legacy')
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    diff, _ = check_onnx(model, path, (32, 32))
    assert diff > 0.5


def test_cli(tmp_path, capsys):
    from safetensors.torch import save_file
    model = _calibrated('se_resnet8', num_classes=5, in_chans=1)
    ckpt = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(ckpt))
    out = tmp_path / 'out'
    assert main(['convert', '--model', 'se_resnet8', '--checkpoint', str(ckpt), '--num-classes', '5',
                 '--in-chans', '1', '--format', 'both', '--exporter', 'legacy', '--output', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'se_resnet8' in printed and 'onnx' in printed and 'torchscript' in printed
    assert sorted(os.listdir(out)) == ['se_resnet8.onnx', 'se_resnet8.torchscript.pt']
    for argv, message in [
        (['--checkpoint', str(tmp_path / 'model.pth')], 'only .safetensors'),
        (['--checkpoint', str(ckpt), '--in-chans', '1'],  # class-count mismatch between the weights and the head
         r'5-class head \(fc.weight \[5, 64\]\) but the model was built with 10 classes.*--num-classes 5'),
    ]:
        assert main(['convert', '--model', 'se_resnet8', '--output', str(out), *argv]) == 2
        assert re.search(message, capsys.readouterr().err), message
    assert main(['convert', '--model', 'nothing_*', '--output', str(out)]) == 2
    assert 'No aff_zoo model matches' in capsys.readouterr().err
