"""bench/multimode_data.py on tiny, hand-made stand-ins for the four packages (nothing is downloaded)."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import multimode_data as mm
from bench.datasets import CLIPART_SUBDIR, _write_manifest

MIN = 2  # concept cells need this many images in these tests
RNG_SEED = 7


def _png(path: Path, seed: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _idx(path: Path, array: np.ndarray) -> None:
    magic = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(magic + array.astype(np.uint8).tobytes())


def make_sources(root: Path) -> None:
    """Unpacked stand-ins with the packages' layouts, and the markers that say they are unpacked."""
    clip = root / CLIPART_SUBDIR
    for i in range(3):
        _png(clip / f"animals/birds/bird_{i}.png", 100 + i)
    _png(clip / "animals/birds/baby_tux_01.png", 110)  # left out (Tux)
    _png(clip / "animals/birds/contour_bat.png", 111)  # a bat in the birds folder: mammal
    _png(clip / "animals/mammals/dogs/dog.png", 112)
    _png(clip / "unsorted/Anatra.png", 113)  # a duck outside the folders: bird
    _png(clip / "food/fruit/apple.png", 114)  # the only clip-art fruit: a thin cell, left out
    _png(clip / "food/dairy/cheese.png", 115)  # food family, no concept
    _png(clip / "people/clothing/pantyhose/ph.png", 116)
    _png(clip / "people/clothing/t-shirt_01.png", 122)  # garment by the file table
    _png(clip / "people/clothing/hats/hat.png", 117)  # clothing family, no concept
    _png(clip / "computer/icon.png", 118)
    _png(clip / "transportation/vehicles/car.png", 119)  # road vehicle by the file table
    _png(clip / "transportation/bus_01.png", 120)
    _png(clip / "transportation/vehicles/rocket.png", 121)  # vehicle family only
    _write_manifest(root / "openclipart_manifest.json", "openclipart-png=test", clip)

    emoji = root / "emoji-datasource-google" / "package"
    entries = [
        ("ROOSTER", "Animals & Nature", "animal-bird", 200),
        ("DUCK", "Animals & Nature", "animal-bird", 201),
        ("FEATHER", "Animals & Nature", "animal-bird", 202),  # left out
        ("WHALE", "Animals & Nature", "animal-marine", 203),  # mammal by name
        ("FISH", "Animals & Nature", "animal-marine", 204),  # animal family, no concept
        ("GRINNING CAT FACE WITH SMILING EYES", "Smileys & Emotion", "cat-face", 205),
        ("TAXI", "Travel & Places", "transport-ground", 206),  # the only emoji road vehicle: thin
        ("STATION", "Travel & Places", "transport-ground", 207),  # no family
        ("AIRPLANE", "Travel & Places", "transport-air", 208),  # vehicle family
        ("T-SHIRT", "Objects", "clothing", 209),
        ("JEANS", "Objects", "clothing", 210),
        ("SPAIN FLAG", "Flags", "country-flag", 211),
        ("CEUTA FLAG", "Flags", "country-flag", 211),  # the same picture: a duplicate
        ("WAVING HAND", "People & Body", "hand-fingers-open", 212),
    ]
    records = []
    for k, (name, category, subcategory, seed) in enumerate(entries):
        image = f"{k:04x}.png"
        _png(emoji / "img/google/64" / image, seed)
        record = {"name": name, "category": category, "subcategory": subcategory, "image": image, "has_img_google": True}
        if name == "WAVING HAND":
            _png(emoji / "img/google/64/waving-dark.png", 299)  # a skin-tone variant: never used
            record["skin_variations"] = {"1F3FF": {"image": "waving-dark.png"}}
        records.append(record)
    (emoji / "emoji.json").write_text(json.dumps(records))
    (root / ".emoji-datasource-google.unpacked").write_text("emoji-datasource-google=test\n")

    stamps = root / mm.TUXPAINT_SUBDIR
    _png(stamps / "animals/birds/owl.png", 300)
    _png(stamps / "animals/birds/owl_mirror.png", 301)  # a flipped copy: skipped
    _png(stamps / "animals/birds/crow.png", 302)
    (stamps / "animals/birds/crow.svg").write_text("<svg/>")
    _png(stamps / "animals/birds/cartoon/parrot.png", 303)  # the only cartoon bird: thin
    _png(stamps / "animals/mammals/bears/cartoon/teddy_bear.png", 304)  # left out
    _png(stamps / "food/fruit/cartoon/apple.png", 305)
    _png(stamps / "food/fruit/cartoon/pear.png", 306)
    _png(stamps / "vehicles/auto/sedan.png", 307)  # the only tuxpaint road vehicle: thin
    _png(stamps / "hobbies/drum.png", 308)
    shutil.copy(clip / "computer/icon.png", stamps / "hobbies/icon_copy.png")  # the clip-art copy wins
    (root / ".tuxpaint-stamps-default.unpacked").write_text("tuxpaint-stamps-default=test\n")

    fmnist = root / mm.FMNIST_SUBDIR
    fmnist.mkdir(parents=True)
    rng = np.random.default_rng(RNG_SEED)
    for split, n in (("train", 30), ("t10k", 10)):
        _idx(fmnist / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(fmnist / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    (root / ".dataset-fashion-mnist.unpacked").write_text("dataset-fashion-mnist=test\n")


@pytest.fixture
def root(tmp_path):
    make_sources(tmp_path)
    return tmp_path


def _by_name(items):
    return {item.path.relative_to(item.path.parents[1]).as_posix(): item for item in items if item.source != "fashion-mnist"}


def test_labels_modes_and_families(root):
    items = mm.multimode_items(root, min_per_mode=MIN, fmnist_per_class=2)
    named = _by_name(items)
    expected = {  # (last folder/file) -> (source, concepts, families, mode)
        "birds/bird_0.png": ("openclipart", {"bird"}, {"animal"}, "clipart"),
        "birds/contour_bat.png": ("openclipart", {"mammal"}, {"animal"}, "clipart"),
        "dogs/dog.png": ("openclipart", {"mammal"}, {"animal"}, "clipart"),
        "unsorted/Anatra.png": ("openclipart", {"bird"}, {"animal"}, "clipart"),
        "dairy/cheese.png": ("openclipart", set(), {"food"}, "clipart"),
        "pantyhose/ph.png": ("openclipart", {"garment"}, {"clothing"}, "clipart"),
        "hats/hat.png": ("openclipart", set(), {"clothing"}, "clipart"),
        "computer/icon.png": ("openclipart", set(), set(), "clipart"),
        "vehicles/car.png": ("openclipart", {"road_vehicle"}, {"vehicle"}, "clipart"),
        "transportation/bus_01.png": ("openclipart", {"road_vehicle"}, {"vehicle"}, "clipart"),
        "vehicles/rocket.png": ("openclipart", set(), {"vehicle"}, "clipart"),
        "64/0000.png": ("emoji", {"bird"}, {"animal"}, "emoji"),
        "64/0003.png": ("emoji", {"mammal"}, {"animal"}, "emoji"),
        "64/0004.png": ("emoji", set(), {"animal"}, "emoji"),
        "64/0005.png": ("emoji", {"mammal"}, {"animal"}, "emoji"),
        "64/0007.png": ("emoji", set(), set(), "emoji"),
        "64/0008.png": ("emoji", set(), {"vehicle"}, "emoji"),
        "64/0009.png": ("emoji", {"garment"}, {"clothing"}, "emoji"),
        "64/000d.png": ("emoji", set(), set(), "emoji"),
        "birds/owl.png": ("tuxpaint", {"bird"}, {"animal"}, "tuxpaint-photo"),
        "cartoon/apple.png": ("tuxpaint", {"fruit"}, {"food"}, "tuxpaint-cartoon"),
        "hobbies/drum.png": ("tuxpaint", set(), set(), "tuxpaint-photo"),
    }
    for name, want in expected.items():
        item = named[name]
        assert (item.source, set(item.concepts), set(item.families), item.mode) == want, name
    left_out = [
        "birds/baby_tux_01.png",  # excluded
        "fruit/apple.png",  # thin cell (clip-art fruit)
        "64/0002.png",  # FEATHER
        "64/0006.png",  # TAXI: thin cell
        "64/000c.png",  # duplicate picture of 000b
        "64/waving-dark.png",  # skin-tone variant
        "birds/owl_mirror.png",
        "cartoon/parrot.png",  # thin cell (cartoon bird)
        "cartoon/teddy_bear.png",
        "auto/sedan.png",  # thin cell
        "hobbies/icon_copy.png",  # same bytes as the clip-art icon
    ]
    for name in left_out:
        assert name not in named, name
    assert not any(item.path.suffix == ".svg" for item in items)
    assert all(item.path.is_absolute() and item.path.is_file() for item in items)
    cells = {}
    for item in items:
        for concept in item.concepts:
            cells[concept, item.mode] = cells.get((concept, item.mode), 0) + 1
            assert mm.CONCEPTS[concept] in item.families
    assert min(cells.values()) >= MIN
    assert {mode for _, mode in cells} == {"clipart", "emoji", "tuxpaint-photo", "tuxpaint-cartoon", "fashion-mnist"}


def test_fashion_mnist_sample(root, tmp_path_factory):
    items = [it for it in mm.multimode_items(root, min_per_mode=MIN, fmnist_per_class=2) if it.source == "fashion-mnist"]
    assert len(items) == 20  # 2 of each of the 10 classes
    by_class = {}
    for item in items:
        by_class.setdefault(item.path.parent.name, []).append(item)
        assert item.families == {"clothing"} and item.mode == "fashion-mnist"
        with Image.open(item.path) as image:
            assert image.size == (28, 28) and image.mode == "L"
    assert sorted(by_class) == sorted(name.lower().replace("/", "-").replace(" ", "-") for name in mm.FMNIST_CLASSES)
    garments = {name for name, members in by_class.items() if all(it.concepts == {"garment"} for it in members)}
    assert garments == {"t-shirt-top", "trouser", "pullover", "dress", "coat", "shirt"}
    assert all(not it.concepts for name in set(by_class) - garments for it in by_class[name])
    # The pixels are the IDX images of the chosen class, and the same sample comes out of a fresh copy.
    other = tmp_path_factory.mktemp("again")
    make_sources(other)
    again = [it for it in mm.multimode_items(other, min_per_mode=MIN, fmnist_per_class=2) if it.source == "fashion-mnist"]
    assert [it.path.relative_to(other) for it in again] == [it.path.relative_to(root) for it in items]
    raw = gzip.decompress((root / mm.FMNIST_SUBDIR / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    train = np.frombuffer(raw, np.uint8).reshape(-1, 28, 28)
    first = next(it for it in items if it.path.name.startswith("train-"))
    index = int(first.path.stem.split("-")[1])
    assert mm.FMNIST_CLASSES[index % 10].lower().replace("/", "-").replace(" ", "-") == first.path.parent.name
    np.testing.assert_array_equal(np.asarray(Image.open(first.path)), train[index])


def test_manifest_is_reused_and_rebuilt_when_arguments_change(root):
    items = mm.multimode_items(root, min_per_mode=MIN, fmnist_per_class=1)
    (root / "emoji-datasource-google/package/emoji.json").rename(root / "emoji.json.away")
    assert mm.multimode_items(root, min_per_mode=MIN, fmnist_per_class=1) == items  # from the manifest alone
    (root / "emoji.json.away").rename(root / "emoji-datasource-google/package/emoji.json")
    looser = _by_name(mm.multimode_items(root, min_per_mode=1, fmnist_per_class=1))
    assert looser["64/0006.png"].concepts == {"road_vehicle"}  # TAXI: its cell is kept now
    assert looser["cartoon/parrot.png"].mode == "tuxpaint-cartoon"


def test_label_tables_are_consistent():
    families = set(mm.CONCEPTS.values())
    tables = [
        mm.OPENCLIPART_FOLDER_CONCEPTS,
        mm.OPENCLIPART_LABELS,
        mm.EMOJI_SUBCATEGORY_CONCEPTS,
        mm.EMOJI_NAME_CONCEPTS,
        mm.TUXPAINT_FOLDER_CONCEPTS,
        mm.TUXPAINT_LABELS,
    ]
    for table in tables:
        assert set(table.values()) - {None} <= set(mm.CONCEPTS)
    assert set(mm.OPENCLIPART_FOLDER_FAMILIES.values()) <= families
    assert set(mm.TUXPAINT_FOLDER_FAMILIES.values()) <= families
    assert not set(mm.OPENCLIPART_LABELS) & mm.OPENCLIPART_EXCLUDE
    assert not set(mm.TUXPAINT_LABELS) & mm.TUXPAINT_EXCLUDE
    assert not set(mm.EMOJI_NAME_CONCEPTS) & mm.EMOJI_EXCLUDE


def test_summary_command(root, capsys):
    mm.main(["--root", str(root), "--summary", "--json"])
    stats = json.loads(capsys.readouterr().out)
    items = mm.multimode_items(root)  # the defaults main used
    assert stats["total"] == len(items)
    assert stats["concept_mode"]["garment"]["fashion-mnist"] == sum(1 for it in items if "garment" in it.concepts)
    assert set(stats["packages"]) == set(mm.SOURCES)


def test_project_holds_every_item_and_grows_in_place(root, capsys):
    project, truth = mm.multimode_project(root, min_per_mode=MIN, fmnist_per_class=1)
    items = mm.multimode_items(root, min_per_mode=MIN, fmnist_per_class=1)
    assert project.root == root / "multimode-efficientnet_lite0"
    assert project.backbone_name == "efficientnet_lite0"
    assert sorted(truth.values(), key=lambda it: it.path) == sorted(items, key=lambda it: it.path)
    rows = {row["id"]: row for row in project.store.images()}
    assert all(rows[i]["embedded"] for i in truth)
    assert all(Path(rows[i]["path"]) == item.path for i, item in truth.items())

    project2, truth2 = mm.multimode_project(root, min_per_mode=MIN, fmnist_per_class=2)  # 10 more images
    assert project2.root == project.root
    assert len(truth2) == len(truth) + 10
    assert all(truth2[i] == item for i, item in truth.items())  # the old images keep their ids
    assert all(row["embedded"] for row in project2.store.images())

    _, truth3 = mm.multimode_project(root, min_per_mode=MIN, fmnist_per_class=1)  # the corpus shrinks again
    assert truth3 == truth
    assert "holds 10 images that left the corpus" in capsys.readouterr().err
