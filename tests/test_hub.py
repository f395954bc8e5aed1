"""Weights through a real Hub server (olah on 127.0.0.1, see tests/conftest.py): the three user paths
(timm name, ``hf-hub:`` name, torch.hub) give identical weights, online and from the cache with
HF_HUB_OFFLINE=1; hash mismatch, unknown tag and an unreachable server fail clearly; save_pretrained,
export and publish (everything up to the upload HTTP call, which no local server implements)."""
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import aff_zoo
from aff_zoo import utils as zutils
from aff_zoo.models import pretrained as zpre
from aff_zoo.publish import folders as zfolders, upload as zupload
from aff_zoo.cli import main as cli_main
from aff_zoo.models._builder import registered_weights
from aff_zoo.models.weights import Weights

from conftest import HUB_TEST_ORG, _free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

# Loads weights through the three user paths in a fresh interpreter (so HF_ENDPOINT and HF_HUB_OFFLINE
# are read from the environment at import, as for a user) and prints a digest of each model's state.
_LOAD_SCRIPT = r"""
import hashlib, json, sys, torch, timm, aff_zoo
from aff_zoo.models._builder import registered_weights
from aff_zoo.models.weights import Weights
extra, names, repo = [Weights.from_dict(d) for d in json.loads(sys.argv[1])], json.loads(sys.argv[2]), sys.argv[3]
def digest(m):
    h = hashlib.sha256()
    for k, v in m.state_dict().items():
        h.update(k.encode()); h.update(v.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
out = {}
with registered_weights(*extra) as records:
    for w in records:
        if w.name in names:
            out[w.name] = {
                'timm': digest(timm.create_model(w.name, pretrained=True)),
                'hf-hub': digest(timm.create_model('hf-hub:' + w.hf_hub_id, pretrained=True)),
                'torch.hub': digest(torch.hub.load(repo, w.name, source='local', pretrained=True, device='cpu')),
                'torch.hub-arch': digest(torch.hub.load(repo, w.arch, source='local', pretrained=True,
                                                        pretrained_cfg=w.tag)),
            }
print('DIGESTS ' + json.dumps(out))
"""


def _digest_of_file(arch, path) -> str:
    import hashlib
    model = timm.create_model(arch, num_classes=load_file(str(path))['fc.weight'].shape[0])
    model.load_state_dict(load_file(str(path)))
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def _run_loader(env, extra, names):
    env = dict(env, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get('PYTHONPATH', '')]))
    proc = subprocess.run(
        [sys.executable, '-c', _LOAD_SCRIPT, json.dumps([w.to_dict() for w in extra]), json.dumps(names),
         str(REPO_ROOT)], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('DIGESTS ')][-1]
    return json.loads(line[len('DIGESTS '):])


def test_three_paths_identical_online_then_offline_cache(hub_server, hub_env, hub_checkpoint, tmp_path):
    """The test checkpoint and every published one (hub/<name>/, committed to the server as test-org/<name>;
    AFF_ZOO_HUB_DIR points at an empty folder so the shipped copies are not used) load identically."""
    folder, record = hub_checkpoint
    expected = {record.name: _digest_of_file(record.arch, folder / 'model.safetensors')}
    for w in aff_zoo.models.weights.WEIGHTS:
        hub_server.add_repo(f'{HUB_TEST_ORG}/{w.name}', REPO_ROOT / 'hub' / w.name)
        expected[w.name] = _digest_of_file(w.arch, REPO_ROOT / 'hub' / w.name / w.filename)
    (tmp_path / 'no_shipped').mkdir()
    env = dict(hub_env, AFF_ZOO_HUB_DIR=str(tmp_path / 'no_shipped'))
    online = _run_loader(env, [record], list(expected))
    assert {n: set(d.values()) for n, d in online.items()} == {n: {e} for n, e in expected.items()}, online
    # second load: served from the HF cache the first one filled, with the client forbidden to go online
    offline = _run_loader(dict(env, HF_HUB_OFFLINE='1'), [record], list(expected))
    assert offline == online
    cached = list(Path(hub_env['HF_HOME']).rglob(f'*{record.name}*/**/model.safetensors'))
    assert cached and zutils.sha256_file(cached[0]) == record.sha256


