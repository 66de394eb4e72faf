"""Specification of a project's tables: the labels CSV (written and read back), the corpus
score table in CSV and Parquet, and the ImageNet-style folder tree."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
from exported import CATEGORY, app_scores

from bgminer.project import Project
from bgminer.settings import local_user
from bgminer.tables import LABEL_COLUMNS, export_folders, import_labels_csv, write_labels_csv, write_scores


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_labels_csv_holds_every_label_with_its_current_score(trained, tmp_path):
    out = tmp_path / "labels.csv"
    assert write_labels_csv(trained.project, out) == 7
    rows = read_csv(out)
    assert tuple(rows[0]) == LABEL_COLUMNS
    scores = app_scores(trained.project)
    assert {r["label"] for r in rows} == {"positive", "negative"}
    assert all(abs(float(r["score"]) - scores[r["path"]]) < 1e-6 for r in rows)
    assert all(r["author"] == local_user() and r["updated_at"].endswith("+00:00") for r in rows)


def test_labels_csv_round_trip_into_a_new_project(trained, tmp_path):
    exported = tmp_path / "labels.csv"
    write_labels_csv(trained.project, exported)
    with open(exported, "a", newline="") as f:
        f.write(f"{tmp_path / 'gone.png'},{CATEGORY},positive,user,user,,,\n")
    fresh = Project.create(tmp_path / "fresh")
    fresh.ingest([trained.images])

    report = import_labels_csv(fresh, exported)

    assert report.imported == 7 and report.categories_created == [CATEGORY]
    assert report.missing == [str(tmp_path / "gone.png")]

    def pairs(project):
        return {(r["path"], r["category"], r["label"], r["author"]) for r in project.store.label_table()}

    assert pairs(fresh) == pairs(trained.project)
    again = import_labels_csv(fresh, exported)
    assert (again.imported, again.unchanged) == (0, 7)


def test_scores_tables_cover_the_corpus_in_csv_and_parquet(trained, tmp_path):
    expected = app_scores(trained.project)
    for name in ("scores.csv", "scores.parquet"):
        assert write_scores(trained.project, tmp_path / name) == 40
        table = pd.read_csv(tmp_path / name) if name.endswith(".csv") else pd.read_parquet(tmp_path / name)
        assert list(table.columns) == ["path", "image_id", CATEGORY]
        assert all(abs(s - expected[p]) < 1e-6 for p, s in zip(table["path"], table[CATEGORY], strict=True))


def test_folder_tree_links_positives_and_optionally_negatives(trained, tmp_path):
    report = export_folders(trained.project, tmp_path / "tree", include_negatives=True)
    positives = sorted((tmp_path / "tree" / CATEGORY).iterdir())
    negatives = sorted((tmp_path / "tree" / f"{CATEGORY}_negative").iterdir())
    assert report.counts == {CATEGORY: 4, f"{CATEGORY}_negative": 3}
    assert all(p.is_symlink() for p in positives + negatives)
    assert sorted(p.resolve() for p in positives) == sorted(p.resolve() for p in trained.positives)
    assert sorted(p.resolve() for p in negatives) == sorted(p.resolve() for p in trained.negatives)


def test_folder_tree_can_copy_and_never_overwrites(trained, tmp_path):
    export_folders(trained.project, tmp_path / "tree", link=False)
    copies = sorted((tmp_path / "tree" / CATEGORY).iterdir())
    assert [p.is_symlink() for p in copies] == [False] * 4
    assert sorted(p.read_bytes() for p in copies) == sorted(p.read_bytes() for p in trained.positives)
    with pytest.raises(ValueError, match="not empty"):
        export_folders(trained.project, tmp_path / "tree")
