"""Streaming data: path choice, disjoint and resumable loaders, and 2-process torchrun training (gloo) from a
folder of mixed-size JPEGs and from WebDataset shards, with a SIGKILL mid-epoch and an exact resume."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from _imagefolder import make_imagefolder
from _mixed_images import make_mixed_folder
from aff_zoo.data import DataError
from aff_zoo.data.streaming import StreamSplit, choose_data_path, open_data, train_val_split, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# aff_resnet50 at 64 px, 2 epochs of 5 steps per process; 1 DataLoader worker so the worker path is exercised
TRAIN = ['train', '--model', 'aff_resnet50', '--img-size', '64', '--batch-size', '8', '--lr', '0.02',
         '--epochs', '2', '--workers', '1', '--no-progress', '--eval-batch-size', '16']


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
    return make_mixed_folder(tmp_path_factory.mktemp('mixed') / 'imgs', classes=4, per_class=24)


@pytest.fixture(scope='module')
def shards(mixed, tmp_path_factory):
    out = tmp_path_factory.mktemp('shards') / 'wds'
    write_shards(mixed, str(out), shard_size=24, progress=False)
    return str(out)


def test_choice_of_data_path(mixed, shards, tmp_path):
    assert choose_data_path(mixed).path == 'stream'
    assert choose_data_path(shards) == choose_data_path(shards, 'stream')
    assert choose_data_path(shards).kind == 'wds'
    uniform = make_imagefolder(tmp_path / 'u', classes=2, per_class=6, size=16)
    assert choose_data_path(uniform).path == 'memory'
    assert choose_data_path(uniform, img_size=16).path == 'memory'
    assert choose_data_path(uniform, img_size=32).path == 'stream'   # resized by the transform
    assert choose_data_path(uniform, 'stream').path == 'stream'
    with pytest.raises(DataError, match='only stream'):
        choose_data_path(shards, 'memory')
    with pytest.raises(DataError, match='mixed|differ'):  # the in-memory path still refuses mixed sizes
        open_data(mixed, data_path='memory', progress=False)


def test_folder_split_matches_memory_rule(mixed):
    data, choice = open_data(mixed, img_size=64, workers=0)
    assert isinstance(data, StreamSplit) and len(data) == 96 and data.classes == [f'class{k}' for k in range(4)]
    train, val = train_val_split(data)   # 24 per class -> auto: last 2 names of each class are validation
    assert (len(train), len(val)) == (88, 8)
    assert sorted(val.names) == sorted(f'class{k}/{i:04d}.jpg' for k in range(4) for i in (22, 23))
    assert train.is_training and not val.is_training


def test_streamed_folder_with_val_folder(tmp_path):
    """ImageNet's layout: <root>/train and <root>/val; val/ is the validation set unless --val-per-class."""
    make_mixed_folder(tmp_path / 'train', classes=3, per_class=5, sizes=(20, 40))
    make_mixed_folder(tmp_path / 'val', classes=3, per_class=2, sizes=(20, 40), seed=1)
    data, choice = open_data(tmp_path, img_size=32, workers=0)
    assert choice.path == 'stream' and len(data) == 15
    train, val = train_val_split(data)
    assert (len(train), len(val)) == (15, 6) and all('/val/' in f for _, f in val.files)
    assert not val.is_training
    assert [len(s) for s in train_val_split(data, 1)] == [12, 3]


def test_streamed_images_go_through_the_project_reader(tmp_path):
    """16-bit PNGs are scaled to 8 bits (aff_zoo.data.images.to_rgb), not clipped to white, when streamed."""
    from PIL import Image
    for c in ('a', 'b'):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((12 + i, 10, 1), 32896, dtype=np.uint16)[..., 0]).save(tmp_path / c / f'{i}.png')
    data, choice = open_data(tmp_path, img_size=8, workers=0)
    assert choice.path == 'stream'
    _, val = train_val_split(data, 1)
    (x, y), = list(val.make_loader(4, shuffle=False))
    assert x.shape == (2, 3, 8, 8) and bool((x == 128).all())


def _epoch(split, epoch, rank=0, world=2, batch=8):
    loader = split.make_loader(batch, shuffle=True, seed=3, drop_last=True, num_replicas=world, rank=rank)
    loader.set_epoch(epoch)
    return loader, list(loader)


@pytest.mark.parametrize('source', ['folder', 'wds'])
def test_epoch_replays_exactly_and_ranks_are_disjoint(source, mixed, shards, monkeypatch):
    """An epoch's batches depend on (seed, epoch, rank) only: a fresh loader set to epoch 1 (a resumed run)
    gives bit-identical batches to one that ran epoch 0 first; the two ranks read disjoint samples."""
    data, _ = open_data(mixed if source == 'folder' else shards, img_size=32, workers=1)
    train, _ = train_val_split(data)
    loader, _ = _epoch(train, 0)
    loader.set_epoch(1)
    continued = list(loader)
    _, resumed = _epoch(train, 1)
    assert len(continued) == len(resumed) == len(loader) > 0
    for (xa, ya), (xb, yb) in zip(continued, resumed):
        assert xa.dtype == torch.uint8 and xa.shape == (8, 3, 32, 32)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    _, other_epoch = _epoch(train, 2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(continued, other_epoch))
    # disjoint: which samples each rank reads (workers=0, so the reads happen in this process)
    seen = {}
    if source == 'folder':
        for rank in (0, 1):
            loader, _ = _epoch(train, 1, rank=rank)
            seen[rank] = set(iter(loader.sampler))
        assert len(seen[0]) == len(seen[1]) == len(train) // 2
    else:
        import timm.data.readers.reader_wds as rw
        decode = rw._decode
        for rank in (0, 1):
            keys = []
            def recording(sample, _keys=keys, **kw):
                _keys.append(sample['__url__'] + sample['__key__'])
                return decode(sample, **kw)
            monkeypatch.setattr(rw, '_decode', recording)
            _epoch(train._replace(workers=0), 1, rank=rank)
            seen[rank] = set(keys)
            assert len(keys) == math.ceil(len(train) / 2 / 8) * 8   # equal step counts on every rank
        assert len(seen[0] | seen[1]) == len(train)   # together they cover every training sample
        shards_of = {r: {k.split('.tar')[0] for k in seen[r]} for r in (0, 1)}
        assert shards_of[0] and shards_of[1]
    assert not seen[0] & seen[1]


