"""The committed demo corpus (assets/demo, built by scripts/build_demo.py) is small, readable and labelled."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from PIL import Image

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"
RARE = "animals"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def image_names() -> list[str]:
    return sorted(f"images/{p.name}" for p in (DEMO / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def labels() -> dict[str, str]:
    with open(DEMO / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "category"]
        return {row["path"]: row["category"] for row in reader}


def test_demo_folder_exists():
    assert DEMO.is_dir()


def test_demo_folder_holds_a_few_hundred_images():
    assert 200 <= len(image_names()) <= 1000


def test_demo_folder_is_under_10_mb():
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 10_000_000


def test_demo_carries_its_licence_note():
    assert "public domain" in (DEMO / "LICENSE.md").read_text().lower()


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
    except OSError:
        return False
    return min(image.size) > 0


def test_every_image_decodes():
    assert [name for name in image_names() if not decodes(DEMO / name)] == []


def test_labels_cover_exactly_the_images():
    assert sorted(labels()) == image_names()


def test_file_names_do_not_reveal_the_class():
    assert all(re.fullmatch(r"images/img_\d{4}\.png", name) for name in image_names())


def test_rare_class_is_3_to_5_percent():
    categories = list(labels().values())
    assert 0.03 <= categories.count(RARE) / len(categories) <= 0.05


def test_background_spans_many_categories():
    assert len({c for c in labels().values() if c != RARE}) >= 10
