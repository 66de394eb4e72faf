"""Finding images: the vector index of the active version (one per version, loaded once per
process, the pretrained one kept in step with new embeddings), outside images embedded into its
space, and the searches over the corpus (more like this, text search, browsing) as
:class:`Candidate` lists.

:class:`bgminer.project.Project` offers these as ``index``, ``embed_query``, ``search_like``,
``search_text`` and ``browse``.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .project import Project

CandidateKind = Literal["score", "similarity", "class_probability"]
CANDIDATE_KINDS: tuple[CandidateKind, ...] = ("score", "similarity", "class_probability")


@dataclass(frozen=True)
class Candidate:
    """An image offered to the user, with the number that put it there and what that number is.

    ``kind`` names ``value`` (docs/architecture.md, glossary): ``"score"``, the active model's
    probability for the category (the review queue once a model exists); ``"similarity"``, a cosine
    similarity of embeddings (more like this); ``"class_probability"``, the pretrained classifier's
    mass on the matched ImageNet classes (text search). Both are None when no number ranked the
    image (browsing, the review queue before the first model).
    """

    image_id: int
    path: str
    value: float | None = None
    kind: CandidateKind | None = None

    def __post_init__(self) -> None:
        if (self.value is None) != (self.kind is None) or self.kind not in (None, *CANDIDATE_KINDS):
            raise ValueError(f"candidate value {self.value!r} with kind {self.kind!r}")


class Finder:
    """A project's vector indexes and the searches that use them (thread-safe)."""

    def __init__(self, project: Project):
        self.project = project
        self._indexes: dict[int | None, Any] = {}
        self._lock = threading.Lock()

    def index_path(self, model_id: int | None) -> Path:
        """The index file of a version (``model_id`` None: the pretrained features' index)."""
        return self.project.index_dir / ("pretrained.faiss" if model_id is None else f"v{operator.index(model_id):04d}.faiss")

    def build_index(self, model_id: int | None, vectors: np.ndarray, ids: np.ndarray):
        """Build, save and keep the index of a version (after a round or a re-scoring)."""
        from .index import build_index

        index = build_index(np.asarray(vectors, dtype=np.float32), ids)
        self.project.index_dir.mkdir(parents=True, exist_ok=True)
        index.save(self.index_path(model_id))
        with self._lock:
            self._indexes[model_id] = index
        return index

    def index(self):
        """The FAISS index over the active model's trunk embeddings (pretrained features before training).

        Loaded from disk once per process; images embedded since it was built are added incrementally.
        """
        from .index import VectorIndex
        from .scoring import read_version

        active = self.project.store.active_model()
        model_id = None if active is None else active.id
        with self._lock:
            index = self._indexes.get(model_id)
        if index is None:
            path = self.index_path(model_id)
            if path.exists():
                index = VectorIndex.load(path)
            elif model_id is None:
                ids = np.asarray(self.project.store.image_ids(embedded=True), dtype=np.int64)
                if len(ids) == 0:
                    raise ValueError("no embedded images yet: ingest and embed a corpus first")
                return self.build_index(None, self.project.features.read("pooled", ids), ids)
            else:
                version = read_version(self.project.scores_dir, model_id, active.categories)
                return self.build_index(model_id, version.embeddings(), version.ids)
            with self._lock:
                self._indexes[model_id] = index
        if model_id is None:  # keep the pretrained index in step with newly embedded images
            have = index.ids()
            new = np.setdiff1d(np.asarray(self.project.store.image_ids(embedded=True), dtype=np.int64), have)
            if len(new):
                with self._lock:
                    index.add(self.project.features.read("pooled", new), new)
                    index.save(self.index_path(None))
        return index

    def embed_query(self, image_file: str | Path | bytes) -> np.ndarray:
        """Embed an image that is not in the corpus into the active index's space (see :func:`bgminer.modes.embed_query`)."""
        import io

        import torch

        from .backbone import Preprocess
        from .imageio import load_rgb, to_tensor_uint8
        from .modes import embed_query

        source = io.BytesIO(image_file) if isinstance(image_file, bytes) else image_file
        preprocess = self.project.backbone.preprocess
        pixels = Preprocess(preprocess)(to_tensor_uint8(load_rgb(source, draft_size=preprocess.resize)))
        active = self.project.store.active_model()
        model = None if active is None else self.project.load_model(active.id)
        with torch.inference_mode():
            return embed_query(self.project.backbone, model, pixels[None]).numpy()

    def candidates(
        self, ids: Sequence[int], values: Sequence[float] | None = None, kind: CandidateKind | None = None
    ) -> list[Candidate]:
        """Candidates for ``ids`` that still have a path; ``values`` (aligned with ids) are of ``kind``."""
        paths = self.project.store.image_paths(ids)
        if values is None:
            return [Candidate(int(i), paths[int(i)]) for i in ids if int(i) in paths]
        return [Candidate(int(i), paths[int(i)], float(v), kind) for i, v in zip(ids, values, strict=True) if int(i) in paths]

    def like(self, image_id: int | None = None, image_file: str | Path | bytes | None = None, n: int = 48) -> list[Candidate]:
        """Nearest neighbours of a corpus image or of an uploaded image file ("more like this")."""
        index = self.index()
        if image_id is not None:
            query = index.vectors([image_id])
            exclude = [image_id]
        elif image_file is not None:
            query, exclude = self.embed_query(image_file), None
        else:
            raise ValueError("search_like needs an image id or an image file")
        sims, ids = index.search(np.asarray(query, dtype=np.float32), n, exclude_ids=exclude)
        keep = ids[0] >= 0
        return self.candidates(ids[0][keep], sims[0][keep], "similarity")

    def text(self, query: str, n: int = 48) -> tuple[list[str], list[Candidate]]:
        """Offline text search over ImageNet class names; returns (matched classes, images)."""
        from .textsearch import class_probability, match_classes

        matches = match_classes(query)
        if not matches:
            return [], []
        ids = np.asarray(self.project.store.image_ids(embedded=True), dtype=np.int64)
        chunks = [ids[i : i + 8192] for i in range(0, len(ids), 8192)]
        features = self.project.features
        prob = np.concatenate([class_probability(features.read("logits", c), matches) for c in chunks] or [np.zeros(0)])
        top = np.argsort(-prob, kind="stable")[:n]
        return [m.name for m in matches], self.candidates(ids[top], prob[top], "class_probability")

    def browse(self, n: int = 48, seed: int = 0, offset: int = 0) -> list[Candidate]:
        """Corpus images in a random order that is stable for ``seed`` (for paging)."""
        ids = np.asarray(self.project.store.image_ids(), dtype=np.int64)
        order = np.random.default_rng(seed).permutation(len(ids))[offset : offset + n]
        return self.candidates(ids[order])
