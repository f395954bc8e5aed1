"""Shared fixtures. Hub fixtures (``hub_*``): a real Hugging Face Hub server (olah, offline mode) on
127.0.0.1 serving git repos from a temporary mirrors dir, and a tiny trained checkpoint folder."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HUB_TEST_ORG = 'test-org'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class OlahHub:
    """An olah server on 127.0.0.1 whose model repos are git repos under ``mirrors/models/<org>/<name>``."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / 'mirrors'
        self.port = _free_port()
        self.endpoint = f'http://127.0.0.1:{self.port}'
        (root / 'repos').mkdir(parents=True)
        self.mirrors.mkdir()
        self.config = root / 'olah.toml'
        self.config.write_text(
            '[basic]\n'
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{root / "repos"}"\nmirrors-path = ["{self.mirrors}"]\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            '[accessibility]\noffline = true\n')
        self.log = open(root / 'olah.log', 'wb')
        self.proc = subprocess.Popen([sys.executable, '-m', 'olah.server', '-c', str(self.config)],
                                     cwd=root, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0):
        # the HTML index answers 500; a file URL answers 401/404 once the server is up
        url = f'{self.endpoint}/{HUB_TEST_ORG}/none/resolve/main/none'
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f'olah exited: {(self.root / "olah.log").read_text()[-2000:]}')
            try:
                urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f'olah did not start in {timeout}s: {(self.root / "olah.log").read_text()[-2000:]}')

    def add_repo(self, repo_id: str, folder: Path, replace: dict = None) -> Path:
        """Commit the files of ``folder`` (``replace``: ``{name: bytes}`` overrides) as branch ``main``."""
        repo = self.mirrors / 'models' / repo_id
        repo.mkdir(parents=True, exist_ok=True)
        for f in Path(folder).iterdir():
            shutil.copyfile(f, repo / f.name)
        for name, data in (replace or {}).items():
            (repo / name).write_bytes(data)
        git = ['git', '-C', str(repo), '-c', 'user.name=aff-zoo-tests', '-c', 'user.email=tests@localhost']
        if not (repo / '.git').exists():
            subprocess.run(git + ['init', '-q', '-b', 'main'], check=True)
        subprocess.run(git + ['add', '-A'], check=True)
        subprocess.run(git + ['commit', '-q', '-m', f'add {repo_id}'], check=True)
        return repo

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope='session')
def hub_server(tmp_path_factory):
    """A running olah server (started once per session)."""
    # a missing tool fails (not skips) the Hub tests: the README's test command installs olah
    import importlib.util
    if importlib.util.find_spec('olah') is None:
        pytest.fail('the Hub tests need olah, a local Hub server: pip install ".[test]"')
    if shutil.which('git') is None:
        pytest.fail('the Hub tests need git (the local Hub server serves git repositories)')
    hub = OlahHub(tmp_path_factory.mktemp('olah'))
    try:
        hub.wait_ready()
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope='session')
def hub_checkpoint(tmp_path_factory):
    """``(folder, record)``: aff_resnet8 trained 3 SGD steps on random tensors, written by ``save_pretrained``
    as ``aff_resnet8.hubtest`` (its record's Hub repo follows ``AFF_ZOO_HUB_ORG``, so set it per test)."""
    import timm
    import torch
    import aff_zoo  # noqa: F401
    from aff_zoo.publish.folders import save_pretrained
    torch.manual_seed(0)
    model = timm.create_model('aff_resnet8')
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    folder = tmp_path_factory.mktemp('ckpt') / 'aff_resnet8.hubtest'
    record = save_pretrained(
        model.eval(), folder, tag='hubtest', dataset='random tensors (test fixture)',
        metrics=dict(top1=12.5, top5=50.0, split='the 8 training tensors', epochs=0),
        recipe='tests/conftest.py::hub_checkpoint: 3 SGD steps on 8 random images')
    return folder, record


@pytest.fixture(scope='session')
def hub_env(hub_server, hub_checkpoint, tmp_path_factory):
    """Environment for a subprocess that loads ``aff_resnet8.hubtest`` from the server: the repo is
    committed as ``test-org/aff_resnet8.hubtest``; HF_ENDPOINT/HF_HOME/AFF_ZOO_HUB_ORG are set."""
    folder, _ = hub_checkpoint
    hub_server.add_repo(f'{HUB_TEST_ORG}/{folder.name}', folder)
    env = dict(os.environ, HF_ENDPOINT=hub_server.endpoint, HF_HOME=str(tmp_path_factory.mktemp('hf_home')),
               AFF_ZOO_HUB_ORG=HUB_TEST_ORG, HF_HUB_DISABLE_TELEMETRY='1')
    for k in ('HF_HUB_CACHE', 'HF_HUB_OFFLINE', 'HUGGINGFACE_HUB_CACHE', 'TRANSFORMERS_OFFLINE'):
        env.pop(k, None)
    return env
