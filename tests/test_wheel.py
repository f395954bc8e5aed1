"""A non-editable install carries the shipped weights: build the wheel from a copy of the checkout,
install it into a temporary target, and from another directory, offline, classify with a shipped tag."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# Runs ``python -m aff_zoo.cli classify ...`` (runpy, as -m does) after printing where aff_zoo and the
# shipped weights were found, so the test can tell the installed copy from the checkout.
_RUN = r"""
import runpy, sys
import aff_zoo, aff_zoo.models.pretrained as p
print('FILE', aff_zoo.__file__)
print('SHIPPED', p.shipped_root())
sys.argv = ['aff_zoo.cli'] + sys.argv[1:]
runpy.run_module('aff_zoo.cli', run_name='__main__', alter_sys=True)
"""


def test_wheel_ships_weights_and_classifies_offline(tmp_path):
    src = tmp_path / 'src'  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / 'aff_zoo', src / 'aff_zoo', ignore=ignore)
    shutil.copytree(ROOT / 'hub', src / 'hub', ignore=ignore)
    dist = tmp_path / 'dist'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(dist)], check=True, capture_output=True, timeout=300)
    wheel, = dist.glob('aff_zoo-*.whl')

    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / 'aff_zoo').rglob('*.py') if '__pycache__' not in p.parts}
    assert modules - names == set(), 'pyproject.toml [tool.setuptools] packages misses a subpackage'
    shipped = {f'aff_zoo/_shipped/{p.parent.name}/{p.name}' for p in (ROOT / 'hub').glob('*/*')
               if p.name in ('model.safetensors', 'config.json')}
    assert shipped and shipped <= names

    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    Image.new('RGB', (32, 32), (200, 30, 30)).save(elsewhere / 'img.png')
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf_home'))
    for k in ('AFF_ZOO_HUB_DIR', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, '-c', _RUN, 'classify', '--model', 'aff_resnet20.cifar10_e12', '--pretrained', 'img.png',
         '--topk', '10'], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[0] == f'FILE {target / "aff_zoo" / "__init__.py"}'
    assert out[1] == f'SHIPPED {target / "aff_zoo" / "_shipped"}'
    assert out[2] == 'img.png' and len(out) == 13
    assert {line.split('%')[1].strip() for line in out[3:]} == {
        'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'}
