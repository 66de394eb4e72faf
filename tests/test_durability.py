"""Nothing is lost: concurrent and killed embeddings, zero rows, rescores, atomic writes, backups."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bgminer.fsutil import atomic_write_bytes
from bgminer.index import VectorIndex, build_index
from bgminer.model import build_model, load_checkpoint, save_checkpoint
from bgminer.project import Project
from bgminer.scoring import VersionWriter, generations, read_version, rescore_version, score
from bgminer.store import Store
from bgminer.train import TrainConfig


def tiny_pngs(folder: Path, n: int, seed: int) -> Path:
    """``n`` small, distinct, real PNGs (random pixels)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def keep_only(store: Store, ids: list[int], keep: list[int]) -> None:
    """Reject every image of ``ids`` but ``keep``, so embedding stays quick while image ids pass 1024."""
    for image_id in sorted(set(ids) - set(keep)):
        store.reject_image(image_id, "not_in_test", "left out to keep the test quick")


def expected_pooled(project: Project, ids: list[int]) -> np.ndarray:
    """The pooled features of ``ids`` computed directly by the backbone, in one batch."""
    from bgminer.backbone import Preprocess
    from bgminer.imageio import load_rgb, to_tensor_uint8

    bb = project.backbone
    paths = project.store.image_paths(ids)
    pixels = torch.stack(
        [Preprocess(bb.preprocess)(to_tensor_uint8(load_rgb(paths[i], draft_size=bb.preprocess.resize))) for i in ids]
    )
    with torch.inference_mode():
        return bb.net.forward_features(pixels).numpy()


def zero_rows_marked_embedded(root: Path) -> list[int]:
    """Ids the database marks embedded whose pooled row on disk is all zeros (read without opening a Project)."""
    store = Store(root / "bgminer.sqlite")
    try:
        ids = np.asarray(store.image_ids(embedded=True), dtype=np.int64)
    finally:
        store.close()
    pooled = np.load(root / "features" / "efficientnet_lite0" / "pooled.npy", mmap_mode="r")
    return ids[~np.asarray(pooled[ids]).any(axis=1)].tolist()


EMBEDDER_PAUSED_AFTER_FIRST_BATCH = """
import os, sys, time
from pathlib import Path
from bgminer.project import Project
root, paused, go = sys.argv[1:4]
def hold(done, total, message=""):
    if done >= 4 and not os.path.exists(paused):
        Path(paused).touch()
        deadline = time.monotonic() + 600
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                sys.exit(3)
            time.sleep(0.05)
Project(root).embed(batch_size=4, progress=hold)
"""

# Killed while the cache grows: after pooled.npy was replaced by its grown copy, as the copy of logits.npy begins.
EMBEDDER_KILLED_MID_GROWTH = """
import os, signal, sys
import numpy as np
real = np.lib.format.open_memmap
grown = []
def open_memmap(filename, mode="r+", *args, **kwargs):
    if mode == "w+":
        grown.append(filename)
        if len(grown) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(filename, mode, *args, **kwargs)
np.lib.format.open_memmap = open_memmap
from bgminer.project import Project
Project(sys.argv[1]).embed(batch_size=64)
"""


