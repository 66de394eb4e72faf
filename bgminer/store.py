"""The project's durable state in one SQLite file (WAL): images, categories, label events,
model versions and jobs.

Labels are an append-only event log; the current label of an (image, category) pair is
its latest event, so history and undo come for free. Every write commits before the
call returns.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .records import JobRecord, LabelEvent, ModelRecord, job_record, label_event, model_record
from .schema import LABEL_SOURCES, LABEL_VALUES, StoreError, check_category_name, migrate
from .settings import local_user

INTERRUPTED = "interrupted: the process running it ended"


class UndoConflict(StoreError):
    """The decision to undo is no longer its image's current label: someone changed it since."""

    def __init__(self, message: str, image_id: int, changed_by: str):
        super().__init__(message)
        self.image_id = image_id
        self.changed_by = changed_by


class JobBusy(StoreError):
    """A job that must run alone on the project is already active."""

    def __init__(self, message: str, job_id: int, kind: str):
        super().__init__(message)
        self.job_id = job_id
        self.kind = kind


class Store:
    """Thread-safe handle on a project's SQLite database (one connection per thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        migrate(self.db, self.path)

    # -- connections ---------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front and commits on exit."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- meta ----------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # -- images --------------------------------------------------------------------------
    def known_files(self) -> dict[str, tuple[int | None, float | None]]:
        """path -> (size, mtime) for every file ever seen, so re-ingest skips them cheaply."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT path, size, mtime FROM images")}

    def rejected_files(self) -> dict[str, tuple[int | None, float | None]]:
        """path -> (size, mtime) of rejected files that carry no labels (safe to forget and retry)."""
        rows = self.db.execute(
            "SELECT path, size, mtime FROM images i WHERE status = 'rejected'"
            " AND NOT EXISTS (SELECT 1 FROM label_events e WHERE e.image_id = i.id)"
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def forget_rejected(self, paths: Sequence[str]) -> None:
        with self.write() as db:
            db.executemany("DELETE FROM images WHERE path = ? AND status = 'rejected'", [(p,) for p in paths])

    def known_hashes(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.execute("SELECT sha256, id FROM images WHERE status = 'ok'")}

    def add_images(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert image rows (keys as the images table) in one transaction; returns their ids."""
        now = time.time()
        ids = []
        with self.write() as db:
            for r in rows:
                cur = db.execute(
                    "INSERT INTO images (path, sha256, size, mtime, width, height, status, reason, detail, added_at)"
                    " VALUES (:path, :sha256, :size, :mtime, :width, :height, :status, :reason, :detail, :added_at)",
                    {"sha256": None, "size": None, "mtime": None, "width": None, "height": None,
                     "reason": None, "detail": None, **r, "added_at": now},
                )
                ids.append(cur.lastrowid)
        return ids

    def image_count(self, status: str | None = "ok") -> int:
        if status is None:
            return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM images WHERE status = ?", (status,)).fetchone()[0]

    def image_ids(self, embedded: bool | None = None) -> list[int]:
        """Ids of accepted images, ascending; optionally only (un)embedded ones."""
        sql = "SELECT id FROM images WHERE status = 'ok'"
        if embedded is not None:
            sql += f" AND embedded = {int(embedded)}"
        return [r[0] for r in self.db.execute(sql + " ORDER BY id")]

    def image(self, image_id: int) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise StoreError(f"no image with id {image_id}")
        return row

    def image_paths(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: r[1] for r in self.db.execute(q, chunk)})
        return out

    def image_id_for_path(self, path: str | Path) -> int | None:
        row = self.db.execute("SELECT id FROM images WHERE path = ? AND status = 'ok'", (str(path),)).fetchone()
        return row[0] if row else None

    def images(self, status: str = "ok", limit: int | None = None, offset: int = 0) -> list[sqlite3.Row]:
        sql = "SELECT * FROM images WHERE status = ? ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return self.db.execute(sql, (status,)).fetchall()

    def rejected_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT reason, COUNT(*) FROM images WHERE status = 'rejected' GROUP BY reason")
        return {r[0]: r[1] for r in rows}

    def mark_embedded(self, ids: Sequence[int]) -> None:
        with self.write() as db:
            db.executemany("UPDATE images SET embedded = 1 WHERE id = ?", [(int(i),) for i in ids])

    def unmark_embedded(self, ids: Sequence[int]) -> None:
        """The next embedding redoes these images (their cached rows were found missing)."""
        with self.write() as db:
            db.executemany("UPDATE images SET embedded = 0 WHERE id = ?", [(int(i),) for i in ids])

    def reject_image(self, image_id: int, reason: str, detail: str) -> None:
        """Mark an ingested image unusable (e.g. the file changed or vanished before embedding)."""
        with self.write() as db:
            db.execute(
                "UPDATE images SET status = 'rejected', reason = ?, detail = ?, embedded = 0 WHERE id = ?",
                (reason, detail, image_id),
            )

    def embedded_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images WHERE status = 'ok' AND embedded = 1").fetchone()[0]

    # -- categories ----------------------------------------------------------------------
    def add_category(self, name: str) -> int:
        """The id of category ``name`` (stripped), created when new; a new name must pass :func:`check_category_name`."""
        name = name.strip()
        with self.write() as db:
            row = db.execute("SELECT id FROM categories WHERE name = ?", (name,)).fetchone()
            if row:  # names from before validation stay usable
                return row[0]
            name = check_category_name(name)
            return db.execute("INSERT INTO categories (name, created_at) VALUES (?, ?)", (name, time.time())).lastrowid

    def rename_category(self, old: str, new: str) -> None:
        """Rename a category; its labels, models and validation sample follow it (all keyed by id)."""
        new = check_category_name(new)
        cid = self.category_id(old)
        with self.write() as db:
            if db.execute("SELECT 1 FROM categories WHERE name = ?", (new,)).fetchone():
                raise StoreError(f"category {new!r} already exists")
            db.execute("UPDATE categories SET name = ? WHERE id = ?", (new, cid))

    def categories(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM categories ORDER BY id")]

    def category_id(self, name: str) -> int:
        cid = self._find_category(name)
        if cid is None:
            known = ", ".join(self.categories()) or "none yet"
            raise StoreError(f"unknown category {name!r} (known: {known})")
        return cid

    def _find_category(self, name: str) -> int | None:
        row = self.db.execute("SELECT id FROM categories WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    # -- labels --------------------------------------------------------------------------
    def add_labels(
        self,
        category: str,
        labels: Sequence[tuple[int, str]],
        source: str = "user",
        author: str | None = None,
    ) -> list[int]:
        """Append label events ``(image_id, value)`` by ``author`` (default: the OS user); durable before returning."""
        author = local_user() if author is None else author
        if source not in LABEL_SOURCES:
            raise StoreError(f"label source must be one of {LABEL_SOURCES}, not {source!r}")
        cid = self.category_id(category)
        now = time.time()
        ids = []
        with self.write() as db:
            for image_id, value in labels:
                if value not in LABEL_VALUES:
                    raise StoreError(f"label value must be one of {LABEL_VALUES}, not {value!r}")
                if db.execute("SELECT 1 FROM images WHERE id = ? AND status = 'ok'", (int(image_id),)).fetchone() is None:
                    raise StoreError(f"no ingested image with id {image_id}")
                cur = db.execute(
                    "INSERT INTO label_events (image_id, category_id, value, source, author, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (int(image_id), cid, value, source, author, now),
                )
                ids.append(cur.lastrowid)
        return ids

    def undo(self, category: str, author: str) -> LabelEvent | None:
        """Revert ``author``'s newest not-yet-undone decision in ``category``, if it is still its image's current label.

        Appends an event that restores the pair's previous value and returns the undone event,
        or None when ``author`` has nothing to undo. Raises :class:`UndoConflict`, changing
        nothing, when someone else's decision on that image is newer (and not undone itself):
        nobody's newer label is ever overwritten.
        """
        cid = self.category_id(category)
        live = "e.undoes IS NULL AND NOT EXISTS (SELECT 1 FROM label_events u WHERE u.undoes = e.id)"
        with self.write() as db:
            row = db.execute(
                "SELECT e.*, c.name AS category FROM label_events e JOIN categories c ON c.id = e.category_id"
                f" WHERE e.category_id = ? AND e.author = ? AND {live} ORDER BY e.id DESC LIMIT 1",
                (cid, author),
            ).fetchone()
            if row is None:
                return None
            newer = db.execute(
                f"SELECT e.author FROM label_events e WHERE e.image_id = ? AND e.category_id = ? AND e.id > ? AND {live}"
                " ORDER BY e.id DESC LIMIT 1",
                (row["image_id"], cid, row["id"]),
            ).fetchone()
            if newer is not None:
                raise UndoConflict(f"{newer[0]} changed #{row['image_id']} since; nothing undone", row["image_id"], newer[0])
            prev = db.execute(
                "SELECT value FROM label_events WHERE image_id = ? AND category_id = ? AND id < ? ORDER BY id DESC LIMIT 1",
                (row["image_id"], cid, row["id"]),
            ).fetchone()
            db.execute(
                "INSERT INTO label_events (image_id, category_id, value, source, author, created_at, undoes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row["image_id"], cid, prev[0] if prev else "cleared", row["source"], author, time.time(), row["id"]),
            )
        return label_event(row)

    def labels(self, category: str) -> dict[int, str]:
        """Current label per image id for one category ('positive' / 'negative')."""
        cid = self.category_id(category)
        rows = self.db.execute("SELECT image_id, value FROM current_labels WHERE category_id = ?", (cid,))
        return {r[0]: r[1] for r in rows}

    def label_authors(self, category: str) -> dict[int, str]:
        """Who made the current label, per image id, for one category."""
        cid = self.category_id(category)
        rows = self.db.execute("SELECT image_id, author FROM current_labels WHERE category_id = ?", (cid,))
        return {r[0]: r[1] for r in rows}

    def label_table(self, category: str | None = None) -> list[sqlite3.Row]:
        """Current labels joined with image paths and category names."""
        sql = (
            "SELECT i.id AS image_id, i.path, c.name AS category, l.value AS label, l.source, l.author,"
            " l.created_at AS updated_at"
            " FROM current_labels l JOIN images i ON i.id = l.image_id JOIN categories c ON c.id = l.category_id"
        )
        args: tuple = ()
        if category is not None:
            sql += " WHERE l.category_id = ?"
            args = (self.category_id(category),)
        return self.db.execute(sql + " ORDER BY c.id, i.id", args).fetchall()

    def label_counts(self) -> dict[str, dict[str, int]]:
        counts = {name: {"positive": 0, "negative": 0} for name in self.categories()}
        rows = self.db.execute(
            "SELECT c.name, l.value, COUNT(*) FROM current_labels l JOIN categories c ON c.id = l.category_id"
            " GROUP BY c.name, l.value"
        )
        for name, value, n in rows:
            counts[name][value] = n
        return counts

    def label_history(self, category: str | None = None, limit: int = 100) -> list[LabelEvent]:
        sql = "SELECT e.*, c.name AS category FROM label_events e JOIN categories c ON c.id = e.category_id"
        args: tuple = ()
        if category is not None:
            sql += " WHERE e.category_id = ?"
            args = (self.category_id(category),)
        rows = self.db.execute(sql + f" ORDER BY e.id DESC LIMIT {int(limit)}", args)
        return [label_event(r) for r in rows]

    def add_skips(self, category: str, author: str, image_ids: Sequence[int]) -> None:
        """Remember that ``author`` skipped these images in review for ``category`` (durable on return)."""
        cid = self.category_id(category)
        now = time.time()
        with self.write() as db:
            for image_id in image_ids:
                if db.execute("SELECT 1 FROM images WHERE id = ? AND status = 'ok'", (int(image_id),)).fetchone() is None:
                    raise StoreError(f"no ingested image with id {image_id}")
                db.execute(
                    "INSERT OR IGNORE INTO skips (category_id, author, image_id, created_at) VALUES (?, ?, ?, ?)",
                    (cid, author, int(image_id), now),
                )

    def skipped(self, category: str, author: str) -> list[int]:
        """The images ``author`` skipped in review for ``category``, ascending."""
        rows = self.db.execute(
            "SELECT image_id FROM skips WHERE category_id = ? AND author = ? ORDER BY image_id",
            (self.category_id(category), author),
        )
        return [r[0] for r in rows]

    # -- models --------------------------------------------------------------------------
    def add_model(self, categories: Sequence[str], mode: str, config: dict, parent_id: int | None) -> int:
        """A new model version in state 'training', owned by this process (see :meth:`fail_orphaned_models`)."""
        with self.write() as db:
            ids = []
            for name in categories:
                row = db.execute("SELECT id FROM categories WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise StoreError(f"unknown category {name!r}")
                ids.append(row[0])
            model_id = db.execute(
                "INSERT INTO models (categories, mode, state, config, parent_id, created_at, pid, host)"
                " VALUES (?, ?, 'training', ?, ?, ?, ?, ?)",
                (json.dumps(list(categories)), mode, json.dumps(config), parent_id, time.time(), os.getpid(),
                 socket.gethostname()),
            ).lastrowid
            db.executemany(
                "INSERT INTO model_categories (model_id, position, category_id) VALUES (?, ?, ?)",
                [(model_id, k, cid) for k, cid in enumerate(ids)],
            )
            return model_id

    def update_model(self, model_id: int, **fields: Any) -> None:
        as_json = ("config", "label_counts", "losses", "metrics")
        cols = {k: json.dumps(v, default=str) if k in as_json else v for k, v in fields.items()}
        with self.write() as db:
            db.execute(f"UPDATE models SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?", (*cols.values(), model_id))

    def model(self, model_id: int) -> ModelRecord:
        rows = self._model_records("WHERE m.id = ?", (int(model_id),))
        if not rows:
            raise StoreError(f"no model version {model_id}")
        return rows[0]

    def models(self) -> list[ModelRecord]:
        return self._model_records()

    def _model_records(self, where: str = "", args: tuple = ()) -> list[ModelRecord]:
        """Model rows (newest first) with their categories' current names, read in one statement."""
        rows = self.db.execute(
            "SELECT m.*, mc.position AS mc_position, mc.category_id AS mc_category_id, c.name AS mc_name FROM models m"
            " LEFT JOIN model_categories mc ON mc.model_id = m.id LEFT JOIN categories c ON c.id = mc.category_id"
            f" {where} ORDER BY m.id DESC, mc.position",
            args,
        ).fetchall()
        grouped: dict[int, tuple[sqlite3.Row, list[tuple[int, int | None, str | None]]]] = {}
        for r in rows:
            _, columns = grouped.setdefault(r["id"], (r, []))
            if r["mc_position"] is not None:
                columns.append((r["mc_position"], r["mc_category_id"], r["mc_name"]))
        return [model_record(r, columns) for r, columns in grouped.values()]

    def active_model(self, category: str | None = None) -> ModelRecord | None:
        """The newest ready model version (that scores ``category``, matched by id, when given)."""
        cid = None if category is None else self._find_category(category)
        if category is not None and cid is None:
            return None
        for m in self.models():
            if m.state == "ready" and (cid is None or cid in m.category_ids):
                return m
        return None

    def fail_orphaned_models(self, reason: str = INTERRUPTED) -> int:
        """Mark failed the model versions left 'training' by a process of this machine that no longer exists."""
        host = socket.gethostname()
        rows = self.db.execute("SELECT id, pid, host FROM models WHERE state = 'training'").fetchall()
        dead = [r["id"] for r in rows if r["pid"] is None or (r["host"] in (None, host) and not _process_alive(r["pid"]))]
        if dead:
            with self.write() as db:
                db.executemany(
                    "UPDATE models SET state = 'failed', error = ? WHERE id = ? AND state = 'training'",
                    [(reason, i) for i in dead],
                )
        return len(dead)

    # -- jobs ----------------------------------------------------------------------------
    def add_job(self, kind: str, params: dict | None = None, exclusive: Sequence[str] = ()) -> int:
        """A queued job row. With ``exclusive``, raises :class:`JobBusy` instead while a job of one of
        those kinds is active in a live process (checked and inserted in one transaction, so it
        holds across processes)."""
        with self.write() as db:
            if exclusive:
                marks = ", ".join("?" * len(exclusive))
                rows = db.execute(
                    f"SELECT id, kind, pid FROM jobs WHERE state IN ('queued', 'running') AND kind IN ({marks})",
                    tuple(exclusive),
                )
                busy = next((r for r in rows if r["pid"] is not None and _process_alive(r["pid"])), None)
                if busy is not None:
                    message = f"a {busy['kind']} job (#{busy['id']}) is already running on this project"
                    raise JobBusy(message, busy["id"], busy["kind"])
            return db.execute(
                "INSERT INTO jobs (kind, state, params, started_at, pid) VALUES (?, 'queued', ?, ?, ?)",
                (kind, json.dumps(params or {}, default=str), time.time(), os.getpid()),
            ).lastrowid

    def update_job(self, job_id: int, **fields: Any) -> None:
        cols = {k: json.dumps(v, default=str) if k in ("params", "result") else v for k, v in fields.items()}
        if cols.get("state") in ("done", "failed", "cancelled"):
            cols.setdefault("finished_at", time.time())
        with self.write() as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?", (*cols.values(), job_id))

    def request_cancel(self, job_id: int) -> None:
        with self.write() as db:
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def job(self, job_id: int) -> JobRecord:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id}")
        return job_record(row)

    def jobs(self, limit: int = 20, active_only: bool = False) -> list[JobRecord]:
        sql = "SELECT * FROM jobs"
        if active_only:
            sql += " WHERE state IN ('queued', 'running')"
        return [job_record(r) for r in self.db.execute(sql + f" ORDER BY id DESC LIMIT {int(limit)}")]

    def fail_orphaned_jobs(self, reason: str = INTERRUPTED) -> int:
        """Mark failed the jobs left queued/running by a process that no longer exists; returns how many."""
        rows = self.db.execute("SELECT id, pid FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        dead = [r["id"] for r in rows if r["pid"] is None or not _process_alive(r["pid"])]
        with self.write() as db:
            db.executemany(
                "UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?",
                [(reason, time.time(), job_id) for job_id in dead],
            )
        return len(dead)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
