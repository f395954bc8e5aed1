"""Training loop: a killed run resumes to the same weights, DDP on gloo, evaluation of a checkpoint."""
import json
import math
import os
import shlex
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
    # Each epoch says where it ran: both processes here are one machine, so one entry of all three epochs.
    assert {r['machine'] for r in log} == {metrics['machine']} and metrics['machines'] == {metrics['machine']: 3}
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


# ------------------------------------------------------------------------ timm pieces, resume, divergence, AMP

def _old_lr(step, base, total, warmup, min_lr=0.):
    """The schedule of the published runs (the hand-written CosineWarmup before timm's), as it was."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def test_timm_scheduler_against_the_published_e12_curve():
    """e12: lr 0.1, 0.3 warm-up epochs, 12 epochs x 352 updates. Warm-up identical; the cosine runs one update
    ahead of the old formula (which held the peak for two updates); the largest difference is 3.8e-5."""
    from aff_zoo.training.train import TrainConfig, create_scheduler
    cfg = TrainConfig(lr=0.1, warmup_epochs=0.3, epochs=12, min_lr=0.)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = create_scheduler(opt, cfg, 352)
    total, warmup = 12 * 352, int(0.3 * 352)
    new = []
    for u in range(total):
        sched.step_update(u + 1)  # as the loop does before update u
        new.append(opt.param_groups[0]['lr'])
    old = [_old_lr(u, 0.1, total, warmup) for u in range(total + 1)]
    assert max(abs(new[u] - old[u]) for u in range(warmup)) < 1e-9
    assert max(abs(new[u] - old[u + 1]) for u in range(warmup, total)) < 1e-9  # one update ahead
    gap = max(abs(a - b) for a, b in zip(new, old))
    assert 3.0e-5 < gap < 3.9e-5, gap
    assert new[warmup - 1] == pytest.approx(0.1) and new[-1] == 0.0


@pytest.fixture(scope='module')
def small(folder):
    from aff_zoo.data import load_images, split_train_val
    os.environ.setdefault('AFF_ZOO_CACHE', str(os.path.join(os.path.dirname(folder), 'cache')))
    train_ds, val_ds = split_train_val(load_images(folder, progress=False), 4)
    return train_ds.subset(list(range(0, 192, 4))), val_ds  # 48 training images: 3 updates of 16 per epoch


def _model():
    import timm
    import aff_zoo  # noqa: F401
    torch.manual_seed(0)
    return timm.create_model('add_resnet8', num_classes=3)


@pytest.fixture(scope='module')
def epoch1_of_3(small, tmp_path_factory):
    """The run folder of a 3-epoch run stopped after its first epoch (as after a kill)."""
    from aff_zoo.training import train as T
    out = tmp_path_factory.mktemp('epoch1') / 'run'
    orig = T._write_logs

    def stop(rows, out_dir):
        orig(rows, out_dir)
        raise KeyboardInterrupt
    T._write_logs = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(_model(), *small, T.TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0,
                                                    progress=False), str(out))
    finally:
        T._write_logs = orig
    return out


def test_resume_with_another_recipe_is_refused_or_overridden(small, epoch1_of_3, tmp_path, monkeypatch):
    import shutil
    import aff_zoo.training.train as T
    from aff_zoo.training.train import RunError, TrainConfig, train
    here = T.machine_line('cpu')
    out = tmp_path / 'run'
    shutil.copytree(epoch1_of_3, out)
    base = dict(epochs=3, batch_size=16, lr=0.05, warmup_epochs=0, progress=False)
    with pytest.raises(RunError, match=r"lr 0\.05 -> 0\.1\. .*--resume-override lr,"):
        train(_model(), *small, TrainConfig(**dict(base, lr=0.1)), str(out), resume=True)
    with pytest.raises(RunError, match=r"batch_size 16 -> 8, lr 0\.05 -> 0\.1\. .*--resume-override batch_size,lr,"):
        train(_model(), *small, TrainConfig(**dict(base, lr=0.1, batch_size=8)), str(out), resume=True,
              resume_override=[])
    with pytest.raises(RunError, match='opt cannot change'):
        train(_model(), *small, TrainConfig(**dict(base, opt='adamw')), str(out), resume=True, resume_override=['opt'])
    with pytest.raises(RunError, match='unknown field.*bogus'):
        train(_model(), *small, TrainConfig(**base), str(out), resume=True, resume_override=['bogus'])
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['epoch'] == 1  # refusals touched nothing

    monkeypatch.setattr(T, 'machine_line', lambda device: 'another machine')  # resumed elsewhere
    m = train(_model(), *small, TrainConfig(**dict(base, lr=0.1, batch_size=8)), str(out), resume=True,
              resume_override=['batch_size', 'lr'])
    log = json.loads((out / 'log.json').read_text())
    # epoch 1: lr 0.05, 3 updates of 16 (9 in all); epochs 2-3: lr 0.1, 6 updates of 8 (18 in all): the new
    # schedule from the resumed epoch, i.e. at update 12 of 18 after epoch 2 (the bug ran them at lr 0)
    assert log[0]['lr'] == pytest.approx(0.025 * (1 + math.cos(math.pi * 3 / 9)))
    assert log[1]['lr'] == pytest.approx(0.05 * (1 + math.cos(math.pi * 12 / 18)))
    assert [r['epoch'] for r in log] == [1, 2, 3]
    assert [r['machine'] for r in log] == [here, 'another machine', 'another machine']
    assert m['machines'] == {here: 1, 'another machine': 2} and m['machine'] == 'another machine'
    assert T.epochs_by_machine([{'epoch': 1}, *log]) == {'not recorded': 1, here: 1, 'another machine': 2}
    assert m['config']['batch_size'] == 8 and m['config']['lr'] == 0.1
    assert {(o['field'], o['original'], o['new'], o['from_epoch']) for o in m['resume_overrides']} == {
        ('batch_size', 16, 8, 2), ('lr', 0.05, 0.1, 2)}
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved['resume_overrides'] == m['resume_overrides'] and saved['run']['batch_size'] == 8


def test_divergence_keeps_the_last_good_checkpoint(small, epoch1_of_3, tmp_path):
    import shutil
    from aff_zoo.training.train import TrainConfig, TrainingDiverged, train
    from aff_zoo.utils import sha256_file
    out = tmp_path / 'run'
    shutil.copytree(epoch1_of_3, out)
    before = sha256_file(out / 'checkpoint.pt')
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e12, warmup_epochs=0, progress=False)
    with pytest.raises(TrainingDiverged, match=r'at epoch 2, step \d of 3; stopped: .*checkpoint.pt keeps the last '
                                               r'good state \(epoch 1\)'):
        train(_model(), *small, cfg, str(out), resume=True, resume_override=['lr'])
    assert sha256_file(out / 'checkpoint.pt') == before


def test_diverging_cli_run_ends_in_one_line_and_leaves_no_folder(folder, tmp_path, capsys):
    from aff_zoo.cli import main
    os.environ['AFF_ZOO_CACHE'] = str(tmp_path / 'cache')
    out = tmp_path / 'never'
    rc = main(['train', '--data', folder, '--output', str(out), '--model', 'add_resnet8', '--batch-size', '16',
               '--lr', '1e12', '--warmup-epochs', '0', '--val-per-class', '4', '--train-subset', '48',
               '--no-progress', '--epochs', '2'])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(('decoding', 'data: '))]
    assert rc == 2 and len(err) == 1, err  # one line, no traceback (the data decoding bar aside)
    assert err[0].startswith('error: the loss became NaN/inf at epoch 1, step ') and 'no run folder' in err[0]
    assert not out.exists()


def test_accumulation_and_bf16_autocast_on_cpu(small, tmp_path):
    """--accum-steps 3 at batch 8: one AdamW update per 3 micro-batches, effective batch 24; bf16 autocast
    (CPU) trains with a finite loss. (fp16 + GradScaler and CUDA bf16 need a GPU: scripts/gpu_check.sh.)"""
    from aff_zoo.training.train import TrainConfig, train
    cfg = TrainConfig(epochs=2, batch_size=8, accum_steps=3, opt='adamw', lr=1e-3, warmup_epochs=0, amp=True,
                      amp_dtype='bfloat16', channels_last=False, progress=False)
    m = train(_model(), *small, cfg, str(tmp_path / 'run'))
    state = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)
    assert {int(s['step']) for s in state['optimizer']['state'].values()} == {4}  # 48 / 8 / 3 = 2 per epoch
    assert m['effective_batch_size'] == 24 and m['amp_dtype'] == 'bfloat16' and state['updates'] == 4
    log = json.loads((tmp_path / 'run' / 'log.json').read_text())
    assert all(math.isfinite(r['train_loss']) and r['train_images_per_s'] > 0 for r in log)
    assert log[0]['eta_seconds'] >= 0 and log[-1]['eta_seconds'] == 0


def _segments(cmd):
    import shlex
    segs, cur = set(), []
    for tok in shlex.split(cmd)[2:]:
        if tok.startswith('--') and cur:
            segs.add(' '.join(cur))
            cur = []
        cur.append(tok)
    segs.add(' '.join(cur))
    return segs


def test_recipes_print_their_full_command(capsys, monkeypatch):
    from aff_zoo.cli import main
    from aff_zoo.models.weights import WEIGHTS
    where = ['--data', '/work/shared/data/cifar10-train-jpeg.tar.gz', '--output', '/work/runs/ckpt20/aff_resnet20-e12']
    assert main(['train', '--recipe', 'cifar10-e12', '--model', 'aff_resnet20', *where, '--print-command']) == 0
    printed = capsys.readouterr().out.strip().split(': ', 1)[1]
    published = next(w for w in WEIGHTS if getattr(w, 'arch', '') == 'aff_resnet20' and w.tag == 'cifar10_e12')
    missing = _segments(published.recipe) - _segments(printed)
    assert not missing, f'the preset differs from the published recipe in {missing}'

    def run(*extra):
        assert main(['train', '--recipe', 'imagenet-paper', '--data', 'x', '--output', 'y', *extra,
                     '--print-command']) == 0
        return _segments(capsys.readouterr().out.strip().split(': ', 1)[1])
    assert {'--lr 0.075', '--epochs 160', '--warmup-epochs 5.0', '--label-smoothing 0.1', '--mixup-alpha 0.2',
            '--mixup-off-epoch 155', '--nesterov', '--no-wd-bn-bias', '--weight-decay 0.0001'} <= run(
        '--model', 'aff_resnet50')
    assert {'--lr 0.15', '--epochs 240', '--mixup-off-epoch 235'} <= run('--model', 'aff_resnext50', '--batch-size',
                                                                          '256')
    assert {'--lr 0.3', '--epochs 3', '--mixup-alpha 0.0', '--mixup-off-epoch 0'} <= run(
        '--model', 'aff_resnet50', '--accum-steps', '4', '--epochs', '3', '--mixup-alpha', '0')  # explicit wins
    monkeypatch.setenv('WORLD_SIZE', '8')
    assert {'--lr 0.06', '--epochs 5'} <= run('--model', 'aff_resnet50', '--recipe', 'imagenet-upcycle')


def test_mixup_stops_after_mixup_off_epoch(small, tmp_path, monkeypatch):
    """--mixup-off-epoch 1 of 2 epochs: the first epoch mixes at the recipe's alpha, the second not at all (timm's
    train.py semantics: epochs counted from 0, mixing while epoch < N); the run records the setting."""
    from aff_zoo.training import train as T
    seen, orig = [], T._mixup

    def spy(x, y, num_classes, alpha, smoothing, generator):
        seen.append(alpha)
        return orig(x, y, num_classes, alpha, smoothing, generator)
    monkeypatch.setattr(T, '_mixup', spy)
    cfg = T.TrainConfig(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, mixup_alpha=1.0, mixup_off_epoch=1,
                        progress=False)
    m = T.train(_model(), *small, cfg, str(tmp_path / 'run'))
    per_epoch = len(seen) // 2
    assert per_epoch > 0 and seen == [1.0] * per_epoch + [0.0] * per_epoch
    assert m['config']['mixup_off_epoch'] == 1


def test_cutout_erases_one_uniform_square_per_image_and_replays_from_the_generator():
    import timm
    from aff_zoo.training.train import cutout_transform
    model = timm.create_model('add_resnet8')
    erase = cutout_transform(8, model)
    x = erase(torch.ones(2000, 3, 32, 32), torch.Generator().manual_seed(3))
    tops, lefts = [], []
    for img in x[:200]:
        zero = (img == 0)
        assert bool((zero == zero[0]).all())  # the same square in every channel
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        assert int(zero[0].sum()) == 64 and len(rows) == 8 and len(cols) == 8
        assert int(rows[-1] - rows[0]) == 7 and int(cols[-1] - cols[0]) == 7  # one contiguous 8x8 square
    zero = (x[:, 0] == 0)
    tops = zero.any(2).float().argmax(1)  # first erased row of each image
    lefts = zero.any(1).float().argmax(1)
    # timm's RandomErasing puts the square wholly inside, top and left uniform over 0..24: all 25 values appear
    assert set(tops.tolist()) == set(range(25)) == set(lefts.tolist())
    assert torch.equal(erase(torch.ones(2000, 3, 32, 32), torch.Generator().manual_seed(3)), x)  # replays
    assert not torch.equal(erase(torch.ones(2000, 3, 32, 32), torch.Generator().manual_seed(4)), x)
    with pytest.raises(ValueError, match='does not fit'):
        cutout_transform(32, model)


def test_resnet9_recipe_prints_pages_settings(capsys):
    from aff_zoo.cli import main
    assert main(['train', '--recipe', 'cifar10-r9', '--model', 'aff_resnet9', '--data', 'x', '--output', 'y',
                 '--print-command']) == 0
    printed = _segments(capsys.readouterr().out.strip().split(': ', 1)[1])
    assert {'--batch-size 512', '--lr 0.4', '--epochs 24', '--warmup-epochs 5.0', '--cutout 8',
            '--label-smoothing 0.2', '--amp-dtype bfloat16', '--no-no-wd-bn-bias', '--weight-decay 0.0005',
            '--crop-pad 4', '--hflip', '--nesterov'} <= printed
    assert main(['train', '--recipe', 'cifar10-r9-e48', '--model', 'aff_resnet9', '--data', 'x', '--output', 'y',
                 '--print-command']) == 0
    longer = _segments(capsys.readouterr().out.strip().split(': ', 1)[1])
    assert longer ^ printed == {'--epochs 24', '--epochs 48'}  # the same recipe at twice the epochs
    assert main(['train', '--recipe', 'cifar10-r9-e96', '--model', 'aff_resnet9', '--data', 'x', '--output', 'y',
                 '--print-command']) == 0
    assert _segments(capsys.readouterr().out.strip().split(': ', 1)[1]) ^ printed == {'--epochs 24', '--epochs 96'}
    assert main(['train', '--recipe', 'cifar10-r9-e96-cutout12', '--model', 'aff_resnet9', '--data', 'x',
                 '--output', 'y', '--print-command']) == 0
    assert _segments(capsys.readouterr().out.strip().split(': ', 1)[1]) ^ printed == {
        '--epochs 24', '--epochs 96', '--cutout 8', '--cutout 12'}
    # the ResNet-11 recipe is the published ResNet-9 one: only the network differs
    assert main(['train', '--recipe', 'cifar10-r11-e96', '--model', 'aff_resnet9', '--data', 'x',
                 '--output', 'y', '--print-command']) == 0
    assert _segments(capsys.readouterr().out.strip().split(': ', 1)[1]) ^ printed == {
        '--epochs 24', '--epochs 96', '--cutout 8', '--cutout 12'}
    # the mixup recipe: the published one with the authors' mixup, its switch-off and label smoothing, longer
    assert main(['train', '--recipe', 'cifar10-r11-mix-e150', '--model', 'aff_resnet9', '--data', 'x',
                 '--output', 'y', '--print-command']) == 0
    assert _segments(capsys.readouterr().out.strip().split(': ', 1)[1]) ^ printed == {
        '--epochs 24', '--epochs 150', '--cutout 8', '--cutout 12', '--mixup-alpha 0.0', '--mixup-alpha 1.0',
        '--mixup-off-epoch 0', '--mixup-off-epoch 135', '--label-smoothing 0.2', '--label-smoothing 0.1'}
    # and that recipe without weight decay on norm scales and biases (the authors' --no-wd): nothing else differs
    assert main(['train', '--recipe', 'cifar10-r11-mix-e150', '--model', 'aff_resnet9', '--data', 'x',
                 '--output', 'y', '--print-command']) == 0
    mix = _segments(capsys.readouterr().out.strip().split(': ', 1)[1])
    assert main(['train', '--recipe', 'cifar10-r11-mix-e150-nwd', '--model', 'aff_resnet9', '--data', 'x',
                 '--output', 'y', '--print-command']) == 0
    assert _segments(capsys.readouterr().out.strip().split(': ', 1)[1]) ^ mix == {
        '--no-no-wd-bn-bias', '--no-wd-bn-bias'}


def test_the_mix_recipe_prints_the_published_records_commands(capsys):
    """``--recipe cifar10-r11-mix-e150`` is exactly what trained the three .cifar10_mix_e150 files."""
    from aff_zoo.cli import main
    from aff_zoo.models.weights import WEIGHTS
    records = [w for w in WEIGHTS if w.tag == 'cifar10_mix_e150']
    assert sorted(w.arch for w in records) == ['add_resnet11', 'aff_resnet11', 'iaff_resnet11']
    for w in records:
        where = {s.split(' ', 1)[0]: s.split(' ', 1)[1] for s in _segments(w.recipe)
                 if s.split(' ', 1)[0] in ('--data', '--output', '--device', '--workers')}
        assert main(['train', '--recipe', 'cifar10-r11-mix-e150', '--model', w.arch,
                     *[x for kv in where.items() for x in kv], '--print-command']) == 0
        assert _segments(capsys.readouterr().out.strip().split(': ', 1)[1]) == _segments(w.recipe), w.name


def test_nonfinite_report_names_the_tensor_or_the_largest_running_variance():
    from aff_zoo.training.train import nonfinite_report
    model = _model()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bns[1].running_var.fill_(1e6)
    names = {m: n for n, m in model.named_modules()}
    report = nonfinite_report(model)
    assert report.startswith('every tensor of the state is finite') and f'{names[bns[1]]}.running_var = 1e+06' in report
    bns[2].running_mean[0] = float('nan')
    assert nonfinite_report(model) == f'non-finite tensors in the model state: {names[bns[2]]}.running_mean'


def test_nan_validation_loss_is_explained_once(small, tmp_path, capsys):
    """Train mode normalises with batch statistics, eval mode with the running ones: a NaN in those breaks
    only the validation (as iaff_resnet32_w4 on the H100). The run goes on and says why, once."""
    from aff_zoo.training.train import TrainConfig, train
    model = _model()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    def poison(m, args):  # every training step leaves a NaN running variance behind
        if m.training:
            m.running_var.fill_(float('nan'))

    bn.register_forward_pre_hook(poison)
    train(model, *small, TrainConfig(epochs=2, batch_size=16, progress=False), str(tmp_path / 'run'))
    log = json.loads((tmp_path / 'run' / 'log.json').read_text())
    assert [math.isnan(r['val_loss']) for r in log] == [True, True] and log[-1]['train_loss'] > 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: the validation loss')]
    assert len(err) == 1 and 'at epoch 1' in err[0] and 'running_var' in err[0], err


def test_machine_line_tells_the_cpus_bfloat16_units(tmp_path, monkeypatch):
    """Both Xeons this project ran on print the same model name; bfloat16 is 2.4x faster than float32 on the one
    (AMX) and 2.3x slower on the other (emulated), so the records say which."""
    import aff_zoo.utils as U
    from aff_zoo.utils import bfloat16_units, cpuinfo, machine_line
    info = tmp_path / 'cpuinfo'
    cpu = 'processor\t: {}\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.50GHz\nflags\t\t: fpu avx512f {}\n'
    info.write_text(cpu.format(0, 'avx512_vnni') + '\n' + cpu.format(1, 'amx_bf16'))  # the first CPU's fields
    assert cpuinfo(str(info)) == {'processor': '0', 'model name': 'Intel(R) Xeon(R) Processor @ 2.50GHz',
                                  'flags': 'fpu avx512f avx512_vnni'}
    assert cpuinfo(str(tmp_path / 'absent')) == {}
    assert bfloat16_units('fpu avx512f avx512_bf16 amx_bf16 amx_tile') == 'bfloat16: AMX'
    assert bfloat16_units('fpu avx512f avx512_bf16') == 'bfloat16: AVX512-BF16'
    assert bfloat16_units('fpu avx512f avx512_vnni') == 'bfloat16: emulated'
    assert bfloat16_units('') == ''  # no cpuinfo (not Linux): nothing claimed
    monkeypatch.setattr(U, 'cpuinfo', lambda: cpuinfo(str(info)))
    assert machine_line('cpu').startswith('Intel(R) Xeon(R) Processor @ 2.50GHz (bfloat16: emulated), ')
    monkeypatch.setattr(U, 'cpuinfo', lambda: {})
    assert ' (bfloat16' not in machine_line('cpu')


def test_every_recipes_printed_command_runs_the_same_config():
    """A record's command line, run again, trains what the preset trained: each recipe's printed command parses
    back to the same TrainConfig. (argparse's BooleanOptionalAction once read ``--no-wd-bn-bias`` as False.)"""
    from aff_zoo.cli import build_parser
    from aff_zoo.training.train import RECIPES, config_from_args

    def parse(argv):
        return config_from_args(build_parser('train').parse_args(['train', *argv]))
    for name in RECIPES:
        preset = parse(['--recipe', name, '--model', 'aff_resnet20', '--data', 'x', '--output', 'y'])
        again = parse(shlex.split(preset.command)[2:])
        assert again == preset, f'{name}: {preset.command}'
    assert parse(['--model', 'm', '--data', 'x', '--output', 'y', '--no-wd-bn-bias']).no_wd_bn_bias is True
    assert parse(['--model', 'm', '--data', 'x', '--output', 'y', '--no-no-wd-bn-bias']).no_wd_bn_bias is False
    assert parse(['--model', 'm', '--data', 'x', '--output', 'y', '--no-amp']).amp is False
