"""Files in and out: regular-file inputs, atomic outputs.

An output is written to a temporary name beside its target (``.NAME.PID.XXXXXXXX.tmp``,
created exclusively) and renamed into place only when complete, so an interrupted or failed
write never leaves a half-written file at the target. A temporary whose process is gone (a
run killed with SIGKILL) is removed by the next write to the same target.

The command line *reserves* every output before any work (:func:`reserve`): the checks run
(folder, suffix, existing file without ``--force``, the output being one of the inputs, hard
links included) and the temporary is created then, which also proves the folder writable. The
writers (:func:`atomic_output`) then fill the reserved temporary; :func:`release` drops
whatever was not committed.

Once the command line has seen Ctrl-C or SIGTERM (:func:`note_interrupt`) no output is
committed any more: a library that caught the ``KeyboardInterrupt`` the signal raised (some
compiled code does) cannot make an interrupted run leave a file. The one exception is an
output that records progress (``checkpoint=True``: a sweep's finished cells), written
complete precisely because the run was cut short.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path

from simcache.errors import SimcacheError

_RESERVED: dict[Path, "Output"] = {}
_TARGETS: set[Path] = set()  # every target this process made a temporary for (see release)
_INTERRUPTED = [False]


def note_interrupt():
    """Record that the run was interrupted: every later :meth:`Output.commit` refuses."""
    _INTERRUPTED[0] = True


def interrupted() -> bool:
    return _INTERRUPTED[0]


def check_input(path, what: str = "file") -> Path:
    """``path`` when it names an existing regular file (a FIFO or device would block or
    stream forever; a folder is a usage slip)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SimcacheError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise SimcacheError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise SimcacheError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise SimcacheError(f"{what} {path} is not a regular file (a pipe or device?)")
    return path


def check_output(path, overwrite: bool = True, inputs=(), suffixes=None, what: str = "output") -> Path:
    """The output path, after checking its folder, its suffix, that it may be (over)written
    and that it is none of ``inputs`` (same file, hard links included)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + (" or " if len(suffixes) > 1 else "") + suffixes[-1]
        raise SimcacheError(f"{what} must end in {names}, got {path.name}")
    parent = path.parent
    if not parent.is_dir():
        raise SimcacheError(f"{what} directory does not exist: {parent}")
    if path.is_dir():
        raise SimcacheError(f"{what} path is a directory: {path}")
    if path.exists():
        if not path.is_file():
            raise SimcacheError(f"{what} {path} exists and is not a regular file")
        for source in inputs:
            if source is not None and Path(source).exists() and os.path.samefile(path, source):
                raise SimcacheError(f"{what} {path} is the input {source}: it would be destroyed; "
                                    f"choose another name")
        if not overwrite:
            raise SimcacheError(f"output file exists: {path} (use --force to replace it)")
    return path


_STALE = r"\.{name}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp"


def clean_stale(path: Path) -> list[Path]:
    """Remove temporaries of ``path`` left by processes that no longer run (the PID in the
    name; a name without one is from a version that did not write it)."""
    pattern = re.compile(_STALE.format(name=re.escape(path.name)))
    removed = []
    for tmp in path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"):
        m = pattern.fullmatch(tmp.name)
        if m is None or (m.group(1) is not None and _running(int(m.group(1)))):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


class Output:
    """One output being written: checked target, exclusive temporary beside it, commit."""

    def __init__(self, path, *, overwrite: bool = True, inputs=(), suffixes=None, what: str = "output"):
        self.path = check_output(path, overwrite, inputs, suffixes, what)
        self.overwrite = overwrite
        clean_stale(self.path)
        _TARGETS.add(_key(self.path))  # before the temporary exists: an interrupt may come between
        try:  # mkstemp opens with O_CREAT | O_EXCL
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp",
                                       dir=self.path.parent)
        except OSError as exc:
            raise SimcacheError(f"cannot write {what} in {self.path.parent}: {exc.strerror}") from None
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self, checkpoint: bool = False) -> Path:
        """Move the temporary into place, with the permissions a plain open() would give.
        Without ``overwrite``, a target that appeared meanwhile (another run) is kept and
        this one refused. After an interrupt only a ``checkpoint`` is committed."""
        if _INTERRUPTED[0] and not checkpoint:
            self.discard()
            raise KeyboardInterrupt
        mask = os.umask(0)
        os.umask(mask)
        try:
            os.chmod(self.tmp, 0o666 & ~mask)
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                self._link_new()
        except BaseException:
            self.discard()
            raise
        _RESERVED.pop(_key(self.path), None)
        return self.path

    def _link_new(self):
        try:
            os.link(self.tmp, self.path)  # fails if the target exists: no window for a race
        except FileExistsError:
            raise SimcacheError(f"output file appeared while this ran: {self.path} (use --force "
                                f"to replace it)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if self.path.exists():  # no hard links here: check, then rename
                raise SimcacheError(f"output file appeared while this ran: {self.path} (use --force "
                                    f"to replace it)") from None
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink()

    def discard(self):
        with contextlib.suppress(OSError):
            self.tmp.unlink()
        if _RESERVED.get(_key(self.path)) is self:
            del _RESERVED[_key(self.path)]


def _key(path) -> Path:
    return Path(os.path.abspath(path))


def reserve(path, *, overwrite: bool = False, inputs=(), suffixes=None, what: str = "output") -> Path | None:
    """Check ``path`` and create its temporary now, before any work; the next writer of
    ``path`` in this process fills it. ``None`` passes through (an option not given)."""
    if path is None:
        return None
    key = _key(path)
    if key in _RESERVED:
        raise SimcacheError(f"{what} {path} is already another output of this command")
    _RESERVED[key] = Output(path, overwrite=overwrite, inputs=inputs, suffixes=suffixes, what=what)
    return Path(path)


def release():
    """Drop every temporary of this process not committed (the command failed, was
    interrupted or did not write): the reserved ones, and any whose creation an interrupt cut
    before it was recorded (found by the PID in its name)."""
    for out in list(_RESERVED.values()):
        out.discard()
    _RESERVED.clear()
    for target in _TARGETS:
        for tmp in target.parent.glob(f".{_glob_escape(target.name)}.{os.getpid()}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    _TARGETS.clear()


def claim(path, overwrite: bool = True, inputs=(), suffixes=None, what: str = "output") -> Output:
    """The reserved output for ``path``, or a new one."""
    reserved = _RESERVED.get(_key(path))
    if reserved is not None:
        return reserved
    return Output(path, overwrite=overwrite, inputs=inputs, suffixes=suffixes, what=what)


@contextlib.contextmanager
def atomic_output(path, overwrite: bool = True, inputs=(), suffixes=None, checkpoint: bool = False):
    """``with atomic_output(p) as tmp: write(tmp)`` -> ``p`` appears only on success (and,
    unless it is a ``checkpoint`` of progress, only if the run was not interrupted)."""
    out = claim(path, overwrite, inputs, suffixes)
    try:
        yield out.tmp
    except BaseException:
        out.discard()
        raise
    out.commit(checkpoint)


def atomic_write_text(path, text: str, overwrite: bool = True) -> Path:
    with atomic_output(path, overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
