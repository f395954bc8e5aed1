#!/usr/bin/env python
"""Many `aff-zoo train` runs at once on one lent GPU machine, inside a fixed time window; results packed small.

A lent GPU comes with minutes, not hours, and gives back only a few small files. So this script
1. decodes the data once (every run then reads the cache),
2. starts CUDA MPS where it works (one shared GPU context: the small kernels of many runs then overlap
   instead of time-slicing), else goes on without it,
3. starts every run at once, each its own process with `--device cuda --no-progress --resume`,
4. watches the window: a run of a lower tier (a later ``--tier``) that cannot finish before the deadline is
   stopped, and so is the lowest-priority run still going whenever a tier-0 run is projected to miss it,
5. packs what came back into ``--results``, within what a lent machine returns (8 files of 16 MiB, 64 MiB):
   ``runs.tar.gz`` (every run folder without its checkpoint and weights, and ``gpu.csv``, the ``nvidia-smi``
   samples every 2 s), the weights of the finished runs of ``--weights-tiers`` (or of the best tier) as float16
   safetensors (``<recipe>.<model>-s<seed>.fp16.safetensors``, half the size, or in parts
   ``...fp16-1of2.safetensors`` where a file would pass 16 MiB; ``aff-zoo evaluate`` them again after the
   return; weights that would overrun the return are left out, and ``--check`` says so beforehand) and
   ``summary.json`` (device, MPS, every run's state, accuracy and wall time, GPU utilisation).

    export AFF_ZOO_GIT_COMMIT=<the commit sent>  # the copy there sits on another commit: runs record this one
    python scripts/gpu_batch.py --data cifar10-train-jpeg.tar.gz --runs-dir runs --results $OUT --deadline 470 \\
        --tier cifar10-r9-e48/aff_resnet9:0,cifar10-r9-e48/add_resnet9:0 --tier cifar10-r9-e48/aff_resnet9:1

The same command with ``--check``, run here before the lease, names every run and its epochs and the size of
the weights that will come back, or fails on an unknown recipe or model, or on weights that would not fit the
return. Rerunning it with the same ``--runs-dir`` resumes unfinished runs from their epoch checkpoints. Back on
the home machine, ``--unpack`` puts the returned folders under ``--runs-dir`` and each run's float16 weights
(one file or its parts) back as its ``model.safetensors`` (float32 again, values as rounded):

    python scripts/gpu_batch.py --unpack /work/.device/1 --runs-dir runs
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PACK_SECONDS = 25  # kept free at the end for packing
# What a lent machine gives back (.library/device/README.md); a part stays 1 MiB under the file limit for its header.
RETURN_FILES, RETURN_FILE_BYTES, RETURN_BYTES = 8, 16 << 20, 64 << 20
PART_BYTES = RETURN_FILE_BYTES - (1 << 20)


class Run:
    def __init__(self, spec: str, tier: int, runs_dir: str):
        recipe, _, rest = spec.partition('/')
        self.model, _, seed = rest.partition(':')
        if not (recipe and self.model and seed.isdigit()):
            raise ValueError(f'run {spec!r}: expected recipe/model:seed, e.g. cifar10-r9-e96/aff_resnet9:0')
        self.recipe, self.seed, self.tier = recipe, int(seed), tier
        self.name = f'{self.recipe}/{self.model}-s{self.seed}'
        self.out = os.path.join(runs_dir, self.recipe, f'{self.model}-s{self.seed}')
        self.proc = None
        self.state = 'waiting'
        self.started = self.ended = None
        self.base = 0  # epochs done before this launch (a resumed run)
        self.epoch_times = []  # wall time at which each epoch of this launch was first seen

    def epochs_total(self) -> int:
        from aff_zoo.training.train import RECIPES
        return EPOCHS or int(RECIPES[self.recipe]['epochs'])

    def epochs_done(self) -> int:
        try:
            with open(os.path.join(self.out, 'log.csv')) as f:
                return max(0, sum(1 for _ in f) - 1)
        except OSError:
            return 0

    def finished(self) -> bool:
        return os.path.exists(os.path.join(self.out, 'metrics.json'))

    def metrics(self) -> dict:
        """The finished run's metrics.json."""
        with open(os.path.join(self.out, 'metrics.json')) as f:
            return json.load(f)

    def projected_end(self, now: float) -> float:
        """When the run ends at its recent pace: unknown (now) before 3 epochs, unless it is slower than one
        epoch in 150 s; from 4 epochs on, the pace of the last 3 (start-up excluded, later stops counted)."""
        n = len(self.epoch_times)
        if n < 3:
            return float('inf') if now - self.started > 150 * (n + 1) else now
        per_epoch = ((self.epoch_times[-1] - self.epoch_times[-4]) / 3 if n >= 4  # the pace of the last 3
                     else (self.epoch_times[-1] - self.started) / n)
        return self.epoch_times[-1] + per_epoch * (self.epochs_total() - self.base - n)

    def late(self, now: float, deadline: float) -> bool:
        """Projected past ``deadline``, judged on the pace after start-up only (4 epochs seen): the first epochs
        of runs starting at once are slow (the 2026-11-28 lease lost a run 20 s in, to a pace with start-up)."""
        return len(self.epoch_times) >= 4 and self.projected_end(now) > deadline

    def stop(self, why: str):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.state, self.ended = f'stopped: {why}', time.time()
        print(f'[{_clock()}] stopped {self.name}: {why}', flush=True)


