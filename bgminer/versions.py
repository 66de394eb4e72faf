"""Per-model-version artifacts on disk: which images were scored, their per-category
scores and their trunk embeddings (the vectors the FAISS index is built from).

``scores/v0007/{ids,scores,embeddings}.npy``; embeddings are float16 and memory-mapped.
Each folder is written under a temporary name and renamed, so readers see all or nothing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class VersionScores:
    ids: np.ndarray  # int64 [N] image ids, ascending
    scores: np.ndarray  # float32 [N, K]
    categories: list[str]
    embeddings_path: Path

    def embeddings(self) -> np.ndarray:
        return np.load(self.embeddings_path, mmap_mode="r")

    def column(self, category: str) -> np.ndarray:
        return self.scores[:, self.categories.index(category)]


def version_dir(scores_dir: Path, model_id: int) -> Path:
    return Path(scores_dir) / f"v{model_id:04d}"


class VersionWriter:
    """Writes one version's folder chunk by chunk: memory-mapped arrays in ``<folder>.tmp``, renamed
    over the old folder by :meth:`commit`, so readers see the old version or the whole new one.

    ``folder`` (the temporary one) may also hold a producer's scratch files until the commit.
    """

    def __init__(self, scores_dir: Path, model_id: int, ids: np.ndarray, embedding_dim: int, n_categories: int):
        self.final = version_dir(scores_dir, model_id)
        self.folder = self.final.with_name(self.final.name + ".tmp")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.ids = np.asarray(ids, dtype=np.int64)
        np.save(self.folder / "ids.npy", self.ids)
        open_memmap = np.lib.format.open_memmap
        self._embeddings = open_memmap(self.folder / "embeddings.npy", mode="w+", dtype=np.float16, shape=(len(self.ids), embedding_dim))
        self._scores = open_memmap(self.folder / "scores.npy", mode="w+", dtype=np.float32, shape=(len(self.ids), n_categories))

    def write(self, start: int, embeddings: np.ndarray, scores: np.ndarray) -> None:
        """Rows ``start : start + len(scores)`` (positions in ``ids``)."""
        self._embeddings[start : start + len(scores)] = embeddings
        self._scores[start : start + len(scores)] = scores

    def commit(self) -> Path:
        self._embeddings.flush()
        self._scores.flush()
        del self._embeddings, self._scores
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.folder, self.final)
        return self.final


def read_version(scores_dir: Path, model_id: int, categories: list[str]) -> VersionScores | None:
    folder = version_dir(scores_dir, model_id)
    if not (folder / "ids.npy").exists():
        return None
    return VersionScores(
        ids=np.load(folder / "ids.npy"),
        scores=np.load(folder / "scores.npy"),
        categories=list(categories),
        embeddings_path=folder / "embeddings.npy",
    )
