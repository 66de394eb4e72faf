"""Peak memory while embedding, at several corpus sizes: does it grow with the corpus?

    python bench/memory.py [--sizes 10000 100000] [--workers 2] [--batch-size 32] [--json]

Each size runs in a fresh child process that embeds N images (the Open Clip Art PNGs of
bench/datasets.py, cycled through per-round symlinks so the store holds N distinct paths) into a
fresh project, exactly as ``bgminer embed`` does (decode worker processes included). Reported per size:

- ``maxrss_main_mb`` / ``maxrss_children_mb``: ``getrusage(RUSAGE_SELF / RUSAGE_CHILDREN).ru_maxrss``
  of the embedding process, i.e. its peak resident set, and the largest peak of any one of its
  (finished) decode workers. RSS counts anonymous memory (heap, tensors) *and* file pages mapped
  into the process (the feature files, shared libraries); the second kind is page cache the kernel
  can drop at any time, but it still counts.
- ``peak_pss_*_mb``: the process tree (embedder + workers), sampled from outside every 0.5 s in
  ``/proc/<pid>/smaps_rollup``: proportional set size, so pages shared between the embedder and
  its forked workers count once, split into anonymous and file-backed.
- ``growth``: largest size over smallest, for each figure (target: < 1.2 from 10k to 100k).

The machine's load average is printed beside the numbers; heavy: 100k images take about an hour
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from bench.datasets import openclipart
from bgminer.backbone import load_backbone
from bgminer.feature_cache import FeatureCache
from bgminer.features import embed_images
from bgminer.store import Store

items = openclipart()
with tempfile.TemporaryDirectory(prefix="bgminer-bench-memory-") as tmp:
    paths = []
    for i in range({n}):
        link = Path(tmp) / f"r{{i // len(items)}}" / f"{{i % len(items)}}.png"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(items[i % len(items)].path)
        paths.append(link)
    store = Store(Path(tmp) / "bench.sqlite")
    store.add_images([{{"path": str(p), "sha256": f"{{i:064x}}", "status": "ok"}} for i, p in enumerate(paths)])
    del paths
    bb = load_backbone()
    cache = FeatureCache(Path(tmp) / "features", bb.feature_dim, len(bb.class_names), bb.map_shape)
    print("START", flush=True)
    report = embed_images(store, cache, bb, batch_size={batch_size}, device="cpu", workers={workers})
print(json.dumps({{
    "images": report.embedded,
    "images_per_second": report.images_per_second,
    "workers": report.workers,
    "maxrss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "maxrss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}}))
"""


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (decode workers, a forkserver and its children)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def tree_pss(root: int) -> tuple[dict[str, float], int]:
    """Proportional set size (MB) of a process tree, total and by kind."""
    total = {"Pss": 0.0, "Pss_Anon": 0.0, "Pss_File": 0.0}
    pids = descendants(root)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in total:
                        total[key] += int(rest.split()[0]) / 1024
        except OSError:
            continue
    return total, len(pids)


def measure(n: int, workers: int | None, batch_size: int, threads: int) -> dict:
    code = CHILD.format(root=str(ROOT), n=n, workers=workers, batch_size=batch_size, threads=threads)
    load = os.getloadavg()[0]
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # "START": the corpus is set up, embedding begins
    peak = {"Pss": 0.0, "Pss_Anon": 0.0, "Pss_File": 0.0, "processes": 0}
    before, _ = tree_pss(child.pid)
    while child.poll() is None:
        total, processes = tree_pss(child.pid)
        for key, value in total.items():
            peak[key] = max(peak[key], value)
        peak["processes"] = max(peak["processes"], processes)
        time.sleep(0.5)
    out = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"the embedding child failed ({child.returncode})")
    row = json.loads(out.strip().splitlines()[-1])
    return {
        **row,
        "pss_before_mb": before["Pss"],
        "peak_pss_mb": peak["Pss"],
        "peak_pss_anon_mb": peak["Pss_Anon"],
        "peak_pss_file_mb": peak["Pss_File"],
        "processes": peak["processes"],
        "load_average_before": round(load, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workers", type=int, default=None, help="decode worker processes (default: bgminer's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of the embedder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [measure(n, args.workers, args.batch_size, args.threads) for n in args.sizes]
    keys = ("maxrss_main_mb", "maxrss_children_mb", "peak_pss_mb", "peak_pss_anon_mb", "peak_pss_file_mb")
    growth = {k: rows[-1][k] / rows[0][k] for k in keys if rows[0][k]} if len(rows) > 1 else {}
    result = {"benchmark": "memory", "cpus": len(os.sched_getaffinity(0)), "results": rows, "growth": growth}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'images':>8} {'img/s':>7} {'workers':>7} " + " ".join(f"{k:>19}" for k in keys) + f" {'load':>11}")
    for r in rows:
        load = f"{r['load_average_before']:.1f}->{r['load_average_after']:.1f}"
        figures = " ".join(f"{r[k]:>19.0f}" for k in keys)
        print(f"{r['images']:>8} {r['images_per_second']:>7.1f} {r['workers']:>7} {figures} {load:>11}")
    if growth:
        print("growth " + " ".join(f"{k}={v:.2f}" for k, v in growth.items()))


if __name__ == "__main__":
    main()
