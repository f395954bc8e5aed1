"""The lowest layer: atomic file writes (and the one safetensors writer) (readers see the old file or the new one, never half of one),
file hashes, and the git commit of this code (recorded with every run and upload)."""
import hashlib
import os
import subprocess
from typing import Callable, Dict, Optional


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmps(path: str):
    """Delete ``<path>.<pid>.tmp`` files left by writers that were killed (their pid is gone)."""
    folder, base = os.path.split(path)
    prefix = base + '.'
    for name in os.listdir(folder or '.'):
        pid = name[len(prefix):-len('.tmp')] if name.startswith(prefix) and name.endswith('.tmp') else ''
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def atomic_write(path: str, write: Callable[[str], None]):
    """``write(tmp)`` then rename over ``path``.

    The temporary file sits in the same folder (so the rename is atomic) and is named after the
    writing process (``<path>.<pid>.tmp``): processes writing the same file at once, e.g. DDP
    ranks filling one data cache, never write into or rename each other's temporary. A temporary
    left by a killed writer is removed by the next successful write of the same file.
    """
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _remove_stale_tmps(path)


def atomic_write_text(path: str, text: str):
    """``text`` to ``path``, atomically."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            f.write(text)
    atomic_write(path, write)


def save_safetensors(model_or_state, path, metadata: Optional[Dict[str, str]] = None):
    """The one safetensors writer (run folders, fine-tune folders, Hub folders): contiguous CPU copies, so a
    channels_last or CUDA model saves as is; ``format: pt`` metadata as timm and transformers expect; atomic."""
    from safetensors.torch import save_file
    state = model_or_state.state_dict() if hasattr(model_or_state, 'state_dict') else model_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(str(path), lambda tmp: save_file(state, tmp, metadata={'format': 'pt', **(metadata or {})}))


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '') if sha.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
