"""Upcycling (aff_zoo.upcycle): an AFF / iAFF model built from a plain peer computes the peer's function
(eval and train mode), training gets past the zero start, and parents that do not fit are refused by name."""
import os

import pytest
import timm
import torch
import torch.nn as nn

import aff_zoo
from aff_zoo.layers.fusion import MSCAM
from aff_zoo.models.upcycle import UpcycleError, plain_keys, upcycle, zero_fusion_logits


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine and statistics everywhere: timm zero-inits each block's last BN gamma, which
    would make every residual branch zero and the equality test trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


PEERS = [('aff_resnet50', 'resnet50d'), ('iaff_resnet50', 'resnet50d'),
         ('aff_resnext50', 'resnext50d_32x4d'), ('iaff_resnext50', 'resnext50d_32x4d'),
         ('aff_resnet101', 'resnet101d'), ('iaff_resnet101', 'resnet101d')]


@pytest.mark.parametrize('peer', sorted({p for _, p in PEERS}))
def test_upcycled_logits_equal_parent(peer):
    """Every AFF/iAFF model with an exact plain peer: logits equal (rel. diff <= 1e-5) in eval and in
    train mode (BatchNorm on batch statistics), at 64 px (train mode at 32 px) to keep it fast. Train mode runs in float64: small batches give
    layer4's BatchNorms a few values per channel, which amplify float32 rounding (``2 * lerp(y, x, 0.5)``
    vs ``x + y``: one ulp) to ~2e-5 after 33 blocks; in float64 the rounding is gone and any real
    difference would still show."""
    torch.manual_seed(0)
    parent = _randomize(timm.create_model(peer, num_classes=7))
    inputs = {False: torch.randn(2, 3, 64, 64), True: torch.randn(4, 3, 32, 32, dtype=torch.float64)}
    for arch in [a for a, p in PEERS if p == peer]:
        model = upcycle(arch, parent)
        assert model.num_classes == 7  # the parent's head size by default
        assert any(isinstance(m, MSCAM) for m in model.modules())
        for train, x in inputs.items():
            parent.train(train).to(x.dtype), model.train(train).to(x.dtype)
            with torch.no_grad():
                ref, out = parent(x), model(x)
            assert ref.abs().max() > 0.1
            assert _rel(out, ref) <= 1e-5, (arch, train, _rel(out, ref))
        # the check above can fail: non-zero attention logits change the output
        parent.eval().float(), model.eval().float()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, MSCAM):
                    m.global_att.conv2.bias.fill_(2.0)
            assert _rel(model(inputs[False]), parent(inputs[False])) > 1e-3


def test_training_gets_past_the_zero_start():
    """Plain SGD (no weight decay, so only gradients move weights): step 1 moves every zeroed tensor (and, the
    other fusion tensors having exactly zero gradient then, nothing else in the fusions); step 2 moves all."""
    torch.manual_seed(0)
    parent = _randomize(timm.create_model('add_resnet20'))
    # float64: at step 2 some updates (~1e-9, scaled by the tiny just-moved last layers) are below a float32 ulp of 1.0
    model = upcycle('iaff_resnet20', parent).train().double()
    fusion = {n: p for n, p in model.named_parameters() if '.fusion.' in n}
    zeroed = {n for n in fusion if n.endswith(('local_att.bn2.weight', 'local_att.bn2.bias',
                                               'global_att.conv2.weight', 'global_att.conv2.bias')) and '.att2.' in n}
    assert zeroed and all(fusion[n].abs().max() == 0 for n in zeroed)
    assert len(zeroed) == 4 * 9  # the outer MS-CAM (att2) of each of the 9 iAFFs decides the output
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    start = {n: p.detach().clone() for n, p in fusion.items()}

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return {n for n, p in fusion.items() if not torch.equal(p, start[n])}
    assert step() == zeroed
    assert step() == set(fusion)


