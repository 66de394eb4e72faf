"""Several people on one project: labels per person, undo of one's own decisions only, category
names, renames that carry models, interrupted rounds, paths from the database, CSV formulas."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from bgminer.cli import main as cli
from bgminer.corpus import thumbnail_path
from bgminer.project import Project, ProjectError
from bgminer.schema import StoreError
from bgminer.scoring import VersionWriter
from bgminer.settings import local_user
from bgminer.store import Store, UndoConflict
from bgminer.tables import import_labels_csv, write_labels_csv, write_scores
from bgminer.train import TrainConfig


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "p.sqlite")
    s.add_images([{"path": f"/img/{i}.png", "sha256": f"{i:064x}", "status": "ok"} for i in range(1, 6)])
    s.add_category("cat")
    return s


@pytest.fixture
def project(tmp_path, image_folder):
    """12 real images ingested (not embedded: labeling needs no features)."""
    p = Project.create(tmp_path / "project")
    p.ingest([image_folder])
    p.add_category("cat")
    return p


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


# -- labels per person -------------------------------------------------------------------------


def test_each_author_undoes_only_their_own_latest_decision(store):
    store.add_labels("cat", [(1, "positive")], author="alice")
    store.add_labels("cat", [(2, "negative")], author="bob")
    undone = store.undo("cat", "alice")
    assert (undone.image_id, undone.author) == (1, "alice")
    assert store.labels("cat") == {2: "negative"}
    assert store.undo("cat", "alice") is None
    assert store.undo("cat", "bob").image_id == 2
    assert store.labels("cat") == {}


def test_undo_refuses_when_someone_else_changed_the_image_since(store):
    store.add_labels("cat", [(3, "positive")], author="alice")
    store.add_labels("cat", [(3, "negative")], author="bob@example.org")
    history = store.label_history("cat")
    with pytest.raises(UndoConflict, match=r"bob@example.org changed #3 since; nothing undone") as caught:
        store.undo("cat", "alice")
    assert (caught.value.image_id, caught.value.changed_by) == (3, "bob@example.org")
    assert store.labels("cat") == {3: "negative"} and store.label_history("cat") == history  # nothing was written
    store.undo("cat", "bob@example.org")  # bob takes his label back: alice's is current again
    assert store.labels("cat") == {3: "positive"}
    assert store.undo("cat", "alice").image_id == 3
    assert store.labels("cat") == {}


def test_project_labels_default_to_the_os_user(project):
    project.label("cat", [1], "positive")
    assert project.store.label_history("cat")[0].author == local_user()
    assert project.undo("cat").image_id == 1


def test_cli_label_and_undo_by_author(project, capsys):
    root, paths = str(project.root), project.store.image_paths([1, 2])
    assert cli(["label", root, "--category", "cat", "--positive", paths[1], "--author", "alice"]) == 0
    assert cli(["label", root, "--category", "cat", "--negative", paths[1], paths[2], "--author", "bob"]) == 0
    capsys.readouterr()
    assert cli(["undo", root, "--category", "cat", "--author", "alice", "--json"]) == 2
    assert "bob changed #1 since; nothing undone" in capsys.readouterr().err
    assert cli(["undo", root, "--category", "cat", "--author", "bob", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["undone"]["image_id"] == 2
    assert project.store.label_authors("cat") == {1: "bob"}
    assert cli(["undo", root, "--category", "cat", "--json"]) == 0  # the OS user decided nothing
    assert json.loads(capsys.readouterr().out) == {"category": "cat", "author": local_user(), "undone": None}


# -- category names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Red fox", "  spaced  ", "Ölflasche", "猫", "a-b_c.d'e(f),g+h&i", "x" * 64])
def test_category_names_from_the_safe_set_are_accepted(store, name):
    store.add_category(name)
    assert name.strip() in store.categories()


@pytest.mark.parametrize(
    "name", ["", "   ", "x" * 65, "**bold**", "[link](http://x)", "a\nb", "a\tb", "<img>", "a/b", "=1+1", "![x](y)"]
)
def test_unsafe_category_names_are_refused_and_change_nothing(store, name):
    before = store.categories()
    with pytest.raises(StoreError, match="category"):
        store.add_category(name)
    with pytest.raises(StoreError, match="category"):
        store.rename_category("cat", name)
    assert store.categories() == before


# -- renames carry models and validation samples -----------------------------------------------


def test_a_rename_keeps_its_model_and_sample_and_the_old_name_starts_fresh(project, tmp_path):
    project.embed(device="cpu")
    project.label("cat", [1, 2], "positive")
    project.label("cat", [5, 6, 7], "negative")
    config = TrainConfig(mode="adapter", epochs=2, device="cpu", warm_start=True)
    first = project.train("cat", config)
    sample = project.validation_sample("cat", n=4)

    project.store.rename_category("cat", "feline")

    assert project.store.active_model("feline").id == first.id
    assert project.store.model(first.id).categories == ["feline"]
    assert project.load_model(first.id).categories == ["feline"]
    assert project.validation_sample("feline", n=4) == sample
    assert project.scores("feline") is not None
    assert write_scores(project, tmp_path / "scores.csv") == 12
    assert "feline" in (tmp_path / "scores.csv").read_text().splitlines()[0]
    second = project.train("feline", config)  # warm-starts from the renamed version
    assert second.parent_id == first.id and second.categories == ["feline"]

    project.add_category("cat")  # the old name, a new category
    assert project.store.active_model("cat") is None
    assert project.scores("cat") is None
    with pytest.raises(ValueError, match="train a model first"):
        project.validation_sample("cat")


# -- interrupted rounds ------------------------------------------------------------------------


def test_a_round_left_training_by_a_dead_process_is_failed_at_open(project):
    store = project.store
    orphan = store.add_model(["cat"], "adapter", {}, None)
    running = store.add_model(["cat"], "adapter", {}, None)  # this process: still training
    store.db.execute("UPDATE models SET pid = ? WHERE id = ?", (_dead_pid(), orphan))

    reopened = Project(project.root)

    assert reopened.store.model(orphan).state == "failed"
    assert reopened.store.model(orphan).error == "interrupted: the process running it ended"
    assert reopened.store.model(running).state == "training"


# -- paths and hashes from the database --------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../etc/passwd", "AB" * 32, "a" * 63, "g" * 64, "/" + "a" * 63, None])
def test_thumbnail_path_needs_a_sha256(tmp_path, bad):
    with pytest.raises(ValueError, match="sha256"):
        thumbnail_path(tmp_path, bad)
    assert thumbnail_path(tmp_path, "ab" * 32) == tmp_path / "ab" / f"{'ab' * 32}.jpg"


@pytest.mark.parametrize("checkpoint", ["../outside.pt", "/etc/passwd", "models/../../x.pt", "models"])
def test_a_checkpoint_outside_models_is_refused(project, checkpoint):
    (project.root.parent / "outside.pt").write_bytes(b"not read")
    model_id = project.store.add_model(["cat"], "adapter", {}, None)
    project.store.update_model(model_id, state="ready", checkpoint=checkpoint)
    with pytest.raises(ProjectError, match="outside the project's models/ folder"):
        project.load_model(model_id)


def test_a_project_inside_an_uploads_tree_is_refused(project):
    for inside in (project.uploads_dir, project.uploads_dir / "a" / "b"):
        with pytest.raises(ProjectError, match="inside the uploads folder"):
            Project.create(inside)
        with pytest.raises(ProjectError, match="inside the uploads folder"):
            Project(inside)
    assert not (project.uploads_dir / "a").exists()


def test_cli_refuses_projects_outside_the_projects_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BGMINER_PROJECTS_DIR", str(tmp_path / "projects"))
    assert cli(["init", str(tmp_path / "elsewhere")]) == 2
    assert "outside BGMINER_PROJECTS_DIR" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
    assert cli(["init", str(tmp_path / "projects" / "ok")]) == 0
    assert cli(["undo", str(tmp_path / "projects" / ".." / "elsewhere"), "--category", "c"]) == 2


# -- CSV formulas ------------------------------------------------------------------------------


def _raw_cells(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_formula_cells_are_escaped_in_the_labels_csv_and_round_trip(project, tmp_path):
    project.add_category("-x")
    project.add_category("'quoted")
    project.label("-x", [1], "positive", author='=HYPERLINK("http://evil")')
    project.label("'quoted", [2], "negative", author="@sum")
    out = tmp_path / "labels.csv"
    write_labels_csv(project, out)
    cells = [c for row in _raw_cells(out)[1:] for c in row]
    assert {"'-x", '\'=HYPERLINK("http://evil")', "''quoted", "'@sum"} <= set(cells)
    assert not any(c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)

    fresh = Project.create(tmp_path / "fresh")
    fresh.ingest([project.store.image(1)["path"], project.store.image(2)["path"]])
    report = import_labels_csv(fresh, out)
    assert report.imported == 2 and sorted(report.categories_created) == ["'quoted", "-x"]
    assert {(r["category"], r["label"], r["author"]) for r in fresh.store.label_table()} == {
        ("-x", "positive", '=HYPERLINK("http://evil")'),
        ("'quoted", "negative", "@sum"),
    }


def test_formula_cells_are_escaped_in_the_scores_csv_and_numbers_stay_numbers(project, tmp_path):
    project.add_category("+plus")
    store = project.store
    model_id = store.add_model(["+plus"], "adapter", {}, None)
    ids = np.asarray(store.image_ids(), dtype=np.int64)
    writer = VersionWriter(project.scores_dir, model_id, ids, 4, 1)
    writer.write(0, np.zeros((len(ids), 4)), -np.linspace(0.1, 0.9, len(ids))[:, None])
    writer.commit()
    store.update_model(model_id, state="ready")

    write_scores(project, tmp_path / "scores.csv")

    header, *rows = _raw_cells(tmp_path / "scores.csv")
    assert header == ["path", "image_id", "'+plus"]
    assert float(rows[0][2]) == pytest.approx(-0.1) and rows[0][2].startswith("-")  # a number, not escaped


def test_an_unsafe_category_in_an_imported_csv_is_skipped_with_its_line(project, tmp_path):
    path = project.store.image(1)["path"]
    (tmp_path / "in.csv").write_text(f"path,category,label\n{path},**bold**,positive\n{path},cat,positive\n")
    report = import_labels_csv(project, tmp_path / "in.csv")
    assert report.imported == 1 and len(report.invalid) == 1 and report.invalid[0].startswith("line 2:")
    assert "**bold**" not in project.store.categories()
