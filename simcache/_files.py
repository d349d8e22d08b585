"""Atomic output: write to a temporary name beside the target, then rename.

An interrupted or failed write never leaves a half-written file at the target path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from simcache.errors import SimcacheError


def check_output(path, overwrite: bool = True) -> Path:
    """The output path, after checking its folder exists and it may be (over)written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SimcacheError(f"output directory does not exist: {parent}")
    if path.is_dir():
        raise SimcacheError(f"output path is a directory: {path}")
    if path.exists() and not overwrite:
        raise SimcacheError(f"output file exists: {path} (use --force to replace it)")
    return path


def temp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def commit(tmp: Path, path: Path) -> Path:
    """Give ``tmp`` the permissions a plain open() would, and rename it to ``path``."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = True):
    """``with atomic_output(p) as tmp: write(tmp)`` -> ``p`` appears only on success."""
    path = check_output(path, overwrite)
    tmp = temp_beside(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)


def atomic_write_text(path, text: str, overwrite: bool = True) -> Path:
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
