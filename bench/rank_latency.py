"""How long the review strategies take to fill a queue, at 10k and 100k images.

Builds a synthetic feature cache of the product's shapes on disk (pooled 1280-d float32 and
1000 ImageNet logits float16, memory-mapped and read by image id, as
:class:`bgminer.feature_cache.FeatureCache` serves them), labels some positives and negatives,
and times ``make_strategy(name).query(ctx, 50)`` (one Review-page queue) for the default
strategy cold (no model) and warm (a model's scores), and for each of its parts.

    .venv/bin/python bench/rank_latency.py [--sizes 10000 100000] [--positives 10 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bgminer import strategies
from bgminer.rank import RankContext

PARTS = ("auto", "probe", "new-modes", "class-lift", "unexplored", "most-likely")


class MappedFeatures:
    """Memory-mapped rows by image id, like FeatureCache.read."""

    def __init__(self, folder: Path, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.arrays = {}
        for name, dim, dtype in (("pooled", 1280, np.float32), ("logits", 1000, np.float16)):
            path = folder / f"{name}.npy"
            out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, dim))
            for start in range(0, n, 20_000):
                rows = min(20_000, n - start)
                out[start : start + rows] = rng.standard_normal((rows, dim)).astype(dtype)
            out.flush()
            del out
            self.arrays[name] = np.load(path, mmap_mode="r")

    def read(self, name: str, ids) -> np.ndarray:
        return np.asarray(self.arrays[name][np.asarray(ids, dtype=np.int64)])


def time_query(name: str, ctx: RankContext, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        strategies.make_strategy(name).query(ctx, 50)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--positives", nargs="+", type=int, default=[10, 40])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bgminer-rank-") as folder:
            features = MappedFeatures(Path(folder), n)
            rng = np.random.default_rng(1)
            ids = np.arange(n, dtype=np.int64)
            scores = rng.random(n).astype(np.float32)
            for k in args.positives:
                labeled = rng.choice(n, 4 * k, replace=False)
                for warm in (False, True):
                    ctx = RankContext(
                        ids=ids,
                        scores=scores if warm else None,
                        positive_ids=labeled[:k],
                        negative_ids=labeled[k:],
                        features=features,
                    )
                    for name in PARTS:
                        if name == "most-likely" and not warm:
                            continue
                        seconds = time_query(name, ctx, args.repeat)
                        rows.append({"images": n, "positives": k, "model": warm, "strategy": name, "seconds": seconds})
                        if not args.json:
                            print(f"{n:>8} images  {k:>3} positives  {'model' if warm else 'cold ':<5}  {name:<12} "
                                  f"{seconds:6.2f} s", flush=True)
    result = {"benchmark": "rank_latency", "load": os.getloadavg(), "threads": args.threads, "rows": rows}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"load average {result['load'][0]:.2f} {result['load'][1]:.2f} {result['load'][2]:.2f}")


if __name__ == "__main__":
    main()
