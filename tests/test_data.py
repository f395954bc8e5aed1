"""Data module: sources, cache, fixed split, clear errors, augmentation against a reference."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from aff_zoo.data import memory as D
from aff_zoo.utils import sha256_file
from _imagefolder import make_imagefolder


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    c = tmp_path / 'cache'
    monkeypatch.setenv('AFF_ZOO_CACHE', str(c))
    return c


def _tar(folder, path, prefix='train'):
    with tarfile.open(path, 'w:gz') as t:
        t.add(folder, arcname=prefix)
    return str(path)


def test_imagefolder_dir_and_archive_agree(tmp_path, cache):
    root = make_imagefolder(tmp_path / 'imgs', classes=3, per_class=6)
    a = D.load_images(root, progress=False)
    assert a.images.shape == (18, 16, 16, 3) and a.images.dtype == np.uint8
    assert a.classes == ['class0', 'class1', 'class2'] and a.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    arc = _tar(root, tmp_path / 'd.tar.gz')
    b = D.load_images(arc, progress=False)
    assert np.array_equal(a.images, b.images) and a.names == b.names and b.sha256 == sha256_file(arc)
    assert len(list(cache.glob('*.npz'))) == 2  # directory and archive each decoded into the cache once


def test_cache_is_reused_and_damaged_cache_rebuilt(tmp_path, cache, monkeypatch):
    arc = _tar(make_imagefolder(tmp_path / 'imgs', per_class=4), tmp_path / 'd.tar.gz')
    first = D.load_images(arc, progress=False)
    decode = D._decode_source
    monkeypatch.setattr(D, '_decode_source', lambda *a, **k: pytest.fail('decoded twice'))
    second = D.load_images(arc, progress=False)
    assert np.array_equal(first.images, second.images) and first.names == second.names
    with pytest.raises(D.DataError, match='classes'):  # a wrong class count does not drop the cache
        D.load_images(arc, num_classes=5, progress=False)
    (cached,) = cache.glob('*.npz')
    cached.write_bytes(b'garbage')
    monkeypatch.setattr(D, '_decode_source', decode)
    third = D.load_images(arc, progress=False)
    assert np.array_equal(first.images, third.images)


def test_fixed_val_split_is_last_by_name(tmp_path, cache):
    a = D.load_images(make_imagefolder(tmp_path / 'imgs', classes=2, per_class=7), progress=False)
    tr, va = D.split_train_val(a, val_per_class=2)
    assert va.names == ['class0/0005.png', 'class0/0006.png', 'class1/0005.png', 'class1/0006.png']
    assert len(tr) == 10 and not set(tr.names) & set(va.names)
    with pytest.raises(D.DataError, match='lower val_per_class'):
        D.split_train_val(a, val_per_class=7)


def test_missing_and_corrupt_archives(tmp_path, cache):
    with pytest.raises(D.DataError, match='does not exist'):
        D.load_images(tmp_path / 'nope.tar.gz')
    bad = tmp_path / 'bad.tar.gz'
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(D.DataError, match='corrupt'):
        D.load_images(bad)
    good = _tar(make_imagefolder(tmp_path / 'imgs', per_class=30, size=32), tmp_path / 'good.tar.gz')
    truncated = tmp_path / 'trunc.tar.gz'
    truncated.write_bytes(open(good, 'rb').read()[: os.path.getsize(good) // 2])
    with pytest.raises(D.DataError, match='corrupt|truncated'):
        D.load_images(truncated, progress=False)


def test_corrupt_image_names_the_file(tmp_path, cache):
    root = make_imagefolder(tmp_path / 'imgs', per_class=3)
    (tmp_path / 'imgs' / 'class1' / '0001.png').write_bytes(b'not an image')
    with pytest.raises(D.DataError, match='0001.png'):
        D.load_images(root, progress=False)


def test_unknown_layout_and_class_mismatch(tmp_path, cache):
    flat = tmp_path / 'flat'
    flat.mkdir()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(D.DataError, match='No images'):
        D.load_images(tmp_path / 'empty')
    make_imagefolder(tmp_path / 'flat' / 'only', classes=1, per_class=2)
    with pytest.raises(D.DataError, match='Unknown layout'):
        D.load_images(flat / 'only', progress=False)
    root = make_imagefolder(tmp_path / 'imgs', classes=3, per_class=2)
    with pytest.raises(D.DataError, match='3 classes.*10 were expected'):
        D.load_images(root, num_classes=10, progress=False)
    with pytest.raises(D.DataError, match="no 'test'"):
        D.load_images(_tar(root, tmp_path / 'd.tar.gz'), split='test', progress=False)


def _cifar_python_archive(path, batches):
    with tarfile.open(path, 'w:gz') as t:
        def add(name, obj):
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
        add('batches.meta', {b'label_names': [b'a', b'b']})
        for name, obj in batches.items():
            add(name, obj)
    return str(path)


def test_cifar_python_archive_restricted_unpickler(tmp_path, cache):
    rng = np.random.default_rng(0)
    batches = {}
    for i in range(1, 6):
        batches[f'data_batch_{i}'] = {
            b'data': rng.integers(0, 255, (4, 3072), dtype=np.uint8), b'labels': [0, 1, 1, 0],
            b'filenames': [f'img_{i}_{j}.png'.encode() for j in range(4)]}
    arc = _cifar_python_archive(tmp_path / 'cifar-10-python.tar.gz', batches)
    a = D.load_images(arc, progress=False)
    assert a.images.shape == (20, 32, 32, 3) and a.classes == ['a', 'b']
    first = batches['data_batch_1'][b'data'][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(a.images[a.names.index('a/img_1_0.png')], first)

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    evil = _cifar_python_archive(tmp_path / 'evil.tar.gz', {f'data_batch_{i}': Evil() for i in range(1, 6)})
    with pytest.raises(D.DataError, match='Refusing to unpickle'):
        D.load_images(evil, progress=False)


def test_augment_matches_reference_crop_and_flip():
    x = torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8)
    y = D.gpu_augment(x, torch.Generator().manual_seed(3), pad=2)
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 5, (16,), generator=g), torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    p = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = p[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        assert torch.equal(y[i], ref.flip(2) if flip[i] else ref)
    n = D.normalize(y, (0.5, 0.25, 0.0), (0.5, 0.5, 1.0), channels_last=True)
    assert n.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(n[:, 0], (y[:, 0].float() / 255 - 0.5) / 0.5, atol=1e-5)
    assert torch.allclose(n[:, 2], y[:, 2].float() / 255, atol=1e-5)
