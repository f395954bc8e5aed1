"""scripts/gpu_check.sh: valid bash, and its CPU fallback runs every check end to end (tiny sizes)."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'gpu_check.sh')


def test_gpu_check_script_parses():
    subprocess.run(['bash', '-n', SCRIPT], check=True)


def test_gpu_check_cpu_fallback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    p = subprocess.run(['bash', SCRIPT, '--cpu', '--no-install', '--out', str(tmp_path / 'out')], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    checks = [r['check'] for r in res['results']]
    assert checks.count('hub') == 1 and checks.count('train') == 4 and 'inference' in checks
    assert all(r['ok'] for r in res['results'])
    md = (tmp_path / 'out' / 'gpu_check.md').read_text()
    assert '| aff_resnet50 | resnet50d |' in md and '| aff_resnet20 | add_resnet20 |' in md
    assert all(r['ratio'] > 0 for r in res['table'])
