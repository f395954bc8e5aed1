"""Atomic file writes: readers see the old file or the new one, never half of one."""
import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]):
    """``write(tmp)`` then rename over ``path``.

    The temporary name is fixed (``<path>.tmp``, same folder, so the rename is atomic), so one left
    behind by a killed process is overwritten by the next write instead of piling up.
    """
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str):
    """``text`` to ``path``, atomically."""
    def write(tmp):
        with open(tmp, 'w', newline='') as f:
            f.write(text)
    atomic_write(path, write)
