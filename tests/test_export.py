"""Specification of exports: the self-contained classifier file, `predict` without a project,
label CSV round trip, score tables and the ImageNet-style folder tree."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from bgminer.export import (
    LABEL_COLUMNS,
    ExportResult,
    export_folders,
    export_model,
    import_labels_csv,
    load_exported,
    predict,
    write_labels_csv,
    write_scores,
)
from bgminer.project import Project
from bgminer.settings import local_user
from bgminer.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
CATEGORY = "red-disc"


def make_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """``discs/``: 10 red discs on white (some large JPEGs, so the draft decode path is used);
    ``background/``: 30 blue/green striped noise images; varied sizes."""
    (folder / "discs").mkdir(parents=True)
    (folder / "background").mkdir()
    rng = np.random.default_rng(0)
    discs, backgrounds = [], []
    for i in range(10):
        w, h = (640, 520) if i % 3 == 0 else (200 + 9 * i, 180 + 5 * i)
        img = Image.new("RGB", (w, h), "white")
        r = min(w, h) // 3
        cx, cy = w // 2 + (i - 5) * 4, h // 2 - (i - 5) * 3
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 20 + 5 * i, 30))
        path = folder / "discs" / (f"disc_{i:02d}.jpg" if i % 3 == 0 else f"disc_{i:02d}.png")
        img.save(path)
        discs.append(path)
    for i in range(30):
        w, h = 160 + 7 * i, 240 - 2 * i
        arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        arr[..., 1 + i % 2] += 120
        arr[:, (np.arange(w) // (6 + i % 5)) % 2 == 0] //= 2
        path = folder / "background" / (f"bg_{i:02d}.jpg" if i % 4 == 0 else f"bg_{i:02d}.png")
        Image.fromarray(arr).save(path)
        backgrounds.append(path)
    return discs, backgrounds


@dataclass
class Trained:
    project: Project
    images: Path
    positives: list[Path]
    negatives: list[Path]
    export: ExportResult


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("export")
    discs, backgrounds = make_images(root / "images")
    project = Project.create(root / "project")
    project.ingest([root / "images"])
    project.embed(device="cpu")
    project.add_category(CATEGORY)
    positives, negatives = discs[:4], backgrounds[:3]
    assert project.label_paths(CATEGORY, positives, "positive") == []
    assert project.label_paths(CATEGORY, negatives, "negative", source="user") == []
    project.train(CATEGORY, TrainConfig(mode="adapter", epochs=8, lr=1e-2, device="cpu"))
    result = export_model(project, CATEGORY, root / "exported")
    return Trained(project, root / "images", positives, negatives, result)


def app_scores(project: Project) -> dict[str, float]:
    ids, scores = project.scores(CATEGORY)
    paths = project.store.image_paths(ids.tolist())
    return {str(Path(paths[int(i)]).resolve()): float(s) for i, s in zip(ids, scores)}


def test_predict_in_a_fresh_process_agrees_with_the_app_scores(trained, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    inputs = [trained.images / "discs", *trained.negatives]  # a folder and single files
    command = [sys.executable, "-m", "bgminer", "predict", str(trained.export.model), *map(str, inputs), "--json", "--batch-size", "5"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["categories"] == [CATEGORY]
    predicted = {str(Path(p["path"]).resolve()): p["scores"][CATEGORY] for p in out["predictions"]}
    expected = app_scores(trained.project)
    assert len(predicted) == 13 and predicted.keys() <= expected.keys()
    worst = max(abs(score - expected[p]) for p, score in predicted.items())
    assert worst < 1e-4
    assert np.ptp(list(predicted.values())) > 0.1  # a trained model, not a constant one


def test_metadata_describes_the_model_and_is_embedded_in_the_file(trained):
    meta = json.loads(trained.export.metadata.read_text())
    project = trained.project
    record = project.store.active_model(CATEGORY)
    bb = project.backbone
    assert meta["format"] == "bgminer-export" and meta["format_version"] == 1
    assert meta["categories"] == [CATEGORY]
    assert meta["input"]["resize"] == bb.preprocess.resize and meta["input"]["crop"] == bb.preprocess.crop
    assert meta["input"]["mean"] == list(bb.preprocess.mean) and meta["input"]["std"] == list(bb.preprocess.std)
    assert meta["backbone"] == {"name": bb.name, "weights_sha256": bb.weights_sha256, "feature_dim": bb.feature_dim}
    model = meta["model"]
    assert model["version"] == record.id and model["mode"] == "adapter" and model["config"]["epochs"] == 8
    assert model["label_counts"] == {CATEGORY: {"positive": 4, "negative": 3}}
    assert model["metrics"] == record.metrics and model["metrics"]
    assert meta["created_at"] and meta["bgminer_version"]
    assert load_exported(trained.export.model).metadata == meta


def test_exported_model_has_only_the_main_head(trained):
    exported = load_exported(trained.export.model)
    shapes = [tuple(p.shape) for p in exported.module.parameters()]
    state = torch.load(trained.export.state_dict, map_location="cpu", weights_only=True)
    assert not any(1000 in s for s in shapes)
    assert not any(1000 in v.shape for v in state.values())
    images = [torch.randint(0, 256, (3, 90, 300), dtype=torch.uint8), torch.randint(0, 256, (3, 400, 260), dtype=torch.uint8)]
    assert exported.scores(images).shape == (2, 1)


def test_plain_state_dict_matches_the_scripted_weights(trained):
    state = torch.load(trained.export.state_dict, map_location="cpu", weights_only=True)
    scripted = dict(load_exported(trained.export.model).module.network.named_parameters())
    assert set(scripted) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in scripted.items())


def _truncated(src: Path, dest: Path) -> None:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _bit_flipped(src: Path, dest: Path) -> None:
    data = bytearray(src.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    dest.write_bytes(bytes(data))


def _plain_torch_file(src: Path, dest: Path) -> None:
    torch.save({"weight": torch.zeros(4, 4)}, dest)


def _other_torchscript(src: Path, dest: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated; still what other tools ship
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(dest))


def _text_file(src: Path, dest: Path) -> None:
    dest.write_text("not a model\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_truncated, "damaged model file"),
        (_bit_flipped, "damaged model file"),
        (_plain_torch_file, "not a bgminer model export"),
        (_other_torchscript, "not a bgminer model export"),
        (_text_file, "not a bgminer model export"),
    ],
)
def test_loading_a_file_that_is_not_an_intact_export_fails_clearly(trained, tmp_path, make, message):
    bad = tmp_path / "model.ts"
    make(trained.export.model, bad)
    with pytest.raises(ValueError, match=message):
        load_exported(bad)


def test_predict_reports_undecodable_files_and_scores_the_rest(trained, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(trained.positives[0], folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    skipped: list[tuple[str, str]] = []
    results = predict(trained.export.model, [folder], on_skip=lambda p, reason: skipped.append((Path(p).name, reason)))
    assert [Path(p).name for p, _ in results] == ["good.png"]
    assert [name for name, _ in skipped] == ["broken.jpg"]


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
        assert all(abs(s - expected[p]) < 1e-6 for p, s in zip(table["path"], table[CATEGORY]))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exported_model_runs_on_cuda(trained):
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).contiguous() for p in trained.positives]
    on_cpu = load_exported(trained.export.model).scores(images)
    on_gpu = load_exported(trained.export.model, device="cuda")
    assert on_gpu.device.type == "cuda"
    assert np.abs(on_gpu.scores(images) - on_cpu).max() < 1e-3
