"""Streaming image data for sets that do not fit in memory: ImageFolder directories and WebDataset shards.

Images are read, decoded and augmented by DataLoader workers with timm's pieces: ``create_dataset`` (its
folder reader, and ``wds/`` for WebDataset shards), ``create_transform`` (train: RandomResizedCrop, flip,
colour jitter; eval: resize + centre crop with the model's ``crop_pct`` and interpolation). Batches arrive as
uint8 N x 3 x H x W tensors, already augmented, so the training loop only moves and normalises them. Images
of any size work: every one is cropped or resized to ``img_size`` by the transform.

``open_data`` picks the path: the in-memory one (``aff_zoo.data.memory``: decode once, keep uint8) for small
fixed-size sets such as CIFAR archives, streaming for WebDataset shards, folders of mixed-size images, folders
whose images differ from ``--img-size``, and folders of more than ``STREAM_MIN_IMAGES`` images.

A streaming split looks like ``ImageArrays`` without pixels (``classes``, ``labels``, ``names``, ``subset``,
``sha256``), so ``split_train_val`` and the fine-tuning checks work on it unchanged, plus ``make_loader``.

Determinism: an epoch's batches depend only on (seed, epoch, rank, world size, batch size, workers). The
sampler's epoch is set from the checkpoint and each epoch's DataLoader gets a generator seeded from
(seed, epoch, rank), from which PyTorch seeds every worker (torch, random; numpy through timm's worker init).
Without workers the transforms draw from the main process's RNG, which the checkpoint restores. So a run
resumed at an epoch boundary replays the uninterrupted run's batches exactly. Changing ``workers`` changes the
augmentation draws (and, for shards, which worker reads which shard): resume with the same value.

WebDataset shards: a directory with ``_info.json`` in timm's format (``write_shards`` writes one) and the
shards it names, ``train-000000.tar``, ... and ``val-000000.tar``, ...; each sample is ``<key>.jpg`` (or
png/webp) + ``<key>.cls`` (class index). Training shards are split across ranks and workers by timm's reader
(disjoint shard sets, each rank reads the same number of samples, repeating its own when shards are
unequal); validation shards are split by rank, each sample read exactly once.
"""
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .memory import DataError, ImageArrays, IMG_EXTENSIONS, _list_dir, load_images, split_train_val, VAL_PER_CLASS

__all__ = [
    'STREAM_MIN_IMAGES', 'DataChoice', 'StreamSplit', 'StreamLoader', 'inspect_folder', 'choose_data_path',
    'open_data', 'train_val_split', 'auto_val_per_class', 'write_shards', 'is_shard_source',
]

STREAM_MIN_IMAGES = 100_000   # auto: more images than this stream (100k x 224 x 224 x 3 bytes = 15 GB decoded)
INFO_FILE = '_info.json'       # timm's WebDataset split description
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class DataChoice:
    """Which data path a run uses and why (recorded in metrics.json)."""
    path: str                      # 'memory' or 'stream'
    kind: str                      # 'folder', 'wds' or 'archive'
    reason: str


@dataclass
class FolderInfo:
    files: List[Tuple[str, str]]   # (name relative to the split root, full path), class then name order
    classes: List[str]
    sizes: Dict[Tuple[int, int], int] = field(default_factory=dict)  # (w, h) -> count; empty if not read


def is_shard_source(path: str) -> bool:
    """A WebDataset source: a directory holding ``_info.json`` or ``*.tar`` shards (and no class folders)."""
    path = os.path.expanduser(str(path))
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, INFO_FILE)):
        return True
    entries = os.listdir(path)
    return any(e.endswith('.tar') for e in entries) and not any(
        os.path.isdir(os.path.join(path, e)) for e in entries)


def inspect_folder(path: str, split: str = 'train', read_sizes: bool = True) -> FolderInfo:
    """List an ImageFolder (same layout rules and class order as the in-memory path) and, up to
    ``STREAM_MIN_IMAGES`` images, read every image's size from its header (no decoding)."""
    files, classes = _list_dir(path, split)
    info = FolderInfo(files, classes)
    if read_sizes and len(files) <= STREAM_MIN_IMAGES:
        from PIL import Image, UnidentifiedImageError
        for rel, full in files:
            try:
                with Image.open(full) as im:
                    info.sizes[im.size] = info.sizes.get(im.size, 0) + 1
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f'Cannot read image {rel!r} in {path} ({e}); the file is corrupt or not an '
                                'image. Remove or replace it.') from e
    return info


