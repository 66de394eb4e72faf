"""Speed of one interactive round on CPU, phase by phase, through the real Project API: train
(default mode and epochs), score every image into the new version, activate it, the first page
of 50 candidates (the reviewer waits for these), and the search index, which builds on a
background thread after the round returned.

    python bench/loop.py [--sizes 10000 100000] [--json]
    python bench/loop.py --sizes 1000000 --json     # 1M: ~10 GB of features, run when the machine is idle

10k uses real clip-art features (bench/datasets.py; the 6,883 distinct images, topped up to
10k with jittered copies); larger sizes use synthetic features of the real shape (1280-d
pooled features, 1000 ImageNet logits from the real classifier). Images rows point at no
files: adapter mode never decodes pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bgminer.loop import Miner
from bgminer.project import Project

CATEGORY = "rare"


def real_features(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from bench.datasets import RARE_CATEGORY, openclipart_project

    project, truth = openclipart_project()
    ids = np.array(sorted(truth), dtype=np.int64)
    pooled = project.features.read("pooled", ids)
    logits = project.features.read("logits", ids)
    rare = np.array([truth[int(i)].category == RARE_CATEGORY for i in ids])
    extra = n - len(ids)
    if extra > 0:
        pick = rng.integers(0, len(ids), extra)
        pooled = np.concatenate([pooled, pooled[pick] * rng.normal(1.0, 0.05, (extra, pooled.shape[1])).astype(np.float32)])
        logits = np.concatenate([logits, logits[pick]])
        rare = np.concatenate([rare, rare[pick]])
    return pooled[:n], logits[:n], rare[:n]


def synthetic_features(
    n: int, rng: np.random.Generator, classifier: torch.nn.Linear
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centers = rng.gamma(1.0, 0.4, size=(64, 1280)).astype(np.float32)
    cluster = rng.integers(0, 64, n)
    pooled = centers[cluster] + rng.gamma(1.0, 0.1, size=(n, 1280)).astype(np.float32)
    with torch.inference_mode():
        logits = torch.cat([classifier(torch.from_numpy(pooled[i : i + 8192])) for i in range(0, n, 8192)]).numpy()
    return pooled, logits.astype(np.float16), cluster == 0


def make_project(root: Path, pooled: np.ndarray, logits: np.ndarray) -> Project:
    project = Project.create(root)
    n = len(pooled)
    project.store.add_images([{"path": f"/synthetic/{i}.png", "sha256": f"{i:064x}", "status": "ok"} for i in range(n)])
    ids = np.arange(1, n + 1)
    cache = project.features
    cache.ensure_capacity(n + 1)
    cache.open("pooled", writable=True)[ids] = pooled
    cache.open("logits", writable=True)[ids] = logits
    project.store.mark_embedded(ids.tolist())
    return project


def one_round(project: Project, rare: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    ids = np.arange(1, len(rare) + 1)
    project.add_category(CATEGORY)
    project.label(CATEGORY, rng.choice(ids[rare], 20, replace=False).tolist(), "positive")
    project.label(CATEGORY, rng.choice(ids[~rare], 20, replace=False).tolist(), "negative")
    project.index()  # the pretrained index exists before the first round, as in the app
    t0 = time.perf_counter()
    record = project.train(CATEGORY)
    t1 = time.perf_counter()
    page = Miner(project, CATEGORY, "bench").query(50)
    t2 = time.perf_counter()
    project.wait_for_index()
    t3 = time.perf_counter()
    found = sum(bool(rare[c.image_id - 1]) for c in page)
    train_s, score_s = record.metrics["fit_seconds"], record.metrics["score_seconds"]
    return {
        "train_s": train_s,
        "score_s": score_s,
        "activate_s": (t1 - t0) - train_s - score_s,
        "first_page_s": t2 - t1,
        "round_s": t2 - t0,  # until the reviewer sees the new version's first page
        "index_build_s": project.finder.build_seconds[record.id],  # on its thread, overlapping the first page
        "index_ready_s": t3 - t0,  # until "more like this" uses the new version
        "positives_in_first_page": found,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            if n <= 10_000:
                pooled, logits, rare = real_features(n, rng)
                source = "real clip-art features"
            else:
                pooled, logits, rare = synthetic_features(n, rng, Project.create(Path(tmp) / "probe").backbone.classifier)
                source = "synthetic, real shape"
            project = make_project(Path(tmp) / "p", pooled, logits)
            row = {"images": n, "features": source, **one_round(project, rare, rng)}
            results.append(row)
    if args.json:
        print(json.dumps({"benchmark": "loop", "threads": torch.get_num_threads(), "results": results}))
        return
    columns = ("train_s", "score_s", "activate_s", "first_page_s", "round_s", "index_build_s", "index_ready_s")
    print(f"{'images':>8} {'features':<24} " + " ".join(f"{c:>14}" for c in columns) + f" {'pos in page':>12}")
    for r in results:
        phases = " ".join(f"{r[c]:>14.3f}" for c in columns)
        print(f"{r['images']:>8} {r['features']:<24} {phases} {r['positives_in_first_page']:>12}")


if __name__ == "__main__":
    main()
