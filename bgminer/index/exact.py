"""Exact backend: brute-force inner product (faiss ``IndexFlatIP`` behind ``IndexIDMap2``).

A query costs N*D multiply-adds, so :func:`~bgminer.index.auto_kind` uses it while N*D <=
``EXACT_MAX_FLOATS`` (2**24, ~13k vectors at 1280-d).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from .base import VectorIndex, read_faiss, register
from .knn import pad_invalid

EXACT_MAX_FLOATS = 1 << 24


@register
class ExactIndex(VectorIndex):
    """Brute-force inner product over float32 vectors (faiss IndexFlatIP in IndexIDMap2)."""

    kind = "exact"
    max_floats = EXACT_MAX_FLOATS

    def __init__(self, dim: int, index: faiss.Index | None = None):
        super().__init__(dim)
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @classmethod
    def _read(cls, dim: int, header: dict, f: BinaryIO, path: Path) -> ExactIndex:
        return cls(dim, read_faiss(f))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._index.add_with_ids(vectors, ids)

    def _remove(self, ids: np.ndarray) -> int:
        return int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))

    def _search(self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        sims, ids = self._index.search(queries, k, params=params)
        return pad_invalid(sims, ids)

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._index.reconstruct_batch(ids)

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return {}, [self._index]
