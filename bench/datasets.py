"""Real image corpora for the benchmarks: the Open Clip Art Library as shipped by Debian.

The ``openclipart-png`` package holds ~8,100 public-domain PNGs in topic folders (animals,
food, people, ...). The top-level folder is the ground-truth category; ``animals`` (~4%)
plays the rare class. The corpus is fetched with ``apt-get download`` once, unpacked with
``dpkg -x``, deduplicated by content hash and described by a cached JSON manifest.

Run ``python bench/datasets.py openclipart`` to prepare it and print a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

PACKAGE = "openclipart-png"
DATA_ROOT = Path(__file__).resolve().parent / "data"
CLIPART_SUBDIR = Path("usr/share/openclipart/png")  # where the package puts its images
MANIFEST_NAME = "openclipart_manifest.json"
MANIFEST_VERSION = 1
RARE_CATEGORY = "animals"
MAX_PIXELS = 20_000_000


@dataclass(frozen=True)
class ClipArt:
    """One distinct image of a corpus and its ground-truth category."""

    path: Path
    category: str
    sha256: str
    width: int
    height: int


def openclipart(root: Path = DATA_ROOT, deb: Path | None = None) -> list[ClipArt]:
    """The deduplicated Open Clip Art corpus, sorted by path; fetched and indexed on first use.

    ``deb`` names an already downloaded ``openclipart-png_*.deb`` to unpack instead of
    downloading one. The manifest (``root/openclipart_manifest.json``) makes later calls instant.
    """
    root = Path(root)
    manifest = root / MANIFEST_NAME
    if not manifest.exists():
        package = _unpack(root, deb or _download(root))
        _write_manifest(manifest, package, root / CLIPART_SUBDIR)
    data = json.loads(manifest.read_text())
    clipart_root = root / CLIPART_SUBDIR
    return [
        ClipArt(clipart_root / item["path"], item["category"], item["sha256"], item["width"], item["height"])
        for item in data["items"]
    ]


def manifest_summary(root: Path = DATA_ROOT) -> dict:
    """Package, per-category counts and skip counts recorded in the cached manifest."""
    data = json.loads((Path(root) / MANIFEST_NAME).read_text())
    return {
        "package": data["package"],
        "files": data["files"],
        "skipped": data["skipped"],
        "categories": dict(Counter(item["category"] for item in data["items"]).most_common()),
    }


def _download(root: Path) -> Path:
    return apt_download(root, PACKAGE)


def apt_download(root: Path, package: str) -> Path:
    """``apt-get download`` ``package`` into ``root`` (once: a .deb already there is reused); refreshes
    the apt lists once if needed."""
    existing = max(root.glob(f"{package}_*.deb"), default=None)
    if existing is not None:
        return existing
    root.mkdir(parents=True, exist_ok=True)
    command = ["apt-get", "download", package]
    result = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True)
    if result.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        result = subprocess.run(command, check=False, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`apt-get download {package}` failed (try `apt-get update` first):\n{result.stderr}")
    return max(root.glob(f"{package}_*.deb"))


def _unpack(root: Path, deb: Path) -> str:
    """``dpkg -x`` the package into ``root``; returns ``name=version`` for the manifest."""
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version"], check=True, capture_output=True, text=True)
    info = dict(line.split(": ", 1) for line in fields.stdout.splitlines())
    return f"{info['Package']}={info['Version']}"


def _write_manifest(manifest: Path, package: str, clipart_root: Path) -> None:
    """Index every distinct, decodable PNG of at most ``MAX_PIXELS`` under ``clipart_root``."""
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    items = []
    files = sorted(p for p in clipart_root.rglob("*") if p.suffix.lower() == ".png")
    for path in files:
        if path.is_symlink():  # the package links one file into several folders
            skipped["symlink"] += 1
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            skipped["duplicate"] += 1
            continue
        status, size = _check_image(path)
        if status != "ok":
            skipped[status] += 1
            continue
        seen.add(digest)
        relative = path.relative_to(clipart_root)
        items.append(
            {"path": relative.as_posix(), "category": relative.parts[0], "sha256": digest, "width": size[0], "height": size[1]}
        )
    data = {
        "version": MANIFEST_VERSION,
        "package": package,
        "files": len(files),
        "skipped": dict(skipped),
        "items": items,
    }
    manifest.write_text(json.dumps(data, indent=1))


def _check_image(path: Path) -> tuple[str, tuple[int, int]]:
    """``("ok", size)``, ``("too_large", size)`` (size from the header) or ``("unreadable", (0, 0))``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
                if size[0] * size[1] > MAX_PIXELS:
                    return "too_large", size
                image.load()
    except Image.DecompressionBombError:
        return "too_large", (0, 0)
    except (OSError, SyntaxError, ValueError):
        return "unreadable", (0, 0)
    return "ok", size


