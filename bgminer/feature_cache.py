"""Cached backbone outputs per image: the memory-mapped arrays, their folder lock and their repair.

Per image id (row = id) the cache holds the pooled feature (float32), the 1000 ImageNet
logits (float16; their argmax is the auxiliary pseudo-label) and, optionally, the input
maps of the last stage (float16) for last-stage training. Arrays are memory-mapped
``.npy`` files that grow on demand, so the corpus never has to fit in RAM.

Writers in any process take the folder's lock (``.lock``) for each batch and each growth, and
mark rows embedded only once their bytes are flushed into the file readers map; rows marked
embedded but all zeros are un-marked (:func:`unmark_zero_rows`) so they are embedded again.
No torch here: opening a project (and ``bgminer info``) needs only this module.

Rows are written and bulk-read with file reads and writes (:func:`read_rows`), not through a map:
the bytes pass through the OS page cache either way, but pages touched through a map count in the
process's resident memory until it unmaps them, so embedding or scoring a million images through
maps would "grow" the process by the size of the files it touched (reclaimable, file-backed pages,
yet they inflate RSS and the peak that ``getrusage`` reports). Readers still map the files.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fsutil import atomic_path, ensure_free
from .progress import CancelToken, check
from .store import Store


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


LOCK_NAME = ".lock"  # in the feature folder: held by every writer of the arrays, in any process
CLEAN_META = "features_clean:{}"  # store meta key: stamp of the pooled file after its last clean scan
SCAN_ROWS = 8192  # rows per chunk of the zero-row scan


class CacheBusy(TimeoutError):
    """Another writer holds the feature folder's lock."""


class FolderLock:
    """An exclusive advisory lock on ``<folder>/.lock``, shared by every process that opens the
    folder (closing its file releases it, so a killed holder never leaves it taken); re-entrant
    within a thread."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._thread_lock = threading.RLock()
        self._depth = 0  # nesting of hold() in the thread that has _thread_lock

    @contextmanager
    def hold(self, cancel: CancelToken | None = None, timeout: float | None = None) -> Iterator[None]:
        """Wait (cancellable by ``cancel``) for the holder; with ``timeout``, :class:`CacheBusy` after that many seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._thread_lock.acquire(timeout=0.05):
            _wait(cancel, deadline, self.folder)
        try:
            if self._depth:  # this thread holds it already
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / LOCK_NAME, "a") as f:
                while True:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        _wait(cancel, deadline, self.folder)
                        time.sleep(0.05)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
        finally:
            self._thread_lock.release()


