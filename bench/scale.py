"""Scale benchmark: Ray embedding overhead, and kNN search over 1M-10M vectors.

    .venv/bin/python bench/scale.py embed [--n 400] [--json]
    .venv/bin/python bench/scale.py rescore [--n 200000] [--json]
    .venv/bin/python bench/scale.py index [--sizes 1000000 10000000] [--json]

``embed``: the same N clip-art PNGs (bench/datasets.py) embedded by the in-process pipeline
(bgminer.features.embed_images) and by Ray local mode (bgminer.ray_engine.embed_on_ray, Ray
started with this machine's cores), alternating, each into a fresh store. Reports end-to-end
images/s (Ray: actor start-up included, ``ray.init`` excluded and shown apart), steady-state
images/s (first to last finished batch/shard), their ratios, and the largest difference between
the two runs' features.

``rescore``: adapter-mode re-scoring (bgminer.scoring.rescore_version) of N cached pooled
features streamed from a memory-mapped file, in process and on Ray local mode: rows/s.

``index``: synthetic clustered vectors of the real dimensionality (bench/knn.py's generator:
gaussian clusters in a 64-d subspace, a shared mean direction, isotropic noise), generated chunk
by chunk and never held whole (10M x 1280 float32 would be 51 GB). The index is trained on a
sample, filled chunk by chunk; the same pass computes exact top-10 for tuning and evaluation
queries (fresh draws, not in the index). Reports build time, index bytes (serialised size),
the process's RSS growth while building, single-query p50/p95 latency and recall@10.

Timings on a shared machine are noisy: rerun, and compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.knn import CLUSTER_SPREAD, CLUSTERS, NOISE, SUBSPACE, Synthetic
from bgminer.index import IVFConfig, IVFPQConfig, IVFPQIndex, auto_kind, exact_knn, make_index, recall_at_k

GEN_CHUNK = 65_536


# -- embedding ---------------------------------------------------------------------------------
class _Clock:
    """Progress callback that keeps (time, done) so a steady-state rate can be read off."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if done:
            self.marks.append((time.perf_counter(), done))

    def steady_rate(self) -> float | None:
        if len(self.marks) < 3:
            return None
        (t0, d0), (t1, d1) = self.marks[0], self.marks[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None


def _embed_once(engine: str, paths: list[Path], root: Path, batch_size: int, shard_rows: int) -> dict:
    from bench.embed import _store_for
    from bgminer.backbone import load_backbone
    from bgminer.features import embed_images
    from bgminer.ray_engine import RayConfig, embed_on_ray

    root.mkdir(parents=True)
    store, cache = _store_for(paths, root)
    clock = _Clock()
    if engine == "local":
        rep = embed_images(store, cache, load_backbone(), batch_size=batch_size, progress=clock)
    else:
        config = RayConfig(shard_rows=shard_rows, batch_size=batch_size)
        rep = embed_on_ray(store, cache, "efficientnet_lite0", None, config, progress=clock)
    ids = np.asarray(store.image_ids(), np.int64)
    return {
        "engine": engine,
        "images": rep.embedded,
        "seconds": round(rep.seconds, 2),
        "images_per_second": round(rep.embedded / rep.seconds, 2),
        "steady_images_per_second": None if clock.steady_rate() is None else round(clock.steady_rate(), 2),
        "pooled": cache.read("pooled", ids),
        "logits": cache.read("logits", ids).astype(np.float32),
    }


def bench_embed(n: int, batch_size: int, shard_rows: int, repeats: int) -> dict:
    import ray
    import torch

    from bench.datasets import openclipart
    from bgminer.backbone import load_backbone

    paths = [item.path for item in openclipart()[:n]]
    load_backbone()
    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    runs: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(repeats):
                for engine in ("local", "ray"):
                    runs.append(_embed_once(engine, paths, Path(tmp) / f"{engine}{r}", batch_size, shard_rows))
    finally:
        ray.shutdown()
    local = [x for x in runs if x["engine"] == "local"]
    remote = [x for x in runs if x["engine"] == "ray"]

    def best(rows: list[dict], key: str) -> float | None:
        values = [x[key] for x in rows if x[key] is not None]
        return max(values) if values else None

    result = {
        "benchmark": "scale-embed",
        "images": len(paths),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "shard_rows": shard_rows,
        "ray_init_s": round(ray_init_s, 2),
        "runs": [{k: v for k, v in x.items() if k not in ("pooled", "logits")} for x in runs],
        "max_abs_diff_pooled": float(max(np.abs(a["pooled"] - b["pooled"]).max() for a, b in zip(local, remote, strict=True))),
        "max_abs_diff_logits": float(max(np.abs(a["logits"] - b["logits"]).max() for a, b in zip(local, remote, strict=True))),
    }
    for key in ("images_per_second", "steady_images_per_second"):
        lo, hi = best(local, key), best(remote, key)
        result[f"ratio_{key}"] = round(hi / lo, 3) if lo and hi else None
    return result


def print_embed(result: dict) -> None:
    print(
        f"{result['images']} images, {result['cores']} cores, torch threads {result['torch_threads']}, "
        f"batch {result['batch_size']}, shard {result['shard_rows']} images; ray.init {result['ray_init_s']} s (not counted)"
    )
    print(f"{'engine':<7} {'seconds':>8} {'img/s':>7} {'steady img/s':>13}")
    for run in result["runs"]:
        print(f"{run['engine']:<7} {run['seconds']:>8} {run['images_per_second']:>7} {run['steady_images_per_second']!s:>13}")
    print(
        f"ray / in-process (best of each): end-to-end {result['ratio_images_per_second']}, steady "
        f"{result['ratio_steady_images_per_second']}"
    )
    print(f"max |ray - in-process|: pooled {result['max_abs_diff_pooled']:.2e}, logits {result['max_abs_diff_logits']:.2e}")


# -- re-scoring --------------------------------------------------------------------------------
def bench_rescore(n: int, chunk_rows: int, engines: list[str]) -> dict:
    """Adapter-mode re-scoring of ``n`` cached pooled features (random, in a memory-mapped file), streamed."""
    import torch

    from bgminer.backbone import load_backbone
    from bgminer.model import build_model
    from bgminer.ray_engine import RayConfig
    from bgminer.scoring import rescore_version

    model = build_model("adapter", load_backbone(), ["rare"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        pooled = np.lib.format.open_memmap(
            Path(tmp) / "pooled.npy", mode="w+", dtype=np.float32, shape=(n + 1, model.embedding_dim)
        )
        rng = np.random.default_rng(0)
        for start in range(1, n + 1, GEN_CHUNK):
            rows = min(GEN_CHUNK, n + 1 - start)
            pooled[start : start + rows] = rng.random((rows, model.embedding_dim), dtype=np.float32)
        pooled.flush()
        del pooled
        pooled = np.load(Path(tmp) / "pooled.npy", mmap_mode="r")
        ids = np.arange(1, n + 1, dtype=np.int64)
        for engine in engines:
            config = None
            if engine == "ray":
                import ray

                ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
                config = RayConfig()
            t0 = time.perf_counter()
            rescore_version(model, pooled, ids, Path(tmp) / engine, 1, engine=engine, ray_config=config, chunk_rows=chunk_rows)
            seconds = time.perf_counter() - t0
            if engine == "ray":
                ray.shutdown()
            runs.append({"engine": engine, "rows": n, "seconds": round(seconds, 2), "rows_per_second": round(n / seconds)})
    return {
        "benchmark": "scale-rescore",
        "mode": "adapter",
        "torch_threads": torch.get_num_threads(),
        "chunk_rows": chunk_rows,
        "runs": runs,
    }


# -- index -------------------------------------------------------------------------------------
class ChunkedSynthetic(Synthetic):
    """bench/knn.py's clustered generator, normalised, filling one reused buffer per chunk (fresh
    allocations of 335 MB per chunk cost more in page faults than the arithmetic)."""

    def __init__(self, dim: int, seed: int):
        super().__init__("clustered", dim, seed)
        self._buf = np.empty((GEN_CHUNK, dim), np.float32)

    def unit_chunk(self, stream: int, index: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, index])
        z = self.centers[rng.integers(0, CLUSTERS, n)] + CLUSTER_SPREAD * rng.standard_normal((n, SUBSPACE), dtype=np.float32)
        x = self._buf[:n]
        rng.random(out=x, dtype=np.float32)
        x -= 0.5
        x *= NOISE * np.sqrt(12.0)
        x += z @ self.basis
        x += self.mean
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, start in enumerate(range(0, n, GEN_CHUNK)):
            rows = min(GEN_CHUNK, n - start)
            yield self.unit_chunk(1, i, rows), np.arange(start, start + rows, dtype=np.int64)


def _rss_anon_mb() -> float:
    """Anonymous resident memory (heap), leaving out file pages such as a memory-mapped codes file."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def bench_index(n: int, dim: int, kind: str, n_queries: int, tuning_queries: int, seed: int, workdir: Path, log) -> dict:
    gen = ChunkedSynthetic(dim, seed)
    kind = auto_kind(n, dim) if kind == "auto" else kind
    queries = np.concatenate([gen.unit_chunk(2, 0, tuning_queries), gen.unit_chunk(3, 0, n_queries)]).copy()
    rss0 = _rss_anon_mb()
    t0 = time.perf_counter()
    config = IVFConfig() if kind == "ivf" else IVFPQConfig(scratch_dir=str(workdir)) if kind == "ivfpq" else None
    index = make_index(kind, dim, config)
    if kind != "exact":
        size = index.train_size(n)
        sample = np.concatenate([gen.unit_chunk(4, i, min(GEN_CHUNK, size - s)) for i, s in enumerate(range(0, size, GEN_CHUNK))])
        index.train(sample, expected_size=n)
        del sample
    train_s = time.perf_counter() - t0
    log(f"  trained in {train_s:.0f} s")

    def adding(chunks):
        for i, (x, ids) in enumerate(chunks):
            index.add(x, ids)
            if i % 16 == 15:
                log(f"  {ids[-1] + 1:,}/{n:,} vectors added, {time.perf_counter() - t0:.0f} s")
            yield x, ids

    _, true_ids = exact_knn(queries, adding(gen.chunks(n)), 10)
    build_s = time.perf_counter() - t0
    tune_ids, eval_ids = true_ids[:tuning_queries], true_ids[tuning_queries:]
    tuned = index.tune(queries[:tuning_queries], tune_ids) if kind != "exact" else None
    rss_build = _rss_anon_mb() - rss0
    path = workdir / f"index-{n}.bin"
    index.save(path)
    side_files = list(workdir.glob(f"{path.name}.*.codes"))
    disk_mb = sum(p.stat().st_size for p in [path, *side_files]) / 2**20
    ram_mb = (index.memory_bytes() if isinstance(index, IVFPQIndex) else path.stat().st_size) / 2**20
    eval_q = queries[tuning_queries:]
    index.search(eval_q[:5], 10)  # warm up
    times, found = [], []
    for q in eval_q:
        t = time.perf_counter()
        found.append(index.search(q[None], 10)[1][0])
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {
        "n": n,
        "dim": dim,
        "kind": index.kind,
        "settings": index.describe(),
        "train_s": round(train_s, 1),
        "build_s": round(build_s, 1),
        "index_ram_mb": round(ram_mb, 1),
        "disk_mb": round(disk_mb, 1),
        "rss_anon_growth_mb": round(rss_build, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "recall_at_10": round(recall_at_k(np.stack(found), eval_ids), 4),
        "tuned_recall": None if tuned is None else round(tuned, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }


def print_index(result: dict) -> None:
    cols = [
        "n",
        "kind",
        "train_s",
        "build_s",
        "index_ram_mb",
        "disk_mb",
        "rss_anon_growth_mb",
        "p50_ms",
        "p95_ms",
        "recall_at_10",
        "tuned_recall",
    ]
    print("  ".join(f"{c:>13}" for c in cols) + "  settings")
    for r in result["results"]:
        print("  ".join(f"{r[c]!s:>13}" for c in cols) + f"  {r['settings']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("embed", help="Ray local mode vs the in-process pipeline on the same images")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("rescore", help="adapter-mode re-scoring of cached features, streamed chunk by chunk")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--chunk-rows", type=int, default=65_536)
    p.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("index", help="search latency / recall@10 / memory at 1M-10M synthetic vectors")
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--kind", default="auto", choices=["auto", "exact", "ivf", "ivfpq"])
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--tuning-queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", default=None, help="where index files and on-disk codes go while measuring (default: system temp)"
    )
    p.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.what == "embed":
        result = bench_embed(args.n, args.batch_size, args.shard_rows, args.repeats)
        print(json.dumps(result)) if args.json else print_embed(result)
        return
    if args.what == "rescore":
        result = bench_rescore(args.n, args.chunk_rows, args.engines)
        print(json.dumps(result)) if args.json else print(
            "\n".join(
                f"{r['engine']:<6} {r['rows']} rows in {r['seconds']} s: {r['rows_per_second']} rows/s" for r in result["runs"]
            )
        )
        return
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            log(f"index over {n:,} vectors")
            results.append(bench_index(n, args.dim, args.kind, args.queries, args.tuning_queries, args.seed, Path(tmp), log))
            log(json.dumps(results[-1]))
    result = {"benchmark": "scale-index", "queries": args.queries, "results": results}
    print(json.dumps(result)) if args.json else print_index(result)


if __name__ == "__main__":
    main()