def subsample_positives(items: list[ClipArt], category: str, fraction: float, seed: int) -> list[ClipArt]:
    """All negatives plus a seeded sample of positives so that positives are ~``fraction`` of the result.

    Keeps at least one positive and the input order, so a 0.1% variant of a 6,900-image
    corpus holds ~7 positives among all the background.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    positives = [i for i, item in enumerate(items) if item.category == category]
    n_negatives = len(items) - len(positives)
    n_keep = max(1, round(fraction * n_negatives / (1.0 - fraction)))
    if n_keep > len(positives):
        raise ValueError(f"{category!r} has {len(positives)} images, {n_keep} needed for fraction {fraction}")
    keep = set(random.Random(seed).sample(positives, n_keep))
    return [item for i, item in enumerate(items) if item.category != category or i in keep]


def stratified_split(
    items: list[ClipArt], category: str, seed: int, test_fraction: float = 0.5
) -> tuple[list[ClipArt], list[ClipArt]]:
    """Seeded ``(train, test)`` split that gives both sides the same share of ``category``."""
    rng = random.Random(seed)
    test: set[int] = set()
    for is_positive in (True, False):
        group = [i for i, item in enumerate(items) if (item.category == category) == is_positive]
        test.update(rng.sample(group, round(len(group) * test_fraction)))
    train = [item for i, item in enumerate(items) if i not in test]
    return train, [item for i, item in enumerate(items) if i in test]


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB image with any transparency composited onto white (how the backbone sees clip art)."""
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def large_jpegs(items: list[ClipArt], out_dir: Path, n: int, long_side: int = 1000, workers: int = 1) -> list[ClipArt]:
    """The first ``n`` items re-encoded as JPEGs whose long side is ``long_side`` px, cached in ``out_dir``.

    Small clip art is upscaled, so a benchmark decodes photo-sized files. A JPEG is named
    after its source's hash and size and is only written when missing.
    """
    if n > len(items):
        raise ValueError(f"asked for {n} JPEGs from {len(items)} images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(item.path, out_dir / f"{item.sha256[:24]}_{long_side}.jpg", long_side) for item in items[:n]]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            sizes = list(pool.map(_write_jpeg, *zip(*jobs, strict=True), chunksize=16))
    else:
        sizes = [_write_jpeg(*job) for job in jobs]
    return [
        ClipArt(target, item.category, hashlib.sha256(target.read_bytes()).hexdigest(), *size)
        for item, (_, target, _), size in zip(items, jobs, sizes, strict=True)
    ]


def _write_jpeg(source: Path, target: Path, long_side: int) -> tuple[int, int]:
    """Write ``target`` unless it exists; returns its ``(width, height)``."""
    if target.exists():
        with Image.open(target) as image:
            return image.size
    with Image.open(source) as image:
        scale = long_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        rgb = flatten_on_white(image).resize(size, Image.Resampling.BICUBIC)
    partial = target.with_name(target.name + ".part")
    rgb.save(partial, format="JPEG", quality=90)
    partial.replace(target)
    return size


def openclipart_project(root: Path = DATA_ROOT, progress=None):
    """A bgminer project over the deduplicated clip art, ingested and embedded (cached on disk).

    Returns ``(project, truth)`` where ``truth`` maps image id -> ClipArt item.
    """
    import csv

    from bgminer.project import Project

    items = openclipart(root)
    project_dir = root / "openclipart-project"
    project = Project.create(project_dir)
    listing = root / "openclipart_paths.csv"
    if not listing.exists():
        with open(listing, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path"])
            writer.writerows([[str(Path(it.path).resolve())] for it in items])
    project.ingest([listing], progress=progress)
    project.embed(progress=progress)
    by_path = {str(Path(it.path).resolve()): it for it in items}
    truth = {row["id"]: by_path[row["path"]] for row in project.store.images() if row["path"] in by_path}
    return project, truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["openclipart"])
    parser.add_argument("--root", type=Path, default=DATA_ROOT, help="where the package is unpacked and indexed")
    parser.add_argument("--deb", type=Path, help="use this downloaded .deb instead of `apt-get download`")
    args = parser.parse_args(argv)
    items = openclipart(args.root, args.deb)
    summary = manifest_summary(args.root)
    print(f"{summary['package']}: {summary['files']} PNG files, {len(items)} distinct images kept")
    print("skipped: " + ", ".join(f"{reason} {count}" for reason, count in sorted(summary["skipped"].items())))
    for category, count in summary["categories"].items():
        marker = "  <- rare class" if category == RARE_CATEGORY else ""
        print(f"  {category:<20} {count:5d}  {100 * count / len(items):5.1f}%{marker}")


if __name__ == "__main__":
    main()
