"""THE registry of published weights: one record per weight file, the single source of truth.

timm's pretrained configs (``default_cfgs``), the torch.hub entrypoints, the model cards and the
README weights table are all derived from ``WEIGHTS``; ``tests/test_registry.py`` checks they agree.
"""
import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

__all__ = [
    'Weights', 'WEIGHTS', 'hub_org', 'get_weights', 'find_weights', 'available_tags', 'pretrained_cfg_entries',
    'registered_weights']

PAPER_CITATION = """@inproceedings{dai21aff,
  title     = {Attentional Feature Fusion},
  author    = {Dai, Yimian and Gieseke, Fabian and Oehmcke, Stefan and Wu, Yiquan and Barnard, Kobus},
  booktitle = {{IEEE} Winter Conference on Applications of Computer Vision, {WACV} 2021},
  year      = {2021},
  eprint    = {2009.14082},
}"""


CODE_REPO = 'aff-zoo/aff_zoo'  # GitHub owner/name of this code, for torch.hub.load in the model cards


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
    metrics: Dict[str, Any]      # top1, top5, split, epochs, best_epoch, train_images, train_seconds, device, ...
    recipe: str                  # the exact command that trained it
    filename: str = 'model.safetensors'
    dataset_id: str = 'cifar10'  # Hub dataset id for the card's metadata
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

    @property
    def top1(self) -> Optional[float]:
        return self.metrics.get('top1')

    @property
    def top5(self) -> Optional[float]:
        return self.metrics.get('top5')

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Weights':
        """Inverse of ``to_dict`` (JSON turns tuples into lists)."""
        return cls(**{k: tuple(v) if k in ('input_size', 'mean', 'std') else v for k, v in d.items()})

    def pretrained_cfg(self) -> Dict[str, Any]:
        """The fields of timm's PretrainedCfg this record decides."""
        return dict(
            hf_hub_id=self.hf_hub_id, num_classes=self.num_classes, input_size=self.input_size,
            mean=self.mean, std=self.std, interpolation=self.interpolation, crop_pct=self.crop_pct,
            license=self.license, paper_ids='arXiv:2009.14082',
            tag=self.tag, architecture=self.arch,
        )


# Filled as checkpoints are trained and exported (``aff-zoo export``); see README "Publishing weights".
_E2_NOTE = ('A short run of the fusion ablation (2 epochs on 15000 training images, single seed, trained on a '
            'shared 2-core CPU machine without GPU): far from converged. It exists to publish and test the weights '
            'pipeline end to end; use it for smoke tests or as a starting point, not as a result.')

