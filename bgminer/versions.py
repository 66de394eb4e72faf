"""Per-model-version artifacts on disk: which images were scored, their per-category
scores and their trunk embeddings (the vectors the FAISS index is built from).

``scores/v0007/{ids,scores,embeddings}.npy``; embeddings are float16 and memory-mapped.
Each folder is written under a temporary name and renamed, so readers see all or nothing.
"""

from __future__ import annotations

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
