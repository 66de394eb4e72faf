"""Consistent online copies of a project (``bgminer backup PROJECT DEST``), taken while the app
may be writing to it.

What is copied, in this order, so that the copy never refers to a file it lacks:

1. ``bgminer.sqlite`` through SQLite's online backup API: one consistent snapshot of images,
   labels, models and jobs, whatever other processes commit meanwhile.
2. The checkpoint of every model version ready in that snapshot (a checkpoint is on disk before
   its version is marked ready).
3. The scores of the active versions (their current generation) and their indexes (an index
   missing from the copy is rebuilt from the scores on first use).
4. Optionally the thumbnails and the feature cache. Features are copied under the cache's lock
   after the snapshot, so every row the snapshot marks embedded is in them; without them the
   restored project finds its embedded rows missing at first use and re-embeds them.

Images, uploaded ones included, stay referenced by their absolute paths, as in the project.
Everything is written into ``DEST.partial``, fsynced, and renamed to ``DEST`` at the end.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from .fsutil import ensure_free, fsync_dir
from .progress import ProgressFn, report
from .scoring import FILES as VERSION_FILES
from .scoring import version_dir
from .store import Store

if TYPE_CHECKING:
    from .project import Project

INTERRUPTED = "interrupted: still running when the backup was taken"


class BackupError(ValueError):
    """The backup cannot be written where it was asked for."""


@dataclass
class BackupReport:
    dest: Path
    files: int  # files copied besides the database
    bytes: int  # bytes written, database included
    models: list[int]  # model versions whose checkpoints were copied
    active_versions: list[int]  # versions whose scores were copied
    with_features: bool
    with_thumbnails: bool
    seconds: float


def backup_project(
    project: Project,
    dest: str | Path,
    with_features: bool = False,
    with_thumbnails: bool = False,
    progress: ProgressFn | None = None,
) -> BackupReport:
    """Copy ``project`` into the new folder ``dest`` (which must not exist or be empty); see the module docstring."""
    from .project import DB_NAME

    started = time.perf_counter()
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder; back up into a new folder")
    if dest == project.root or project.root in dest.parents:
        raise BackupError(f"{dest} is inside the project {project.root}; back up to a folder outside it")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a backup that failed
    partial.mkdir(parents=True)
    copier = _Copier(project.root, partial)
    try:
        report(progress, 0, 4, "database")
        ensure_free(partial, project.store.path.stat().st_size)
        _snapshot_database(project.store.path, partial / DB_NAME)
        copier.bytes += (partial / DB_NAME).stat().st_size
        snapshot = Store(partial / DB_NAME)
        try:
            records = snapshot.models()
            active = {
                m.id: m for m in [snapshot.active_model(), *map(snapshot.active_model, snapshot.categories())] if m is not None
            }
        finally:
            snapshot.close()

        report(progress, 1, 4, "checkpoints")
        models = []
        for record in records:
            if record.state == "ready" and record.checkpoint:
                source = project.checkpoint_path(record)
                copier.copy_together(lambda source=source: [source])
                models.append(record.id)

        report(progress, 2, 4, "scores and indexes")
        for model_id in sorted(active):
            if copier.copy_together(lambda model_id=model_id: _version_files(project.scores_dir, model_id)) is not None:
                copier.copy_together(lambda model_id=model_id: _index_files(project.finder.index_path(model_id)))

        report(progress, 3, 4, "features and thumbnails")
        if with_thumbnails and project.thumbs_dir.exists():
            for source in sorted(p for p in project.thumbs_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
                copier.copy_together(lambda source=source: [source])
        if with_features:
            cache = project.features
            with cache.lock():
                copier.copy_together(lambda: [cache.path(n) for n in cache.specs if cache.path(n).exists()])
        report(progress, 4, 4, "done")

        os.sync()  # every file of the copy durable before it takes its name
        os.rename(partial, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BackupReport(
        dest=dest,
        files=copier.files,
        bytes=copier.bytes,
        models=models,
        active_versions=sorted(active),
        with_features=with_features,
        with_thumbnails=with_thumbnails,
        seconds=time.perf_counter() - started,
    )


def _snapshot_database(source: Path, target: Path) -> None:
    """One consistent copy of the live database (SQLite's online backup, in one step); work that was
    still running in the source is marked interrupted in the copy, where nothing will finish it."""
    with ExitStack() as stack:
        src = sqlite3.connect(source, timeout=60)
        stack.callback(src.close)
        dst = sqlite3.connect(target)
        stack.callback(dst.close)
        src.backup(dst)
        with dst:
            dst.execute("UPDATE models SET state = 'failed', error = ? WHERE state = 'training'", (INTERRUPTED,))
            dst.execute(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE state IN ('queued', 'running')",
                (INTERRUPTED, time.time()),
            )


def _version_files(scores_dir: Path, model_id: int) -> list[Path] | None:
    folder = version_dir(scores_dir, model_id)
    return None if folder is None else [folder / name for name in VERSION_FILES]


def _index_files(path: Path) -> list[Path] | None:
    from .index import side_files

    return [path, *side_files(path)] if path.exists() else None


class _Copier:
    """Copies groups of files that must come from one moment (a version's arrays, an index and its codes)
    to the same place under the backup as under the project: every file of a group is opened before
    any is copied, and the group is listed again when a newer one replaced it meanwhile."""

    def __init__(self, source_root: Path, target_root: Path):
        self.source_root, self.target_root, self.files, self.bytes = source_root, target_root, 0, 0

    def copy_together(self, list_files: Callable[[], list[Path] | None], attempts: int = 20) -> Path | None:
        """Copy the files ``list_files()`` names (all in one folder); returns the folder written, None when it names none."""
        for _ in range(attempts):
            try:
                sources = list_files()
                if not sources:
                    return None
                with ExitStack() as stack:
                    opened = [(path, stack.enter_context(open(path, "rb"))) for path in sources]
                    folder = self.target_root / sources[0].parent.relative_to(self.source_root)
                    folder.mkdir(parents=True, exist_ok=True)
                    for path, f in opened:
                        self._write(f, folder / path.name)
                return folder
            except FileNotFoundError:  # replaced by a newer generation while we listed or opened it: list again
                continue
        raise BackupError(f"files kept changing while being copied: {sources}")

    def _write(self, source: BinaryIO, target: Path) -> None:
        size = os.fstat(source.fileno()).st_size
        ensure_free(target.parent, size)
        with open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        self.files += 1
        self.bytes += size
