"""Ingest: turn folders, files, .zip archives and .csv lists into image rows in the store.

Each file is hashed (sha256), validated by a full decode and thumbnailed; images stay where
they are (only zip contents are extracted, into the project's uploads folder). Worker
processes inspect files and return rows; the main process commits them in chunks, so a
killed or cancelled run keeps what it committed and the next run resumes after it.

With data roots configured (``BGMINER_DATA_ROOTS``), nothing outside them is read: a source
outside is refused, and a file outside (a CSV entry, a symlink's target) becomes a rejected
row with the reason ``outside_data_roots`` without being opened or even stat'ed.
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import re
import shutil
import stat
import sys
import threading
import time
import uuid
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from multiprocessing.context import BaseContext
from pathlib import Path, PurePosixPath
from typing import Any

from .fsutil import atomic_write_bytes, ensure_free, fsync_dir
from .imageio import MAX_PIXELS_DEFAULT, ImageRejected, Walk, make_thumbnail, read_image, walk_images
from .progress import CancelToken, ProgressFn, RateMeter, check, report
from .settings import Limits, OutsideDataRoots, Settings, load_settings
from .store import Store

THUMBNAIL_SIZE = 256
CHUNK_SIZE = 256  # files per store transaction: the unit that survives a kill or a cancel
TASK_SIZE = 32  # files per worker task: small enough to keep every worker busy
POOL_MIN_FILES = 64  # below this, worker start-up costs more than it saves
RATIO_MIN_BYTES = 2**20  # entries smaller than this may compress as well as they like
RESERVE_CHECK_BYTES = 8 * 2**20  # while unpacking, re-check the disk reserve this often
THUMBNAIL_BYTES = 64 * 2**10  # a generous estimate of one thumbnail, for the disk reserve
OUTSIDE = OutsideDataRoots.reason
OUTSIDE_DETAIL = "outside the data roots (BGMINER_DATA_ROOTS); nothing was read from it"
ARCHIVE_UNREADABLE = "archive_unreadable"


class IngestError(ValueError):
    """A source that cannot be ingested at all (missing, outside the data roots, unsafe or
    damaged archive, bad CSV); ``reason`` names the cause when it is a code, e.g. ``outside_data_roots``."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


@dataclass
class IngestReport:
    """What one ingest run did. total_seen = added + skipped_known + sum(rejected.values())."""

    added: int = 0
    duplicates: int = 0  # also counted in rejected["duplicate"]
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_known: int = 0  # paths already in the store
    ignored: int = 0  # non-image files met while walking folders
    total_seen: int = 0
    seconds: float = 0.0
    files_per_second: float = 0.0  # files inspected (not skipped) per second
    rejected_files: list[tuple[str, str, str]] = field(default_factory=list)  # (path, reason, detail)


def thumbnail_path(thumbs_dir: str | Path, sha256: str) -> Path:
    """Where the thumbnail of an image with this content hash lives (content-addressed).

    The hash comes from the project's database, so it is checked (64 lower-case hex digits)
    before it becomes part of a path.
    """
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 content hash: {sha256!r}")
    return Path(thumbs_dir) / sha256[:2] / f"{sha256}.jpg"