def test_two_embeddings_one_killed_mid_growth_leave_no_zero_row_marked_embedded(tmp_path):
    first, later = tiny_pngs(tmp_path / "first", 1000, seed=1), tiny_pngs(tmp_path / "later", 100, seed=2)
    project = Project.create(tmp_path / "proj")
    project.ingest([first])
    ids = project.store.image_ids()
    keep_first = ids[::42]  # 24 images, ids below 1024: the cache starts at 1024 rows
    keep_only(project.store, ids, keep_first)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paused, go = tmp_path / "paused", tmp_path / "go"

    holder = subprocess.Popen(
        [sys.executable, "-c", EMBEDDER_PAUSED_AFTER_FIRST_BATCH, str(project.root), str(paused), str(go)], env=env
    )
    try:
        deadline = time.monotonic() + 600
        while not paused.exists():  # the first embedding has written one batch and holds its maps open
            assert holder.poll() is None, "the first embedding ended before its first batch"
            assert time.monotonic() < deadline, "the first embedding never finished its first batch"
            time.sleep(0.05)
        project.ingest([later])  # ids past 1024: the next embedding must grow the cache
        new = [i for i in project.store.image_ids() if i not in set(ids)]
        keep_later = new[::9][:12]
        keep_only(project.store, new, keep_later)
        assert max(keep_later) >= 1024

        killed = subprocess.run(
            [sys.executable, "-c", EMBEDDER_KILLED_MID_GROWTH, str(project.root)], env=env, capture_output=True, check=False
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        go.touch()
        assert holder.wait(timeout=600) == 0
    finally:
        if holder.poll() is None:
            holder.kill()

    assert zero_rows_marked_embedded(project.root) == []
    again = Project(project.root)
    assert again.features.unmark_zero_rows(again.store) == []
    report = again.embed(batch_size=8)
    everything = keep_first + keep_later
    assert report.embedded == len(keep_later)  # the first embedding's images were all done, once
    assert again.store.image_ids(embedded=True) == again.store.image_ids() == sorted(everything)
    np.testing.assert_allclose(again.features.read("pooled", everything), expected_pooled(again, everything), atol=1e-4)
    assert again.embed().embedded == 0
    assert sorted(p.name for p in again.features.root.iterdir()) == [
        ".lock",
        "logits.npy",
        "maps.npy",
        "pooled.npy",
    ]  # no growth copy left


@pytest.fixture
def embedded(tmp_path, image_folder):
    project = Project.create(tmp_path / "proj")
    project.ingest([image_folder])
    project.embed(batch_size=6)
    return project


def test_a_zero_row_marked_embedded_is_found_at_open_and_embedded_again(embedded):
    ids = embedded.store.image_ids()
    before = embedded.features.read("pooled", ids)
    victim = ids[5]
    pooled = np.load(embedded.features.path("pooled"), mmap_mode="r+")  # what a writer on a replaced file left behind
    pooled[victim] = 0
    pooled.flush()
    del pooled

    reopened = Project(embedded.root)
    _ = reopened.features
    assert reopened.store.image_ids(embedded=False) == [victim]
    assert reopened.embed().embedded == 1
    np.testing.assert_allclose(reopened.features.read("pooled", ids), before, atol=1e-5)
    assert Project(embedded.root).store.image_ids(embedded=False) == []


def test_growing_the_cache_keeps_the_disk_reserve_and_changes_nothing_when_refused(embedded, monkeypatch):
    from bgminer.fsutil import DiskSpaceError

    cache, ids = embedded.features, embedded.store.image_ids()
    before = cache.read("pooled", ids)
    free_mib = shutil.disk_usage(cache.root).free // 2**20
    monkeypatch.setenv("BGMINER_DISK_RESERVE_MB", str(free_mib - 1))  # a few MiB may still be written, not a grown cache
    with pytest.raises(DiskSpaceError):
        cache.ensure_capacity(cache.capacity * 64)
    assert cache.capacity == 1024
    np.testing.assert_array_equal(cache.read("pooled", ids), before)
    assert sorted(p.name for p in cache.root.iterdir()) == [".lock", "logits.npy", "maps.npy", "pooled.npy"]


def adapter(project: Project, seed: int, categories=("a", "b")):
    torch.manual_seed(seed)
    model = build_model("adapter", project.backbone, list(categories))
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_a_rescore_never_leaves_the_version_without_complete_scores(embedded, tmp_path):
    ids = np.asarray(embedded.store.image_ids(), dtype=np.int64)
    pooled = embedded.features.open("pooled")
    models = [adapter(embedded, seed) for seed in (1, 2)]
    expected = [score(m, pooled, ids)[1] for m in models]
    scores_dir = tmp_path / "scores"
    rescore_version(models[0], pooled, ids, scores_dir, 7, chunk_rows=4)
    first = read_version(scores_dir, 7, ["a", "b"])
    first_embeddings = np.array(first.embeddings())

    seen, problems, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            version = read_version(scores_dir, 7, ["a", "b"])
            if version is None:
                problems.append("no scores")
            elif not any(v.shape == version.scores.shape and np.allclose(version.scores, v, atol=1e-6) for v in expected):
                problems.append("a partial or mixed array")
            elif version.embeddings().shape != (len(ids), models[0].embedding_dim) or not np.array_equal(version.ids, ids):
                problems.append("ids or embeddings of another shape")
            seen.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(20):
            rescore_version(models[round_ % 2], pooled, ids, scores_dir, 7, chunk_rows=4)
    finally:
        stop.set()
        thread.join()
    assert seen and problems == []
    assert [g for g, _ in generations(scores_dir, 7)] == [21]  # older generations are gone ...
    np.testing.assert_array_equal(first.embeddings(), first_embeddings)  # ... yet a reader holding one still reads it
    assert [p.name for p in scores_dir.iterdir()] == ["v0007.g21"]


def test_before_and_after_each_rename_and_delete_of_a_commit_readers_see_whole_scores(embedded, tmp_path, monkeypatch):
    import types

    from bgminer import scoring

    ids = np.asarray(embedded.store.image_ids(), dtype=np.int64)
    pooled = embedded.features.open("pooled")
    models = [adapter(embedded, seed) for seed in (1, 2)]
    expected = [score(m, pooled, ids)[1] for m in models]
    scores_dir = tmp_path / "scores"
    rescore_version(models[0], pooled, ids, scores_dir, 7)
    seen = []

    def look():
        version = read_version(scores_dir, 7, ["a", "b"])
        seen.append(version is not None and any(np.allclose(version.scores, e, atol=1e-6) for e in expected))

    def observed(module, names):
        def wrap(fn):
            def step(*args, **kwargs):
                look()
                try:
                    return fn(*args, **kwargs)
                finally:
                    look()

            return step

        return types.SimpleNamespace(
            **{n: wrap(getattr(module, n)) if n in names else getattr(module, n) for n in dir(module) if not n.startswith("__")}
        )

    monkeypatch.setattr(scoring, "os", observed(os, ["rename", "replace", "unlink"]))
    monkeypatch.setattr(scoring, "shutil", observed(scoring.shutil, ["rmtree", "move"]))
    rescore_version(models[1], pooled, ids, scores_dir, 7)
    assert len(seen) >= 4 and all(seen)  # the swap and the removal of the old generation were both watched
    np.testing.assert_allclose(read_version(scores_dir, 7, ["a", "b"]).scores, expected[1], atol=1e-6)


def test_a_version_written_before_generations_is_read_and_then_replaced(embedded, tmp_path):
    ids = np.asarray(embedded.store.image_ids(), dtype=np.int64)
    pooled = embedded.features.open("pooled")
    scores_dir = tmp_path / "scores"
    committed = VersionWriter(scores_dir, 3, ids, 4, 2)
    committed.write(0, np.ones((len(ids), 4)), np.full((len(ids), 2), 0.25))
    committed.commit().rename(scores_dir / "v0003")  # the old layout: one plain folder per version
    assert read_version(scores_dir, 3, ["a", "b"]).scores[0].tolist() == [0.25, 0.25]
    model = adapter(embedded, 1)
    rescore_version(model, pooled, ids, scores_dir, 3)
    np.testing.assert_allclose(read_version(scores_dir, 3, ["a", "b"]).scores, score(model, pooled, ids)[1], atol=1e-6)
    assert [p.name for p in scores_dir.iterdir()] == ["v0003.g1"]


def test_a_rescore_removes_the_folder_of_a_writer_killed_mid_write_and_keeps_a_live_ones(embedded, tmp_path):
    from bgminer.fsutil import temp_name

    ids = np.asarray(embedded.store.image_ids(), dtype=np.int64)
    scores_dir = tmp_path / "scores"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead = scores_dir / f".v0002.{int(gone.stdout)}-1-deadbeef.tmp"
    live = temp_name(scores_dir / "v0002")  # this process: still writing
    for folder in (dead, live):
        (folder / "scores.npy").parent.mkdir(parents=True)
        (folder / "scores.npy").write_bytes(b"half")
    rescore_version(adapter(embedded, 1), embedded.features.open("pooled"), ids, scores_dir, 2)
    assert sorted(p.name for p in scores_dir.iterdir()) == sorted([live.name, "v0002.g1"])


def at_once(*writers) -> None:
    """Run the writers in threads released together; re-raise the first error."""
    barrier, errors = threading.Barrier(len(writers)), []

    def run(write):
        barrier.wait()
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_two_writers_of_the_same_file_at_once_both_succeed_and_one_result_is_whole(embedded, tmp_path):
    payloads = [bytes([k]) * (8 << 20) for k in (1, 2)]
    for _ in range(3):
        at_once(*(lambda p=p: atomic_write_bytes(tmp_path / "blob", p) for p in payloads))
        assert (tmp_path / "blob").read_bytes() in payloads

    models = [adapter(embedded, seed) for seed in (1, 2)]
    at_once(*(lambda m=m: save_checkpoint(m, tmp_path / "models" / "v0001.pt") for m in models))
    loaded = load_checkpoint(tmp_path / "models" / "v0001.pt", embedded.backbone).state_dict()
    assert any(all(torch.equal(loaded[k], v) for k, v in m.state_dict().items()) for m in models)

    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((500, 32)).astype(np.float32) for _ in range(2)]
    indexes = [build_index(v, np.arange(500)) for v in vectors]
    at_once(*(lambda i=i: i.save(tmp_path / "index" / "v0001.faiss") for i in indexes))
    again = VectorIndex.load(tmp_path / "index" / "v0001.faiss")
    assert any(np.allclose(again.vectors([0, 499]), i.vectors([0, 499])) for i in indexes)

    ids = np.asarray(embedded.store.image_ids(), dtype=np.int64)
    pooled = embedded.features.open("pooled")
    at_once(*(lambda m=m: rescore_version(m, pooled, ids, tmp_path / "scores", 1, chunk_rows=4) for m in models))
    version = read_version(tmp_path / "scores", 1, ["a", "b"])
    assert any(np.allclose(version.scores, score(m, pooled, ids)[1], atol=1e-6) for m in models)
    assert [p.name for p in (tmp_path / "index").iterdir()] == ["v0001.faiss"]  # no temporary file left
    assert len(list((tmp_path / "scores").iterdir())) == 1


