"""scripts/gpu_batch.py: runs start together, finished ones are packed small, and the deadline rule holds."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from safetensors.torch import load_file

from _imagefolder import make_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'gpu_batch.py')


def _module():
    spec = importlib.util.spec_from_file_location('gpu_batch', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_tiers_on_cpu_pack_logs_and_float16_weights(tmp_path):
    data = make_imagefolder(tmp_path / 'imgs', classes=3, per_class=20, size=16)
    out, runs = tmp_path / 'out', tmp_path / 'runs'
    env = dict(os.environ, AFF_ZOO_CACHE=str(tmp_path / 'cache'), OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, SCRIPT, '--data', data, '--runs-dir', str(runs), '--results', str(out),
                        '--deadline', '200', '--device', 'cpu', '--epochs', '2',
                        '--extra', '--val-per-class 4 --batch-size 16 --num-classes 3',
                        '--tier', 'cifar10-e12/add_resnet8:0,cifar10-e12/aff_resnet8:0',
                        '--tier', 'cifar10-e12/iaff_resnet8:1'],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert [r['state'] for r in summary['runs']] == ['finished'] * 3
    assert summary['mps'] == 'off (--no-mps)' and 'torch' in summary['machine']
    assert summary['gpu'] is None  # no GPU sampled on --device cpu
    # tier 0 comes back with float16 weights equal to the run's own up to rounding; tier 1 as logs only
    name = 'cifar10-e12.aff_resnet8-s0.fp16.safetensors'
    assert sorted(os.listdir(out)) == sorted(['runs.tar.gz', 'summary.json', name,
                                              'cifar10-e12.add_resnet8-s0.fp16.safetensors'])
    half, full = load_file(out / name), load_file(runs / 'cifar10-e12' / 'aff_resnet8-s0' / 'model.safetensors')
    assert half.keys() == full.keys()
    for k, v in full.items():
        if v.is_floating_point():
            assert half[k].dtype == torch.float16 and torch.allclose(half[k].float(), v, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(half[k], v)
    with tarfile.open(out / 'runs.tar.gz') as tar:
        names = tar.getnames()
    assert 'cifar10-e12/iaff_resnet8-s1/metrics.json' in names and 'cifar10-e12/add_resnet8-s0/log.csv' in names
    assert not any(n.endswith(('checkpoint.pt', 'model.safetensors')) for n in names)
    # back home: the folders unpacked, the float16 file as a float32 model.safetensors with the rounded values
    home = tmp_path / 'home'
    assert _module().main(['--unpack', str(out), '--runs-dir', str(home)]) == 0
    back = load_file(home / 'cifar10-e12' / 'aff_resnet8-s0' / 'model.safetensors')
    assert all(v.dtype == torch.float32 and torch.equal(v, half[k].float()) for k, v in back.items()
               if v.is_floating_point())
    assert (home / 'cifar10-e12' / 'iaff_resnet8-s1' / 'metrics.json').is_file()
    assert not (home / 'cifar10-e12' / 'iaff_resnet8-s1' / 'model.safetensors').exists()


def test_gpu_use_summarises_nvidia_smi_samples(tmp_path):
    """The format of `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits`; a last
    line cut short by the sampler's stop is skipped."""
    csv = tmp_path / 'gpu.csv'
    csv.write_text('0, 1200\n90, 30000\n100, 41000\n96, 40000\n9')
    assert _module().gpu_use(str(csv)) == dict(samples=4, util_mean=71.5, util_median=96.0, memory_max_mib=41000.0)
    csv.write_text('')
    assert _module().gpu_use(str(csv)) == dict(samples=0)


def test_projection_and_the_stop_rule(monkeypatch):
    gb = _module()
    monkeypatch.setattr(gb, 'EPOCHS', 10)
    run = gb.Run('cifar10-e12/aff_resnet8:1', 1, 'runs')
    run.started = 100.0
    assert run.projected_end(120.0) == 120.0  # too early to tell
    assert run.projected_end(400.0) == float('inf')  # no epoch in 300 s
    run.epoch_times = [110.0, 120.0, 130.0, 140.0]  # 10 s an epoch once started
    monkeypatch.setattr(gb.Run, 'epochs_done', lambda self: len(self.epoch_times))
    assert run.projected_end(141.0) == pytest.approx(140.0 + 6 * 10.0)
    run.base = 4  # resumed at epoch 4: only 2 epochs are left
    assert run.projected_end(141.0) == pytest.approx(160.0)