def ingest(
    store: Store,
    sources: Sequence[str | Path],
    thumbs_dir: str | Path,
    uploads_dir: str | Path,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    max_pixels: int = MAX_PIXELS_DEFAULT,
    workers: int | None = None,
    chunk_size: int = CHUNK_SIZE,
    data_roots: Sequence[str | Path] | None = None,
    limits: Limits | None = None,
) -> IngestReport:
    """Add every image file under ``sources`` to the store, with a thumbnail each.

    Files already in the store are skipped, except rejected ones whose size or mtime changed
    since (fixed or re-copied files are retried); bad files and exact duplicates become
    'rejected' rows with a reason, and so do files outside the data roots and archives the
    disk refused to unpack. Raises IngestError (before anything is stored) for a source that
    cannot be read or lies outside the data roots, and progress.Cancelled between chunks.

    ``data_roots`` and ``limits`` default to the settings (:func:`load_settings`); an empty
    ``data_roots`` allows any path. The project's uploads folder is always allowed.
    """
    started = time.perf_counter()
    if data_roots is None or limits is None:
        settings = load_settings()
        data_roots = settings.data_roots if data_roots is None else data_roots
        limits = settings.limits if limits is None else limits
    uploads_dir = Path(uploads_dir)
    found = collect_files(sources, uploads_dir, data_roots, limits)
    known = store.known_files()
    forgettable = store.rejected_files()
    retry = _changed_rejections(forgettable, [p for p in found.files if p in known])  # inside the roots only
    retry += [p for p in [*found.refused, *found.archives] if p in forgettable]  # re-reported, or unpacked now
    if retry:
        store.forget_rejected(retry)
        known = {p: v for p, v in known.items() if p not in set(retry)}
    todo = [p for p in found.files if p not in known]
    refused = [row for path, row in found.refused.items() if path not in known]
    seen = len(found.files) + len(found.refused)
    out = IngestReport(skipped_known=seen - len(todo) - len(refused), ignored=found.ignored, total_seen=seen)
    if refused:
        store.add_images(refused)
        _tally(out, refused)
    dedup = _Deduplicator(store)
    meter = RateMeter(len(todo))
    report(progress, 0, len(todo), meter.message(0, "files"))
    inspect = partial(_inspect_files, thumbs_dir=Path(thumbs_dir), max_pixels=max_pixels, reserve=limits.disk_reserve_bytes)
    task_size = min(TASK_SIZE, chunk_size)
    tasks = [todo[i : i + task_size] for i in range(0, len(todo), task_size)]
    pending: list[dict[str, Any]] = []
    done = 0
    with closing(_map_in_order(inspect, tasks, _worker_count(workers, len(todo)))) as results:
        for i, rows in enumerate(results):
            pending.extend(rows)
            if len(pending) < chunk_size and i < len(tasks) - 1:
                continue
            dedup.mark(pending)
            store.add_images(pending)
            _tally(out, pending)
            done += len(pending)
            pending = []
            report(progress, done, len(todo), meter.message(done, "files"))
            check(cancel)
    out.seconds = time.perf_counter() - started
    out.files_per_second = len(todo) / out.seconds if out.seconds > 0 else 0.0
    return out


@dataclass
class Collected:
    """What the sources of one ingest hold, before anything is read from the files."""

    files: list[str]  # resolved paths of candidate files, in order, each once (all inside the roots)
    refused: dict[str, dict[str, Any]]  # path -> rejected row that needs no reading (outside the roots, archive not unpacked)
    ignored: int  # non-image files met while walking folders
    archives: list[str]  # archives unpacked (or found unpacked) in this run


def collect_files(
    sources: Sequence[str | Path], uploads_dir: Path, data_roots: Sequence[str | Path] = (), limits: Limits | None = None
) -> Collected:
    """The candidate files under ``sources``; zip archives are extracted first.

    Every source is checked against the data roots before anything is read from it (even
    whether it exists), so a refusal says the same for a path that exists and one that does not.
    """
    roots = tuple(Path(os.path.realpath(Path(r).expanduser())) for r in data_roots)
    allowed = Settings(data_roots=(*roots, Path(os.path.realpath(uploads_dir))) if roots else ()).inside_data_roots
    paths = [Path(source).expanduser() for source in sources]
    for source, path in zip(sources, paths, strict=True):
        if not allowed(path):
            raise IngestError(f"{source} refused: {OUTSIDE} ({OUTSIDE_DETAIL})", OUTSIDE)
        if not path.exists():
            raise IngestError(f"no such file or folder: {source}")
    out = Collected([], {}, 0, [])
    for path in (p.resolve() for p in paths):
        if path.is_dir():
            walk = walk_images(path, allowed)
        elif path.suffix.lower() == ".zip":
            try:
                folder = extract_zip(path, uploads_dir, limits)
            except OSError as e:  # disk full, read-only or missing uploads folder, I/O error: this archive only
                out.refused[str(path)] = _rejected_row(str(path), ARCHIVE_UNREADABLE, f"cannot unpack: {e.strerror or e}")
                continue
            out.archives.append(str(path))
            walk = walk_images(folder, allowed)
        elif path.suffix.lower() == ".csv":
            walk = Walk(*_read_csv(path, allowed), ignored=0)
        else:
            walk = Walk([str(path)], [], 0)
        out.files.extend(walk.files)
        out.refused.update((p, _rejected_row(p, OUTSIDE, OUTSIDE_DETAIL)) for p in walk.outside)
        out.ignored += walk.ignored
    out.files = list(dict.fromkeys(out.files))
    for path in set(out.files) & set(out.refused):  # e.g. an archive also listed in a CSV: it is a file there
        del out.refused[path]
    return out


