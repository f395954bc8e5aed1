"""Every bad input a user can give the CLI ends in one clear line on stderr and exit code 2, never a
traceback (the table below, one row per case; docs/errors.md lists the same cases), and the inputs
that used to give silently wrong results (labels of another model, a flipped byte) no longer do."""
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from aff_zoo.cli import main

from _imagefolder import make_imagefolder
from conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / 'hub'
AFF20 = SHIPPED / 'aff_resnet20.cifar10_e12'
ADD20 = SHIPPED / 'add_resnet20.cifar10_e12'


def _tensor_offset(path: Path, name: str) -> int:
    """Byte offset of the first element of tensor ``name`` in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert header[name]['dtype'] == 'F32'
    return 8 + n + header[name]['data_offsets'][0]


def _flip(src: Path, dst: Path, name: str, how: str) -> None:
    """Copy ``src`` with one damaged float32 of ``name``: 'inf' sets the exponent bits to all ones,
    'huge' flips the exponent's top bit (|x| * 2**128)."""
    raw = bytearray(src.read_bytes())
    off = _tensor_offset(src, name)
    if how == 'inf':
        raw[off + 3] |= 0x7F
        raw[off + 2] |= 0x80
    else:
        raw[off + 3] ^= 0x40
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(raw))


def _bomb_png(path: Path) -> None:
    """A valid PNG whose header claims 20000 x 20000 pixels (4e8 > 2 x PIL's limit): PIL refuses it at open."""
    buf = io.BytesIO()
    Image.new('L', (1, 1)).save(buf, 'PNG')
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack('>II', 20000, 20000)  # IHDR width, height
    raw[29:33] = struct.pack('>I', zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


@pytest.fixture(scope='module')
def bad(tmp_path_factory):
    """The bad (and the odd but valid) inputs of the table, each a path keyed by a short name."""
    d = tmp_path_factory.mktemp('bad')
    p = {}
    p['img'] = d / 'img.png'
    Image.new('RGB', (32, 32), (200, 30, 30)).save(p['img'])
    p['not_image'] = d / 'notes.jpg'
    p['not_image'].write_bytes(b'this is text, not a JPEG')
    jpg = io.BytesIO()
    Image.new('RGB', (64, 64), (1, 2, 3)).save(jpg, 'JPEG')
    p['cut_jpg'] = d / 'cut.jpg'
    p['cut_jpg'].write_bytes(jpg.getvalue()[:len(jpg.getvalue()) // 2])
    p['bomb'] = d / 'bomb.png'
    _bomb_png(p['bomb'])
    weights = AFF20 / 'model.safetensors'
    raw = bytearray(weights.read_bytes())
    raw[20:30] = b'\xff' * 10  # inside the JSON header
    p['damaged'] = d / 'damaged.safetensors'
    p['damaged'].write_bytes(bytes(raw))
    p['pickle'] = d / 'pickle.safetensors'
    torch.save({'fc.weight': torch.zeros(10, 64)}, p['pickle'])
    p['cut_st'] = d / 'cut.safetensors'
    p['cut_st'].write_bytes(weights.read_bytes()[:5000])
    p['pt'] = d / 'weights.pt'
    torch.save({'fc.weight': torch.zeros(10, 64)}, p['pt'])
    p['add_folder'] = d / 'add_folder'  # add_resnet20's weights with their config.json
    shutil.copytree(ADD20, p['add_folder'])
    p['add_bare'] = d / 'add_bare' / 'model.safetensors'  # the same tensors, no config.json
    p['add_bare'].parent.mkdir()
    shutil.copyfile(ADD20 / 'model.safetensors', p['add_bare'])
    p['inf'] = d / 'inf' / 'model.safetensors'
    _flip(weights, p['inf'], 'fc.weight', 'inf')
    p['ckpt_cut'] = d / 'checkpoint.pt'
    buf = io.BytesIO()
    torch.save({'model': {'fc.weight': torch.zeros(10, 64)}, 'epoch': 3}, buf)
    p['ckpt_cut'].write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    p['data'] = Path(make_imagefolder(d / 'data', classes=10, per_class=1, size=32))
    return p


# (case, argv with {name} for a path of the fixture, text the one-line error must contain)
CASES = [
    ('image missing', ['classify', '{img}.missing', '--model', 'aff_resnet8'], 'no such image file'),
    ('not an image', ['classify', '{not_image}', '--model', 'aff_resnet8'], 'cannot read'),
    ('truncated image', ['classify', '{cut_jpg}', '--model', 'aff_resnet8'], 'truncated'),
    ('decompression bomb', ['classify', '{bomb}', '--model', 'aff_resnet8'], 'decompression bomb'),
    ('damaged safetensors header', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{damaged}'],
     'cannot be read as safetensors (Error while deserializing header'),
    ('pickle renamed .safetensors', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{pickle}'],
     "header too large): it is a zip/pickle file (torch.save's format)"),
    ('truncated safetensors', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{cut_st}'],
     'cannot be read as safetensors'),
    ('pickle .pt as weights', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{pt}'],
     'only safetensors weight files are loaded'),
    ('weights file missing', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{img}.safetensors'],
     'no such weight file'),
    ('wrong architecture, config.json', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{add_folder}'],
     'is for add_resnet20, not aff_resnet20 (its config.json says so)'),
    ('wrong architecture, key set', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{add_bare}'],
     "is for add_resnet20, not aff_resnet20 (its tensor names are exactly that model's)"),
    ('non-finite tensor', ['classify', '{img}', '--model', 'aff_resnet20', '--weights', '{inf}'],
     'tensor fc.weight [10, 64] has 1 NaN or infinite value(s)'),
    ('label names count', ['classify', '{img}', '--model', 'aff_resnet8', '--label-names', 'a,b'],
     '--label-names gives 2 names but the model has 10 classes'),
    ('unknown model', ['classify', '{img}', '--model', 'aff_resnet5'],
     "Unknown model 'aff_resnet5'. Did you mean aff_resnet56 or aff_resnet50"),
    ('unknown tag', ['classify', '{img}', '--model', 'aff_resnet20.nope', '--pretrained'],
     "Unknown pretrained tag 'nope' for aff_resnet20"),
    ('evaluate: truncated checkpoint.pt', ['evaluate', '--model', 'aff_resnet20', '--data', '{data}',
                                           '--val-per-class', '0', '--checkpoint', '{ckpt_cut}'],
     'checkpoint.pt cannot be read as a training checkpoint'),
    ('evaluate: checkpoint missing', ['evaluate', '--model', 'aff_resnet20', '--data', '{data}',
                                      '--val-per-class', '0', '--checkpoint', '{ckpt_cut}.gone'],
     'no such checkpoint file'),
    ('evaluate: wrong architecture', ['evaluate', '--model', 'aff_resnet20', '--data', '{data}',
                                      '--val-per-class', '0', '--checkpoint', '{add_bare}'],
     'is for add_resnet20, not aff_resnet20'),
]


@pytest.mark.parametrize('argv,expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_exit_2(bad, argv, expected, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv('AFF_ZOO_CACHE', str(tmp_path / 'cache'))
    argv = [a.format(**{k: str(v) for k, v in bad.items()}) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.replace('\r', '\n').splitlines()[-1]  # before it: progress bars, the random-weights note
    assert last.startswith(f'aff-zoo {argv[0]}: error: ') and expected in last, err
    assert 'Traceback' not in err


def test_hub_unreachable_fails_fast_for_hf_hub_names(bad, capsys, monkeypatch):
    """An ``hf-hub:`` name goes through our download path: ~0.1 s on a closed port, not timm's ~25 s of retries."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', f'http://127.0.0.1:{_free_port()}')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    t0 = time.perf_counter()
    assert main(['classify', str(bad['img']), '--model', 'hf-hub:test-org/aff_resnet8.nowhere', '--pretrained']) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert 'the Hub cannot be reached for config.json of Hub repo test-org/aff_resnet8.nowhere' in err, err


def test_hub_unreachable_console_command_has_no_traceback(bad, tmp_path):
    """The same through ``python -m aff_zoo.cli`` with HF_ENDPOINT set, as a user runs it."""
    env = dict(os.environ, HF_ENDPOINT=f'http://127.0.0.1:{_free_port()}', HF_HOME=str(tmp_path / 'hf'),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    env.pop('HF_HUB_OFFLINE', None)
    proc = subprocess.run(
        [sys.executable, '-m', 'aff_zoo.cli', 'classify', str(bad['img']), '--pretrained',
         '--model', 'hf-hub:test-org/aff_resnet8.nowhere'], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
    assert 'the Hub cannot be reached' in proc.stderr and 'Retrying' not in proc.stderr


def _classify(argv, capsys):
    assert main(['classify', *argv, '--topk', '10']) == 0
    return [line.split('%')[1].strip() for line in capsys.readouterr().out.splitlines()[1:]]


def test_label_names_come_from_the_loaded_weights(bad, capsys, tmp_path):
    """A --weights file without config.json has no names ('class i'), never the registry's CIFAR-10 ones;
    with its config.json (or --label-names) it has its own."""
    cifar = {'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'}
    bare = tmp_path / 'bare' / 'my.safetensors'
    bare.parent.mkdir()
    shutil.copyfile(AFF20 / 'model.safetensors', bare)
    img = str(bad['img'])
    assert set(_classify([img, '--model', 'aff_resnet20', '--weights', str(bare)], capsys)) == \
        {f'class {i}' for i in range(10)}
    own = tmp_path / 'own'
    shutil.copytree(AFF20, own)
    config = json.loads((own / 'config.json').read_text())
    config['pretrained_cfg']['label_names'] = [f'thing{i}' for i in range(10)]
    (own / 'config.json').write_text(json.dumps(config))
    assert set(_classify([img, '--model', 'aff_resnet20', '--weights', str(own / 'model.safetensors')], capsys)) == \
        {f'thing{i}' for i in range(10)}
    names = ','.join(f'n{i}' for i in range(10))
    assert set(_classify([img, '--model', 'aff_resnet20', '--weights', str(bare), '--label-names', names],
                         capsys)) == {f'n{i}' for i in range(10)}
    assert set(_classify([img, '--model', 'aff_resnet20.cifar10_e12', '--pretrained'], capsys)) == cifar
    # random weights print no names, even for a tag whose published weights have them
    assert set(_classify([img, '--model', 'aff_resnet20.cifar10_e12'], capsys)) == {f'class {i}' for i in range(10)}


def test_flipped_exponent_byte_is_warned_and_the_file_otherwise_loads(bad, tmp_path):
    """A flipped exponent bit that leaves the value finite but absurd: a warning naming the tensor."""
    from aff_zoo.models.pretrained import create_model
    path = tmp_path / 'huge' / 'model.safetensors'
    _flip(AFF20 / 'model.safetensors', path, 'fc.weight', 'huge')
    from safetensors.torch import load_file
    w = load_file(str(path))['fc.weight']
    assert torch.isfinite(w).all() and w.abs().max() > 1e30  # the test's damage: finite, absurd
    with pytest.warns(UserWarning, match=r'fc\.weight \(max \|w\| = .*e\+3\d\).*damaged'):
        model = create_model('aff_resnet20', weights=str(path))
    assert torch.equal(model.fc.weight, w)
