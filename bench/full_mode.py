"""Full mode against last-stage (and adapter) at 20 positives, through the product's rounds (issue 11).

    python bench/full_mode.py --device cuda                       # every category of 40+ images, 3 seeds
    python bench/full_mode.py --device cpu --categories computer --seeds 1
    python bench/full_mode.py --device cpu --max-steps 2 --seeds 1 --categories computer   # smoke test

On the demo corpus (assets/demo: 400 clip-art PNGs with their categories), for each category with at
least 40 images and each seed, one project category gets ``--positives`` positives drawn at random and
then one round per mode, in order, through ``Project.train``: adapter, last-stage, then full, whose first
round starts from that last-stage model (``bgminer.modes._full_from_last_stage``: frozen BatchNorm
statistics, the trunk at a tenth of the heads' rate, at least 2,000 unlabeled images per round, here all
~380). After each round the AP of the active model's ranking over the images not labeled is recorded.
``bench/gpu_check.sh`` runs this on CUDA; on 2 CPU cores a full round costs minutes per category.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bgminer.demo import DEMO_DIR, build_demo_project
from bgminer.evaluate import average_precision
from bgminer.project import Project
from bgminer.train import TrainConfig

MODES = ("adapter", "last-stage", "full")


def demo_project(folder: Path, device: str) -> tuple[Project, dict[int, str]]:
    """The demo project (``bgminer.demo``) built in ``folder``; image id -> its category from the demo's labels."""
    project = build_demo_project(folder / "demo", device=device)
    with open(DEMO_DIR / "labels.csv", newline="") as f:
        truth = {str((DEMO_DIR / r["path"]).resolve()): r["category"] for r in csv.DictReader(f)}
    by_id = {project.store.image_id_for_path(p): c for p, c in truth.items()}
    return project, {i: c for i, c in by_id.items() if i is not None}


def compare(
    project: Project,
    category_of: dict[int, str],
    categories: list[str],
    seeds: int,
    positives: int,
    device: str,
    max_steps: int | None = None,
    modes: tuple[str, ...] = MODES,
) -> list[dict]:
    """One row per (category, seed, mode): AP over the unlabeled images, positives, round seconds."""
    rows = []
    ids = np.array(sorted(category_of), dtype=np.int64)
    for category in categories:
        truth = np.array([category_of[int(i)] == category for i in ids])
        members = ids[truth]
        for seed in range(seeds):
            name = f"{category}-seed{seed}"
            project.add_category(name)
            chosen = np.random.default_rng(seed).choice(members, positives, replace=False)
            project.label(name, [int(i) for i in chosen], "positive")
            rest = ~np.isin(ids, chosen)
            for mode in modes:
                config = TrainConfig(mode=mode, device=device, max_steps=max_steps, seed=seed)
                t0 = time.perf_counter()
                record = project.train(name, config)
                seconds = time.perf_counter() - t0
                scored_ids, scores = project.scores(name)
                order = np.searchsorted(scored_ids, ids)
                rows.append({
                    "category": category,
                    "seed": seed,
                    "mode": mode,
                    "warm_from_model": record.parent_id,
                    "positives": positives,
                    "hidden_positives": int(truth[rest].sum()),
                    "unlabeled": int(rest.sum()),
                    "ap": average_precision(truth[rest], scores[order][rest]),
                    "round_seconds": seconds,
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> dict[str, dict]:
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        aps = np.array([r["ap"] for r in rows if r["mode"] == mode])
        secs = np.array([r["round_seconds"] for r in rows if r["mode"] == mode])
        out[mode] = {
            "ap_mean": float(aps.mean()),
            "ap_std": float(aps.std()),
            "runs": len(aps),
            "round_seconds_median": float(np.median(secs)),
        }
    return out


def run(device: str, categories: list[str] | None, seeds: int, positives: int, max_steps: int | None, modes=MODES) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project, category_of = demo_project(Path(tmp), device)
        counts = {c: sum(v == c for v in category_of.values()) for c in set(category_of.values())}
        if categories is None:
            categories = sorted(c for c, n in counts.items() if n >= 2 * positives)
        unknown = [c for c in categories if c not in counts]
        if unknown:
            raise SystemExit(f"unknown demo categories {unknown}; the demo has {sorted(counts)}")
        load_before = os.getloadavg()[0]
        rows = compare(project, category_of, categories, seeds, positives, device, max_steps, modes)
        project.finder.wait()
    return {
        "device": device,
        "positives": positives,
        "categories": {c: counts[c] for c in categories},
        "seeds": seeds,
        "max_steps": max_steps,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "summary": summary(rows),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--categories", nargs="*", default=None, help="default: every one with 2x positives images")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--positives", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=None, help="cap each round (smoke tests only)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.device, args.categories, args.seeds, args.positives, args.max_steps, tuple(args.modes))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    load = result["load_average_before"]
    print(f"full vs last-stage, {args.positives} positives, demo corpus, device {args.device}, load {load:.1f}")
    for mode, s in result["summary"].items():
        ap = f"AP {s['ap_mean']:.3f} ± {s['ap_std']:.3f} ({s['runs']} runs)"
        print(f"  {mode:10s}  {ap}  round {s['round_seconds_median']:.1f} s")


if __name__ == "__main__":
    main()