def choose_data_path(path: str, mode: str = 'auto', img_size: Optional[int] = None,
                     folder: Optional[FolderInfo] = None) -> DataChoice:
    """'memory' or 'stream' for ``path``; ``mode`` 'auto' decides by format, size and image sizes."""
    if mode not in ('auto', 'memory', 'stream'):
        raise DataError(f"Unknown data path {mode!r}; choose 'auto', 'memory' or 'stream'.")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise DataError(f'Dataset path {path} does not exist. Pass an ImageFolder directory, a directory of '
                        'WebDataset shards, an ImageFolder .tar/.tar.gz archive, or cifar-10-python.tar.gz.')
    if is_shard_source(path):
        if mode == 'memory':
            raise DataError(f'{path} holds WebDataset shards, which only stream; use --data-path stream or auto.')
        return DataChoice('stream', 'wds', 'WebDataset shards')
    if not os.path.isdir(path):
        if mode == 'stream':
            raise DataError(f'{path} is an archive; streaming reads ImageFolder directories and WebDataset shards. '
                            'Extract it, or use --data-path memory (or auto).')
        return DataChoice('memory', 'archive', 'archive (decoded once into memory)')
    if mode != 'auto':
        return DataChoice(mode, 'folder', f'--data-path {mode}')
    folder = folder or inspect_folder(path)
    n = len(folder.files)
    if n > STREAM_MIN_IMAGES:
        return DataChoice('stream', 'folder', f'{n} images > {STREAM_MIN_IMAGES} (too many to hold decoded)')
    if len(folder.sizes) > 1:
        return DataChoice('stream', 'folder', f'mixed image sizes ({len(folder.sizes)} different)')
    (w, h), = folder.sizes
    if img_size and (w, h) != (img_size, img_size):
        return DataChoice('stream', 'folder', f'images are {w}x{h}, --img-size is {img_size}')
    return DataChoice('memory', 'folder', f'{n} images of one size {w}x{h}')


