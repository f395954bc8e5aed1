"""A few real CIFAR-10 JPEGs for downstream tests, read straight from the shared archive (no full extraction).

The archive is ``../shared/data/cifar10-train-jpeg.tar.gz`` relative to the project root (or any
``shared/data`` above it, or ``$AFF_ZOO_CIFAR10_JPEG``); tests skip, saying why, where it is absent.
"""
import io
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from PIL import Image

ARCHIVE = 'cifar10-train-jpeg.tar.gz'


def archive_path() -> Optional[Path]:
    env = os.environ.get('AFF_ZOO_CIFAR10_JPEG')
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1]
    for d in (root, *root.parents):
        p = d / 'shared' / 'data' / ARCHIVE
        if p.is_file():
            return p
    return None


def cifar_images(per_class: Dict[str, int]) -> Dict[str, List[Image.Image]]:
    """The first ``n`` training images of each named class, as RGB PIL images (32x32)."""
    path = archive_path()
    if path is None:
        pytest.skip(f'{ARCHIVE} not found (expected in ../shared/data/ or $AFF_ZOO_CIFAR10_JPEG)')
    out: Dict[str, List[Image.Image]] = {c: [] for c in per_class}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = member.name.split('/')
            if not member.isfile() or len(parts) != 3 or parts[1] not in out:
                continue
            imgs = out[parts[1]]
            if len(imgs) < per_class[parts[1]]:
                imgs.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB'))
            if all(len(out[c]) >= n for c, n in per_class.items()):
                break
    return out
