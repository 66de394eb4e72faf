"""What the store's SQLite file holds and accepts: the tables as a list of migrations (applied by
:func:`migrate` when a :class:`bgminer.store.Store` opens the file), the values their CHECK
constraints allow, the rule for category names, and :class:`StoreError` for what is refused.
"""
from __future__ import annotations

import sqlite3
import unicodedata
from pathlib import Path

LABEL_VALUES = ("positive", "negative", "cleared")
LABEL_SOURCES = ("user", "import", "review")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
CATEGORY_NAME_MAX = 64
CATEGORY_NAME_PUNCTUATION = " -_.'(),+&"  # besides unicode letters and digits


class StoreError(ValueError):
    """Bad request against the store (unknown category, unknown image, a value the schema refuses, ...)."""


# Each entry migrates the schema from version i to i+1; never edit a shipped entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        sha256 TEXT,
        size INTEGER,
        mtime REAL,
        width INTEGER,
        height INTEGER,
        status TEXT NOT NULL CHECK (status IN ('ok', 'rejected')),
        reason TEXT,
        detail TEXT,
        embedded INTEGER NOT NULL DEFAULT 0,
        added_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX images_ok_sha256 ON images (sha256) WHERE status = 'ok';
    CREATE INDEX images_status ON images (status, embedded);
    CREATE TABLE categories (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE label_events (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images (id),
        category_id INTEGER NOT NULL REFERENCES categories (id),
        value TEXT NOT NULL CHECK (value IN ('positive', 'negative', 'cleared')),
        source TEXT NOT NULL CHECK (source IN ('user', 'import', 'review')),
        author TEXT NOT NULL,
        created_at REAL NOT NULL,
        undoes INTEGER REFERENCES label_events (id)
    );
    CREATE INDEX label_events_pair ON label_events (category_id, image_id, id);
    CREATE VIEW current_labels AS
        SELECT e.image_id, e.category_id, e.value, e.source, e.author, e.created_at
        FROM label_events e
        WHERE e.id = (SELECT MAX(id) FROM label_events x
                      WHERE x.image_id = e.image_id AND x.category_id = e.category_id)
          AND e.value != 'cleared';
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        categories TEXT NOT NULL,
        mode TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('training', 'ready', 'failed', 'cancelled')),
        config TEXT NOT NULL DEFAULT '{}',
        label_counts TEXT NOT NULL DEFAULT '{}',
        losses TEXT NOT NULL DEFAULT '[]',
        metrics TEXT NOT NULL DEFAULT '{}',
        parent_id INTEGER REFERENCES models (id),
        checkpoint TEXT,
        train_seconds REAL,
        error TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        progress REAL NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        result TEXT NOT NULL DEFAULT '{}',
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        started_at REAL,
        finished_at REAL,
        error TEXT
    );
    """,
    # 2: the process running a job, so only jobs whose process died are marked orphaned.
    """
    ALTER TABLE jobs ADD COLUMN pid INTEGER;
    """,
    # 3: models and validation samples keyed by category id, so a rename carries them; the
    # process (pid, host) training a model, so a round killed mid-way is failed at the next open.
    # models.categories keeps the names at training time (the checkpoint's); position k of a
    # model is category_id's current name. A name that matches no category stays unmapped (NULL).
    """
    CREATE TABLE model_categories (
        model_id INTEGER NOT NULL REFERENCES models (id),
        position INTEGER NOT NULL,
        category_id INTEGER REFERENCES categories (id),
        PRIMARY KEY (model_id, position)
    );
    CREATE INDEX model_categories_category ON model_categories (category_id, model_id);
    INSERT INTO model_categories (model_id, position, category_id)
        SELECT m.id, CAST(j.key AS INTEGER), (SELECT c.id FROM categories c WHERE c.name = j.value)
        FROM models m, json_each(m.categories) j;
    UPDATE meta SET key = 'validation#' || (SELECT c.id FROM categories c WHERE c.name = substr(meta.key, 12))
        WHERE substr(key, 1, 11) = 'validation:' AND substr(key, 12) IN (SELECT name FROM categories);
    DELETE FROM meta WHERE substr(key, 1, 11) = 'validation:';
    UPDATE meta SET key = 'validation:' || substr(key, 12) WHERE substr(key, 1, 11) = 'validation#';
    ALTER TABLE models ADD COLUMN pid INTEGER;
    ALTER TABLE models ADD COLUMN host TEXT;
    """,
    # 4: review skips per person and category, so a skipped image stays out of that person's
    # queue across reloads, tabs and the CLI (a skip is no label: others still see the image).
    """
    CREATE TABLE skips (
        category_id INTEGER NOT NULL REFERENCES categories (id),
        author TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images (id),
        created_at REAL NOT NULL,
        PRIMARY KEY (category_id, author, image_id)
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def split_sql(script: str) -> list[str]:
    """The statements of ``script``, one string each."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s]


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the database at ``path`` (open as ``db``) to :data:`SCHEMA_VERSION`, one transaction per step."""
    while True:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{path} was written by a newer bgminer (schema {version} > {SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        if db.execute("PRAGMA user_version").fetchone()[0] != version:  # another process migrated
            db.execute("ROLLBACK")
            continue
        try:
            for statement in split_sql(MIGRATIONS[version]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def check_category_name(name: str) -> str:
    """``name`` stripped, or StoreError unless it is 1-64 unicode letters, digits, spaces and ``- _ . ' ( ) , + &``."""
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise StoreError("a category needs a non-empty name")
    if len(name) > CATEGORY_NAME_MAX:
        raise StoreError(f"a category name has at most {CATEGORY_NAME_MAX} characters ({len(name)} given)")
    bad = sorted({ch for ch in name if not _name_char(ch)})
    if bad:
        shown = " ".join(repr(ch) for ch in bad)
        allowed = " ".join(CATEGORY_NAME_PUNCTUATION.strip())
        raise StoreError(f"a category name may hold letters, digits, spaces and {allowed} only, not {shown}")
    return name


def _name_char(ch: str) -> bool:
    kind = unicodedata.category(ch)
    return kind.startswith("L") or kind == "Nd" or ch in CATEGORY_NAME_PUNCTUATION