def auto_val_per_class(class_counts: Sequence[int], requested: Optional[int] = None) -> int:
    """Validation images per class: ``requested``, else 500 (the CIFAR recipe's split), lowered to a tenth of
    the smallest class (at least 1) for small sets where 500 would leave nothing to train on."""
    if requested is not None:
        return requested
    smallest = min(class_counts) if len(class_counts) else 0
    return VAL_PER_CLASS if smallest > 10 * VAL_PER_CLASS else max(1, smallest // 10)


# ----------------------------------------------------------------------------------------------- splits


class StreamSplit:
    """A split read from disk while training: what the training loop needs of a dataset, plus ``make_loader``.

    Folder splits know every sample's name and label (``subset`` works, so do ``split_train_val`` and the
    fine-tuning balance check); shard splits know only their shard files and sample count.
    """

    def __init__(self, kind: str, source: str, classes: List[str], sha256: str, is_training: bool,
                 img_size: Optional[int] = None, workers: int = DEFAULT_WORKERS,
                 files: Optional[List[Tuple[str, str]]] = None, labels: Optional[np.ndarray] = None,
                 shards: Optional[List[str]] = None, shard_lengths: Optional[List[int]] = None):
        self.kind, self.source, self.classes, self.sha256 = kind, source, list(classes), sha256
        self.is_training, self.img_size, self.workers = is_training, img_size, workers
        self.files, self.shards, self.shard_lengths = files, shards, shard_lengths
        self.labels = labels
        self.names = [f'{classes[int(y)]}/{os.path.basename(r)}' for (r, _), y in zip(files, labels)] \
            if files is not None else None

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else int(sum(self.shard_lengths))

    def subset(self, idx) -> 'StreamSplit':
        if self.files is None:
            raise DataError(f'{self.source}: a subset of WebDataset shards cannot be taken by index; '
                            'select shards instead.')
        idx = np.asarray(idx, dtype=np.int64)
        return self._replace(files=[self.files[i] for i in idx], labels=self.labels[idx])

    def as_split(self, is_training: bool) -> 'StreamSplit':
        return self._replace(is_training=is_training)

    def _replace(self, **kw) -> 'StreamSplit':
        args = dict(kind=self.kind, source=self.source, classes=self.classes, sha256=self.sha256,
                    is_training=self.is_training, img_size=self.img_size, workers=self.workers, files=self.files,
                    labels=self.labels, shards=self.shards, shard_lengths=self.shard_lengths)
        args.update(kw)
        return StreamSplit(**args)

    def transform(self, model: Optional[torch.nn.Module] = None):
        """timm's transform for this split, sized ``img_size`` (else the model's input size), output uint8."""
        from timm.data import create_transform, resolve_data_config
        args = {'input_size': (3, self.img_size, self.img_size)} if self.img_size else {}
        from torchvision.transforms import Compose
        from .images import to_rgb
        cfg = resolve_data_config(args, model=model)
        if self.is_training:
            t = create_transform(cfg['input_size'], is_training=True, use_prefetcher=True,
                                 interpolation='bilinear', hflip=0.5, color_jitter=0.4)
        else:
            t = create_transform(cfg['input_size'], is_training=False, use_prefetcher=True,
                                 interpolation=cfg['interpolation'], crop_pct=cfg['crop_pct'],
                                 crop_mode=cfg.get('crop_mode', 'center'))
        # the readers hand over the image unconverted (input_img_mode=None): the project's one reader makes it
        # RGB (16-bit scaled, not clipped; alpha composited; EXIF orientation; first frame)
        return Compose([to_rgb, t])

    def make_loader(self, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                    num_replicas: int = 1, rank: int = 0, model: Optional[torch.nn.Module] = None) -> 'StreamLoader':
        return StreamLoader(self, batch_size, shuffle, seed, drop_last, num_replicas, rank, model)


class _Rows(torch.utils.data.Dataset):
    """timm's ImageDataset restricted to rows ``idx`` (a split of one folder listing)."""

    def __init__(self, dataset, idx: Sequence[int]):
        self.dataset, self.idx = dataset, list(idx)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.dataset[self.idx[i]]


def _folder_dataset(split: StreamSplit, transform):
    """timm's folder dataset over the split's files, labels in our class order (checked against timm's)."""
    from timm.data import create_dataset
    root = os.path.commonpath([os.path.dirname(os.path.dirname(full)) for _, full in split.files])
    ds = create_dataset('', root=root, split='train', search_split=False,
                        class_map={c: i for i, c in enumerate(split.classes)}, transform=transform,
                        input_key=';'.join(IMG_EXTENSIONS), input_img_mode=None)
    row = {os.path.abspath(p): i for i, (p, _) in enumerate(ds.reader.samples)}
    try:
        idx = [row[os.path.abspath(full)] for _, full in split.files]
    except KeyError as e:
        raise DataError(f'{split.source}: timm\'s folder reader does not list {e.args[0]}; the folder changed '
                        'while opening it, or holds an unsupported layout.') from None
    got = [ds.reader.samples[i][1] for i in idx]
    if got != [int(y) for y in split.labels]:
        raise DataError(f'{split.source}: class folders changed while reading; run again.')
    return _Rows(ds, idx)


def _wds_dataset(split: StreamSplit, transform, batch_size: int, seed: int, num_replicas: int, rank: int,
                 workers: int):
    from timm.data import create_dataset
    if split.is_training:
        ds = create_dataset('wds/', root=split.source, split=_brace(split.shards, sum(split.shard_lengths)),
                            is_training=True, batch_size=batch_size, seed=seed, transform=transform,
                            input_img_mode=None)
        r = ds.reader
        r.dist_rank, r.dist_num_replicas = rank, num_replicas  # explicit, also without a process group
    else:
        # Evaluation: this rank's shards (rank::world), every sample exactly once (timm pads per rank instead).
        mine = list(range(rank, len(split.shards), num_replicas))
        if not mine:
            return None
        shards = [split.shards[i] for i in mine]
        ds = create_dataset('wds/', root=split.source, split=_brace(shards, sum(split.shard_lengths[i] for i in mine)),
                            is_training=False, batch_size=batch_size, transform=transform, input_img_mode=None)
        ds.reader.dist_rank, ds.reader.dist_num_replicas = 0, 1
    ds.set_loader_cfg(num_workers=workers)
    return ds


def _brace(shards: Sequence[str], num_samples: int) -> str:
    """timm's wds split string for an explicit shard list: ``a.tar::b.tar|N``."""
    return '::'.join(shards) + f'|{num_samples}'


class StreamLoader:
    """Batches of (uint8 images N x 3 x H x W, int64 labels) from DataLoader workers; the interface of
    ``BatchLoader`` (``set_epoch``, ``len``, iteration). ``augmented``: the loop applies no augmentation."""
    augmented = True

    def __init__(self, split: StreamSplit, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0, model: Optional[torch.nn.Module] = None):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.drop_last, self.num_replicas, self.rank = drop_last, num_replicas, rank
        self.workers = split.workers
        self.epoch = 0
        transform = split.transform(model)
        self.sampler = None
        if split.kind == 'folder':
            from torch.utils.data import DistributedSampler
            ds = _folder_dataset(split, transform)
            if split.is_training:
                # drop_last: every rank gets as many distinct samples (no padded duplicates across ranks)
                self.sampler = DistributedSampler(ds, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                                  seed=seed, drop_last=True)
            else:  # evaluation shards exactly: rank::world, every sample once
                ds = _Rows(ds, range(rank, len(ds), num_replicas)) if num_replicas > 1 else ds
            self.dataset = ds
        else:
            self.dataset = _wds_dataset(split, transform, batch_size, seed, num_replicas, rank, self.workers)

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.split.kind == 'wds' and self.dataset is not None:
            self.dataset.set_epoch(epoch)
            # timm builds the shard pipeline once and seeds its sample shuffle from the worker seed: rebuild it
            # each epoch from (seed, epoch, rank) so an epoch never depends on the ones before (resume).
            self.dataset.reader.ds = None
            self.dataset.reader.worker_seed = self._epoch_seed()

    def _epoch_seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch * 1009 + self.rank) % (2 ** 63)

    def __len__(self) -> int:
        if self.dataset is None:
            return 0
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self.dataset is None:
            return iter(())
        from functools import partial
        from timm.data.loader import _worker_init
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=self.workers,
            drop_last=self.drop_last, pin_memory=torch.cuda.is_available(), persistent_workers=False,
            generator=torch.Generator().manual_seed(self._epoch_seed()),
            worker_init_fn=partial(_worker_init, worker_seeding='all'))
        return _as_tensors(loader)


