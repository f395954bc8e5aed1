"""THE registry of published weights: one record per weight file, the single source of truth.

timm's pretrained configs (``default_cfgs``), the torch.hub entrypoints, the model cards and the
README weights table are all derived from ``WEIGHTS``; ``tests/test_registry.py`` checks they agree.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    'Weights', 'WEIGHTS', 'hub_org', 'get_weights', 'find_weights', 'available_tags', 'pretrained_cfg_entries']

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
    label_names: Tuple[str, ...] = ()  # class names in output order (timm's pretrained_cfg.label_names)
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
        return cls(**{k: tuple(v) if k in ('input_size', 'mean', 'std', 'label_names') else v for k, v in d.items()})

    def pretrained_cfg(self) -> Dict[str, Any]:
        """The fields of timm's PretrainedCfg this record decides."""
        return dict(
            hf_hub_id=self.hf_hub_id, num_classes=self.num_classes, input_size=self.input_size,
            mean=self.mean, std=self.std, interpolation=self.interpolation, crop_pct=self.crop_pct,
            license=self.license, paper_ids='arXiv:2009.14082',
            tag=self.tag, architecture=self.arch,
            **({'label_names': self.label_names} if self.label_names else {}),
        )


# Filled as checkpoints are trained and exported (``aff-zoo export``); see README "Publishing weights".
# First record of an architecture = its default tag.
_E12_NOTE = ('12 epochs (cosine schedule, seed 0) on the 45,000 training images, trained on a 2-core CPU without GPU '
             'next to the same-budget addition baseline (add_resnet20.cifar10_e12): a short schedule, about 7 points '
             'below what a ResNet-20 reaches with the usual ~180 epochs (~91 %). Validation = the last 500 images per '
             'class of the JPEG CIFAR-10 training set (the test split was not available).')

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')

WEIGHTS: Tuple[Weights, ...] = (
    Weights(
        arch='aff_resnet20',
        tag='cifar10_e12',
        sha256='7f512f8b581df4c19171c85407d37c1ac2c42b54ae826bb5f48f69582b16fe31',
        size=1194952,
        num_classes=10,
        dataset='CIFAR-10 (JPEG): the 45,000 training images (train split minus the validation images)',
        metrics={
            'top1': 84.32,
            'top5': 99.32,
            'split': 'last 500 images per class (sorted by name)',
            'epochs': 12,
            'best_epoch': 12,
            'train_images': 45000,
            'val_images': 5000,
            'train_seconds': 4834.9,
            'device': 'cpu',
            'world_size': 1,
            'git_commit': 'd003b42bea6f8b647ce4f1e165c44b07014bd7df-dirty',
            'dataset_sha256': 'bb033266dbb26aa71223ff120c0df4e7d3943dbd93b9e65984876854c6234931',
        },
        recipe='aff-zoo train --amp --batch-size 128 --channels-last --crop-pad 4 --data '
            '/work/shared/data/cifar10-train-jpeg.tar.gz --drop-path 0.0 --ema-decay 0.0 --epochs 12 '
            '--eval-batch-size 500 --hflip --label-smoothing 0.0 --lr 0.1 --min-lr 0.0 --mixup-alpha '
            '0.0 --model aff_resnet20 --momentum 0.9 --nesterov --no-wd-bn-bias --opt sgd --output '
            '/work/runs/ckpt20/aff_resnet20-e12 --seed 0 --train-subset 0 --val-per-class 500 '
            '--warmup-epochs 0.3 --weight-decay 0.0005',
        label_names=CIFAR10_CLASSES,
        notes=_E12_NOTE,
    ),
    Weights(
        arch='iaff_resnet20',
        tag='cifar10_e12',
        sha256='cebb31debf0c5c4641e39f3eeff1fc761771b6d05c846828af6e39ca900c67b8',
        size=1285216,
        num_classes=10,
        dataset='CIFAR-10 (JPEG): the 45,000 training images (train split minus the validation images)',
        metrics={
            'top1': 84.3,
            'top5': 99.36,
            'split': 'last 500 images per class (sorted by name)',
            'epochs': 12,
            'best_epoch': 12,
            'train_images': 45000,
            'val_images': 5000,
            'train_seconds': 4722.4,
            'device': 'cpu',
            'world_size': 1,
            'git_commit': 'd003b42bea6f8b647ce4f1e165c44b07014bd7df-dirty',
            'dataset_sha256': 'bb033266dbb26aa71223ff120c0df4e7d3943dbd93b9e65984876854c6234931',
        },
        recipe='aff-zoo train --amp --batch-size 128 --channels-last --crop-pad 4 --data '
            '/work/shared/data/cifar10-train-jpeg.tar.gz --drop-path 0.0 --ema-decay 0.0 --epochs 12 '
            '--eval-batch-size 500 --hflip --label-smoothing 0.0 --lr 0.1 --min-lr 0.0 --mixup-alpha '
            '0.0 --model iaff_resnet20 --momentum 0.9 --nesterov --no-wd-bn-bias --opt sgd --output '
            '/work/runs/ckpt20/iaff_resnet20-e12 --seed 0 --train-subset 0 --val-per-class 500 '
            '--warmup-epochs 0.3 --weight-decay 0.0005',
        label_names=CIFAR10_CLASSES,
        notes=_E12_NOTE,
    ),
    Weights(
        arch='add_resnet20',
        tag='cifar10_e12',
        sha256='6959630148d6a75fbf5655c55ee013bffbca26d73a541d1bb58afb09a83019a0',
        size=1104992,
        num_classes=10,
        dataset='CIFAR-10 (JPEG): the 45,000 training images (train split minus the validation images)',
        metrics={
            'top1': 84.14,
            'top5': 99.36,
            'split': 'last 500 images per class (sorted by name)',
            'epochs': 12,
            'best_epoch': 12,
            'train_images': 45000,
            'val_images': 5000,
            'train_seconds': 4524.5,
            'device': 'cpu',
            'world_size': 1,
            'git_commit': 'd003b42bea6f8b647ce4f1e165c44b07014bd7df-dirty',
            'dataset_sha256': 'bb033266dbb26aa71223ff120c0df4e7d3943dbd93b9e65984876854c6234931',
        },
        recipe='aff-zoo train --amp --batch-size 128 --channels-last --crop-pad 4 --data '
            '/work/shared/data/cifar10-train-jpeg.tar.gz --drop-path 0.0 --ema-decay 0.0 --epochs 12 '
            '--eval-batch-size 500 --hflip --label-smoothing 0.0 --lr 0.1 --min-lr 0.0 --mixup-alpha '
            '0.0 --model add_resnet20 --momentum 0.9 --nesterov --no-wd-bn-bias --opt sgd --output '
            '/work/runs/ckpt20/add_resnet20-e12 --seed 0 --train-subset 0 --val-per-class 500 '
            '--warmup-epochs 0.3 --weight-decay 0.0005',
        label_names=CIFAR10_CLASSES,
        notes=_E12_NOTE,
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