WEIGHTS: Tuple[Weights, ...] = (
    Weights(
        arch='aff_resnet8',
        tag='cifar10_e2',
        sha256='3a604f01bdccf8ba408a8e9713a6db0f855cd741c141374be9d28d09ad33fbf1',
        size=347224,
        num_classes=10,
        dataset='CIFAR-10 (JPEG): 15000 training images, a subset of the train split minus the validation '
            'images',
        metrics={
            'top1': 47.98,
            'top5': 93.48,
            'split': 'last 500 images per class (sorted by name)',
            'epochs': 2,
            'best_epoch': 2,
            'train_images': 15000,
            'val_images': 5000,
            'train_seconds': 810.4,
            'device': 'cpu',
            'world_size': 1,
            'git_commit': '40f010c13f49d7e344b1b79b0b2dea342d7b4642',
            'dataset_sha256': 'bb033266dbb26aa71223ff120c0df4e7d3943dbd93b9e65984876854c6234931',
        },
        recipe='aff-zoo train --amp --batch-size 128 --channels-last --crop-pad 4 --data '
            '/work/shared/data/cifar10-train-jpeg.tar.gz --drop-path 0.0 --ema-decay 0.0 --epochs 2 '
            '--eval-batch-size 500 --hflip --label-smoothing 0.0 --lr 0.1 --min-lr 0.0 --mixup-alpha '
            '0.0 --model aff_resnet8 --momentum 0.9 --nesterov --no-wd-bn-bias --opt sgd --output '
            '/work/runs/train/ablation/aff_resnet8-s0 --seed 0 --train-subset 15000 --val-per-class 500'
            ' --warmup-epochs 0.3 --weight-decay 0.0005',
        notes=_E2_NOTE,
    ),
    Weights(
        arch='iaff_resnet8',
        tag='cifar10_e2',
        sha256='0819a17aaa8fd9b10399a4d684a15d78bbdfbf5f1e981c7d3af5920187b31613',
        size=377272,
        num_classes=10,
        dataset='CIFAR-10 (JPEG): 15000 training images, a subset of the train split minus the validation '
            'images',
        metrics={
            'top1': 47.92,
            'top5': 93.32,
            'split': 'last 500 images per class (sorted by name)',
            'epochs': 2,
            'best_epoch': 2,
            'train_images': 15000,
            'val_images': 5000,
            'train_seconds': 1169.9,
            'device': 'cpu',
            'world_size': 1,
            'git_commit': '8f82a133a5347c49ad02eca98b21c61ec8749659-dirty',
            'dataset_sha256': 'bb033266dbb26aa71223ff120c0df4e7d3943dbd93b9e65984876854c6234931',
        },
        recipe='aff-zoo train --amp --batch-size 128 --channels-last --crop-pad 4 --data '
            '/work/shared/data/cifar10-train-jpeg.tar.gz --drop-path 0.0 --ema-decay 0.0 --epochs 2 '
            '--eval-batch-size 500 --hflip --label-smoothing 0.0 --lr 0.1 --min-lr 0.0 --mixup-alpha '
            '0.0 --model iaff_resnet8 --momentum 0.9 --nesterov --no-wd-bn-bias --opt sgd --output '
            '/work/runs/train/ablation/iaff_resnet8-s0 --seed 0 --train-subset 15000 --val-per-class '
            '500 --warmup-epochs 0.3 --weight-decay 0.0005',
        notes=_E2_NOTE,
    ),
)


def get_weights(name: str) -> Weights:
    """The record for ``arch.tag`` (or an arch's default, its first tag); a clear error otherwise."""
    for w in WEIGHTS:
        if w.name == name:
            return w
    for w in WEIGHTS:
        if w.arch == name:
            return w
    raise KeyError(f'No published weights named {name!r}. Available: {", ".join(available_tags()) or "none yet"}')


def find_weights(hf_hub_id: Optional[str] = None, name: Optional[str] = None) -> Optional[Weights]:
    """The record published as ``hf_hub_id`` (``org/repo``, an ``@revision`` suffix ignored) or named ``name``."""
    repo = (hf_hub_id or '').split('@')[0]
    for w in WEIGHTS:
        if (repo and w.hf_hub_id == repo) or (name and w.name == name):
            return w
    return None


def available_tags(arch: Optional[str] = None) -> List[str]:
    """``arch.tag`` names that have weights, for one architecture or for the whole zoo."""
    return [w.name for w in WEIGHTS if arch is None or w.arch == arch]


def pretrained_cfg_entries(arch: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``(arch.tag, cfg overrides)`` for timm's ``default_cfgs``, first tag = default."""
    return [(w.name, w.pretrained_cfg()) for w in WEIGHTS if w.arch == arch]


@contextlib.contextmanager
def registered_weights(*records: Weights, replace: bool = False) -> Iterator[Tuple[Weights, ...]]:
    """Temporarily add ``records`` to the registry (or use only them with ``replace=True``), timm's
    pretrained configs included; restored on exit. For tests and for trying a new record before
    pasting it into ``WEIGHTS``."""
    global WEIGHTS
    from .models._builder import refresh_pretrained_cfgs
    saved = WEIGHTS
    archs = {w.arch for w in records} | ({w.arch for w in saved} if replace else set())
    WEIGHTS = tuple(records) if replace else saved + tuple(w for w in records if w not in saved)
    try:
        refresh_pretrained_cfgs(archs)
        yield WEIGHTS
    finally:
        WEIGHTS = saved
        refresh_pretrained_cfgs(archs)
