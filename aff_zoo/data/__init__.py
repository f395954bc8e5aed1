"""Data: the one image reader (``images``) and small image sets decoded once into memory (CIFAR-size)."""
from .images import BACKGROUND, ImageError, load_rgb, to_rgb
from .memory import (
    IMG_EXTENSIONS, VAL_PER_CLASS, BatchLoader, DataError, ImageArrays, cache_dir, gpu_augment, load_images,
    normalize, split_train_val, to_tensor_nchw)