class FeatureCache:
    """Growable memory-mapped arrays indexed by image id.

    Every write (a batch of rows, a merged shard, a growth) happens under one :class:`FolderLock`
    on the folder, so writers in other processes (the app's jobs, the CLI, Ray drivers) take
    turns. A writer reopens an array whenever its file was replaced by a growth, and marks rows
    embedded only after they are flushed into the file that readers map. Keep one instance per
    open project (pass the project's ``lock``).
    """

    def __init__(
        self, root: Path, feature_dim: int, num_classes: int, map_shape: tuple[int, ...] | None, lock: FolderLock | None = None
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.specs = {
            "pooled": ArraySpec("pooled", (feature_dim,), "float32"),
            "logits": ArraySpec("logits", (num_classes,), "float16"),
        }
        if map_shape is not None:
            self.specs["maps"] = ArraySpec("maps", tuple(map_shape), "float16")
        self._folder_lock = lock or FolderLock(self.root)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.npy"

    @property
    def has_maps(self) -> bool:
        return "maps" in self.specs

    @property
    def capacity(self) -> int:
        return _rows(self.path("pooled"))

    def lock(self, cancel: CancelToken | None = None, timeout: float | None = None):
        """``with cache.lock():`` hold the folder against every other writer, in this process or another."""
        return self._folder_lock.hold(cancel, timeout)

    def ensure_capacity(self, rows: int, cancel: CancelToken | None = None) -> None:
        """Grow every array to hold ``rows`` rows (doubling, copied in chunks under a temporary name,
        swapped atomically), keeping the free-disk reserve."""
        with self.lock(cancel):
            for spec in self.specs.values():
                path = self.path(spec.name)
                old = np.load(path, mmap_mode="r") if path.exists() else None
                old_rows = 0 if old is None else old.shape[0]
                if old_rows >= rows:
                    continue
                _remove_stale_temps(self.root)
                new_rows = max(rows, 2 * old_rows, 1024)
                ensure_free(self.root, new_rows * int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize)
                with atomic_path(path) as tmp:
                    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=spec.dtype, shape=(new_rows, *spec.shape))
                    new_offset = new.offset
                    del new  # the header is written and the file sized (sparse); rows are copied file to file
                    if old is not None:
                        _copy_bytes(path, old.offset, tmp, new_offset, old.nbytes)
                del old

    def commit_rows(
        self, store: Store, ids: Sequence[int] | np.ndarray, values: dict[str, np.ndarray], cancel: CancelToken | None = None
    ) -> None:
        """Write one block of rows (every array of the cache) and mark the images embedded, under the lock.

        The rows go into the files readers map now (written with file writes, :func:`write_rows`) and
        are flushed to disk before the store marks them, so no image is ever marked embedded without its bytes.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if set(values) != set(self.specs):
            raise ValueError(f"a block of rows needs the arrays {sorted(self.specs)}, got {sorted(values)}")
        if not len(ids):
            return
        with self.lock(cancel):
            clean = _is_clean(store, self.root)
            self.ensure_capacity(int(ids.max()) + 1)
            for name, rows in values.items():
                write_rows(self.path(name), ids, rows.astype(self.specs[name].dtype, copy=False))
            store.mark_embedded(ids.tolist())
            if clean:  # this block added only real rows: the file is still clean, no rescan needed
                _record_clean(store, self.root)

    def unmark_zero_rows(self, store: Store, cancel: CancelToken | None = None, timeout: float | None = None) -> list[int]:
        """See :func:`unmark_zero_rows`."""
        return unmark_zero_rows(store, self.root, self._folder_lock, cancel, timeout)

    def open(self, name: str, writable: bool = False) -> np.memmap:
        """The array's file as it is now (a later growth replaces the file; reopen to see rows added since)."""
        return np.load(self.path(name), mmap_mode="r+" if writable else "r")

    def read(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows for ``ids`` as an in-memory array (:func:`read_rows`)."""
        return read_rows(self.open(name), ids)

    def pseudo_labels(self, ids: Sequence[int] | np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Hard ImageNet pseudo-labels (argmax of the cached logits) for ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        logits = self.open("logits")
        return np.concatenate(
            [read_rows(logits, ids[i : i + chunk]).argmax(1) for i in range(0, len(ids), chunk)] or [np.zeros(0, np.int64)]
        ).astype(np.int64)


def unmark_zero_rows(
    store: Store, folder: Path, lock: FolderLock | None = None, cancel: CancelToken | None = None, timeout: float | None = None
) -> list[int]:
    """Un-mark every image marked embedded whose pooled row in ``folder`` is all zeros or missing, so
    the next embedding redoes it; returns their ids.

    Such rows come from a cache lost or replaced behind the store's back (a backup restored
    without features, a crash of an older bgminer). The pooled file is read in chunks, and only
    when it changed since the last clean scan (its stamp is kept in the store's meta), so a
    project opens fast. Needs no backbone, so :class:`~bgminer.project.Project` runs it at open.
    """
    folder = Path(folder)
    with (lock or FolderLock(folder)).hold(cancel, timeout):
        if _is_clean(store, folder):
            return []
        _remove_stale_temps(folder)
        ids = np.asarray(store.image_ids(embedded=True), dtype=np.int64)
        capacity = _rows(folder / "pooled.npy")
        bad = [ids[ids >= capacity]]
        inside = ids[ids < capacity]
        if len(inside):
            pooled = np.load(folder / "pooled.npy", mmap_mode="r")
            for start in range(0, len(inside), SCAN_ROWS):
                check(cancel)
                chunk = inside[start : start + SCAN_ROWS]
                bad.append(chunk[~read_rows(pooled, chunk).any(axis=1)])
            del pooled
        zero = np.concatenate(bad).tolist()
        if zero:
            store.unmark_embedded(zero)
        _record_clean(store, folder)
        return zero


def read_rows(array: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``array[ids]`` as an in-memory array. For a whole ``.npy`` map (``np.load(..., mmap_mode=...)``,
    this module's :meth:`FeatureCache.open`) the rows are read from the file in id order, one read per
    run of consecutive ids, so none of the file stays mapped in this process; any other array
    (a view, a plain array) is fancy-indexed."""
    ids = np.asarray(ids, dtype=np.int64)
    if not _whole_file_map(array):
        return np.asarray(array[ids])
    if len(ids) and (ids.min() < 0 or ids.max() >= array.shape[0]):
        raise IndexError(f"row ids outside 0..{array.shape[0] - 1}")
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    out = np.empty((len(ids), *array.shape[1:]), dtype=array.dtype)
    row_bytes = out[:1].nbytes
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        for begin, end in _runs(ordered):
            view = memoryview(out[begin:end]).cast("B")
            _read_exactly(fd, view, array.offset + int(ordered[begin]) * row_bytes)
    finally:
        os.close(fd)
    result = np.empty_like(out)
    result[order] = out
    return result


def write_rows(path: Path, ids: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows`` (already of the file's dtype and row shape) at rows ``ids`` of the ``.npy`` file
    at ``path``, one write per run of consecutive ids, then flush the file's data to disk."""
    header = np.load(path, mmap_mode="r")  # the header only: nothing of the data is touched
    offset, capacity, dtype, row_shape = header.offset, header.shape[0], header.dtype, header.shape[1:]
    del header
    if rows.dtype != dtype or rows.shape != (len(ids), *row_shape):
        raise ValueError(f"rows {rows.dtype} {rows.shape} do not fit {path.name} ({dtype}, rows of {row_shape})")
    if len(ids) and (ids.min() < 0 or ids.max() >= capacity):
        raise IndexError(f"row ids outside 0..{capacity - 1} of {path.name}")
    order = np.argsort(ids, kind="stable")
    ordered, rows = ids[order], np.ascontiguousarray(rows[order])
    row_bytes = rows[:1].nbytes
    fd = os.open(path, os.O_RDWR)
    try:
        for begin, end in _runs(ordered):
            data = memoryview(rows[begin:end]).cast("B")
            position = offset + int(ordered[begin]) * row_bytes
            while data:
                written = os.pwrite(fd, data, position)
                data, position = data[written:], position + written
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _whole_file_map(array: np.ndarray) -> bool:
    return (
        isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)
        and array.mode in ("r", "r+")
        and array.flags.c_contiguous
        and array.filename is not None
    )


def _runs(ordered: np.ndarray) -> Iterator[tuple[int, int]]:
    """(begin, end) positions of each run of consecutive values in a sorted id array."""
    if not len(ordered):
        return
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    edges = [0, *breaks.tolist(), len(ordered)]
    yield from itertools.pairwise(edges)


def _read_exactly(fd: int, view: memoryview, position: int) -> None:
    while view:
        got = os.preadv(fd, [view], position)
        if got == 0:
            raise OSError(f"unexpected end of file at byte {position}")
        view, position = view[got:], position + got


def _copy_bytes(source: Path, source_offset: int, dest: Path, dest_offset: int, size: int) -> None:
    """Copy ``size`` bytes between two files inside the kernel (nothing passes through this process)."""
    with open(source, "rb") as src, open(dest, "r+b") as dst:
        while size > 0:
            try:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), min(size, 1 << 30), source_offset, dest_offset)
            except OSError:  # a filesystem or kernel without it: plain reads and writes
                copied = os.pwrite(dst.fileno(), os.pread(src.fileno(), min(size, 1 << 24), source_offset), dest_offset)
            if copied == 0:
                raise OSError(f"{source} ended {size} bytes early")
            source_offset, dest_offset, size = source_offset + copied, dest_offset + copied, size - copied


def _rows(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0]) if path.exists() else 0


def _remove_stale_temps(folder: Path) -> None:
    """Delete growth copies left by writers killed mid-growth (only under the lock, so none is live)."""
    for stale in folder.glob(".*.npy.*.tmp"):
        stale.unlink(missing_ok=True)


def _stamp(folder: Path) -> str | None:
    """(device, inode, size, mtime) of the pooled file: changes whenever the file is written or replaced."""
    try:
        st = os.stat(folder / "pooled.npy")
    except FileNotFoundError:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _is_clean(store: Store, folder: Path) -> bool:
    stamp = _stamp(folder)
    return stamp is not None and store.get_meta(CLEAN_META.format(folder.name)) == stamp


def _record_clean(store: Store, folder: Path) -> None:
    stamp = _stamp(folder)
    if stamp is not None:
        store.set_meta(CLEAN_META.format(folder.name), stamp)


def _wait(cancel: CancelToken | None, deadline: float | None, root: Path) -> None:
    """One step of waiting for the lock: honour a cancel, give up past the deadline."""
    check(cancel)
    if deadline is not None and time.monotonic() >= deadline:
        raise CacheBusy(f"another process is writing the feature cache in {root}; wait for it to finish")
