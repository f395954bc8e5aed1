"""Image-classification data for training on small machines: decode once, keep uint8, augment on tensors.

Sources (any path the user gives):

* an ImageFolder directory ``<root>/<class>/<image>`` (or ``<root>/<split>/<class>/<image>``),
* the same layout packed as ``.tar``, ``.tar.gz`` or ``.tgz`` (e.g. ``cifar10-train-jpeg.tar.gz``,
  which holds ``train/<class>/<NNNN>.jpg``),
* the standard CIFAR-10 python archive ``cifar-10-python.tar.gz`` (read with a restricted unpickler
  that only rebuilds numpy arrays; nothing else in the file can run).

The first read decodes every image into one uint8 array and writes it atomically to a cache outside
the repository (``$AFF_ZOO_CACHE`` or ``~/.cache/aff_zoo``), keyed by the source's sha256, so later
epochs and later runs never decode a JPEG again.

Validation split (fixed, documented): within each class, files sorted by name, the LAST
``val_per_class`` (default 500) images are validation, the rest training. For the python archive the
name of image ``i`` of ``data_batch_k`` is its ``filenames`` entry.
"""
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils import atomic_write, sha256_file
from .images import ImageError, decode_rgb_array

__all__ = [
    'DataError', 'ImageArrays', 'load_images', 'split_train_val', 'cache_dir',
    'gpu_augment', 'normalize', 'BatchLoader',
]

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.webp', '.tif', '.tiff', '.gif')
VAL_PER_CLASS = 500
_CACHE_VERSION = 2  # 2: images read by data.images (16-bit scaled, alpha composited, EXIF applied)


class DataError(ValueError):
    """A dataset path, archive or layout that cannot be used; the message says what to do."""


@dataclass
class ImageArrays:
    """A decoded split held in memory: ``images`` N x H x W x 3 uint8, ``labels`` N int64."""
    images: np.ndarray
    labels: np.ndarray
    names: List[str]
    classes: List[str]
    sha256: str
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> 'ImageArrays':
        return ImageArrays(
            self.images[idx], self.labels[idx], [self.names[i] for i in idx], self.classes, self.sha256, self.source)


