"""The lowest layer: atomic file writes (readers see the old file or the new one, never half of one),
the one safetensors writer, file hashes, the git commit of this code (recorded with every run and
upload), and the one splicer of generated sections into markdown pages."""
import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional


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
    """The checkout's commit (``-dirty`` with local changes), or ``$AFF_ZOO_GIT_COMMIT`` when set: a working
    tree sent to a lent GPU machine arrives on another commit (or none), so the sender names its own."""
    named = os.environ.get('AFF_ZOO_GIT_COMMIT')
    if named:
        return named
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '') if sha.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def write_changed(files: Dict[Path, str], check: bool = False) -> List[Path]:
    """Write each ``{path: text}`` whose file is missing or differs (atomically) and return those paths;
    ``check``: write nothing, only return them (generated files: cards, README and docs sections)."""
    stale = [Path(p) for p, text in files.items() if not Path(p).is_file() or Path(p).read_text() != text]
    if not check:
        for path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(str(path), files[path])
    return stale


def _section_pattern(name: str) -> 're.Pattern':
    return re.compile(rf'(<!-- {re.escape(name)}:start -->\n)(.*?)(<!-- {re.escape(name)}:end -->)', re.S)


def replace_section(text: str, name: str, content: str) -> str:
    """``text`` with the part between ``<!-- name:start -->`` and ``<!-- name:end -->`` replaced by ``content``
    (the README's and docs pages' generated tables; every generator writes through this)."""
    if not _section_pattern(name).search(text):
        raise ValueError(f'no <!-- {name}:start --> ... <!-- {name}:end --> markers in the page; add them where '
                         f'the generated text goes.')
    return _section_pattern(name).sub(lambda m: m.group(1) + content.rstrip('\n') + '\n' + m.group(3), text,
                                      count=1)


def read_section(text: str, name: str) -> str:
    """The text between the ``name`` markers."""
    m = _section_pattern(name).search(text)
    if m is None:
        raise ValueError(f'no <!-- {name}:start --> ... <!-- {name}:end --> markers in the page')
    return m.group(2)


def cpuinfo(path: str = '/proc/cpuinfo') -> Dict[str, str]:
    """The first CPU's fields in ``/proc/cpuinfo`` (``model name``, ``flags``, ...); empty where there is none."""
    try:
        with open(path) as f:
            text = f.read().split('\n\n', 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(':', 1) for line in text.splitlines() if ':' in line)}


def bfloat16_units(flags: str) -> str:
    """What runs bfloat16 on this CPU, from its flags: it decides whether a bfloat16 recipe is 2.4x faster than
    float32 (AMX) or 2.3x slower (emulated, e.g. a Cascade Lake Xeon); both Xeons here print the same model name."""
    flags = set(flags.split())
    return ('bfloat16: AMX' if 'amx_bf16' in flags else 'bfloat16: AVX512-BF16' if 'avx512_bf16' in flags else
            'bfloat16: emulated' if flags else '')


def machine_line(device) -> str:
    """The device in words (GPU name, or CPU model, its bfloat16 units, cores and threads) and the torch version,
    for records."""
    import torch
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        info = cpuinfo()
        name = info.get('model name') or platform.processor() or platform.machine()
        units = bfloat16_units(info.get('flags', ''))
        units = f' ({units})' if units else ''
        name = f'{name}{units}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads'
    return f'{name}; torch {torch.__version__}'
