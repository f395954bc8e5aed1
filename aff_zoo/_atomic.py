"""Atomic file writes: readers see the old file or the new one, never half of one."""
import os
from typing import Callable


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
