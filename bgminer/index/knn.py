"""Vector basics every backend shares, and exact kNN: unit rows, result padding, streamed top-k, recall."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a C-contiguous float32 copy (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True, ndmin=2)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


def as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """``ids`` as a flat C-contiguous int64 array."""
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def pad_invalid(similarities: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Results in the index's convention: float32 similarities, -inf where the id is -1 (no result)."""
    similarities = similarities.astype(np.float32, copy=False)
    similarities[ids < 0] = -np.inf
    return similarities, ids


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of each query's true neighbours (ids >= 0) that ``found_ids`` contains."""
    hits = total = 0
    for found, true in zip(found_ids, true_ids, strict=True):
        true = true[true >= 0]
        hits += np.isin(true, found).sum()
        total += true.size
    return float(hits / total) if total else 1.0


@dataclass
class TopK:
    """Running exact top-k (by inner product) of fixed queries over streamed chunks of vectors."""

    queries: np.ndarray
    k: int
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.similarities = np.full((len(self.queries), self.k), -np.inf, np.float32)
        self.ids = np.full((len(self.queries), self.k), -1, np.int64)

    def update(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        sims = self.queries @ vectors.T
        sims[:, np.isin(ids, self.exclude)] = -np.inf
        if sims.shape[1] > self.k:  # keep each query's k best of this chunk before merging
            part = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
            sims, chunk_ids = np.take_along_axis(sims, part, axis=1), ids[part]
        else:
            chunk_ids = np.broadcast_to(ids, sims.shape)
        all_sims = np.concatenate([self.similarities, sims], axis=1)
        all_ids = np.concatenate([self.ids, chunk_ids], axis=1)
        top = np.argsort(-all_sims, axis=1, kind="stable")[:, : self.k]
        self.similarities = np.take_along_axis(all_sims, top, axis=1)
        self.ids = np.where(np.isfinite(self.similarities), np.take_along_axis(all_ids, top, axis=1), -1)


def exact_knn(
    queries: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    exclude_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k, (similarities, ids), over (vectors, ids) chunks streamed once; for ground truth on corpora
    too big for RAM."""
    topk = TopK(normalize(queries), k, as_ids(exclude_ids if exclude_ids is not None else []))
    for vectors, ids in chunks:
        topk.update(normalize(vectors), as_ids(ids))
    return topk.similarities, topk.ids