def _as_tensors(loader):
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- opening


def _listing_sha256(files: Sequence[Tuple[str, str]]) -> str:
    """Fingerprint of a streamed folder: relative names and byte sizes (hashing every byte of ImageNet's
    140 GB at every start would take longer than an epoch)."""
    h = hashlib.sha256()
    for rel, full in files:
        h.update(f'{rel}\0{os.path.getsize(full)}\0'.encode())
    return 'listing:' + h.hexdigest()


def _open_folder(path: str, split: str, folder: FolderInfo, img_size, workers) -> StreamSplit:
    index = {c: i for i, c in enumerate(folder.classes)}
    labels = np.asarray([index[r.split('/')[-2]] for r, _ in folder.files], dtype=np.int64)
    return StreamSplit('folder', path, folder.classes, _listing_sha256(folder.files), is_training=True,
                       img_size=img_size, workers=workers, files=folder.files, labels=labels)


def _read_info(path: str) -> Dict[str, Any]:
    f = os.path.join(path, INFO_FILE)
    if not os.path.exists(f):
        raise DataError(f'{path} has shards but no {INFO_FILE}; write the shards with '
                        'aff_zoo.data.streaming.write_shards, or add timm\'s info file (splits with filenames, '
                        'shard_lengths, num_samples; and classes).')
    with open(f) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(f'{f} is not valid JSON ({e}).') from e


