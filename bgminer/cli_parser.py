"""The command line's grammar: every sub-command with its arguments and help.

What each sub-command does is in :mod:`bgminer.cli` (``COMMANDS``); this module imports nothing
heavy, so ``bgminer --help`` and light commands start fast.
"""

from __future__ import annotations

import argparse

from .modes import AUTO_MODE, MODES
from .tables import NEGATIVE_SUFFIX


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgminer", description="Find rare classes in large image collections.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a project folder")
    p.add_argument("project")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument(
        "--backbone-weights", default=None, help="weights file for the backbone (e.g. a torchvision ResNet-50 checkpoint)"
    )

    p = sub.add_parser("ingest", help="add images: folders, files, .zip archives, .csv lists")
    p.add_argument("project")
    p.add_argument("paths", nargs="+")
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("embed", help="compute backbone features for every new image")
    p.add_argument("project")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--engine", default="local", choices=["local", "ray"],
        help="ray: Ray Data actor pool, feature shards (pip install 'bgminer[ray]')",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001); default: start Ray on this machine"
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rescore", help="re-score every embedded image with the active model and rebuild its index")
    p.add_argument("project")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--engine", default="local", choices=["local", "ray"],
        help="ray: one Ray actor per chunk of cached features (pip install 'bgminer[ray]')",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001); default: start Ray on this machine"
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="counts: images, rejected, embedded, labels")
    p.add_argument("project")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "backup", help="a consistent copy of a project (database, checkpoints, active scores), safe while the app runs"
    )
    p.add_argument("project")
    p.add_argument("dest", help="a new (or empty) folder; written as DEST.partial and renamed when complete")
    p.add_argument(
        "--with-features", action="store_true",
        help="copy the feature cache too (otherwise the copy re-embeds on its first embed)",
    )
    p.add_argument(
        "--with-thumbnails", action="store_true",
        help="copy the thumbnails too (the app shows images by them; without them, copy thumbs/ back by hand)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="build the ready-to-use demo project")
    p.add_argument("project")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("label", help="label images by path, or from a CSV (path,category,label)")
    p.add_argument("project")
    p.add_argument("--category")
    p.add_argument("--positive", nargs="*", default=[])
    p.add_argument("--negative", nargs="*", default=[])
    p.add_argument("--csv")
    p.add_argument("--author", default=None, help="who decides (default: the OS user; with --csv: the CSV's author column)")
    p.add_argument(
        "--review", action="store_true",
        help="record as review decisions: they count toward the project's auto-retrain threshold, and a due round trains here",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "skip", help="leave images out of your review queue for a category (the app's Skip; others still see them)"
    )
    p.add_argument("project")
    p.add_argument("--category", required=True)
    p.add_argument("images", nargs="+", help="image paths or ids")
    p.add_argument("--author", default=None, help="whose queue (default: the OS user)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("undo", help="undo your latest label decision in a category (only while nobody changed it since)")
    p.add_argument("project")
    p.add_argument("--category", required=True)
    p.add_argument("--author", default=None, help="whose decision (default: the OS user)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("train", help="train a background-splitting model round, re-score and re-index")
    p.add_argument("project")
    p.add_argument("--category", action="append", help="category to train (repeatable; default: all with positives)")
    p.add_argument(
        "--mode", default="adapter", choices=[*MODES, AUTO_MODE],
        help="auto: last-stage on CUDA once every category has enough positives, else adapter",
    )
    p.add_argument("--aux-weight", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rank", help="the review queue: likely positives not yet labeled")
    p.add_argument("project")
    p.add_argument("--category", required=True)
    p.add_argument("--strategy", default="auto",
                   help="auto (the default: the benchmark-chosen mix), most-likely, uncertain, near-positives, probe, "
                        "new-modes, class-lift, name (the ImageNet classes the category's name means), unexplored, random, "
                        "mixed or validate (the estimator's sample)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--author", default=None, help="whose queue: leaves out their skips (default: the OS user)")
    p.add_argument("--pool-neighbors", type=int, default=None, metavar="K",
                   help="rank only among the K nearest neighbours of each positive (SEALS candidate pool; large corpora)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("search", help="more like an image (in the corpus or not), or by text over ImageNet classes")
    p.add_argument("project")
    p.add_argument("--like")
    p.add_argument("--text")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="labels, reviews, positives found and an estimate of how many remain")
    p.add_argument("project")
    p.add_argument("--category", required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a trained classifier as one TorchScript file (+ metadata.json, state_dict.pt)")
    p.add_argument("project")
    p.add_argument("--category", default=None, help="export the active model of this category (default: the newest model)")
    p.add_argument("--model-version", type=int, default=None, help="export this model version instead")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="score image files or folders with an exported model (no project needed)")
    p.add_argument("model", help="model.ts file or the export folder")
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("export-labels", help="write the current labels as CSV")
    p.add_argument("project")
    p.add_argument("--out", required=True)
    p.add_argument("--category", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("import-labels", help="apply a labels CSV (path, category, label[, author, sha256])")
    p.add_argument("project")
    p.add_argument("csv")
    p.add_argument("--author", default=None, help="record every label under this author (default: the CSV's author column)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export-scores", help="write every image's score per category (CSV or Parquet)")
    p.add_argument("project")
    p.add_argument("--out", required=True, help=".csv or .parquet")
    p.add_argument("--format", default=None, choices=["csv", "parquet"], help="default: from the suffix of --out")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export-folders", help="ImageNet-style tree OUT/<category>/ of the labeled positives")
    p.add_argument("project")
    p.add_argument("--out", required=True)
    p.add_argument("--copy", action="store_true", help="copy the files (default: symbolic links)")
    p.add_argument("--negatives", action="store_true", help=f"also write reviewed negatives to OUT/<category>{NEGATIVE_SUFFIX}/")
    p.add_argument("--category", action="append", default=None, help="only this category (repeatable)")
    p.add_argument("--json", action="store_true")
    return parser
