"""kNN benchmark of bgminer.index: build time, index size, single-query latency and recall@10.

Data are synthetic vectors of CNN-feature shape: a mixture of gaussians in a 64-d subspace,
a shared mean direction (pooled CNN features share one, cosine ~0.5 between random images)
and isotropic noise in all dimensions ("clustered"); "uniform" is the structureless worst case
(uniform on the sphere), where any IVF index degrades to scanning most lists. Queries are
fresh draws from the same distribution; recall@10 is against exact float32 search.

    .venv/bin/python bench/knn.py                          # 100k and 1M clustered, 100k uniform
    .venv/bin/python bench/knn.py --cases clustered:100000 --json

Latency is one query at a time (bgminer.index searches a single query with one faiss thread).
Timings on a machine shared with other work are noisy: rerun, and compare like with like.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bgminer.index import IVFConfig, IVFIndex, VectorIndex, build_index, exact_knn, recall_at_k

SUBSPACE = 64
CLUSTERS = 1000
CLUSTER_SPREAD = 1.0
NOISE = 0.2
GEN_CHUNK = 65_536


@dataclass
class Result:
    case: str
    n: int
    dim: int
    kind: str
    nlist: int | None
    nprobe: int | None
    build_s: float
    index_mb: float
    load_s: float
    p50_ms: float
    p95_ms: float
    recall_at_10: float
    tuned_recall: float | None
    exact_p50_ms: float | None
    peak_rss_mb: float


class Synthetic:
    """Deterministic chunked generator: chunk i of a data set depends only on (seed, i)."""

    def __init__(self, kind: str, dim: int, seed: int):
        self.kind, self.dim, self.seed = kind, dim, seed
        rng = np.random.default_rng([seed, 0])
        basis, _ = np.linalg.qr(rng.standard_normal((dim, SUBSPACE)))
        self.basis = basis.T.astype(np.float32)  # [64, D], orthogonal rows
        self.centers = rng.standard_normal((CLUSTERS, SUBSPACE)).astype(np.float32)
        spectrum = 1.0 / np.sqrt(np.arange(1, SUBSPACE + 1))  # decaying variance, like CNN features' PCA spectrum
        self.basis *= (spectrum * np.sqrt(SUBSPACE / np.sum(spectrum**2)))[:, None].astype(np.float32)
        signal_var = SUBSPACE * (1 + CLUSTER_SPREAD**2) + dim * NOISE**2
        mean = rng.standard_normal(dim).astype(np.float32)
        self.mean = mean / np.linalg.norm(mean) * np.sqrt(signal_var)

    def chunk(self, stream: int, index: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, index])
        if self.kind == "uniform":
            return rng.standard_normal((n, self.dim), dtype=np.float32)
        z = self.centers[rng.integers(0, CLUSTERS, n)] + CLUSTER_SPREAD * rng.standard_normal((n, SUBSPACE), dtype=np.float32)
        x = z @ self.basis + self.mean
        noise = rng.random((n, self.dim), dtype=np.float32)  # uniform noise of std NOISE: 10x cheaper than gaussian
        x += (noise - 0.5) * (NOISE * np.sqrt(12.0))
        return x

    def dataset(self, n: int) -> np.ndarray:
        """n vectors as float16 (halves the RAM of a 1M x 1280 set; the index reads any float dtype)."""
        out = np.empty((n, self.dim), np.float16)
        for i, start in enumerate(range(0, n, GEN_CHUNK)):
            out[start : start + GEN_CHUNK] = self.chunk(1, i, min(GEN_CHUNK, n - start))
        return out


def _chunks(data: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(data), GEN_CHUNK):
        block = data[start : start + GEN_CHUNK]
        yield block, np.arange(start, start + len(block), dtype=np.int64)


def _latencies(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    return np.array(times) * 1e3, np.stack(found)


def run_case(case: str, n: int, dim: int, n_queries: int, kind: str, config: IVFConfig, exact_queries: int, seed: int) -> Result:
    gen = Synthetic(case, dim, seed)
    data = gen.dataset(n)
    queries = gen.chunk(2, 0, n_queries)
    _, true_ids = exact_knn(queries, _chunks(data), 10)

    t0 = time.perf_counter()
    index = build_index(data, np.arange(n, dtype=np.int64), kind=kind, config=config)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.bin"
        index.save(path)
        index_mb = path.stat().st_size / 2**20
        del index
        t0 = time.perf_counter()
        index = VectorIndex.load(path)
        load_s = time.perf_counter() - t0

    index.search(queries[:5], 10)  # warm up
    times, found = _latencies(index, queries, 10)
    exact_p50 = None
    if exact_queries and index.kind != "exact":
        exact = build_index(data, np.arange(n, dtype=np.int64), kind="exact")
        exact_p50 = float(np.median(_latencies(exact, queries[:exact_queries], 10)[0]))
        del exact
    ivf = isinstance(index, IVFIndex)
    return Result(
        case=case,
        n=n,
        dim=dim,
        kind=index.kind,
        nlist=index.nlist if ivf else None,
        nprobe=index.nprobe if ivf else None,
        build_s=round(build_s, 2),
        index_mb=round(index_mb, 1),
        load_s=round(load_s, 2),
        p50_ms=round(float(np.percentile(times, 50)), 2),
        p95_ms=round(float(np.percentile(times, 95)), 2),
        recall_at_10=round(recall_at_k(found, true_ids), 4),
        tuned_recall=round(index.tuned_recall, 4) if ivf and index.tuned_recall is not None else None,
        exact_p50_ms=round(exact_p50, 2) if exact_p50 is not None else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["clustered:100000", "clustered:1000000", "uniform:100000"],
        help="data:size pairs; data is 'clustered' or 'uniform'",
    )
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--kind", default="auto", choices=["auto", "exact", "ivf"])
    parser.add_argument("--exact-queries", type=int, default=20, help="queries timed on an exact index too (sizes <= 200k)")
    parser.add_argument("--reduce-dim", type=int, default=IVFConfig.reduce_dim, help="PCA dimensions of the IVF probe stage")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the index's rule)")
    parser.add_argument("--rerank", type=int, default=IVFConfig.rerank_candidates, help="candidates re-ranked exactly")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    results = []
    for case in args.cases:
        data, size = case.split(":")
        n = int(size)
        exact_queries = args.exact_queries if n <= 200_000 else 0
        config = IVFConfig(reduce_dim=args.reduce_dim, nlist=args.nlist, rerank_candidates=args.rerank)
        results.append(run_case(data, n, args.dim, args.queries, args.kind, config, exact_queries, args.seed))
        if not args.json:
            print(f"done {case}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "dim": args.dim,
                    "queries": args.queries,
                    "reduce_dim": args.reduce_dim,
                    "rerank": args.rerank,
                    "results": [asdict(r) for r in results],
                }
            )
        )
        return
    cols = list(asdict(results[0]).keys())
    rows = [[str(v) for v in asdict(r).values()] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