@pytest.fixture
def hub_inprocess(hub_server, hub_checkpoint, monkeypatch, tmp_path):
    """Point this process's huggingface_hub at the server and an empty cache (what HF_ENDPOINT and
    HF_HUB_CACHE do at import), and register the test record with org ``test-org``."""
    from huggingface_hub import constants
    monkeypatch.setenv('AFF_ZOO_HUB_ORG', HUB_TEST_ORG)
    monkeypatch.setattr(constants, 'ENDPOINT', hub_server.endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', hub_server.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    folder, record = hub_checkpoint
    with registered_weights(record):
        yield hub_server, folder, record


def test_hash_mismatch_is_a_clear_error(hub_inprocess):
    server, folder, record = hub_inprocess
    data = bytearray((folder / 'model.safetensors').read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last tensor
    bad = replace(record, tag='corrupt')
    server.add_repo(bad.hf_hub_id, folder, replace={'model.safetensors': bytes(data)})
    with registered_weights(bad):
        with pytest.raises(zpre.HashMismatchError) as e:
            timm.create_model(bad.name, pretrained=True)
    msg = str(e.value)
    assert 'model.safetensors' in msg and record.sha256 in msg
    import hashlib
    assert hashlib.sha256(bytes(data)).hexdigest() in msg


def test_unknown_tag_lists_existing_tags(hub_inprocess):
    with pytest.raises(ValueError, match=r"Unknown pretrained tag 'nope'.*aff_resnet8\.hubtest"):
        timm.create_model('aff_resnet8.nope', pretrained=True)
    with pytest.raises(RuntimeError, match=r'No trained weights exist for aff_resnet56.*aff_resnet8\.hubtest'):
        timm.create_model('aff_resnet56', pretrained=True)


def test_server_down_fails_fast_and_says_how_to_fix(hub_inprocess, monkeypatch):
    from huggingface_hub import constants
    dead = f'http://127.0.0.1:{_free_port()}'
    monkeypatch.setattr(constants, 'ENDPOINT', dead)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', dead + '/{repo_id}/resolve/{revision}/{filename}')
    _, _, record = hub_inprocess
    t0 = time.time()
    with pytest.raises(zpre.WeightsUnavailableError) as e:
        timm.create_model(record.name, pretrained=True)
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert 'cannot be reached' in msg and dead in msg and 'HF_ENDPOINT' in msg and 'pretrained_cfg_overlay' in msg
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(zpre.WeightsUnavailableError, match='HF_HUB_OFFLINE=1 is set'):
        timm.create_model(record.name, pretrained=True)


def test_shipped_folder_loads_without_network_and_is_verified(hub_inprocess, monkeypatch, tmp_path):
    from huggingface_hub import constants
    _, folder, record = hub_inprocess
    monkeypatch.setattr(constants, 'ENDPOINT', f'http://127.0.0.1:{_free_port()}')  # nothing reachable
    shipped = tmp_path / 'repo' / 'hub' / record.name
    shipped.mkdir(parents=True)
    (shipped / 'model.safetensors').write_bytes((folder / 'model.safetensors').read_bytes())
    monkeypatch.setattr(zpre, 'REPO_ROOT', tmp_path / 'repo')
    model = timm.create_model(record.name, pretrained=True)
    ref = load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    (shipped / 'model.safetensors').write_bytes(b'\0' * record.size)
    with pytest.raises(zpre.HashMismatchError, match='shipped in this repository'):
        timm.create_model(record.name, pretrained=True)


def test_num_classes_change_reinitialises_head_with_warning(hub_inprocess):
    _, folder, record = hub_inprocess
    with pytest.warns(UserWarning, match=r'10 classes, the model 3.*fc\.bias, fc\.weight'):
        model = timm.create_model(record.name, pretrained=True, num_classes=3)
    ref = load_file(str(folder / 'model.safetensors'))
    assert model.fc.weight.shape == (3, 64)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if not k.startswith('fc.'))


def test_save_pretrained_layout(hub_checkpoint):
    folder, record = hub_checkpoint
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['architecture'] == 'aff_resnet8' and cfg['num_classes'] == 10 and cfg['num_features'] == 64
    pcfg = cfg['pretrained_cfg']
    assert pcfg['tag'] == 'hubtest' and pcfg['mean'] == list(record.mean) and pcfg['input_size'] == [3, 32, 32]
    assert 'hf_hub_id' not in pcfg and 'file' not in pcfg
    assert record.sha256 == zutils.sha256_file(folder / 'model.safetensors')
    assert record.size == (folder / 'model.safetensors').stat().st_size
    card = (folder / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: timm\n') and 'model-index' in card and 'value: 12.5' in card
    assert set(load_file(str(folder / 'model.safetensors'))) == set(timm.create_model('aff_resnet8').state_dict())
    zfolders.validate_folder(folder, record)


def _fake_run_dir(tmp_path, folder) -> Path:
    """A run dir as ``aff-zoo train`` writes it (model.safetensors, metrics.json, log.csv, curves.png)."""
    from PIL import Image
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'model.safetensors').write_bytes((folder / 'model.safetensors').read_bytes())
    (run / 'metrics.json').write_text(json.dumps(dict(
        model='aff_resnet8', val_top1=27.06, val_top5=82.42, best_epoch=2, epochs=2,
        val_split='last 500 images per class (sorted by name)', total_train_seconds=78.6,
        dataset='cifar10-train-jpeg.tar.gz', command='aff-zoo train --model aff_resnet8 --epochs 2',
        git_commit='f96f71e', device='cpu', world_size=1, classes=[f'c{i}' for i in range(10)])))
    (run / 'log.csv').write_text('epoch,train_loss,val_top1\n1,2.2,17.7\n2,1.9,27.06\n')
    Image.new('RGB', (8, 8), 'white').save(run / 'curves.png')
    return run


def test_export_cli_writes_folder_and_record(hub_checkpoint, tmp_path, capsys):
    folder, _ = hub_checkpoint
    run = _fake_run_dir(tmp_path, folder)
    out = tmp_path / 'hub' / 'aff_resnet8.cifar10'
    assert cli_main(['export', str(run), '--arch', 'aff_resnet8', '--tag', 'cifar10', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    record = eval(printed[printed.index('Weights('):].rstrip().rstrip(','), {'Weights': Weights})
    assert record.name == 'aff_resnet8.cifar10' and record.top1 == 27.06 and record.metrics['epochs'] == 2
    assert record.recipe == 'aff-zoo train --model aff_resnet8 --epochs 2'
    assert record.label_names == tuple(f'c{i}' for i in range(10))  # the run's classes, in output order
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['label_names'] == list(record.label_names)
    assert record.sha256 == zutils.sha256_file(out / 'model.safetensors') == zutils.sha256_file(run / 'model.safetensors')
    assert (out / 'training_curves.png').is_file() and 'training_curves.png' in (out / 'README.md').read_text()
    zfolders.validate_folder(out, record)
    with pytest.raises(ValueError, match='label_names'):
        zfolders.validate_folder(out, replace(record, label_names=('x',) * 10))
    with pytest.raises(ValueError, match="trained 'aff_resnet8', not 'aff_resnet20'"):
        zfolders.export_run(run, 'aff_resnet20', 'cifar10', tmp_path / 'x')


def test_export_float16_halves_the_file_and_loads_into_float32(hub_checkpoint, tmp_path, capsys):
    """Weights trained on a lent GPU come back rounded to float16 (scripts/gpu_batch.py): stored so, they lose
    nothing more and take half the space; they load into the usual float32 model."""
    folder, _ = hub_checkpoint
    run = _fake_run_dir(tmp_path, folder)
    out = tmp_path / 'hub' / 'aff_resnet8.half'
    assert cli_main(['export', str(run), '--arch', 'aff_resnet8', '--tag', 'half', '--out', str(out),
                     '--dtype', 'float16', '--notes', 'rounded on the way back']) == 0
    printed = capsys.readouterr().out
    record = eval(printed[printed.index('Weights('):].rstrip().rstrip(','), {'Weights': Weights})
    assert record.metrics['dtype'] == 'float16' and record.notes == 'rounded on the way back'
    stored = load_file(out / 'model.safetensors')
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert record.size < 0.6 * (run / 'model.safetensors').stat().st_size
    zfolders.validate_folder(out, record)
    with registered_weights(record):
        model = timm.create_model('aff_resnet8.half', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors'))).eval()
    ref = timm.create_model('aff_resnet8').eval()
    ref.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point() else v
                         for k, v in load_file(run / 'model.safetensors').items()})
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_publish_dry_run_lists_exact_operations(hub_checkpoint, capsys):
    folder, record = hub_checkpoint
    with registered_weights(record):
        assert cli_main(['publish', str(folder), '--dry-run', '--endpoint', 'http://127.0.0.1:1']) == 0
    out = capsys.readouterr().out
    assert f'repo {record.hf_hub_id} on http://127.0.0.1:1 (public)' in out
    assert zutils.git_commit().split('-')[0] in out and 'nothing uploaded' in out
    for f in folder.iterdir():
        line = [ln for ln in out.splitlines() if f' {f.name} ' in ln]
        assert line and f'{f.stat().st_size} bytes' in line[0] and zutils.sha256_file(f) in line[0]


def test_publish_refuses_folder_that_disagrees_with_registry(hub_checkpoint, tmp_path):
    folder, record = hub_checkpoint
    bad = tmp_path / record.name
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / 'README.md').write_text((folder / 'README.md').read_text().replace('value: 12.5', 'value: 99.9'))
    wrong = replace(record, sha256='0' * 64)
    with pytest.raises(ValueError) as e:
        zupload.publish(bad, record=wrong, dry_run=True)
    assert 'sha256' in str(e.value) and 'model card' in str(e.value)


def test_publish_upload_reaches_server_and_explains_refusal(hub_server, hub_checkpoint):
    """The real create_repo HTTP call goes out; olah has no write API (405), which must read clearly."""
    folder, record = hub_checkpoint
    with pytest.raises(RuntimeError, match=r'HTTP 405.*no write API'):
        zupload.publish(folder, record=record, endpoint=hub_server.endpoint, token='hf_test_token', log=lambda s: None)


def test_registered_weights_is_temporary(hub_checkpoint):
    _, record = hub_checkpoint
    before = timm.list_models('aff_resnet8*', pretrained=True)
    with registered_weights(record):
        assert record.name in timm.list_models('aff_resnet8*', pretrained=True)
        assert record.name in aff_zoo.models.weights.available_tags('aff_resnet8')
    assert timm.list_models('aff_resnet8*', pretrained=True) == before
    assert record.name not in aff_zoo.models.weights.available_tags()


def test_hf_hub_repo_outside_registry_loads_safetensors_only(hub_inprocess, tmp_path):
    """Someone's fine-tune in their own repo: loaded (no registry hash to check), safetensors only."""
    server, folder, _ = hub_inprocess
    server.add_repo('someone/aff_resnet8-finetune', folder)
    model = timm.create_model('hf-hub:someone/aff_resnet8-finetune', pretrained=True)
    ref = load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    pickle = tmp_path / 'model.pth'
    torch.save(dict(ref), pickle)
    with pytest.raises(ValueError, match='only safetensors'):
        timm.create_model('aff_resnet8', pretrained=True, pretrained_cfg_overlay=dict(file=str(pickle)))


def test_save_pretrained_channels_last_round_trip(tmp_path):
    model = timm.create_model('aff_resnet8', num_classes=4).to(memory_format=torch.channels_last).eval()
    record = zfolders.save_pretrained(model, tmp_path / 'aff_resnet8.cl', tag='cl')
    assert record.num_classes == 4 and record.tag == 'cl'
    loaded = timm.create_model('aff_resnet8', pretrained=True, num_classes=4,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'aff_resnet8.cl')))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