def test_a_sent_copy_records_the_commit_it_was_sent_from(monkeypatch):
    """The working tree sent to a lent machine arrives on the session's base commit (measured: the H100 runs
    recorded 00cc3fe-dirty for code of 94f0ecb), or without .git: $AFF_ZOO_GIT_COMMIT, when set, wins."""
    from aff_zoo import utils
    monkeypatch.setattr(utils.subprocess, 'run', lambda *a, **k: subprocess.CompletedProcess(a, 128, '', 'no git'))
    monkeypatch.delenv('AFF_ZOO_GIT_COMMIT', raising=False)
    assert utils.git_commit() == 'unknown'
    monkeypatch.setattr(utils.subprocess, 'run', lambda *a, **k: subprocess.CompletedProcess(a, 0, 'f00\n', ''))
    assert utils.git_commit() == 'f00-dirty'
    monkeypatch.setenv('AFF_ZOO_GIT_COMMIT', 'abc123')
    assert utils.git_commit() == 'abc123'


def _running(gb, spec: str, tier: int, root, ago: float, epoch_times):
    """A run of ``spec`` started ``ago`` s back, with epochs seen at ``epoch_times`` s after its start; its
    process sleeps until ``_watch`` stops it."""
    r = gb.Run(spec, tier, str(root))
    r.proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)
    r.state, r.started = 'running', time.time() - ago
    r.epoch_times = [r.started + t for t in epoch_times]
    return r


def test_without_stops_only_the_deadline_ends_runs(monkeypatch, tmp_path):
    """--no-stops: a lower-tier run projected past the deadline runs on (a second call on the warm machine
    resumes it); with stops it is ended as soon as its pace is known."""
    gb = _module()
    monkeypatch.setattr(gb, 'EPOCHS', 100)

    def fake_runs():  # 10 s an epoch: 96 left, far too slow
        return [_running(gb, spec, tier, tmp_path, 100, [10.0 * i for i in range(1, 5)])
                for spec, tier in (('cifar10-e12/add_resnet8:0', 0), ('cifar10-e12/aff_resnet8:1', 1))]
    monkeypatch.setattr(gb.Run, 'epochs_done', lambda self: len(self.epoch_times))
    runs = fake_runs()
    gb._watch(runs, time.time() + 3, 0.2, stops=False)
    assert [r.state for r in runs] == ['stopped: deadline'] * 2
    runs = fake_runs()
    gb._watch(runs, time.time() + 3, 0.2)
    assert runs[1].state.startswith('stopped: projected') and runs[0].state == 'stopped: deadline'


def test_a_tier0_start_up_pace_stops_nothing(monkeypatch, tmp_path):
    """A tier-0 run whose first 3 epochs include start-up (CUDA, cuDNN's search, runs starting together) looks
    late; its pace of the last 3 epochs decides. On 2026-11-28 the old rule stopped a lower tier 20 s in."""
    gb = _module()
    monkeypatch.setattr(gb, 'EPOCHS', 100)
    monkeypatch.setattr(gb.Run, 'epochs_done', lambda self: len(self.epoch_times))

    def watch(top_epoch_times):
        runs = [_running(gb, 'cifar10-e12/aff_resnet8:0', 0, tmp_path, 40, top_epoch_times),
                _running(gb, 'cifar10-e12/add_resnet8:1', 1, tmp_path, 40, [31.0, 32.0])]  # 1 s an epoch, too early
        gb._watch(runs, time.time() + 3, 0.2)  # ends at the deadline, or stops a run first
        return runs

    runs = watch([36.0, 37.0, 38.0])  # start-up: 38 s for 3 epochs, 1,267 s projected; 1 s an epoch since
    assert [r.state for r in runs] == ['stopped: deadline'] * 2
    runs = watch([10.0, 20.0, 30.0, 40.0])  # 10 s an epoch for the last 3: late, so the lower tier goes
    assert runs[1].state.startswith('stopped: cifar10-e12/aff_resnet8-s0 projected')