def _rejected_row(path: str, reason: str, detail: str) -> dict[str, Any]:
    return {"path": path, "status": "rejected", "reason": reason, "detail": detail}


def extract_zip(
    zip_path: Path, uploads_dir: Path, limits: Limits | None = None, stem: str | None = None, label: str | None = None
) -> Path:
    """Unpack an archive into ``uploads_dir/<stem>-<sha256[:16]>/`` (once; later calls reuse it).
    ``label`` names the archive in error messages (default: its file name).

    Every entry is checked before anything is written: absolute paths, ``..`` components,
    symlinks, encrypted entries, more entries or uncompressed bytes than ``limits`` allow, and
    entries that compress too well are refused with IngestError (zip bombs). While unpacking,
    an entry that yields more than its declared size is refused too, and the disk reserve is
    re-checked every few MiB so that concurrent extractions cannot eat it together. OS errors
    (disk full, DiskSpaceError, I/O) propagate as OSError. Nothing is left behind on failure.
    """
    limits = load_settings().limits if limits is None else limits
    label = label or zip_path.name
    with open(zip_path, "rb") as fp:
        digest = _sha256(fp)
        fp.seek(0)
        _check_entry_count(fp, label, limits)
    target = uploads_dir / f"{stem or zip_path.stem}-{digest[:16]}"
    if target.is_dir():
        return target
    try:
        with zipfile.ZipFile(zip_path) as archive:
            entries = _checked_entries(archive, label, limits)
            need = sum(info.file_size for info, _ in entries)
            ensure_free(uploads_dir, need, limits.disk_reserve_bytes)
            uploads_dir.mkdir(parents=True, exist_ok=True)
            partial_dir = uploads_dir / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                partial_dir.mkdir()  # an archive without files still gets its folder
                guard = _ReserveGuard(partial_dir, need, limits.disk_reserve_bytes)
                for info, relative in entries:
                    dest = partial_dir.joinpath(*relative.parts)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _unpack_entry(archive, info, dest, label, guard)
                _publish(partial_dir, target)
            finally:
                shutil.rmtree(partial_dir, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise IngestError(f"{label} is not a readable zip archive: {e}") from e
    return target


def _check_entry_count(fp: Any, name: str, limits: Limits) -> None:
    """Refuse an archive whose end record declares too many entries, before zipfile parses them all."""
    end = zipfile._EndRecData(fp)  # the stdlib's own reader of the end record (handles zip64)
    if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > limits.archive_entries:
        raise IngestError(
            f"{name} refused: {end[zipfile._ECD_ENTRIES_TOTAL]} entries, over the limit of {limits.archive_entries} (zip bomb?)"
        )


class _ReserveGuard:
    """Re-checks the disk reserve every RESERVE_CHECK_BYTES written, against the bytes still to come."""

    def __init__(self, folder: Path, left: int, reserve: int):
        self.folder, self.left, self.reserve, self.unchecked = folder, left, reserve, 0

    def wrote(self, n: int) -> None:
        self.left -= n
        self.unchecked += n
        if self.unchecked >= RESERVE_CHECK_BYTES:
            ensure_free(self.folder, self.left, self.reserve)
            self.unchecked = 0


def _unpack_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, name: str, guard: _ReserveGuard) -> None:
    """Write one entry to ``dest`` (fsynced), refusing it if it yields more than its header declares."""
    written = 0
    with archive.open(info) as src, open(dest, "wb") as dst:
        for block in iter(partial(src.read, 1 << 20), b""):
            written += len(block)
            if written > info.file_size:  # headers are not trusted
                raise IngestError(
                    f"{name} refused: entry {info.filename!r} unpacks to more than its declared "
                    f"{info.file_size} bytes (zip bomb?)"
                )
            dst.write(block)
            guard.wrote(len(block))
        dst.flush()
        os.fsync(dst.fileno())