def test_a_backup_taken_while_someone_labels_is_a_consistent_working_project(embedded, tmp_path, capsys):
    from bgminer.cli import main as cli

    project = embedded
    ids = project.store.image_ids()
    project.add_category("thing")
    project.label("thing", ids[:2], "positive")
    project.label("thing", ids[2:4], "negative")
    record = project.train(config=TrainConfig(epochs=1, min_steps=2))

    stop, labeled = threading.Event(), []

    def keep_labeling():
        k = 0
        while not stop.is_set() or not labeled:
            image_id = ids[4 + k % 8]
            project.label("thing", [image_id], "positive" if k % 2 else "negative", author="reviewer")
            labeled.append(image_id)
            k += 1

    thread = threading.Thread(target=keep_labeling)
    thread.start()
    try:
        committed_before = {e.id for e in project.store.label_history("thing", limit=10**6)}
        result = project.backup(tmp_path / "backup")
    finally:
        stop.set()
        thread.join()

    assert result.dest == (tmp_path / "backup").resolve() and not (tmp_path / "backup.partial").exists()
    copy = Project(tmp_path / "backup")
    copied = sorted(e.id for e in copy.store.label_history("thing", limit=10**6))
    source = sorted(e.id for e in project.store.label_history("thing", limit=10**6))
    assert committed_before <= set(copied)
    assert copied == source[: len(copied)]  # one moment of the database: no later event without the earlier ones

    assert copy.store.active_model().id == record.id
    assert copy.load_model().categories == ["thing"]
    copied_ids, copied_scores = copy.scores("thing")
    source_ids, source_scores = project.scores("thing")
    np.testing.assert_array_equal(copied_ids, source_ids)
    np.testing.assert_array_equal(copied_scores, source_scores)

    assert copy.store.image_ids(embedded=True) == []  # no features in this backup: its rows are missing ...
    assert copy.embed().embedded == len(ids)  # ... so it embeds everything again
    np.testing.assert_allclose(copy.features.read("pooled", ids), project.features.read("pooled", ids), atol=1e-5)

    full = tmp_path / "full"
    assert cli(["backup", str(project.root), str(full), "--with-features", "--with-thumbnails", "--json"]) == 0
    capsys.readouterr()
    restored = Project(full)
    assert restored.store.image_ids(embedded=True) == ids  # features came along: nothing to redo
    np.testing.assert_array_equal(restored.features.read("pooled", ids), project.features.read("pooled", ids))
    assert all(restored.thumbnail(i).exists() for i in ids)
    assert cli(["backup", str(project.root), str(full)]) == 2  # DEST must be new or empty
    assert "not an empty folder" in capsys.readouterr().err
