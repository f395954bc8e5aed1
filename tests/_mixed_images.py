"""Generated test data for the streaming path: an ImageFolder of mixed-size JPEGs (and its WebDataset shards)."""
import os

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40), (40, 200, 200)]


def make_mixed_folder(root, classes=4, per_class=24, sizes=(40, 300), seed=0):
    """``root/class{k}/{i:04d}.jpg``: noisy images tinted by class colour, each of a random width and height."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        d = os.path.join(root, f'class{k}')
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(sizes[0], sizes[1] + 1, 2)
            img = rng.integers(0, 90, (h, w, 3)) + np.array(COLOURS[k % len(COLOURS)]) // 2
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(d, f'{i:04d}.jpg'), quality=85)
    return str(root)