def cache_dir() -> str:
    """Where decoded arrays live: ``$AFF_ZOO_CACHE`` or ``~/.cache/aff_zoo`` (never the repository)."""
    return os.environ.get('AFF_ZOO_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'aff_zoo')


def _dir_sha256(files: Sequence[Tuple[str, str]]) -> str:
    """Content hash of a directory dataset: relative names and bytes of every image, in sorted order."""
    h = hashlib.sha256()
    for rel, full in files:
        h.update(rel.encode() + b'\0')
        with open(full, 'rb') as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        return decode_rgb_array(data, name)
    except ImageError as e:
        raise DataError(f'Cannot decode image {name!r}: {e}') from e


def _group_imagefolder(names: Sequence[str], split: str, source: str) -> Dict[str, List[str]]:
    """Map class -> sorted member names for ``[prefix/][split/]<class>/<file>`` paths."""
    images = [n for n in names if n.lower().endswith(IMG_EXTENSIONS) and not os.path.basename(n).startswith('.')]
    if not images:
        raise DataError(
            f'No images ({", ".join(IMG_EXTENSIONS)}) found in {source}. Expected an ImageFolder layout '
            '<root>/<class>/<image> or <root>/<split>/<class>/<image>, or the CIFAR-10 python archive.')
    parts = [[q for q in n.split('/') if q not in ('', '.')] for n in images]
    # Pick the split directory if the layout has one (train/<class>/x.jpg), else classes at the top.
    with_split = [p for p in parts if len(p) >= 3 and p[-3] == split]
    if with_split:
        parts = with_split
    elif any(len(p) >= 3 for p in parts) and {p[-3] for p in parts if len(p) >= 3} & {'train', 'val', 'test'}:
        found = sorted({p[-3] for p in parts if len(p) >= 3})
        raise DataError(f'{source} has split folders {found} but no {split!r}; pass split= one of them.')
    depths = {len(p) for p in parts}
    if min(depths) < 2 or len(depths) != 1:
        raise DataError(
            f'Unknown layout in {source}: images must all sit at <class>/<image> under one root '
            f'(found path depths {sorted(depths)}). Expected ImageFolder: <root>/[<split>/]<class>/<image>.')
    groups: Dict[str, List[str]] = {}
    for p in parts:
        groups.setdefault(p[-2], []).append('/'.join(p))
    if len(groups) < 2:
        raise DataError(f'Unknown layout in {source}: found a single class folder {list(groups)}; '
                        'expected one folder per class.')
    return {c: sorted(v) for c, v in sorted(groups.items())}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, bytes and numpy arrays; refuses every other global (no code can run)."""
    _ALLOWED = {
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('_codecs', 'encode'),  # how protocol-2 pickles written by Python 3 store bytes; a pure function
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f'Refusing to unpickle {module}.{name}: not a CIFAR-10 python batch file.')


def _load_batch(data: bytes, name: str) -> dict:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), encoding='bytes').load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f'{name} in the CIFAR-10 python archive is corrupt ({e}).') from e
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_cifar_python(tar: tarfile.TarFile, members: Dict[str, tarfile.TarInfo], split: str, source: str):
    by_base = {os.path.basename(n): m for n, m in members.items()}
    meta = _load_batch(tar.extractfile(by_base['batches.meta']).read(), 'batches.meta')
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta['label_names']]
    batch_names = [f'data_batch_{i}' for i in range(1, 6)] if split == 'train' else ['test_batch']
    imgs, labels, names = [], [], []
    for b in batch_names:
        if b not in by_base:
            raise DataError(f'{source} lacks {b}; the CIFAR-10 python archive is incomplete.')
        d = _load_batch(tar.extractfile(by_base[b]).read(), b)
        data = np.asarray(d['data'], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f'{b} holds data of shape {data.shape}, expected N x 3072 (32x32 RGB).')
        imgs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(x) for x in d['labels'])
        names.extend(f.decode() if isinstance(f, bytes) else str(f) for f in d['filenames'])
    # Group per class and sort by file name, as for ImageFolder sources.
    images, labels_arr = np.concatenate(imgs), np.asarray(labels, dtype=np.int64)
    order = sorted(range(len(names)), key=lambda i: (labels_arr[i], names[i]))
    return images[order], labels_arr[order], [f'{classes[labels_arr[i]]}/{names[i]}' for i in order], classes


def _stack(decoded: List[np.ndarray], names: List[str], source: str) -> np.ndarray:
    shapes = {a.shape for a in decoded}
    if len(shapes) != 1:
        bad = next(n for a, n in zip(decoded, names) if a.shape != decoded[0].shape)
        raise DataError(f'Images in {source} differ in size ({sorted(shapes)[:3]}..., e.g. {bad!r}); '
                        'this loader keeps fixed-size images (like CIFAR). Resize them first.')
    return np.stack(decoded)


def _list_dir(path: str, split: str):
    """ImageFolder directory -> ([(relative name, full path)] in class/name order, classes)."""
    files = []
    for dirpath, _, fnames in os.walk(path):
        for f in fnames:
            full = os.path.join(dirpath, f)
            files.append((os.path.relpath(full, path).replace(os.sep, '/'), full))
    groups = _group_imagefolder([r for r, _ in files], split, path)
    full_of = dict(files)
    return [(r, full_of[r]) for c in groups for r in groups[c]], list(groups)


def _decode_source(path: str, split: str, progress: bool, sha: str, listing=None):
    """Decode ``path`` fully: returns images, labels, names, classes, sha256."""
    from tqdm import tqdm
    if os.path.isdir(path):
        ordered, classes = listing
        decoded = []
        for rel, full in tqdm(ordered, desc=f'decoding {os.path.basename(path)}', disable=not progress):
            with open(full, 'rb') as f:
                decoded.append(_decode(f.read(), rel))
        labels = np.asarray([classes.index(r.split('/')[-2]) for r, _ in ordered], dtype=np.int64)
        names = ['/'.join(r.split('/')[-2:]) for r, _ in ordered]
        return _stack(decoded, names, path), labels, names, classes, sha
    try:
        tar = tarfile.open(path, 'r:*')
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f'{path} is not a readable tar archive ({e}); it may be corrupt or truncated. '
                        'Download it again, or pass an ImageFolder directory.') from e
    with tar:
        try:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
            raise DataError(f'{path} is corrupt or truncated ({e}). Download it again.') from e
        if any(os.path.basename(n) == 'batches.meta' for n in members):
            images, labels, names, classes = _read_cifar_python(tar, members, split, path)
            return images, labels, names, classes, sha
        groups = _group_imagefolder(list(members), split, path)
        classes = list(groups)
        decoded, labels, names = [], [], []
        ordered = [(c, n) for c in groups for n in groups[c]]
        for ci, (c, n) in enumerate(tqdm(ordered, desc=f'decoding {os.path.basename(path)}', disable=not progress)):
            try:
                data = tar.extractfile(members[n]).read()
            except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
                raise DataError(f'{path} is corrupt or truncated at {n!r} ({e}). Download it again.') from e
            decoded.append(_decode(data, n))
            labels.append(classes.index(c))
            names.append(f'{c}/{os.path.basename(n)}')
        return _stack(decoded, names, path), np.asarray(labels, dtype=np.int64), names, classes, sha


def zlib_error():
    import zlib
    return zlib.error


def _atomic_save_npz(path: str, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(tmp):
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def load_images(
        path: str,
        split: str = 'train',
        num_classes: Optional[int] = None,
        cache: Optional[str] = None,
        progress: bool = True,
) -> ImageArrays:
    """Decode ``path`` (directory or archive) once, cached as uint8; later calls read the cache."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DataError(f'Dataset path {path} does not exist. Pass an ImageFolder directory, an ImageFolder '
                        '.tar/.tar.gz archive, or the CIFAR-10 python archive (cifar-10-python.tar.gz).')
    cache = cache or cache_dir()
    listing = None
    if os.path.isdir(path):  # keyed by content: names and bytes of every image of the split
        listing = _list_dir(path, split)
        key = _dir_sha256(listing[0])
    else:
        key = sha256_file(path)
    cache_file = os.path.join(cache, f'{key}.{split}.v{_CACHE_VERSION}.npz')
    if os.path.exists(cache_file):
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                arrays = ImageArrays(
                    z['images'], z['labels'].astype(np.int64), [str(s) for s in z['names']],
                    [str(s) for s in z['classes']], key, path)
        except (OSError, ValueError, KeyError, EOFError):  # a damaged cache file is rebuilt, never trusted
            os.remove(cache_file)
        else:
            return _check_classes(arrays, num_classes)
    images, labels, names, classes, sha = _decode_source(path, split, progress, key, listing)
    _atomic_save_npz(cache_file, images=images, labels=labels.astype(np.int16), names=np.asarray(names),
                     classes=np.asarray(classes))
    return _check_classes(ImageArrays(images, labels, names, classes, sha, path), num_classes)


