"""torch.hub entrypoints, generated from the zoo: one per registered model (``aff_resnext50``) and one per
published weight file (``aff_resnet20.cifar10_e12``) and upcycled weight (``aff_resnet50.ra4_e3600_r224_in1k_upcycled``),
from ``aff_zoo/models/weights.py``.

    model = torch.hub.load('aff-zoo/aff_zoo', 'aff_resnet20.cifar10_e12', pretrained=True, device='cuda')

Each is ``aff_zoo.models.pretrained.load_model``: ``pretrained=False``, ``device=None`` (the model is built and loaded on
the CPU, then moved), other keyword arguments go to ``timm.create_model`` (``num_classes``, ``in_chans``,
``pretrained_cfg='<tag>'``, ``features_only``, ...).
"""
dependencies = ['torch', 'timm', 'safetensors', 'huggingface_hub']

import aff_zoo as _aff_zoo
from aff_zoo.models import weights as _weights
from aff_zoo.models.pretrained import load_model as _load_model


def _entrypoint(name: str, doc: str):
    def entrypoint(pretrained: bool = False, device=None, **kwargs):
        return _load_model(name, pretrained=pretrained, device=device, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = doc
    return entrypoint


def _entrypoints() -> dict:
    eps = {}
    for arch in _aff_zoo.list_models():
        tags = _weights.available_tags(arch)
        eps[arch] = _entrypoint(arch, f'{arch}; trained weights: {", ".join(tags) or "none yet"} (pretrained=True '
                                      f'loads {tags[0] if tags else "nothing: it raises"}).')
    for w in _weights.WEIGHTS:
        eps[w.name] = _entrypoint(w.name, f'{w.arch} trained on {w.dataset_id}: top-1 {w.top1}% '
                                          f'(Hub repo {w.hf_hub_id}, sha256 {w.sha256[:12]}).')
    for u in _weights.UPCYCLED:
        eps[u.name] = _entrypoint(u.name, f'{u.arch} upcycled from {u.parent} ({u.dataset_id} top-1 {u.parent_top1}% '
                                          f'is the parent\'s; the AFF modules are untrained, output = the parent\'s).')
    return eps


globals().update(_entrypoints())