def test_cifar_zoo_tag_parent_and_cfg():
    """A zoo tag as parent (the shipped add_resnet20.cifar10_e12): same logits, and the parent's data config."""
    parent = timm.create_model('add_resnet20.cifar10_e12', pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    for arch in ('aff_resnet20', 'iaff_resnet20'):
        model = upcycle(arch, 'add_resnet20.cifar10_e12').eval()
        with torch.no_grad():
            assert _rel(model(x), parent(x)) <= 1e-5
        assert model.pretrained_cfg['upcycled_from'] == 'add_resnet20.cifar10_e12'
        assert model.pretrained_cfg['label_names'] == parent.pretrained_cfg['label_names']
    assert aff_zoo.upcycle is upcycle


def test_parents_that_do_not_fit_are_named():
    parent = timm.create_model('add_resnet20')
    with pytest.raises(UpcycleError, match=r'shape mismatches: stem.conv.weight|not a plain peer of aff_resnet32'):
        upcycle('aff_resnet32', parent)  # deeper: keys of the child the parent lacks
    with pytest.raises(UpcycleError, match=r"keys of aff_resnet8 the parent lacks: none; parent keys aff_resnet8 has "
                                           r"no plain place for: stages\.0\.1\."):
        upcycle('aff_resnet8', parent)
    with pytest.raises(UpcycleError, match='no plain place for: stages.0.0.fusion'):
        upcycle('aff_resnet20', timm.create_model('aff_resnet20'))  # not a plain parent
    with pytest.raises(UpcycleError, match='SE fusion'):
        upcycle('se_resnet20', parent)
    with pytest.raises(UpcycleError, match='fusion_scale=1'):
        upcycle('aff_resnet20', parent, fusion_scale=1.0)
    with pytest.warns(UserWarning, match=r'head starts fresh'):
        model = upcycle('aff_resnet20', parent, num_classes=3)
    assert model.num_classes == 3
    assert plain_keys(model) == [k for k in timm.create_model('add_resnet20', num_classes=3).state_dict()]
    assert zero_fusion_logits(model) == 9


# ------------------------------------------------------------------------------------------------------------
# Registered upcycled weights through a real Hub server (olah on 127.0.0.1, see tests/conftest.py), with a
# generated stand-in for the parent: a random resnet50d in timm's Hub layout, served as test-org/resnet50d.standin.

import subprocess  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402

from aff_zoo.models import pretrained as zpre  # noqa: E402
from aff_zoo.models._builder import registered_weights  # noqa: E402
from aff_zoo.models.weights import Upcycled  # noqa: E402
from aff_zoo.utils import sha256_file  # noqa: E402

from conftest import HUB_TEST_ORG  # noqa: E402


@pytest.fixture(scope='module')
def standin_parent(hub_server, tmp_path_factory):
    """``(parent model, pinned record, its folder)``: a random resnet50d saved with timm's ``save_for_hf`` and
    committed to the server; the record is pinned at that commit with the file's sha256."""
    from timm.models._hub import save_for_hf
    torch.manual_seed(0)
    parent = _randomize(timm.create_model('resnet50d')).eval()
    folder = tmp_path_factory.mktemp('standin') / 'resnet50d.standin'
    folder.mkdir()
    save_for_hf(parent, str(folder), safe_serialization=True)
    repo = hub_server.add_repo(f'{HUB_TEST_ORG}/resnet50d.standin', folder)
    commit = subprocess.run(['git', '-C', str(repo), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            check=True).stdout.strip()
    record = Upcycled(
        arch='aff_resnet50', tag='standin_upcycled', parent='resnet50d.standin', parent_top1=0.1, parent_top5=0.5,
        parent_eval='random weights (test stand-in)', revision=commit,
        sha256=sha256_file(folder / 'model.safetensors'), size=(folder / 'model.safetensors').stat().st_size,
        parent_repo_override=f'{HUB_TEST_ORG}/resnet50d.standin')
    return parent, record, folder


@pytest.fixture
def hub_here(hub_server, monkeypatch, tmp_path):
    """This process's huggingface_hub pointed at the server and an empty cache (as HF_ENDPOINT/HF_HUB_CACHE do)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'ENDPOINT', hub_server.endpoint)
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                        hub_server.endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    return hub_server


def test_upcycled_tag_loads_through_hub_then_offline_from_cache(hub_here, standin_parent, monkeypatch):
    """``timm.create_model(tag, pretrained=True)``: the pinned parent file from the server, verified, upcycled
    (logits = the stand-in's); then again with HF_HUB_OFFLINE=1 and a dead endpoint: from the cache alone."""
    from huggingface_hub import constants
    parent, record, _ = standin_parent
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = parent(x)
    with registered_weights(record):
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # pinned: no 'not pinned' warning
            model = timm.create_model(record.name, pretrained=True).eval()
        with torch.no_grad():
            assert _rel(model(x), ref) <= 1e-5
        assert model.pretrained_cfg['hf_hub_id'] == record.parent_repo and 'state_dict' not in model.pretrained_cfg
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
        monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
        again = timm.create_model(record.name, pretrained=True, num_classes=5)  # offline, from the cache; new head
        assert again.num_classes == 5
        plain = set(plain_keys(model)) - {'fc.weight', 'fc.bias'}  # fusion internals are a fresh random init
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items() if k in plain)
        monkeypatch.setattr(constants, 'HF_HUB_CACHE', constants.HF_HUB_CACHE + '-empty')
        with pytest.raises(zpre.WeightsUnavailableError, match='HF_HUB_OFFLINE=1 is set'):
            timm.create_model(record.name, pretrained=True)


def test_unpinned_parent_is_checked_against_the_hub_digest(hub_here, standin_parent):
    """Not pinned (no revision/sha256): the file is checked against the digest the server reports (here the git
    blob id: the stand-in is not in LFS) with a warning; a corrupted cache copy is then refused."""
    parent, record, _ = standin_parent
    unpinned = replace(record, tag='unpinned_upcycled', revision=None, sha256=None, size=None)
    with registered_weights(unpinned):
        with pytest.warns(UserWarning, match='not pinned yet.*git blob id'):
            model = timm.create_model(unpinned.name, pretrained=True)
        assert torch.equal(model.conv1[0].weight, parent.conv1[0].weight)
        from huggingface_hub import try_to_load_from_cache
        cached = os.path.realpath(try_to_load_from_cache(unpinned.parent_repo, 'model.safetensors', revision='main'))
        with open(cached, 'r+b') as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0xFF]))
        with pytest.raises(zpre.HashMismatchError, match='the Hub reports'):
            timm.create_model(unpinned.name, pretrained=True)


