"""Corpus map benchmark: computing the map (bgminer.corpus_map.layout) at 10k and 100k images,
phase by phase, then what a page rerun costs once it is cached.

    .venv/bin/python bench/map.py [--sizes 10000 100000] [--methods tsne pca] [--sample 5000] [--json]

Each case runs in a fresh process: a project whose image rows carry synthetic clustered pooled
features of the product's width (the backbone's, 1280-d: 64 gamma clusters plus gamma noise, as
bench/loop.py), 20 positives and 20 negatives labeled, then ``layout(refresh=True)`` through
``Project``: seconds per phase (sample + PCA, 2-D reduction, placing every image, clusters),
the first-time total and the process's peak RSS (and its RSS before, torch included). Then the
cached map: ``corpus_map.cached`` (what the page reads) and the whole Map page rerun through
Streamlit's AppTest (server side: reading the cache, today's labels, building the chart). The
load average is printed beside the numbers: on a shared machine, rerun when it is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CATEGORY = "rare"
CHUNK = 16_384


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def make_project(root: Path, n: int):
    """A project of ``n`` image rows (no files) with clustered pooled features written straight into the cache."""
    from bgminer.project import Project

    project = Project.create(root)
    project.store.add_images([{"path": f"/synthetic/{i}.png", "sha256": f"{i:064x}", "status": "ok"} for i in range(n)])
    dim = project.backbone.feature_dim
    rng = np.random.default_rng(0)
    centres = rng.gamma(1.0, 0.4, size=(64, dim)).astype(np.float32)
    cluster = rng.integers(0, 64, n)
    pooled = np.lib.format.open_memmap(project.features.path("pooled"), mode="w+", dtype=np.float32, shape=(n + 1, dim))
    for start in range(0, n, CHUNK):
        part = cluster[start : start + CHUNK]
        pooled[1 + start : 1 + start + len(part)] = centres[part] + rng.gamma(1.0, 0.1, size=(len(part), dim)).astype(np.float32)
    pooled.flush()
    del pooled
    ids = np.arange(1, n + 1)
    project.store.mark_embedded(ids.tolist())
    project.add_category(CATEGORY)
    project.label(CATEGORY, rng.choice(ids[cluster == 0], 20, replace=False).tolist(), "positive")
    project.label(CATEGORY, rng.choice(ids[cluster != 0], 20, replace=False).tolist(), "negative")
    return project, dim


def page_rerun_seconds(root: Path, method: str, sample: int, repeats: int) -> list[float]:
    """Seconds of whole Map page reruns (server side) with the map cached."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    at.session_state["project_root"] = str(root)
    at.run()
    at.switch_page("app_pages/map.py")
    at.session_state["map_method"], at.session_state["map_sample"] = method, sample
    at.run()
    if at.exception or not at.get("vega_lite_chart"):
        raise RuntimeError(f"the Map page did not draw the map: {[e.value for e in at.exception]}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
    return times


def one_case(n: int, method: str, sample: int, threads: int) -> dict:
    import faiss

    from bgminer import corpus_map

    faiss.omp_set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "p"
        project, dim = make_project(root, n)
        load_before = os.getloadavg()[0]
        rss_before = rss_mb()
        start = time.perf_counter()
        made = corpus_map.layout(project, CATEGORY, method, sample, refresh=True)
        first = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        reads = []
        for _ in range(5):
            start = time.perf_counter()
            cached = corpus_map.cached(project, CATEGORY, method, sample)
            reads.append(time.perf_counter() - start)
        assert cached is not None and not cached.stale
        page = page_rerun_seconds(root, method, sample, repeats=3)
        return {
            "images": n, "dim": dim, "method": method, "sample": len(made.ids), "placed": made.placed,
            "clusters": len(made.clusters), "without_positive": len(made.without_positive()),
            "phases_s": made.seconds, "first_time_s": round(first, 3),
            "cached_read_s": round(statistics.median(reads), 4), "page_rerun_s": round(statistics.median(page), 3),
            "rss_before_mb": round(rss_before), "peak_rss_mb": round(peak),
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "threads": threads,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--methods", nargs="+", default=["tsne", "pca"], choices=["tsne", "pca"])
    parser.add_argument("--sample", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="BLAS/faiss threads (openTSNE runs on one)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--case", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # the child process of one case
        print(json.dumps(one_case(int(args.case[0]), args.case[1], args.sample, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    results = []
    for n in args.sizes:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--case", str(n), method, "--sample", str(args.sample),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"case {n} {method} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not args.json:
                print_row(results[-1], header=len(results) == 1)
    if args.json:
        print(json.dumps({"benchmark": "map", "results": results}))


def print_row(r: dict, header: bool) -> None:
    phases = ("sample_pca", "reduce", "place", "clusters")
    if header:
        print(f"{'images':>8} {'method':>6} " + " ".join(f"{p:>10}" for p in phases)
              + f" {'first s':>8} {'read s':>7} {'page s':>7} {'peak MB':>8} {'RSS0 MB':>8} {'load':>10}")
    print(f"{r['images']:>8} {r['method']:>6} " + " ".join(f"{r['phases_s'][p]:>10.2f}" for p in phases)
          + f" {r['first_time_s']:>8.2f} {r['cached_read_s']:>7.3f} {r['page_rerun_s']:>7.3f} {r['peak_rss_mb']:>8}"
          + f" {r['rss_before_mb']:>8} {r['loadavg_before']:>4.1f}-{r['loadavg_after']:<4.1f}", flush=True)


if __name__ == "__main__":
    main()
