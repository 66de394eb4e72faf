"""Durable file writes: unique temporary names per writer, fsync, rename, fsync of the folder;
and the free-disk reserve that every write path keeps."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskSpaceError(OSError):
    """A write would eat into the free-disk reserve."""


def disk_reserve() -> int:
    """The free space (bytes) that writes must leave on the disk (``BGMINER_DISK_RESERVE_MB``)."""
    from .settings import load_settings

    return load_settings().limits.disk_reserve_bytes


def ensure_free(path: str | Path, need_bytes: int, reserve_bytes: int | None = None) -> None:
    """Raise :class:`DiskSpaceError` unless writing ``need_bytes`` under ``path`` leaves the reserve free."""
    reserve = disk_reserve() if reserve_bytes is None else reserve_bytes
    free = shutil.disk_usage(existing_parent(Path(path))).free
    if free - max(0, need_bytes) < reserve:
        raise DiskSpaceError(
            f"not enough free disk space: {need_bytes / 2**20:.0f} MiB to write, {free / 2**20:.0f} MiB free, "
            f"{reserve / 2**20:.0f} MiB must stay free (BGMINER_DISK_RESERVE_MB)"
        )


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def temp_name(dest: Path) -> Path:
    """A hidden temporary name beside ``dest``, unique per process, thread and call."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | Path, fsync: bool = True) -> Iterator[Path]:
    """``with atomic_path(dest) as tmp:`` write ``tmp``; it replaces ``dest`` only if the block succeeds.

    The file is fsynced before the rename and the folder after it, so a crash leaves the old
    file or the whole new one. Permissions follow the umask (unlike mkstemp).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
        if fsync:
            fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(dest: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_path(dest, fsync=fsync) as tmp:
        tmp.write_bytes(data)
