"""Rebuild ``assets/demo/``: a small, seeded Open Clip Art corpus in which ``animals`` is rare.

The demo holds ``--size`` downscaled PNGs named ``img_0001.png`` ... in shuffled order, so
neither names nor order reveal the class; ``labels.csv`` holds the ground truth (the
package's top-level folder). Negatives are spread over all other categories (allocation
proportional to the square root of each category's size, so small topics still appear).

    python scripts/build_demo.py            # same seed + same package -> same files
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.datasets import RARE_CATEGORY, ClipArt, manifest_summary, openclipart
from bgminer.demo import DEMO_DIR

MAX_BYTES = 10_000_000
MAX_ASPECT = 3.0  # banners and rules make poor thumbnails
MIN_LONG_SIDE = 96

LICENSE_TEMPLATE = """\
# Demo images: source and licence

The {n_images} images in this folder (`images/img_*.png`) are downscaled copies of clip art
from the Open Clip Art Library (https://openclipart.org) as packaged by Debian:
`{package}` (`apt-get download openclipart-png`). The package's copyright file
dedicates the works to the public domain (Creative Commons Public Domain Dedication /
Certification); the copies here are shared under the same dedication.

`labels.csv` (columns `path,category`; paths relative to this folder) is the ground
truth: each image's top-level folder in the package. `{rare}` is the rare class
({n_rare} of {n_images} images, {rare_percent:.1f}%); the others come from
{n_other_categories} other categories. Labels are the package's folders, not a
curated annotation: a few background images also show animals (a cow filed under
`unsorted`, say), as in any real corpus.

Rebuild (deterministic for a given seed and package version):

    python scripts/build_demo.py --seed {seed} --size {n_images} --rare-fraction {rare_fraction} --long-side {long_side}

which downloads and unpacks the package into `bench/data/` on first use (see
`bench/datasets.py`).
"""


def allocate(available: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over categories in proportion to sqrt(size), capped by what each has."""
    quota = dict.fromkeys(available, 0)
    remaining = total
    while remaining > 0:
        open_ = {c: n for c, n in available.items() if quota[c] < n}
        if not open_:
            raise ValueError(f"only {sum(available.values())} images available, {total} asked")
        weights = {c: math.sqrt(n) for c, n in open_.items()}
        scale = remaining / sum(weights.values())
        shares = {c: min(w * scale, available[c] - quota[c]) for c, w in weights.items()}
        floors = {c: math.floor(s) for c, s in shares.items()}
        if sum(floors.values()) == 0:  # hand the last few out by largest share
            for c in sorted(shares, key=lambda c: (-shares[c], c))[:remaining]:
                floors[c] = 1
        for c, k in floors.items():
            quota[c] += k
        remaining = total - sum(quota.values())
    return quota


def choose(items: list[ClipArt], size: int, rare_fraction: float, seed: int) -> list[ClipArt]:
    """Seeded demo selection: ``round(size * rare_fraction)`` rare images, the rest spread over categories."""
    rng = random.Random(seed)
    eligible = [
        item
        for item in items
        if max(item.width, item.height) >= MIN_LONG_SIDE
        and max(item.width, item.height) <= MAX_ASPECT * min(item.width, item.height)
    ]
    by_category: dict[str, list[ClipArt]] = {}
    for item in eligible:
        by_category.setdefault(item.category, []).append(item)
    n_rare = round(size * rare_fraction)
    chosen = rng.sample(by_category.pop(RARE_CATEGORY), n_rare)
    quota = allocate({c: len(group) for c, group in sorted(by_category.items())}, size - n_rare)
    for category, group in sorted(by_category.items()):
        chosen += rng.sample(group, quota[category])
    rng.shuffle(chosen)
    return chosen


def encode(item: ClipArt, long_side: int) -> bytes:
    """PNG bytes of ``item`` shrunk to ``long_side`` (never enlarged); alpha kept only where used."""
    with Image.open(item.path) as source:
        image = source.convert("RGBA")
    scale = min(1.0, long_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if image.getchannel("A").getextrema()[0] == 255:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build(out_dir: Path, size: int, rare_fraction: float, long_side: int, seed: int) -> dict[str, int]:
    """Write the images, ``labels.csv`` and ``LICENSE.md``; returns counts and bytes written."""
    items = openclipart()
    chosen = choose(items, size, rare_fraction, seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("img_*.png"):
        stale.unlink()
    rows = []
    for number, item in enumerate(chosen, start=1):
        name = f"images/img_{number:04d}.png"
        (out_dir / name).write_bytes(encode(item, long_side))
        rows.append((name, item.category))
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "category"])
        writer.writerows(rows)
    n_rare = sum(category == RARE_CATEGORY for _, category in rows)
    (out_dir / "LICENSE.md").write_text(
        LICENSE_TEMPLATE.format(
            n_images=len(rows),
            package=manifest_summary()["package"],
            rare=RARE_CATEGORY,
            n_rare=n_rare,
            rare_percent=100 * n_rare / len(rows),
            n_other_categories=len({category for _, category in rows}) - 1,
            rare_fraction=rare_fraction,
            seed=seed,
            long_side=long_side,
        )
    )
    total_bytes = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    if total_bytes > MAX_BYTES:
        raise RuntimeError(f"demo is {total_bytes / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget")
    return {"images": len(rows), "rare": n_rare, "categories": len({c for _, c in rows}), "bytes": total_bytes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--size", type=int, default=400, help="number of images")
    parser.add_argument("--rare-fraction", type=float, default=0.04, help=f"share of {RARE_CATEGORY!r} images")
    parser.add_argument("--long-side", type=int, default=224, help="downscale so the long side is at most this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stats = build(args.out, args.size, args.rare_fraction, args.long_side, args.seed)
    print(
        f"{args.out}: {stats['images']} images, {stats['rare']} {RARE_CATEGORY} "
        f"({100 * stats['rare'] / stats['images']:.1f}%), {stats['categories']} categories, {stats['bytes'] / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