def _env(tmp_path):
    return dict(os.environ, AFF_ZOO_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def _torchrun(args, tmp_path, **kw):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
           '-m', 'aff_zoo.cli', *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


def _descendants(pid):
    """Every process below ``pid`` (from /proc), children first listed after their parents."""
    parent = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    parent[int(d)] = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        ppid = todo.pop()
        kids = [c for c, pp in parent.items() if pp == ppid]
        out += kids
        todo += kids
    return out


def _finished(p, timeout=900):
    out = p.communicate(timeout=timeout)[0]
    assert p.returncode == 0, out
    return out


def _check_run(out_dir, epochs, kind):
    metrics = json.loads((out_dir / 'metrics.json').read_text())
    assert metrics['world_size'] == 2 and metrics['data_path'] == 'stream' and metrics['data_source'] == kind
    assert metrics['epochs'] == epochs and 0 <= metrics['val_top1'] <= 100
    log = json.loads((out_dir / 'log.json').read_text())
    assert [r['epoch'] for r in log] == list(range(1, epochs + 1))
    assert all(math.isfinite(r['train_loss']) and math.isfinite(r['val_loss']) for r in log)
    return metrics


def test_torchrun_folder_kill_and_exact_resume(mixed, tmp_path):
    """Two processes (gloo) train from the mixed-size folder; a run SIGKILLed in epoch 2 resumes from the
    epoch-1 checkpoint to weights bit-identical to the uninterrupted run's."""
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    p_full = _torchrun([*TRAIN, '--data', mixed, '--output', str(full)], tmp_path)
    p = _torchrun([*TRAIN, '--data', mixed, '--output', str(killed)], tmp_path)
    deadline = time.time() + 600
    while not (killed / 'log.json').exists():   # written right after the epoch-1 checkpoint
        assert p.poll() is None, p.communicate()[0]
        assert time.time() < deadline, 'no epoch-1 checkpoint after 600 s'
        time.sleep(0.05)
    time.sleep(0.5)   # into epoch 2 (5 steps of about 0.3 s each on an idle core)
    for pid in [*_descendants(p.pid), p.pid]:   # torchrun starts its workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate()
    state = torch.load(killed / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] == 1, 'the run finished epoch 2 before it could be killed'
    _finished(_torchrun([*TRAIN, '--data', mixed, '--output', str(killed), '--resume'], tmp_path))
    _finished(p_full)
    _check_run(full, 2, 'folder')
    a = torch.load(killed / 'checkpoint.pt', weights_only=True)
    b = torch.load(full / 'checkpoint.pt', weights_only=True)
    assert a['epoch'] == b['epoch'] == 2
    for k in b['model']:
        assert torch.equal(a['model'][k], b['model'][k]), f'{k} differs after resume'
    assert [r['train_loss'] for r in a['log']] == [r['train_loss'] for r in b['log']]


def test_torchrun_from_webdataset_shards(shards, tmp_path):
    out = tmp_path / 'wds_run'
    _finished(_torchrun([*TRAIN, '--data', shards, '--output', str(out)], tmp_path))
    metrics = _check_run(out, 2, 'wds')
    assert metrics['train_images'] == 88 and metrics['val_images'] == 8


def test_issue_command_on_mixed_jpegs(mixed, tmp_path):
    """The command of issue 11, as written (``aff-zoo`` replaced by the module, which runs this checkout)."""
    out = tmp_path / 'run'
    _finished(_torchrun(['train', '--model', 'aff_resnet50', '--data', mixed, '--output', str(out),
                         '--epochs', '1', '--batch-size', '8', '--img-size', '64', '--no-progress'], tmp_path))
    metrics = json.loads((out / 'metrics.json').read_text())
    assert 0 <= metrics['val_top1'] <= 100 and metrics['data_path'] == 'stream'


def test_finetune_accepts_mixed_sizes(mixed, tmp_path):
    """Fine-tuning no longer refuses mixed-size images: they stream and the transform resizes them."""
    from aff_zoo.training.finetune import finetune, load_finetune_data, prepare_model
    from aff_zoo.training.train import TrainConfig
    train, val = load_finetune_data(mixed, img_size=32, progress=False)
    assert isinstance(train, StreamSplit) and train.is_training and not val.is_training
    assert (len(train), len(val)) == (76, 20) and val.img_size == 32   # last 5 of 24 per class (20 %)
    train.workers = val.workers = 0
    model = prepare_model('aff_resnet20', 4, pretrained=False, img_size=32)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, progress=False, eval_batch_size=16)
    metrics = finetune(model, train, val, cfg, str(tmp_path / 'ft'))
    assert math.isfinite(metrics['val_top1']) and (tmp_path / 'ft' / 'hub' / 'model.safetensors').exists()
