"""Ingest throughput: files/s for hashing + validation + thumbnailing into a fresh store.

Uses the first N Open Clip Art PNGs (bench/datasets.py; median ~190 px), or N generated
PNGs of similar size with ``--source synthetic``. Every run starts cold: new store, new
thumbnail folder. The machine's load average is printed beside the numbers, since other
work on the same cores slows ingest down.

    python bench/ingest.py [--n 2000] [--workers 1 2] [--source openclipart|synthetic] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bgminer.corpus import ingest
from bgminer.store import Store


def clipart_files(n: int) -> list[Path]:
    from datasets import openclipart

    return [item.path for item in openclipart()[:n]]


def synthetic_files(n: int, folder: Path) -> list[Path]:
    """Varied small PNGs: RGB, RGBA and palette images of 64..320 px with flat shapes and noise."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(64, 320, 2))
        arr = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, (min(h // 3, h - y), min(w // 3, w - x), 3))
        img = Image.fromarray(arr)
        img = [img, img.convert("RGBA"), img.convert("P")][i % 3]
        paths.append(folder / f"img_{i:05d}.png")
        img.save(paths[-1])
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers are forked from
    this single-threaded script, and are joined when ingest returns)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(files: list[Path], workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bgminer-bench-ingest-") as tmp:
        store = Store(Path(tmp) / "project.db")
        cpu = cpu_seconds()
        report = ingest(store, files, Path(tmp) / "thumbs", Path(tmp) / "uploads", workers=workers)
        cpu = cpu_seconds() - cpu
        store.close()
    return {
        "workers": workers,
        "files": report.total_seen,
        "added": report.added,
        "rejected": sum(report.rejected.values()),
        "seconds": round(report.seconds, 3),
        "files_per_second": round(report.files_per_second, 1),
        "cpu_ms_per_file": round(1000 * cpu / max(report.total_seen, 1), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    parser.add_argument("--source", choices=["openclipart", "synthetic"], default="openclipart")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bgminer-bench-files-") as tmp:
        source = args.source
        if source == "openclipart":
            try:
                files = clipart_files(args.n)
            except (RuntimeError, OSError) as e:  # no package mirror reachable: fall back, and say so
                print(f"openclipart unavailable ({e}); using synthetic PNGs", file=sys.stderr)
                source = "synthetic"
        if source == "synthetic":
            files = synthetic_files(args.n, Path(tmp) / "images")
        load_before = os.getloadavg()[0]
        runs = [measure(files, w) for w in args.workers]

    best_cpu = min(r["cpu_ms_per_file"] for r in runs)
    result = {
        "source": source,
        "n": len(files),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "runs": runs,
        # What the measured CPU cost per file allows on idle cores, with perfect scaling.
        "projected_files_per_second_idle": round(1000 * len(os.sched_getaffinity(0)) / best_cpu, 1),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"ingest of {result['n']} {source} files, cold store; {result['cpus']} CPUs, "
          f"load average {result['load_average_before']} -> {result['load_average_after']}")
    print(f"{'workers':>8} {'files':>7} {'added':>7} {'rejected':>9} {'seconds':>8} {'files/s':>9} {'CPU ms/file':>12}")
    for r in runs:
        print(
            f"{r['workers']:>8} {r['files']:>7} {r['added']:>7} {r['rejected']:>9} {r['seconds']:>8.2f}"
            f" {r['files_per_second']:>9.1f} {r['cpu_ms_per_file']:>12.2f}"
        )
    print(f"projected on {result['cpus']} idle CPUs from the CPU cost: {result['projected_files_per_second_idle']} files/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
