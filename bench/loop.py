"""Speed of one interactive round on CPU, phase by phase, through the real Project API: train
(default mode and epochs), score every image into the new version, activate it, the first page
of 50 candidates (the reviewer waits for these), and the search index, which builds on a
background thread after the round returned.

    python bench/loop.py [--sizes 10000 100000] [--json]
    python bench/loop.py --sizes 1000000 --json     # 1M: ~10 GB of features, run when the machine is idle

10k uses real clip-art features (bench/datasets.py; the 6,883 distinct images, topped up to
10k with jittered copies); larger sizes use synthetic features of the real shape (1280-d
pooled features, 1000 ImageNet logits from the real classifier), generated and written chunk
by chunk (1M x 1280 never sits in RAM). Images rows point at no files: adapter mode never
decodes pixels.

Memory per round (this process, sampled every 0.1 s from /proc/self/status from the start of
training until the round returns): peak RSS (``VmHWM`` after resetting it), and its anonymous
(heap, tensors) and file-backed (mapped files: feature cache, libraries) parts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bgminer.loop import Miner
from bgminer.project import Project

CATEGORY = "animals"  # a WordNet word, so the default queue pays for reading the name (NamePrior)


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


CHUNK = 65_536


def synthetic_chunks(
    n: int, rng: np.random.Generator, classifier: torch.nn.Linear
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(pooled, logits, rare) for ``n`` images, CHUNK rows at a time: 64 clusters, cluster 0 is rare."""
    centers = rng.gamma(1.0, 0.4, size=(64, 1280)).astype(np.float32)
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        cluster = rng.integers(0, 64, rows)
        pooled = centers[cluster] + rng.gamma(1.0, 0.1, size=(rows, 1280)).astype(np.float32)
        with torch.inference_mode():
            logits = classifier(torch.from_numpy(pooled)).numpy().astype(np.float16)
        yield pooled, logits, cluster == 0


def make_project(root: Path, n: int, chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[Project, np.ndarray]:
    """A project of ``n`` embedded images whose cached features come from ``chunks``; returns it and the rare mask."""
    from bgminer.feature_cache import write_rows

    project = Project.create(root)
    for start in range(0, n, 100_000):
        rows = range(start, min(n, start + 100_000))
        project.store.add_images([{"path": f"/synthetic/{i}.png", "sha256": f"{i:064x}", "status": "ok"} for i in rows])
    cache = project.features
    cache.ensure_capacity(n + 1)
    rare, begin = [], 1
    for pooled, logits, is_rare in chunks:
        ids = np.arange(begin, begin + len(pooled))
        write_rows(cache.path("pooled"), ids, pooled)
        write_rows(cache.path("logits"), ids, logits.astype(np.float16))
        project.store.mark_embedded(ids.tolist())
        rare.append(is_rare)
        begin += len(pooled)
    return project, np.concatenate(rare)


class MemorySampler:
    """Peak RSS (VmHWM, reset at start) and the peaks of its anonymous and file-backed parts, in MB."""

    def __init__(self) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) // 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.status()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            self._stop.wait(0.1)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        now = self.status()
        return {"peak_rss_mb": now["VmHWM"], "peak_rss_anon_mb": self.peak["RssAnon"], "peak_rss_file_mb": self.peak["RssFile"]}


def one_round(project: Project, rare: np.ndarray, rng: np.random.Generator, reviewing: bool = False) -> dict[str, float]:
    ids = np.arange(1, len(rare) + 1)
    project.add_category(CATEGORY)
    project.label(CATEGORY, rng.choice(ids[rare], 20, replace=False).tolist(), "positive")
    project.label(CATEGORY, rng.choice(ids[~rare], 20, replace=False).tolist(), "negative")
    project.index()  # the pretrained index exists before the first round, as in the app
    if reviewing:  # the round starts mid-review (auto-retrain): the reviewer's previous page was ranked
        Miner(project, CATEGORY, "bench").query(50)
    memory = MemorySampler()
    t0 = time.perf_counter()
    record = project.train(CATEGORY)
    t1 = time.perf_counter()
    round_memory = memory.stop()
    page = Miner(project, CATEGORY, "bench").query(50)
    t2 = time.perf_counter()
    project.wait_for_index()
    t3 = time.perf_counter()
    Miner(project, CATEGORY, "bench").query(50)  # the page after: what the pretrained rankers remembered
    t_next = time.perf_counter() - t3
    found = sum(bool(rare[c.image_id - 1]) for c in page)
    train_s, score_s = record.metrics["fit_seconds"], record.metrics["score_seconds"]
    return {
        "train_s": train_s,
        "score_s": score_s,
        "activate_s": (t1 - t0) - train_s - score_s,
        "first_page_s": t2 - t1,  # the first query of this process: nothing remembered yet
        "next_page_s": t_next,  # a second query (the category name's mass per image is remembered)
        "round_s": t2 - t0,  # until the reviewer sees the new version's first page
        "index_build_s": project.finder.build_seconds[record.id],  # on its thread, overlapping the first page
        "index_ready_s": t3 - t0,  # until "more like this" uses the new version
        "positives_in_first_page": found,
        **round_memory,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reviewing", action="store_true",
                        help="rank one page before the round, as when auto-retrain starts it mid-review")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            if n <= 10_000:
                pooled, logits, rare = real_features(n, rng)
                chunks = iter([(pooled, logits, rare)])
                source = "real clip-art features"
            else:
                chunks = synthetic_chunks(n, rng, Project.create(Path(tmp) / "probe").backbone.classifier)
                source = "synthetic, real shape"
            project, rare = make_project(Path(tmp) / "p", n, chunks)
            load = os.getloadavg()[0]
            row = {"images": n, "features": source, **one_round(project, rare, rng, args.reviewing), "reviewing": args.reviewing}
            row.update(load_average_before=round(load, 2), load_average_after=round(os.getloadavg()[0], 2))
            results.append(row)
    if args.json:
        print(json.dumps({"benchmark": "loop", "threads": torch.get_num_threads(), "results": results}))
        return
    columns = ("train_s", "score_s", "activate_s", "first_page_s", "next_page_s", "round_s", "index_build_s", "index_ready_s")
    header = " ".join(f"{c:>14}" for c in columns)
    print(f"{'images':>8} {'features':<24} {header} {'pos in page':>12} {'peak RSS MB':>12}")
    for r in results:
        phases = " ".join(f"{r[c]:>14.3f}" for c in columns)
        print(f"{r['images']:>8} {r['features']:<24} {phases} {r['positives_in_first_page']:>12} {r['peak_rss_mb']:>12}")


if __name__ == "__main__":
    main()