def test_best_tier_is_the_finished_set_with_the_highest_mean_top1(tmp_path):
    """--weights-tiers best: only one set of three ResNet-9 weights fits the 64 MiB return."""
    gb = _module()

    def tiers(top1s):
        runs = []
        for t, (recipe, scores) in enumerate(top1s):
            for model, top1 in zip(('add_resnet8', 'aff_resnet8'), scores):
                r = gb.Run(f'{recipe}/{model}:0', t, str(tmp_path))
                if top1 is not None:
                    os.makedirs(r.out, exist_ok=True)
                    with open(os.path.join(r.out, 'metrics.json'), 'w') as f:
                        json.dump(dict(val_top1=top1), f)
                runs.append(r)
        return runs
    assert gb.best_tier(tiers([('a', (90.0, 91.0)), ('b', (92.0, 90.5))])) == 1
    assert gb.best_tier(tiers([('c', (91.0, 91.0)), ('d', (93.0, None))])) == 0  # d is unfinished
    assert gb.best_tier(tiers([('e', (None, None))])) == 0


def _lease_command() -> list:
    """The gpu_batch.py command of docs/cifar10-weights.md's next-lease plan, as arguments."""
    text = open(os.path.join(ROOT, 'docs', 'cifar10-weights.md')).read()
    section = text.split('## Next step on the next lease', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```bash\n(.*?)```', section, re.S)
    line = next(b for b in blocks if 'scripts/gpu_batch.py' in b).replace('\\\n', ' ')
    line = next(ln for ln in line.splitlines() if 'scripts/gpu_batch.py' in ln)
    words = shlex.split(line)
    return words[words.index('scripts/gpu_batch.py') + 1:]


def test_the_documented_lease_plan_names_real_recipes_and_models(tmp_path, capsys):
    args = [str(tmp_path) if a == '$OUT' else a for a in _lease_command()]
    assert '--tier' in args
    assert _module().main(args + ['--runs-dir', str(tmp_path / 'runs'), '--check']) == 0
    out = capsys.readouterr().out
    tiers = [a for i, a in enumerate(args) if i and args[i - 1] == '--tier']
    specs = [s for t in tiers for s in t.split(',') if s]
    assert len(re.findall(r'^tier \d+: ', out, re.M)) == len(specs) and f'{len(specs)} runs' in out, out


@pytest.mark.parametrize('spec, says', [('no-such-recipe/aff_resnet9:0', 'unknown recipe'),
                                        ('cifar10-r9-e96/no_such_net:0', 'unknown model'),
                                        ('cifar10-r9-e96/aff_resnet9', 'expected recipe/model:seed')])
def test_a_bad_run_fails_before_anything_starts(tmp_path, capsys, spec, says):
    with pytest.raises(SystemExit) as e:
        _module().main(['--data', 'missing.tar.gz', '--results', str(tmp_path), '--deadline', '60',
                        '--tier', spec, '--check'])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_weights_over_a_returned_file_come_back_in_parts_and_whole(tmp_path, monkeypatch):
    """A float16 file over 16 MiB (aff_resnet11: 19.8 MiB) is cut into parts that unpack joins; gpu.csv rides in
    runs.tar.gz (a returned file fewer); weights past the return's 8 files are left out and say why; a missing
    part writes nothing."""
    import timm
    from aff_zoo.utils import save_safetensors
    gb = _module()
    runs = []
    for i, model in enumerate(('aff_resnet8', 'add_resnet8', 'iaff_resnet8')):
        r = gb.Run(f'cifar10-e12/{model}:0', 0, str(tmp_path / 'runs'))
        os.makedirs(r.out)
        with open(os.path.join(r.out, 'metrics.json'), 'w') as f:
            json.dump(dict(val_top1=90.0 + i, val_top5=99.0, best_epoch=2), f)
        (tmp_path / 'runs' / 'cifar10-e12' / f'{model}-s0' / 'log.csv').write_text('epoch\n1\n2\n')
        torch.manual_seed(i)
        save_safetensors(timm.create_model(model).state_dict(), os.path.join(r.out, 'model.safetensors'))
        r.state = 'finished'
        runs.append(r)
    monkeypatch.setattr(gb, 'PART_BYTES', 80_000)  # ResNet-8s in float16: 150-200 kB, so several parts each
    n_parts = [len(gb.parts(gb._half(load_file(r.out + '/model.safetensors')))) for r in runs]
    assert min(n_parts) >= 2
    monkeypatch.setattr(gb, 'RETURN_FILES', 2 + n_parts[0] + n_parts[1])  # room for two runs' parts, not three
    csv = tmp_path / 'runs' / 'gpu.csv'
    csv.write_text('90, 1000\n')
    out = tmp_path / 'out'
    summary = gb._pack(runs, str(out), {0}, 'off', time.time(), gpu_csv=str(csv))
    rows = {r['run']: r for r in summary['runs']}
    aff = rows['cifar10-e12/aff_resnet8-s0']['weights']
    assert isinstance(aff, list) and len(aff) == n_parts[0] and aff[0].endswith('.fp16-1of%d.safetensors' % len(aff))
    assert isinstance(rows['cifar10-e12/add_resnet8-s0']['weights'], list)
    assert rows['cifar10-e12/iaff_resnet8-s0']['weights'].startswith('not packed:')
    files = sorted(os.listdir(out))
    assert len(files) == gb.RETURN_FILES and 'gpu.csv' not in files
    assert all(os.path.getsize(out / f) <= gb.RETURN_FILE_BYTES for f in files)
    with tarfile.open(out / 'runs.tar.gz') as tar:
        assert 'gpu.csv' in tar.getnames()
    home = tmp_path / 'home'
    assert gb.main(['--unpack', str(out), '--runs-dir', str(home)]) == 0
    assert not (home / 'gpu.csv').exists()
    back = load_file(home / 'cifar10-e12' / 'aff_resnet8-s0' / 'model.safetensors')
    full = load_file(runs[0].out + '/model.safetensors')
    assert back.keys() == full.keys()
    assert all(torch.equal(back[k], v.half().float() if v.is_floating_point() else v) for k, v in full.items())
    assert not (home / 'cifar10-e12' / 'iaff_resnet8-s0' / 'model.safetensors').exists()
    # a part lost on the way: nothing is written for that run
    partial = tmp_path / 'partial'
    partial.mkdir()
    for f in files:
        if not f.endswith('-2of%d.safetensors' % len(aff)) or 'aff_resnet8' not in f:
            (partial / f).write_bytes((out / f).read_bytes())
    with pytest.raises(SystemExit, match='incomplete'):
        gb.unpack(str(partial), str(tmp_path / 'home2'))


def test_check_refuses_a_plan_whose_weights_overrun_the_return(tmp_path, capsys):
    """Three *_resnet11 fit (6 parts, 59.5 MiB); a fourth run's weights would not, and --check says so here."""
    args = ['--data', 'x.tar.gz', '--results', str(tmp_path), '--deadline', '540', '--runs-dir', str(tmp_path),
            '--check', '--tier', 'cifar10-r11-e96/aff_resnet11:0,cifar10-r11-e96/iaff_resnet11:0,'
                                 'cifar10-r11-e96/add_resnet11:0']
    assert _module().main(args) == 0
    assert 'weights of tiers 0: 6 files, 59.5 MiB' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        _module().main(args[:-1] + [args[-1] + ',cifar10-r9-e96/add_resnet9:0'])
    assert e.value.code == 2 and 'pack fewer' in capsys.readouterr().err
    assert _module().main(args[:-1] + [args[-1], '--tier', 'cifar10-r9-e96/add_resnet9:0']) == 0


def test_check_names_a_tensor_larger_than_one_returned_file(tmp_path, capsys, monkeypatch):
    gb = _module()
    monkeypatch.setattr(gb, 'PART_BYTES', 1000)  # smaller than aff_resnet8's largest conv (64x64x3x3 in float16)
    with pytest.raises(SystemExit) as e:
        gb.main(['--data', 'x.tar.gz', '--results', str(tmp_path), '--deadline', '60', '--runs-dir', str(tmp_path),
                 '--check', '--tier', 'cifar10-e12/aff_resnet8:0'])
    assert e.value.code == 2 and 'more than one returned file holds' in capsys.readouterr().err


def test_the_cpu_queue_names_real_recipes_and_models(tmp_path, capsys):
    """scripts/cifar_queue.sh's runs pass the same check as a lease's, so a typo fails here, not hours later."""
    with open(os.path.join(ROOT, 'scripts', 'cifar_queue.sh')) as f:
        runs = re.search(r'RUNS=\$\{RUNS:-"(.*?)"\}', f.read(), re.S).group(1).split()
    assert {'cifar10-r11-e96/aff_resnet11:0', 'cifar10-r11-mix-e150/iaff_resnet11:2'} <= set(runs)  # the docs' runs
    assert _module().main(['--data', 'missing.tar.gz', '--results', str(tmp_path), '--deadline', '60',
                           '--tier', ','.join(runs), '--weights-tiers', '', '--check']) == 0
    assert f'{len(runs)} runs' in capsys.readouterr().out
