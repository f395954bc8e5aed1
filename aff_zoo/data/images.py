"""The one place images are read: ``load_rgb`` (a file, bytes or a PIL image -> PIL RGB) and ``to_rgb``
(an opened PIL image -> PIL RGB), used by ``aff-zoo classify`` and every data path.

PIL's ``convert('RGB')`` is right for 8-bit images only: it clips 16/32-bit samples at 255 (a 16-bit
PNG turns white), drops alpha without looking at it and ignores the EXIF orientation of phone photos.
``to_rgb`` converts each mode as follows (exact rules, tested in tests/test_images.py):

* ``RGB``: unchanged. ``L``, ``1``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion (CMYK without
  colour management: an embedded ICC profile is ignored).
* 16-bit (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): scaled, ``v8 = round(v16 * 255 / 65535)`` (= v16 / 257).
* 32-bit integer ``I``: values within 0..65535 are 16-bit samples (as PIL decodes some 16-bit files) and
  scaled as above; other ranges are stretched linearly from the image's own min..max to 0..255.
* 32-bit float ``F``: values within 0..1 are multiplied by 255; other ranges stretched min..max as for
  ``I``; NaN or infinite pixels are an error.
* Transparency (``RGBA``, ``RGBa``, ``LA``, ``La``, ``PA``, ``P``/``L``/``RGB`` with a transparent colour):
  composited over a white background (``BACKGROUND``, how viewers and web pages show such images),
  ``out = round((c * a + 255 * (255 - a)) / 255)`` per channel; ``P`` without transparency: its palette colours.
* The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a phone photo is upright.
* Animated images (GIF, APNG, WebP): the first frame; a warning says so once per process.
* Decompression bombs: PIL's limit (``PIL.Image.MAX_IMAGE_PIXELS``; above twice it PIL refuses) becomes
  an ``ImageError`` saying the size and how to proceed.
"""
import io
import os
import warnings
from typing import Any, Tuple, Union

import numpy as np

__all__ = ['ImageError', 'BACKGROUND', 'load_rgb', 'to_rgb', 'decode_rgb_array']

BACKGROUND: Tuple[int, int, int] = (255, 255, 255)
_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_ALPHA = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
_warned_animated = False


class ImageError(ValueError):
    """An image that cannot be read (missing, not an image, truncated, too large); the message says what to do."""


def _describe(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return getattr(src, 'filename', None) or '<image bytes>'


def _open(src, name: str):
    from PIL import Image, UnidentifiedImageError
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    try:
        im = Image.open(src)
        im.load()  # decode now, so a truncated file fails here with its name
        return im
    except FileNotFoundError:
        raise ImageError(f'no such image file: {name}') from None
    except Image.DecompressionBombError as e:
        raise ImageError(
            f'{name} is refused as a possible decompression bomb ({e}). Resize the image below PIL\'s limit, '
            f'or, if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS in Python before reading it.') from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(
            f'cannot read {name} as an image ({e}); the file is corrupt, truncated or not an image. '
            'Give a JPEG, PNG, BMP, TIFF, GIF or WebP file.') from None


def _scaled_gray(a: np.ndarray, mode: str, name: str) -> np.ndarray:
    """A 16/32-bit grey array -> uint8, scaled (never clipped) as the module docstring says."""
    if mode == 'F':
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f'{name} is a floating-point image with NaN or infinite pixels; it cannot be shown as RGB.')
        if a.size and a.min() >= 0 and a.max() <= 1:
            return np.floor(a * 255 + 0.5).astype(np.uint8)
    else:
        a = a.astype(np.int64)
        if mode in _SIXTEEN_BIT or (a.size and a.min() >= 0 and a.max() <= 65535):
            return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535), integer exact
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi == lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.floor((a - lo) * 255.0 / (hi - lo) + 0.5).astype(np.uint8)


def _composite(rgba: np.ndarray, background=BACKGROUND) -> np.ndarray:
    """RGBA uint8 -> RGB uint8 over ``background``: round((c * a + bg * (255 - a)) / 255)."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    bg = np.asarray(background, dtype=np.uint32)
    return ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def to_rgb(img, background: Tuple[int, int, int] = BACKGROUND, name: str = None):
    """An opened PIL image -> an 8-bit RGB PIL image (first frame, upright, scaled, composited).

    Also usable as the image conversion of a timm ``ImageDataset`` (``input_img_mode=None`` and
    ``to_rgb`` as the first transform)."""
    global _warned_animated
    from PIL import Image, ImageOps
    name = name or _describe(img)
    try:
        img.load()  # an image opened lazily elsewhere (e.g. by a timm dataset) is decoded here
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f'cannot read {name} as an image ({e}); the file is corrupt or truncated.') from None
    if getattr(img, 'is_animated', False) and getattr(img, 'n_frames', 1) > 1:
        if not _warned_animated:
            warnings.warn(f'{name} is animated ({img.n_frames} frames); only its first frame is used '
                          '(said once for all animated images).', stacklevel=2)
            _warned_animated = True
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == 'RGB' and 'transparency' not in img.info:
        return img
    if mode in _SIXTEEN_BIT or mode in ('I', 'F'):
        gray = _scaled_gray(np.asarray(img), mode, name)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), 'RGB')
    if mode in _ALPHA or 'transparency' in img.info:
        rgba = np.asarray(img.convert('RGBA'))
        return Image.fromarray(_composite(rgba, background), 'RGB')
    try:
        return img.convert('RGB')
    except (ValueError, OSError) as e:
        raise ImageError(f'{name}: images of mode {mode} cannot be converted to RGB ({e}).') from None


def load_rgb(src: Union[str, os.PathLike, bytes, Any], name: str = None,
             background: Tuple[int, int, int] = BACKGROUND):
    """A path, bytes, file object or PIL image -> an 8-bit RGB PIL image; ``ImageError`` if unreadable."""
    name = name or _describe(src)
    return to_rgb(_open(src, name), background, name)


def decode_rgb_array(data, name: str = None) -> np.ndarray:
    """``load_rgb`` as an H x W x 3 uint8 array (what the in-memory data sets store)."""
    return np.asarray(load_rgb(data, name), dtype=np.uint8)
