import multiprocessing as mp

import pytest

from bgminer.schema import SCHEMA_VERSION, StoreError
from bgminer.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "p.sqlite")
    s.add_images([{"path": f"/img/{i}.png", "sha256": str(i), "status": "ok"} for i in range(5)])
    s.add_category("cat")
    return s


def test_schema_version_and_wal(tmp_path):
    s = Store(tmp_path / "p.sqlite")
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopening_keeps_data(tmp_path, store):
    store.add_labels("cat", [(1, "positive")])
    store.close()
    assert Store(tmp_path / "p.sqlite").labels("cat") == {1: "positive"}


def test_current_label_is_latest_event(store):
    store.add_labels("cat", [(1, "positive"), (2, "negative")])
    store.add_labels("cat", [(1, "negative")])
    assert store.labels("cat") == {1: "negative", 2: "negative"}
    assert len(store.label_history("cat")) == 3


def test_undo_restores_previous_value_step_by_step(store):
    store.add_labels("cat", [(1, "positive")], author="ann")
    store.add_labels("cat", [(1, "negative")], author="ann")
    store.add_labels("cat", [(2, "positive")], author="ann")
    assert store.undo("cat", "ann").image_id == 2
    assert store.labels("cat") == {1: "negative"}
    assert store.undo("cat", "ann").value == "negative"
    assert store.labels("cat") == {1: "positive"}
    store.undo("cat", "ann")
    assert store.labels("cat") == {}
    assert store.undo("cat", "ann") is None


def test_cleared_label_disappears(store):
    store.add_labels("cat", [(3, "positive")])
    store.add_labels("cat", [(3, "cleared")])
    assert store.labels("cat") == {}


def test_unknown_category_and_image_are_clear_errors(store):
    with pytest.raises(StoreError, match="unknown category 'dog'"):
        store.add_labels("dog", [(1, "positive")])
    with pytest.raises(StoreError, match="no ingested image"):
        store.add_labels("cat", [(999, "positive")])
    with pytest.raises(StoreError, match="label value"):
        store.add_labels("cat", [(1, "maybe")])


def test_rename_category_keeps_labels(store):
    store.add_labels("cat", [(1, "positive")])
    store.rename_category("cat", "feline")
    assert store.labels("feline") == {1: "positive"}
    with pytest.raises(StoreError):
        store.labels("cat")


def _label_many(path, offset):
    s = Store(path)
    for i in range(40):
        s.add_labels("cat", [(1 + (i + offset) % 5, "positive" if i % 2 else "negative")], author=f"p{offset}")


def test_concurrent_writers_lose_nothing(tmp_path, store):
    path = tmp_path / "p.sqlite"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_label_many, args=(path, k)) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    events = Store(path).label_history("cat", limit=1000)
    assert len(events) == 80
    assert {e.author for e in events} == {"p0", "p1"}


def test_jobs_record_state(store):
    job = store.add_job("embed", {"n": 3})
    store.update_job(job, state="running", progress=0.5, message="half")
    assert store.job(job).active
    store.request_cancel(job)
    assert store.job(job).cancel_requested
    store.update_job(job, state="cancelled")
    assert store.job(job).finished_at is not None


def test_only_jobs_of_dead_processes_are_marked_orphaned(store):
    import subprocess
    import sys

    alive = store.add_job("embed")  # this process
    dead = store.add_job("train")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    store.db.execute("UPDATE jobs SET pid = ? WHERE id = ?", (int(gone.stdout), dead))
    assert store.fail_orphaned_jobs() == 1
    assert store.job(alive).state == "queued"
    assert store.job(dead).state == "failed" and "interrupted" in store.job(dead).error


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    import sqlite3

    from bgminer.schema import MIGRATIONS, split_sql

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    for statement in split_sql(MIGRATIONS[0]):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO jobs (kind, state) VALUES ('embed', 'done')")
    db.commit()
    db.close()
    s = Store(path)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert s.job(1).kind == "embed"


def test_a_version_2_store_keys_models_and_validation_samples_by_category_id(tmp_path):
    import sqlite3

    from bgminer.schema import MIGRATIONS, split_sql

    path = tmp_path / "v2.sqlite"
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        for statement in split_sql(script):
            db.execute(statement)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO categories (id, name, created_at) VALUES (1, 'dog', 0), (2, 'cat', 0)")
    db.execute(
        "INSERT INTO models (categories, mode, state, created_at) VALUES ('[\"cat\", \"gone\", \"dog\"]', 'adapter', 'ready', 0)"
    )
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('validation:cat', '{\"ids\": [1]}'), ('validation:gone', '{}'), ('backbone', 'x')"
    )
    db.commit()
    db.close()

    s = Store(path)

    assert s.model(1).category_ids == [2, None, 1] and s.model(1).categories == ["cat", "gone", "dog"]
    assert dict(s.db.execute("SELECT key, value FROM meta")) == {"validation:2": '{"ids": [1]}', "backbone": "x"}
    s.rename_category("cat", "feline")
    assert s.model(1).categories == ["feline", "gone", "dog"]
    assert s.active_model("feline").id == 1 and s.active_model("gone") is None
