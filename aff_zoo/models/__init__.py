"""Model families; importing this registers every aff_zoo model with timm."""
import fnmatch
from typing import List

from . import cifar, resnet
from .cifar import CifarNet
from .resnet import AFFResNet, FusionBottleneck

IMAGENET_MODELS = tuple(resnet._ARCHS)
CIFAR_MODELS = tuple(cifar._ARCHS)


def list_models(pattern: str = '*') -> List[str]:
    """Every aff_zoo architecture (ImageNet-size first), optionally filtered by a wildcard pattern."""
    return [m for m in IMAGENET_MODELS + CIFAR_MODELS if fnmatch.fnmatch(m, pattern)]
