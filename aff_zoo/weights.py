"""THE registry of published weights: one record per weight file, the single source of truth.

timm's pretrained configs (``default_cfgs``), the torch.hub entrypoints, the model cards and the
README weights table are all derived from ``WEIGHTS``; ``tests/test_registry.py`` checks they agree.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ['Weights', 'WEIGHTS', 'hub_org', 'get_weights', 'available_tags', 'pretrained_cfg_entries']

PAPER_CITATION = """@inproceedings{dai21aff,
  title     = {Attentional Feature Fusion},
  author    = {Dai, Yimian and Gieseke, Fabian and Oehmcke, Stefan and Wu, Yiquan and Barnard, Kobus},
  booktitle = {{IEEE} Winter Conference on Applications of Computer Vision, {WACV} 2021},
  year      = {2021},
  eprint    = {2009.14082},
}"""


def hub_org() -> str:
    """Hugging Face Hub organisation holding the weights; ``AFF_ZOO_HUB_ORG`` overrides it (mirrors, forks)."""
    return os.environ.get('AFF_ZOO_HUB_ORG', 'aff-zoo')


@dataclass(frozen=True)
class Weights:
    """One published weight file and everything needed to load, describe and verify it."""
    arch: str                    # registered model name, e.g. 'aff_resnet20'
    tag: str                     # timm pretrained tag, e.g. 'cifar10'
    sha256: str                  # of ``filename``, checked before every load
    size: int                    # bytes
    num_classes: int
    dataset: str                 # e.g. 'CIFAR-10 (JPEG), train split minus validation'
    metrics: Dict[str, Any]      # top1, top5, split, epochs, ...
    recipe: str                  # the exact command that trained it
    filename: str = 'model.safetensors'
    input_size: Tuple[int, int, int] = (3, 32, 32)
    mean: Tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: Tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    interpolation: str = 'bilinear'
    crop_pct: float = 1.0
    license: str = 'apache-2.0'
    citation: str = PAPER_CITATION
    notes: str = ''
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """timm model name with tag, e.g. ``aff_resnet20.cifar10``."""
        return f'{self.arch}.{self.tag}'

    @property
    def hf_hub_id(self) -> str:
        """One Hub repo per weight file, named like the tagged model."""
        return f'{hub_org()}/{self.name}'

    def pretrained_cfg(self) -> Dict[str, Any]:
        """The fields of timm's PretrainedCfg this record decides."""
        return dict(
            hf_hub_id=self.hf_hub_id, num_classes=self.num_classes, input_size=self.input_size,
            mean=self.mean, std=self.std, interpolation=self.interpolation, crop_pct=self.crop_pct,
            license=self.license, paper_ids='arXiv:2009.14082',
            tag=self.tag, architecture=self.arch,
        )


# Filled as checkpoints are trained and exported (``aff-zoo export``); see README "Weights".
WEIGHTS: Tuple[Weights, ...] = ()


def get_weights(name: str) -> Weights:
    """The record for ``arch.tag`` (or an arch's default, its first tag); a clear error otherwise."""
    for w in WEIGHTS:
        if w.name == name:
            return w
    for w in WEIGHTS:
        if w.arch == name:
            return w
    raise KeyError(f'No published weights named {name!r}. Available: {", ".join(available_tags()) or "none yet"}')


def available_tags(arch: Optional[str] = None) -> List[str]:
    """``arch.tag`` names that have weights, for one architecture or for the whole zoo."""
    return [w.name for w in WEIGHTS if arch is None or w.arch == arch]


def pretrained_cfg_entries(arch: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``(arch.tag, cfg overrides)`` for timm's ``default_cfgs``, first tag = default."""
    return [(w.name, w.pretrained_cfg()) for w in WEIGHTS if w.arch == arch]