def _open_shards(path: str, split: str, img_size, workers) -> StreamSplit:
    info = _read_info(path)
    splits = info.get('splits', {})
    name = split if split in splits else {'val': 'validation', 'validation': 'val'}.get(split)
    if name not in splits:
        raise DataError(f'{path}/{INFO_FILE} has splits {sorted(splits)}, no {split!r}.')
    s = splits[name]
    missing = [f for f in s['filenames'] if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise DataError(f'{path}: shards named in {INFO_FILE} are missing: {missing[:3]}')
    if not info.get('classes') and not info.get('num_classes'):
        raise DataError(f'{path}/{INFO_FILE} names neither "classes" (a list of class names, in label order) nor '
                        '"num_classes"; add one of them.')
    classes = info.get('classes') or [f'class{i}' for i in range(int(info['num_classes']))]
    sha = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()
    return StreamSplit('wds', path, classes, 'shards:' + sha, is_training=split == 'train', img_size=img_size,
                       workers=workers, shards=list(s['filenames']), shard_lengths=list(s['shard_lengths']))


def open_data(path: str, split: str = 'train', data_path: str = 'auto', img_size: Optional[int] = None,
              num_classes: Optional[int] = None, workers: int = DEFAULT_WORKERS, progress: bool = True
              ) -> Tuple[Union[ImageArrays, StreamSplit], DataChoice]:
    """The ``split`` of ``path`` on the chosen path: ``ImageArrays`` (memory) or a ``StreamSplit``."""
    folder = None
    p = os.path.abspath(os.path.expanduser(str(path)))
    if data_path != 'memory' and os.path.isdir(p) and not is_shard_source(p):
        folder = inspect_folder(p, split, read_sizes=data_path == 'auto')
    choice = choose_data_path(p, data_path, img_size, folder)
    if choice.path == 'memory':
        data = load_images(p, split=split, num_classes=num_classes, progress=progress)
        if img_size and data.images.shape[1:3] != (img_size, img_size):
            raise DataError(f'{p} holds {data.images.shape[2]}x{data.images.shape[1]} images but --img-size is '
                            f'{img_size}; the in-memory path does not resize. Omit --img-size, or use an '
                            'ImageFolder directory with --data-path stream (resized by the transform).')
        return data, choice
    data = _open_shards(p, split, img_size, workers) if choice.kind == 'wds' else \
        _open_folder(p, split, folder, img_size, workers)
    if num_classes is not None and len(data.classes) != num_classes:
        raise DataError(f'{p} has {len(data.classes)} classes but {num_classes} were expected.')
    return data, choice


def _val_folder(root: str) -> Optional[str]:
    """The validation split folder next to ``<root>/train`` (ImageNet's layout), if there is one."""
    if os.path.isdir(os.path.join(root, 'train')):
        return next((s for s in ('val', 'validation') if os.path.isdir(os.path.join(root, s))), None)
    return None


def train_val_split(data, val_per_class: Optional[int] = None):
    """(train, val): shards come split (``train``/``val`` in ``_info.json``); a streamed folder with ``train/``
    and ``val/`` uses them (unless ``val_per_class`` is given); everything else is split per class like the
    in-memory path (last ``val_per_class`` names of each class; ``None``: ``auto_val_per_class``)."""
    if isinstance(data, StreamSplit) and data.kind == 'wds':
        return data, _open_shards(data.source, 'val', data.img_size, data.workers)
    if isinstance(data, StreamSplit) and val_per_class is None and _val_folder(data.source):
        val = _open_folder(data.source, _val_folder(data.source), inspect_folder(data.source, _val_folder(data.source),
                                                                                 read_sizes=False),
                           data.img_size, data.workers)
        if val.classes != data.classes:
            raise DataError(f'{data.source}: {_val_folder(data.source)}/ has classes {val.classes[:5]}..., train/ '
                            f'has {data.classes[:5]}...; both need the same class folders.')
        return data.as_split(True), val.as_split(False)
    counts = np.bincount(np.asarray(data.labels), minlength=len(data.classes))
    train, val = split_train_val(data, auto_val_per_class(counts.tolist(), val_per_class))
    if isinstance(train, StreamSplit):
        train, val = train.as_split(True), val.as_split(False)
    return train, val


# ----------------------------------------------------------------------------------------------- writing shards


def write_shards(folder: str, out_dir: str, val_per_class: Optional[int] = None, shard_size: int = 1000,
                 progress: bool = True) -> Dict[str, Any]:
    """An ImageFolder as WebDataset shards ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` plus timm's ``_info.json``
    (same class order and validation split as ``train_val_split``). Image bytes are copied, not re-encoded."""
    import webdataset as wds
    from tqdm import tqdm
    info = inspect_folder(folder, read_sizes=False)
    data = _open_folder(os.path.abspath(folder), 'train', info, None, 0)
    train, val = train_val_split(data, val_per_class)
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    for name, part in (('train', train), ('val', val)):
        # shards hold a shuffled order (a reader's shuffle buffer only mixes nearby samples)
        order = np.random.default_rng(0).permutation(len(part)) if name == 'train' else np.arange(len(part))
        pattern = os.path.join(out_dir, f'{name}-%06d.tar')
        lengths = []
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
            for j, i in enumerate(tqdm(order, desc=f'{name} shards', disable=not progress)):
                rel, full = part.files[i]
                ext = os.path.splitext(full)[1].lower().lstrip('.')
                ext = 'jpg' if ext == 'jpeg' else ext
                with open(full, 'rb') as f:
                    sink.write({'__key__': f'{j:08d}', ext: f.read(), 'cls': str(int(part.labels[i])).encode()})
                if j % shard_size == 0:
                    lengths.append(0)
                lengths[-1] += 1
        splits[name] = dict(name=name, num_samples=len(part), shard_lengths=lengths,
                            filenames=[f'{name}-{k:06d}.tar' for k in range(len(lengths))])
    out = dict(name=os.path.basename(os.path.abspath(folder)), classes=data.classes, num_classes=len(data.classes),
               splits=splits)
    from ..utils import atomic_write_text
    atomic_write_text(os.path.join(out_dir, INFO_FILE), json.dumps(out, indent=1))
    return out
