"""A tiny learnable ImageFolder written with PIL: class k images are noisy, tinted by a fixed colour."""
import os

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40), (40, 200, 200)]


def make_imagefolder(root, classes=3, per_class=12, size=16, seed=0, ext='png'):
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = os.path.join(root, f'class{k}')
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3)) + np.array(COLOURS[k % len(COLOURS)]) // 2
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f'{i:04d}.{ext}'))
    return str(root)
