"""hubconf.py: torch.hub entrypoints generated from the zoo and the weights registry."""
from pathlib import Path

import pytest
import torch

import aff_zoo
from aff_zoo.models._builder import registered_weights
from aff_zoo.models.weights import WEIGHTS

REPO_DIR = str(Path(__file__).resolve().parent.parent)


def _hubconf():
    """hubconf.py imported afresh, as torch.hub.load(source='local') does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('hubconf', str(Path(REPO_DIR) / 'hubconf.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _entrypoints():
    """What ``torch.hub.list`` reports for a GitHub repo: public callables of hubconf."""
    mod = _hubconf()
    return {f for f in dir(mod) if callable(getattr(mod, f)) and not f.startswith('_')}


def test_every_model_and_weight_has_an_entrypoint():
    entries = _entrypoints()
    assert set(aff_zoo.list_models()) <= entries
    assert {w.name for w in WEIGHTS} <= entries
    upcycled = {u.name for u in aff_zoo.models.weights.UPCYCLED}
    assert entries == set(aff_zoo.list_models()) | {w.name for w in WEIGHTS} | upcycled


def test_load_imagenet_model_from_local_repo():
    model = torch.hub.load(REPO_DIR, 'aff_resnext50', source='local')
    assert isinstance(model, aff_zoo.AFFResNet) and model.num_classes == 1000
    assert model.pretrained_cfg['architecture'] == 'aff_resnext50'


def test_kwargs_go_to_timm_and_device_moves():
    model = torch.hub.load(REPO_DIR, 'aff_resnet8', source='local', num_classes=3, in_chans=1, device='cpu')
    assert model.num_classes == 3 and next(model.parameters()).device == torch.device('cpu')
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error on a machine without CUDA')
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device='cuda' was requested but CUDA is not available"):
        torch.hub.load(REPO_DIR, 'aff_resnet8', source='local', device='cuda')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_moves_model():
    model = torch.hub.load(REPO_DIR, 'aff_resnet8', source='local', device='cuda')
    assert next(model.parameters()).is_cuda


def test_pretrained_without_weights_names_existing_tags(hub_checkpoint):
    _, record = hub_checkpoint
    with registered_weights(record):
        with pytest.raises(RuntimeError, match=r'No trained weights exist for aff_resnet56.*aff_resnet8\.hubtest'):
            torch.hub.load(REPO_DIR, 'aff_resnet56', source='local', pretrained=True)
        assert record.name in _entrypoints()
        assert 'aff_resnet8.hubtest' in _hubconf().aff_resnet8.__doc__