_T0 = time.time()
EPOCHS = 0  # --epochs: overrides every recipe's epoch count (tests, a shorter window)
DEVICE, EXTRA = 'cuda', []


def _clock() -> str:
    return f'{time.time() - _T0:6.1f}s'


def _start_mps(env: dict) -> str:
    """Start the MPS daemon and check that a CUDA context opens through it; undo it if not."""
    if not shutil.which('nvidia-cuda-mps-control'):
        return 'off (nvidia-cuda-mps-control not found)'
    for var, d in (('CUDA_MPS_PIPE_DIRECTORY', '/tmp/mps-pipe'), ('CUDA_MPS_LOG_DIRECTORY', '/tmp/mps-log')):
        os.makedirs(d, exist_ok=True)
        env[var] = d
    try:
        subprocess.run(['nvidia-cuda-mps-control', '-d'], env=env, check=True, timeout=30)
        probe = subprocess.run([sys.executable, '-c', 'import torch; print(torch.ones(2, device="cuda").sum().item())'],
                               env=env, timeout=90, capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == '2.0':
            return 'on'
        why = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ['no output']
    except (subprocess.SubprocessError, OSError) as e:
        why = [str(e)]
    subprocess.run(['nvidia-cuda-mps-control'], input='quit\n', text=True, env=env, timeout=30)
    env.pop('CUDA_MPS_PIPE_DIRECTORY'), env.pop('CUDA_MPS_LOG_DIRECTORY')
    return f'off (failed: {why[0]})'


def _start_gpu_log(path: str):
    """``nvidia-smi`` sampling utilisation and memory every 2 s into ``path``: whether the runs fill the GPU
    (more runs per call) or leave it idle (fewer, or a faster input path). None where there is no nvidia-smi."""
    if shutil.which('nvidia-smi') is None:
        return None
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
        return subprocess.Popen(['nvidia-smi', '--query-gpu=utilization.gpu,memory.used',
                                 '--format=csv,noheader,nounits', '-lms', '2000'],
                                stdout=f, stderr=subprocess.DEVNULL, start_new_session=True)


def gpu_use(path: str) -> dict:
    """Mean and median GPU utilisation (%) and peak memory (MiB) of the samples in ``gpu.csv``."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = [float(x) for x in line.split(',')]
            except ValueError:
                continue
            if len(row) == 2:  # not a line cut short when the sampler was stopped
                rows.append(row)
    if not rows:
        return dict(samples=0)
    util = sorted(r[0] for r in rows)
    return dict(samples=len(rows), util_mean=round(sum(util) / len(util), 1), util_median=util[len(util) // 2],
                memory_max_mib=max(r[1] for r in rows))


def _launch(run: Run, data: str, env: dict):
    os.makedirs(run.out, exist_ok=True)
    cmd = [sys.executable, '-m', 'aff_zoo.cli', 'train', '--recipe', run.recipe, '--model', run.model,
           '--seed', str(run.seed), '--data', data, '--output', run.out, '--resume', '--no-progress',
           '--device', DEVICE, *(['--epochs', str(EPOCHS)] if EPOCHS else []), *EXTRA]
    run.base = run.epochs_done()  # before the child can add one
    with open(os.path.join(run.out, 'stdout.log'), 'a') as log:  # the child keeps its own descriptor
        run.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    run.state, run.started = 'running', time.time()


def _watch(runs, deadline: float, poll: float, stops: bool = True):
    last_stop = 0.0
    while True:
        now = time.time()
        live = [r for r in runs if r.state == 'running']
        for r in live:
            n = r.epochs_done() - r.base
            while len(r.epoch_times) < n:
                r.epoch_times.append(now)
            if r.proc.poll() is not None:
                r.state = 'finished' if r.finished() else f'failed (exit {r.proc.returncode})'
                r.ended = now
                print(f'[{_clock()}] {r.name}: {r.state}', flush=True)
        live = [r for r in runs if r.state == 'running']
        if not live:
            return
        if now >= deadline:
            for r in live:
                r.stop('deadline')
            return
        # One stop per 20 s at most (the freed GPU needs a few epochs to show in the others' pace): the
        # lowest-priority run that is projected to miss the deadline, or whenever a tier-0 run is projected to
        # miss it, the lowest-priority run of all.
        lower = sorted((r for r in live if r.tier > 0), key=lambda r: (-r.tier, r.epochs_done()))
        hopeless = [r for r in lower if r.late(now, deadline)]
        late = [r for r in live if r.tier == 0 and r.late(now, deadline)]
        if stops and now - last_stop > 20 and (hopeless or (late and lower)):
            if hopeless:
                victim, why = hopeless[0], f'projected to end {hopeless[0].projected_end(now) - _T0:.0f}s'
            else:
                victim, why = lower[0], f'{late[0].name} projected to end {late[0].projected_end(now) - _T0:.0f}s'
            victim.stop(f'{why} > deadline {deadline - _T0:.0f}s')
            last_stop = now
        time.sleep(poll)


def best_tier(runs) -> int:
    """The tier whose runs all finished with the highest mean best val top-1 (0 where none did): with
    ``--weights-tiers best``, the one set of weights that comes back when two sets would not fit (64 MiB)."""
    scores = {}
    for t in sorted({r.tier for r in runs}):
        tier = [r for r in runs if r.tier == t]
        if all(r.finished() for r in tier):
            scores[t] = sum(r.metrics()['val_top1'] for r in tier) / len(tier)
    return max(scores, key=lambda t: (scores[t], -t)) if scores else 0


def _half(state: dict) -> dict:
    """The float tensors of ``state`` in float16, the rest as they are: what comes back from a lease."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def parts(state: dict, limit: int = 0) -> list:
    """``state`` cut, in key order, into dicts of at most ``limit`` (``PART_BYTES``) bytes of tensor data each."""
    limit = limit or PART_BYTES
    out, size = [{}], 0
    for k, v in state.items():
        n = _nbytes({k: v})
        if n > limit:
            raise ValueError(f'tensor {k} has {n} bytes, more than one returned file holds ({limit})')
        if size + n > limit:
            out, size = out + [{}], 0
        out[-1][k], size = v, size + n
    return out


def _part_names(run, n: int) -> list:
    stem = f'{run.recipe}.{run.model}-s{run.seed}.fp16'
    return [f'{stem}.safetensors'] if n == 1 else [f'{stem}-{i}of{n}.safetensors' for i in range(1, n + 1)]


def _pack(runs, results: str, weights_tiers, mps: str, started: float, gpu=None, gpu_csv=None):
    import torch
    from safetensors.torch import load_file, save_file
    from aff_zoo.utils import machine_line
    os.makedirs(results, exist_ok=True)
    summary = dict(machine=machine_line('cuda') if torch.cuda.is_available() else machine_line('cpu'),
                   mps=mps, wall_seconds=round(time.time() - started, 1), gpu=gpu, runs=[])
    tar_path = os.path.join(results, 'runs.tar.gz')
    with tarfile.open(tar_path, 'w:gz') as tar:
        for r in runs:
            if os.path.isdir(r.out):
                tar.add(r.out, arcname=os.path.join(r.recipe, os.path.basename(r.out)),
                        filter=lambda ti: None if os.path.basename(ti.name) in (
                            'checkpoint.pt', 'model.safetensors', '.lock') else ti)
        if gpu_csv and os.path.exists(gpu_csv):
            tar.add(gpu_csv, arcname='gpu.csv')
    files, size = 2, os.path.getsize(tar_path) + (1 << 20)  # the tar and summary.json (1 MiB kept for it)
    for r in runs:
        row = dict(run=r.name, tier=r.tier, state=r.state, epochs_done=r.epochs_done(), epochs=r.epochs_total(),
                   wall_seconds=round((r.ended or time.time()) - r.started, 1) if r.started else None)
        if r.finished():
            m = r.metrics()
            row.update(val_top1=m['val_top1'], val_top5=m['val_top5'], best_epoch=m['best_epoch'])
            if r.tier in weights_tiers:
                sd = load_file(os.path.join(r.out, 'model.safetensors'))
                half = _half(sd)
                bad = [k for k, v in half.items() if v.is_floating_point() and not torch.isfinite(v).all()]
                pieces = parts(half)
                need = _nbytes(half) + len(pieces) * (64 << 10)
                if bad:
                    row['weights'] = f'not packed: float16 overflows in {bad[:3]}'
                elif files + len(pieces) > RETURN_FILES or size + need > RETURN_BYTES:
                    row['weights'] = (f'not packed: {len(pieces)} more files would pass the return\'s '
                                      f'{RETURN_FILES} files or {RETURN_BYTES >> 20} MiB')
                else:
                    err = max(((half[k].float() - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
                              for k, v in sd.items() if v.is_floating_point() and v.numel())
                    names = _part_names(r, len(pieces))
                    for name, piece in zip(names, pieces):
                        save_file(piece, os.path.join(results, name), metadata=dict(source='aff_zoo gpu_batch.py'))
                        size += os.path.getsize(os.path.join(results, name))
                    files += len(pieces)
                    row.update(weights=names if len(names) > 1 else names[0], fp16_max_rel_error=err)
        summary['runs'].append(row)
    with open(os.path.join(results, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def unpack(results: str, runs_dir: str):
    """The returned run folders under ``runs_dir``; each run's float16 weights (one file or its parts) as its
    float32 ``model.safetensors``."""
    import re
    from safetensors.torch import load_file
    from aff_zoo.utils import save_safetensors
    with tarfile.open(os.path.join(results, 'runs.tar.gz')) as tar:
        tar.extractall(runs_dir, members=[m for m in tar.getmembers() if m.name != 'gpu.csv'], filter='data')
    weights = {}
    for name in sorted(os.listdir(results)):
        m = re.fullmatch(r'(.+?)\.(.+)\.fp16(?:-(\d+)of(\d+))?\.safetensors', name)
        if m:
            weights.setdefault((m[1], m[2]), []).append((int(m[3] or 1), int(m[4] or 1), name))
    for (recipe, run), found in sorted(weights.items()):
        n = found[0][1]
        if sorted(i for i, _, _ in found) != list(range(1, n + 1)):
            raise SystemExit(f'{recipe}/{run}: parts {sorted(i for i, _, _ in found)} of {n} came back; '
                             'the weights are incomplete, so none were written')
        state = {}
        for _, _, name in sorted(found):
            state.update({k: v.float() if v.is_floating_point() else v
                          for k, v in load_file(os.path.join(results, name)).items()})
        out = os.path.join(runs_dir, recipe, run, 'model.safetensors')
        save_safetensors(state, out, metadata=dict(precision='trained on a GPU, rounded to float16 for the '
                                                             'return trip (scripts/gpu_batch.py)'))
        print(f'{out}: {len(state)} tensors from {n} file(s)')


def check(runs) -> None:
    """Fails here, before a lent machine's minutes are spent, on a recipe or model that does not exist."""
    import timm
    import aff_zoo  # noqa: F401  (registers the models)
    from aff_zoo.training.train import RECIPES
    for r in runs:
        if r.recipe not in RECIPES:
            raise ValueError(f'run {r.name}: unknown recipe {r.recipe!r}; known: {", ".join(sorted(RECIPES))}')
        if not timm.is_model(r.model):
            raise ValueError(f'run {r.name}: unknown model {r.model!r}; `aff-zoo list` names the registered ones')


def weights_return(runs, weights_tiers: str):
    """(files, MiB) that the packed float16 weights will take if every run of ``weights_tiers`` finishes (the
    largest tier, for ``best``), counted from the models' tensors before the lease."""
    import timm
    tiers = sorted({r.tier for r in runs})
    chosen = [[t] for t in tiers] if weights_tiers == 'best' else [[int(t) for t in weights_tiers.split(',') if t]]
    sizes = {}
    for r in runs:
        if r.model not in sizes:
            half = _half(timm.create_model(r.model).state_dict())
            sizes[r.model] = (len(parts(half)), _nbytes(half))
    plans = [(sum(sizes[r.model][0] for r in runs if r.tier in ts), sum(sizes[r.model][1] for r in runs
                                                                        if r.tier in ts)) for ts in chosen]
    files, size = max(plans)
    return files, size / (1 << 20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--unpack', metavar='RESULTS', help='put a returned results folder under --runs-dir, and stop')
    p.add_argument('--data')
    p.add_argument('--runs-dir', default='runs')
    p.add_argument('--results', help='folder for the packed results ($OUT on a lent machine)')
    p.add_argument('--tier', action='append',
                   help='comma-separated recipe/model:seed runs; the first --tier has the highest priority')
    p.add_argument('--deadline', type=float, help='seconds from the start by which all is packed')
    p.add_argument('--weights-tiers', default='0',
                   help='comma-separated tiers whose weights are packed, or "best": the finished tier with the highest '
                        'mean val top-1 (the return takes 64 MiB: three ResNet-9s in float16, not six)')
    p.add_argument('--no-mps', action='store_true')
    p.add_argument('--no-stops', action='store_true',
                   help='stop runs at the deadline only: for runs meant to go on in a second call on the warm machine '
                        '(the same command again; they resume from their epoch checkpoints)')
    p.add_argument('--device', default='cuda', help='the runs\' --device (cpu: to try this script without a GPU)')
    p.add_argument('--epochs', type=int, default=0, help='override every recipe\'s epochs (0: keep them)')
    p.add_argument('--extra', default='', help='more `aff-zoo train` options for every run, one string')
    p.add_argument('--poll', type=float, default=2.0)
    p.add_argument('--check', action='store_true',
                   help='check the runs\' recipes and models, print the plan and stop (run it here before a lease)')
    args = p.parse_args(argv)
    if args.unpack:
        unpack(args.unpack, args.runs_dir)
        return 0
    if not (args.data and args.results and args.tier and args.deadline):
        p.error('--data, --results, --tier and --deadline are needed to run (or --unpack RESULTS)')
    global EPOCHS, DEVICE, EXTRA
    EPOCHS, DEVICE, EXTRA = args.epochs, args.device, args.extra.split()
    try:
        runs = [Run(s, t, args.runs_dir) for t, tier in enumerate(args.tier) for s in tier.split(',') if s]
        check(runs)
    except ValueError as e:
        p.error(str(e))
    if args.check:
        for r in runs:
            print(f'tier {r.tier}: {r.name}, {r.epochs_total()} epochs, {r.epochs_done()} done')
        try:
            files, mib = weights_return(runs, args.weights_tiers)
        except ValueError as e:  # a tensor larger than one returned file
            p.error(str(e))
        print(f'{len(runs)} runs; deadline {args.deadline:.0f} s; weights of tiers {args.weights_tiers}: '
              f'{files} files, {mib:.1f} MiB')
        if files + 2 > RETURN_FILES or mib + 1 > RETURN_BYTES >> 20:
            p.error(f'the weights of tiers {args.weights_tiers} take {files} files and {mib:.1f} MiB, but a lent '
                    f'machine returns {RETURN_FILES} files (runs.tar.gz and summary.json among them) and '
                    f'{RETURN_BYTES >> 20} MiB: pack fewer runs\' weights (--weights-tiers) or split the tiers')
        return 0
    deadline = _T0 + args.deadline - PACK_SECONDS
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(x for x in (ROOT, env.get('PYTHONPATH')) if x)
    from aff_zoo.data import load_images
    load_images(args.data)  # decode once; the runs read the cache
    print(f'[{_clock()}] data decoded', flush=True)
    mps = 'off (--no-mps)' if args.no_mps or args.device != 'cuda' else _start_mps(env)
    print(f'[{_clock()}] MPS {mps}', flush=True)
    for r in runs:
        if r.finished():
            r.state = 'finished'
        else:
            _launch(r, args.data, env)
    print(f'[{_clock()}] started {sum(r.state == "running" for r in runs)} runs', flush=True)
    gpu_csv = os.path.join(args.runs_dir, 'gpu.csv')  # into runs.tar.gz at the end: a returned file fewer
    smi = _start_gpu_log(gpu_csv) if args.device == 'cuda' else None
    try:
        _watch(runs, deadline, args.poll, stops=not args.no_stops)
    finally:
        for r in runs:
            if r.state == 'running':
                r.stop('driver ended')
        gpu = None
        if smi is not None:
            smi.terminate()
            smi.wait(timeout=10)
            gpu = gpu_use(gpu_csv)
        tiers = {best_tier(runs)} if args.weights_tiers == 'best' else {
            int(t) for t in args.weights_tiers.split(',') if t}
        summary = _pack(runs, args.results, tiers, mps, _T0, gpu, gpu_csv)
        if mps == 'on':
            subprocess.run(['nvidia-cuda-mps-control'], input='quit\n', text=True, env=env, timeout=30)
    print(json.dumps(summary, indent=1))
    return 0 if all(r['state'] == 'finished' for r in summary['runs'] if r['tier'] == 0) else 1


if __name__ == '__main__':
    sys.exit(main())