def test_corrupt_parent_and_unknown_revision_are_refused(hub_here, standin_parent):
    """Last of the Hub tests: olah answers an unknown revision with a 500 and resets its next connection."""
    parent, record, folder = standin_parent
    data = bytearray((folder / 'model.safetensors').read_bytes())
    data[-1] ^= 0xFF
    corrupt = hub_here.add_repo(f'{HUB_TEST_ORG}/resnet50d.corrupt', folder, replace={'model.safetensors': bytes(data)})
    commit = subprocess.run(['git', '-C', str(corrupt), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                            check=True).stdout.strip()
    bad = replace(record, tag='corrupt_upcycled', revision=commit, parent_repo_override=f'{HUB_TEST_ORG}/resnet50d.corrupt')
    gone = replace(record, tag='gone_upcycled', revision='0' * 40)
    with registered_weights(bad, gone):
        with pytest.raises(zpre.HashMismatchError, match=f'expects {record.sha256}'):
            timm.create_model(bad.name, pretrained=True)
        with pytest.raises(zpre.WeightsUnavailableError, match=r'revision 0{40} of Hub repo .*pinned revision may be wrong'):
            timm.create_model(gone.name, pretrained=True)


def test_registry_upcycled_records_agree_with_timm_hubconf_and_cards():
    """Every ImageNet model with an exact plain peer has upcycled tags (default tag first); timm's cfgs are the
    parent's preprocessing as timm itself gives it; the cards say what the weights are."""
    from aff_zoo.models import weights
    from aff_zoo.publish.cards import upcycled_card
    names = {u.name for u in weights.UPCYCLED}
    for arch in ('aff_resnet50', 'iaff_resnet50', 'aff_resnext50', 'iaff_resnext50', 'aff_resnet101', 'iaff_resnet101'):
        assert timm.models.get_pretrained_cfg(arch).tag.endswith('_upcycled'), arch
    assert {'aff_resnet50.ra4_e3600_r224_in1k_upcycled', 'iaff_resnet50.gluon_in1k_upcycled'} <= names
    assert timm.models.get_pretrained_cfg('aff_resnet50').tag == 'ra4_e3600_r224_in1k_upcycled'
    for u in weights.UPCYCLED:
        ours, theirs = timm.models.get_pretrained_cfg(u.name), timm.models.get_pretrained_cfg(u.parent)
        for k in ('input_size', 'test_input_size', 'crop_pct', 'test_crop_pct', 'interpolation', 'mean', 'std',
                  'pool_size', 'num_classes', 'license'):
            assert getattr(ours, k) == getattr(theirs, k), (u.name, k)
        assert ours.hf_hub_id == theirs.hf_hub_id == u.parent_repo
        card = upcycled_card(u)
        assert 'untrained' in card and f'{u.parent_top1:.3f}' in card and u.parent_repo in card
        assert u.parent_citation in card and u.citation in card and f'license: {theirs.license}' in card
        # the parent is an exact plain peer: its (random) weights upcycle without a key or shape error
    with pytest.raises(RuntimeError, match=r'No weights exist for iaff_resnext101: timm has no ResNeXt-101.*'
                                           r'aff_resnext50\.bt_in1k_upcycled'):
        timm.create_model('iaff_resnext101', pretrained=True)


def test_train_init_from_flag_reaches_the_recipe(tmp_path):
    """``aff-zoo train --init-from`` is parsed and recorded in the run's recipe command (the upcycling itself is
    tested above; scripts/cifar_upcycle.sh runs it end to end)."""
    import argparse
    from aff_zoo.training import train as ztrain
    parser = argparse.ArgumentParser()
    ztrain.register_cli(parser.add_subparsers())
    args = parser.parse_args(['train', '--model', 'aff_resnet8', '--data', str(tmp_path / 'none'), '--output',
                              str(tmp_path / 'run'), '--init-from', 'add_resnet20.cifar10_e12'])
    assert args.init_from == 'add_resnet20.cifar10_e12'
    assert '--init-from add_resnet20.cifar10_e12' in ztrain.recipe_command(args)


def test_offline_hint_for_an_upcycled_tag_names_the_parent_and_upcycle():
    """A local copy of an upcycled tag is the parent's file: the hint says how to upcycle it, not how to load
    a file of ours (which the parent's file is not)."""
    from aff_zoo.models.pretrained import _how_to_fix
    hint = _how_to_fix('aff_resnet50.ra4_e3600_r224_in1k_upcycled')
    assert ("aff_zoo.upcycle('aff_resnet50', timm.create_model('resnet50d.ra4_e3600_r224_in1k', pretrained=True, "
            "pretrained_cfg_overlay=dict(file=") in hint
    assert "timm.create_model('aff_resnet20.cifar10_e12', pretrained=True" in _how_to_fix('aff_resnet20.cifar10_e12')