def _publish(partial_dir: Path, target: Path) -> None:
    """Rename a finished extraction into place (durably); a concurrent twin that won is kept."""
    try:
        os.rename(partial_dir, target)
    except OSError:
        if not target.is_dir():
            raise
    fsync_dir(target.parent)


def _checked_entries(archive: zipfile.ZipFile, name: str, limits: Limits) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The file entries to extract, after refusing the whole archive if any entry is unsafe."""
    infos = archive.infolist()
    if len(infos) > limits.archive_entries:
        raise IngestError(f"{name} refused: {len(infos)} entries, over the limit of {limits.archive_entries} (zip bomb?)")
    entries = []
    total = 0
    for info in infos:
        raw = info.filename.replace("\\", "/")
        relative = PurePosixPath(raw)
        if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
            raise IngestError(f"{name} refused: entry {info.filename!r} has an absolute path")
        if ".." in relative.parts:
            raise IngestError(f"{name} refused: entry {info.filename!r} points outside the archive folder (zip slip)")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IngestError(f"{name} refused: entry {info.filename!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise IngestError(f"{name} refused: entry {info.filename!r} is encrypted")
        if info.file_size > RATIO_MIN_BYTES and info.file_size > limits.archive_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise IngestError(
                f"{name} refused: entry {info.filename!r} compresses {ratio:.0f}:1, over the "
                f"{limits.archive_ratio:g}:1 limit (zip bomb?)"
            )
        total += info.file_size
        if info.is_dir() or any(part.startswith(".") or part == "__MACOSX" for part in relative.parts):
            continue
        entries.append((info, relative))
    if total > limits.archive_bytes:
        raise IngestError(
            f"{name} refused: it would unpack to {total / 2**20:.0f} MiB, over the "
            f"{limits.archive_bytes / 2**20:.0f} MiB limit (zip bomb?)"
        )
    return entries


def _read_csv(csv_path: Path, allowed: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """Paths listed in a CSV, inside and outside the data roots: the ``path`` column, else the
    first column (relative paths are resolved against the CSV's folder). A first row without a
    ``path`` column is a header when its first cell is neither a file nor a name with a
    suffix (a cell outside the data roots is not looked at: only its suffix counts)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise IngestError(f"cannot read the list {csv_path.name}: {e}") from e
    if not rows:
        return [], []
    header = [cell.strip().lower() for cell in rows[0]]
    column = header.index("path") if "path" in header else 0
    first = csv_path.parent / Path(rows[0][0].strip()).expanduser()
    if "path" in header or not (first.suffix or (allowed(first) and first.is_file())):
        rows = rows[1:]
    inside: list[str] = []
    outside: list[str] = []
    for cell in (row[column].strip() for row in rows if column < len(row)):
        if not cell:
            continue
        listed = csv_path.parent / Path(cell).expanduser()
        real = os.path.realpath(listed)
        if allowed(real):
            inside.append(real)
        else:  # named as listed (normalised), so the row says nothing about what is there
            outside.append(os.path.normpath(listed))
    return inside, outside


def _worker_count(workers: int | None, n_files: int) -> int:
    if n_files < POOL_MIN_FILES:
        return 1
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, workers)


def _map_in_order(
    fn: Callable[[list[str]], list[dict[str, Any]]], tasks: list[list[str]], workers: int
) -> Iterator[list[dict[str, Any]]]:
    """fn over tasks, results in task order; on a process pool when workers > 1, with a
    bounded number of tasks in flight so that stopping early wastes little work."""
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        queue = iter(tasks)
        in_flight: deque[Future] = deque(pool.submit(fn, task) for task in islice(queue, 4 * workers))
        try:
            while in_flight:
                rows = in_flight.popleft().result()
                in_flight.extend(pool.submit(fn, task) for task in islice(queue, 1))
                yield rows
        finally:
            for future in in_flight:
                future.cancel()


