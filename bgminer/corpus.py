"""Ingest: turn folders, files, .zip archives and .csv lists into image rows in the store.

Each file is hashed (sha256), validated by a full decode and thumbnailed; images stay where
they are (only zip contents are extracted, into the project's uploads folder). Worker
processes inspect files and return rows; the main process commits them in chunks, so a
killed or cancelled run keeps what it committed and the next run resumes after it.
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

from .imageio import MAX_PIXELS_DEFAULT, ImageRejected, make_thumbnail, read_image
from .progress import CancelToken, ProgressFn, RateMeter, check, report
from .store import Store

THUMBNAIL_SIZE = 256
CHUNK_SIZE = 256  # files per store transaction: the unit that survives a kill or a cancel
TASK_SIZE = 32  # files per worker task: small enough to keep every worker busy
POOL_MIN_FILES = 64  # below this, worker start-up costs more than it saves
MAX_ZIP_BYTES = 16 * 2**30  # total uncompressed size an archive may unpack to
# Folders are walked for these suffixes; unsupported image types are included so that they
# are reported as such instead of silently skipped. Explicit files are taken as they are.
ACCEPTED_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
UNSUPPORTED_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".psd", ".svg", ".ppm", ".pgm", ".tga"})
WALKED_SUFFIXES = ACCEPTED_SUFFIXES | UNSUPPORTED_SUFFIXES


class IngestError(ValueError):
    """A source that cannot be ingested at all (missing, unsafe or damaged archive, bad CSV)."""


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
    """Where the thumbnail of an image with this content hash lives (content-addressed)."""
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
) -> IngestReport:
    """Add every image file under ``sources`` to the store, with a thumbnail each.

    Files already in the store are skipped, except rejected ones whose size or mtime changed
    since (fixed or re-copied files are retried); bad files and exact duplicates become
    'rejected' rows with a reason. Raises IngestError (before anything is stored) for a
    source that cannot be read, and progress.Cancelled between chunks when cancelled.
    """
    started = time.perf_counter()
    candidates, ignored = collect_files(sources, Path(uploads_dir))
    known = store.known_files()
    changed = _changed_rejections(store, [p for p in candidates if p in known])
    if changed:
        store.forget_rejected(changed)  # retried below: the file changed since it was rejected
        known = {p: v for p, v in known.items() if p not in set(changed)}
    todo = [p for p in candidates if p not in known]
    out = IngestReport(skipped_known=len(candidates) - len(todo), ignored=ignored, total_seen=len(candidates))
    dedup = _Deduplicator(store)
    meter = RateMeter(len(todo))
    report(progress, 0, len(todo), meter.message(0, "files"))
    inspect = partial(_inspect_files, thumbs_dir=Path(thumbs_dir), max_pixels=max_pixels)
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


def collect_files(sources: Sequence[str | Path], uploads_dir: Path) -> tuple[list[str], int]:
    """Resolved paths of the candidate files under ``sources`` (in order, each once), and the
    number of non-image files skipped in folders. Zip archives are extracted first."""
    files: list[str] = []
    ignored = 0
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise IngestError(f"no such file or folder: {source}")
        path = path.resolve()
        if path.is_dir():
            found, skipped = _walk(path)
        elif path.suffix.lower() == ".zip":
            found, skipped = _walk(extract_zip(path, uploads_dir))
        elif path.suffix.lower() == ".csv":
            found, skipped = _read_csv(path), 0
        else:
            found, skipped = [str(path)], 0
        files.extend(found)
        ignored += skipped
    return list(dict.fromkeys(files)), ignored


def extract_zip(zip_path: Path, uploads_dir: Path, max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Unpack an archive into ``uploads_dir/<stem>-<sha256[:8]>/`` (once; later calls reuse it).

    Every entry is checked before anything is written: absolute paths, ``..`` components,
    symlinks, encrypted entries and archives that unpack to more than ``max_bytes`` (or than
    the free disk space) are refused with IngestError.
    """
    with open(zip_path, "rb") as fp:
        digest = _sha256(fp)
    target = uploads_dir / f"{zip_path.stem}-{digest[:8]}"
    if target.is_dir():
        return target
    try:
        with zipfile.ZipFile(zip_path) as archive:
            entries = _checked_entries(archive, zip_path.name, max_bytes, uploads_dir)
            uploads_dir.mkdir(parents=True, exist_ok=True)
            partial_dir = uploads_dir / f".{target.name}.partial-{os.getpid()}"
            try:
                for info, relative in entries:
                    dest = partial_dir.joinpath(*relative.parts)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(info) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                partial_dir.mkdir(exist_ok=True)  # an archive without files still gets its folder
                os.replace(partial_dir, target)
            finally:
                shutil.rmtree(partial_dir, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise IngestError(f"{zip_path.name} is not a readable zip archive: {e}") from e
    return target


def _checked_entries(archive: zipfile.ZipFile, name: str, max_bytes: int, uploads_dir: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The file entries to extract, after refusing the whole archive if any entry is unsafe."""
    entries = []
    total = 0
    for info in archive.infolist():
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
        total += info.file_size
        if info.is_dir() or any(part.startswith(".") or part == "__MACOSX" for part in relative.parts):
            continue
        entries.append((info, relative))
    if total > max_bytes:
        raise IngestError(f"{name} refused: it would unpack to {total / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit (zip bomb?)")
    free = shutil.disk_usage(_existing_parent(uploads_dir)).free
    if total > free:
        raise IngestError(f"{name} needs {total / 2**20:.0f} MiB to unpack but only {free / 2**20:.0f} MiB are free")
    return entries


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _walk(root: Path) -> tuple[list[str], int]:
    """Image files under ``root``: sorted, depth-first, hidden entries skipped, symlinked
    folders followed once each (so link loops end)."""
    files: list[str] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # a folder we may not list holds nothing we could ingest
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = os.path.realpath(entry.path) if entry.is_symlink() else entry.path
            if entry.is_dir():
                subfolders.append(path)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in WALKED_SUFFIXES:
                files.append(path)
            else:
                ignored += 1
        stack.extend(reversed(subfolders))
    return files, ignored


def _read_csv(csv_path: Path) -> list[str]:
    """Paths listed in a CSV: the ``path`` column, else the first column (relative paths
    are resolved against the CSV's folder). A first row without a ``path`` column is a
    header when its first cell is neither an existing file nor a name with a suffix."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise IngestError(f"cannot read the list {csv_path.name}: {e}") from e
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    column = header.index("path") if "path" in header else 0
    first = csv_path.parent / rows[0][0].strip()
    if "path" in header or not (first.suffix or first.is_file()):
        rows = rows[1:]
    cells = (row[column].strip() for row in rows if column < len(row))
    return [os.path.realpath(csv_path.parent / Path(cell).expanduser()) for cell in cells if cell]


def _worker_count(workers: int | None, n_files: int) -> int:
    if n_files < POOL_MIN_FILES:
        return 1
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, workers)


def _map_in_order(fn: Callable[[list[str]], list[dict[str, Any]]], tasks: list[list[str]], workers: int) -> Iterator[list[dict[str, Any]]]:
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


def _inspect_files(paths: list[str], thumbs_dir: Path, max_pixels: int) -> list[dict[str, Any]]:
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
    if not thumb.exists():
        _write_atomic(thumb, make_thumbnail(decoded.image, THUMBNAIL_SIZE))
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


def _write_atomic(dest: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so readers never see a partial file."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
    except FileNotFoundError:  # first file of its folder
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
    os.replace(tmp, dest)


def _changed_rejections(store: Store, paths: list[str]) -> list[str]:
    """Known paths that were rejected and whose file has changed since."""
    rejected = store.rejected_files()
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
