"""Crash-safe file writes: a reader sees the old file (or none) or the complete new one.

Every file turboquant writes goes through :func:`atomic_write` (an open file) or
:func:`atomic_path` (a path, for writers that take a file name): the bytes go to a temporary
``.<name>.<pid>.<n>.tmp`` in the same folder, are flushed to the disk (``fsync``), and the
temporary is renamed over the target (atomic within one file system); the folder is then
synced so that the rename survives a power cut. The C++ core's ``KVCache::save`` does the
same (cpp/include/turboquant/atomic_file.h). A writer killed mid-save leaves its temporary
behind; the next write of the same target removes temporaries whose process is gone, so at
most one (the last killed writer's) is ever left.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "atomic_write", "temp_path"]

_counter = itertools.count()
_counter_lock = threading.Lock()


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name for ``path``: ``.<name>.<pid>.<n>.tmp<suffix>`` beside it."""
    p = Path(path)
    with _counter_lock:
        n = next(_counter)
    return p.with_name(f".{p.name}.{os.getpid()}.{n}.tmp{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its temporary
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> int:
    """Remove temporaries of ``path`` left by writers whose process no longer exists."""
    p = Path(path)
    pattern = re.compile(rf"^\.{re.escape(p.name)}\.(\d{{1,9}})\.\d+\.tmp(\..*)?$")
    removed = 0
    try:
        entries = list(os.scandir(p.parent if str(p.parent) else "."))
    except OSError:
        return 0
    for e in entries:
        m = pattern.match(e.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(e.path)
            removed += 1
    return removed


def _fsync_dir(folder: Path) -> None:
    # A folder that cannot be opened or synced (Windows, some network file systems) still
    # holds a complete file after the rename; only its durability across a power cut is lost.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent if str(path.parent) else Path("."))


def _check_target(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"cannot write to {str(p)!r}: it is a folder")
    if not p.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(p)!r}: folder {str(p.parent)!r} does not exist")
    return p


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb",
                 encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is "wb" or "w" (text; ``encoding`` defaults to UTF-8). On an exception the
    temporary is removed and ``path`` is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    p = _check_target(path)
    remove_stale_temporaries(p)
    tmp = temp_path(p)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    f = open(tmp, mode, encoding=encoding)  # noqa: SIM115 - closed below on every path
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        _publish(tmp, p)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same extension) for a writer that takes a file
    name; on a clean exit the file written there is synced and replaces ``path``."""
    p = _check_target(path)
    remove_stale_temporaries(p)
    tmp = temp_path(p, p.suffix)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"the writer of {str(p)!r} produced no file at {str(tmp)!r}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
