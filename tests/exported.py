"""A small project with a trained model and its export, shared by the packaging and tables tests
(built once per session by the ``trained`` fixture in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bgminer.packaging import ExportResult, export_model
from bgminer.project import Project
from bgminer.train import TrainConfig

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


def train_and_export(root: Path) -> Trained:
    """Ingest and embed the images, label 4 discs positive and 3 backgrounds negative, train an
    adapter model and export it."""
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
    return {str(Path(paths[int(i)]).resolve()): float(s) for i, s in zip(ids, scores, strict=True)}
