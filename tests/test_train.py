"""Training loop: a killed run resumes to the same weights, DDP on gloo, evaluation of a checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _imagefolder import make_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ['--model', 'add_resnet8', '--batch-size', '16', '--lr', '0.05', '--val-per-class', '4',
              '--num-classes', '3', '--no-progress', '--ema-decay', '0.9', '--label-smoothing', '0.1',
              '--mixup-alpha', '0.2']


def _env(tmp_path):
    return dict(os.environ, AFF_ZOO_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def _cli(args, tmp_path, **kw):
    cmd = [sys.executable, '-c', 'import sys, torch; torch.set_num_threads(1); from aff_zoo.cli import main; '
           'sys.exit(main(sys.argv[1:]))', *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kw)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp('data') / 'imgs', classes=3, per_class=68, size=16)


def test_resume_after_kill_is_exact(folder, tmp_path):
    common = ['train', '--data', folder, '--epochs', '3', *TRAIN_ARGS]
    killed = tmp_path / 'killed'
    p = _cli([*common, '--output', str(killed)], tmp_path)
    deadline = time.time() + 120
    while not (killed / 'checkpoint.pt').exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, 'no epoch-1 checkpoint after 120 s'
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = torch.load(killed / 'checkpoint.pt', weights_only=True)
    assert state['epoch'] < 3, 'the run finished before it could be killed; make the epochs longer'
    full = tmp_path / 'full'
    procs = [_cli([*common, '--output', str(killed), '--resume'], tmp_path),
             _cli([*common, '--output', str(full)], tmp_path)]
    for q in procs:
        out = q.communicate(timeout=240)[0]
        assert q.returncode == 0, out
    a = torch.load(killed / 'checkpoint.pt', weights_only=True)
    b = torch.load(full / 'checkpoint.pt', weights_only=True)
    assert a['epoch'] == b['epoch'] == 3
    for key in ('model', 'ema'):
        for k in b[key]:
            assert torch.equal(a[key][k], b[key][k]), f'{key}.{k} differs after resume'
    assert [r['val_top1'] for r in a['log']] == [r['val_top1'] for r in b['log']]
    log = json.loads((killed / 'log.json').read_text())
    assert [r['epoch'] for r in log] == [1, 2, 3]
    metrics = json.loads((killed / 'metrics.json').read_text())
    assert metrics['epochs'] == 3 and metrics['command'].startswith('aff-zoo train ')
    assert {'log.csv', 'curves.png', 'model.safetensors'} <= set(os.listdir(killed))
    assert not [f for f in os.listdir(killed) if f.endswith('.tmp')]


def _ddp_worker(rank, world, init_file, folder, out_root, cache):
    import timm
    import torch.distributed as dist
    import aff_zoo  # noqa: F401
    from aff_zoo.data import load_images, split_train_val
    from aff_zoo.training.train import TrainConfig, train
    os.environ['AFF_ZOO_CACHE'] = cache
    torch.set_num_threads(1)
    # file rendezvous: no TCP port to race for on a shared machine
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        train_ds, val_ds = split_train_val(load_images(folder, progress=False), 4)
        torch.manual_seed(0)
        model = timm.create_model('add_resnet8', num_classes=3)
        cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, progress=False)
        metrics = train(model, train_ds, val_ds, cfg, os.path.join(out_root, f'rank{rank}'))
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save(dict(params=params, metrics=metrics), os.path.join(out_root, f'result{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(folder, tmp_path):
    import torch.multiprocessing as mp
    init_file = tmp_path / 'rendezvous'
    mp.spawn(_ddp_worker, args=(2, str(init_file), folder, str(tmp_path), str(tmp_path / 'cache')), nprocs=2)
    r0 = torch.load(tmp_path / 'result0.pt', weights_only=True)
    r1 = torch.load(tmp_path / 'result1.pt', weights_only=True)
    assert torch.equal(r0['params'], r1['params']), 'DDP ranks ended with different weights'
    assert not (tmp_path / 'rank1').exists(), 'rank 1 wrote files'
    assert {'checkpoint.pt', 'metrics.json', 'log.csv', 'model.safetensors'} <= set(os.listdir(tmp_path / 'rank0'))
    m = r0['metrics']
    assert m['world_size'] == 2 and m['val_images'] == 12
    log = json.loads((tmp_path / 'rank0' / 'log.json').read_text())
    # each rank steps on half the data: 192 train images / (2 x 8) = 12 steps per epoch, all counted
    assert log[-1]['train_loss'] < log[0]['train_loss'] + 0.5 and 0 <= log[-1]['val_top1'] <= 100
    assert m['val_top1'] > 100 / 3, f'no better than chance on an easy task: {m["val_top1"]}'


def test_evaluate_reproduces_the_run(folder, tmp_path):
    import timm
    import aff_zoo  # noqa: F401
    from aff_zoo.cli import main
    from aff_zoo.data import load_images, split_train_val
    from aff_zoo.training.evaluate import evaluate
    from aff_zoo.training.train import TrainConfig, train
    os.environ['AFF_ZOO_CACHE'] = str(tmp_path / 'cache')
    train_ds, val_ds = split_train_val(load_images(folder, progress=False), 4)
    torch.manual_seed(0)
    model = timm.create_model('add_resnet8', num_classes=3)
    out = tmp_path / 'run'
    metrics = train(model, train_ds, val_ds, TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False), str(out))
    best = timm.create_model('add_resnet8', num_classes=3, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))
    res = evaluate(best, val_ds, batch_size=5)
    assert res['top1'] == metrics['val_top1'] and res['top5'] == 100.0 and res['images'] == 12
    conf = torch.tensor(res['confusion'])
    assert conf.sum() == 12 and conf.sum(1).tolist() == [4, 4, 4]
    assert res['per_class'] == {c: round(100 * conf[i, i].item() / 4, 2) for i, c in enumerate(val_ds.classes)}
    assert res['images_per_s'] > 0
    assert set(load_file(out / 'model.safetensors')) == set(model.state_dict())
    rc = main(['evaluate', '--model', 'add_resnet8', '--data', folder, '--checkpoint', str(out / 'checkpoint.pt'),
               '--val-per-class', '4', '--output', str(tmp_path / 'eval.json'), '--quiet'])
    assert rc == 0
    last = json.loads((tmp_path / 'eval.json').read_text())
    assert last['top1'] == json.loads((out / 'log.json').read_text())[-1]['val_top1']
    assert main(['evaluate', '--model', 'add_resnet8', '--data', str(tmp_path / 'missing.tar.gz'),
                 '--checkpoint', 'x.safetensors']) == 2
