"""scripts/attention_init_probe.py: the probe behind docs/cifar10-weights.md's initialisation table runs and
prints one row per model."""
import os
import re
import subprocess
import sys

from _imagefolder import make_imagefolder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_probe_prints_a_row_per_model(tmp_path):
    data = make_imagefolder(tmp_path / 'imgs', classes=10, per_class=2, size=32)
    env = dict(os.environ, AFF_ZOO_CACHE=str(tmp_path / 'cache'))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'attention_init_probe.py'), '--data', str(data),
         '--steps', '2', '--batch-size', '8', 'add_resnet8', 'iaff_resnet8:random:clip1', 'iaff_resnet8'],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r'^\| `([^`]+)` \| ([\d.e+]+) \| ([\d.e+]+) \| ([\d.]+) \| ([-\d.e+]+) \|', out.stdout, re.M)
    assert [r[0] for r in rows] == ['add_resnet8', 'iaff_resnet8:random:clip1', 'iaff_resnet8'], out.stdout
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)
    # the inner attention's gradient: none in an addition network; behind the zeroed outer attention, a small
    # fraction of the outer one's after the first step (0 at the first), against the same order from a random start
    inner = {r[0]: r[4] for r in rows}
    assert inner['add_resnet8'] == '-'
    assert 0 < float(inner['iaff_resnet8']) < 0.01 < 0.1 < float(inner['iaff_resnet8:random:clip1']), inner