def _pool_context() -> BaseContext:
    """fork starts workers in milliseconds and needs nothing from ``__main__``, but is unsafe
    once the process runs other threads (the app ingests on a job thread). Then forkserver,
    with this module preloaded so that only the first pool of a process pays for imports."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])
        return context
    return multiprocessing.get_context("spawn")


def _inspect_files(paths: list[str], thumbs_dir: Path, max_pixels: int, reserve: int) -> list[dict[str, Any]]:
    ensure_free(thumbs_dir, len(paths) * THUMBNAIL_BYTES, reserve)  # once per task: the thumbnails keep the reserve
    return [_inspect(path, thumbs_dir, max_pixels) for path in paths]


def _inspect(path: str, thumbs_dir: Path, max_pixels: int) -> dict[str, Any]:
    """One image row: hash, size, mtime, dimensions; rejected with a reason if it fails.

    Writes the thumbnail of a good image. A failure to write it (disk full, permissions)
    is not the file's fault and propagates.
    """
    row: dict[str, Any] = {"path": path, "status": "ok"}
    try:
        info = os.stat(path)
        row.update(size=info.st_size, mtime=info.st_mtime)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("unreadable", "not a regular file")
        with open(path, "rb") as fp:
            row["sha256"] = _sha256(fp)
            fp.seek(0)
            decoded = read_image(fp, max_pixels, draft_size=THUMBNAIL_SIZE)
    except OSError as e:
        return {**row, "status": "rejected", "reason": "unreadable", "detail": e.strerror or str(e)}
    except ImageRejected as e:
        return {**row, "status": "rejected", "reason": e.reason, "detail": e.detail}
    row["width"], row["height"] = decoded.source_size
    thumb = thumbnail_path(thumbs_dir, row["sha256"])
    if not thumb.exists():  # a cache, rebuilt from the image: not worth an fsync per file
        atomic_write_bytes(thumb, make_thumbnail(decoded.image, THUMBNAIL_SIZE), fsync=False)
    return row


class _Deduplicator:
    """Turns 'ok' rows whose content is already in the store, or earlier in this run, into
    'duplicate' rejections that name the original."""

    def __init__(self, store: Store):
        self.store = store
        self.stored = store.known_hashes()  # sha256 -> image id
        self.this_run: dict[str, str] = {}  # sha256 -> path

    def mark(self, rows: list[dict[str, Any]]) -> None:
        ok = [r for r in rows if r["status"] == "ok"]
        stored_paths = self.store.image_paths({self.stored[r["sha256"]] for r in ok if r["sha256"] in self.stored})
        for row in ok:
            sha = row["sha256"]
            original = stored_paths.get(self.stored[sha]) if sha in self.stored else self.this_run.get(sha)
            if original is None:
                self.this_run[sha] = row["path"]
            else:
                row.update(status="rejected", reason="duplicate", detail=f"same content as {original}")


def _tally(out: IngestReport, rows: list[dict[str, Any]]) -> None:
    reasons = Counter(r["reason"] for r in rows if r["status"] == "rejected")
    out.added += sum(r["status"] == "ok" for r in rows)
    out.duplicates += reasons["duplicate"]
    out.rejected = dict(Counter(out.rejected) + reasons)
    out.rejected_files.extend((r["path"], r["reason"], r["detail"]) for r in rows if r["status"] == "rejected")


def _sha256(fp: Any) -> str:
    digest = hashlib.sha256()
    for block in iter(partial(fp.read, 1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _changed_rejections(rejected: dict[str, tuple[int | None, float | None]], paths: list[str]) -> list[str]:
    """Those of ``paths`` (inside the data roots: they are stat'ed) that were rejected and whose file has changed since."""
    changed = []
    for path in paths:
        if path not in rejected:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_size, st.st_mtime) != rejected[path]:
            changed.append(path)
    return changed