def _check_classes(arrays: ImageArrays, num_classes: Optional[int]) -> ImageArrays:
    if num_classes is not None and len(arrays.classes) != num_classes:
        raise DataError(
            f'{arrays.source} has {len(arrays.classes)} classes ({", ".join(arrays.classes[:12])}) but '
            f'{num_classes} were expected. Use the matching dataset, or set num_classes to {len(arrays.classes)}.')
    return arrays


def split_train_val(arrays: ImageArrays, val_per_class: int = VAL_PER_CLASS) -> Tuple[ImageArrays, ImageArrays]:
    """Fixed split: per class, names sorted, the last ``val_per_class`` images are validation."""
    train_idx, val_idx = [], []
    for c in range(len(arrays.classes)):
        idx = np.flatnonzero(arrays.labels == c)
        idx = idx[np.argsort([arrays.names[i] for i in idx], kind='stable')]
        if len(idx) <= val_per_class:
            raise DataError(f'Class {arrays.classes[c]!r} has {len(idx)} images, not more than '
                            f'val_per_class={val_per_class}; lower val_per_class.')
        if val_per_class:
            train_idx.append(idx[:-val_per_class])
            val_idx.append(idx[-val_per_class:])
        else:
            train_idx.append(idx)
    train = arrays.subset(np.concatenate(train_idx))
    val = arrays.subset(np.concatenate(val_idx) if val_idx else np.zeros(0, dtype=np.int64))
    return train, val


def to_tensor_nchw(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 array -> N x 3 x H x W uint8 tensor (channels_last memory, no copy of pixels)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def gpu_augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip on a uint8 N x C x H x W batch.

    Works on any device; the random draws come from ``generator`` (on CPU) so a run is reproducible.
    """
    n, c, h, w = x.shape
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        # Group by offset: 2 x (2 pad + 1) slice copies instead of a per-pixel gather.
        rows = torch.empty(n, c, h, w + 2 * pad, dtype=x.dtype, device=x.device)
        for o in range(2 * pad + 1):
            idx = (dy == o).nonzero().flatten().to(x.device)
            if len(idx):
                rows[idx] = padded[idx, :, o:o + h, :]
        x = torch.empty(n, c, h, w, dtype=x.dtype, device=x.device)
        for o in range(2 * pad + 1):
            idx = (dx == o).nonzero().flatten().to(x.device)
            if len(idx):
                x[idx] = rows[idx, :, :, o:o + w]
    if flip:
        do_flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(do_flip[:, None, None, None], x.flip(3), x)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> torch.Tensor:
    """uint8 N x C x H x W -> float, ``(x / 255 - mean) / std`` (the model's pretrained_cfg mean/std)."""
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * 255
    out = (x.float() - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


class BatchLoader:
    """Batches from in-memory uint8 tensors; shuffling and sharding through ``DistributedSampler``.

    The order of epoch ``e`` depends only on (seed, e), so a resumed run sees the same batches.
    """

    def __init__(self, arrays: ImageArrays, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        from torch.utils.data import DistributedSampler
        self.images = to_tensor_nchw(arrays.images)
        self.labels = torch.from_numpy(arrays.labels)
        self.batch_size = batch_size
        self.drop_last = drop_last
        # Evaluation shards exactly (rank::world, no padded duplicates); training pads like DistributedSampler.
        self.exact = not shuffle and not drop_last
        self.shard = torch.arange(rank, len(arrays), num_replicas)
        self.sampler = DistributedSampler(
            range(len(arrays)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
            drop_last=drop_last)

    def set_epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.shard) if self.exact else len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = self.shard if self.exact else torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for i in range(len(self)):
            b = idx[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images[b], self.labels[b]
