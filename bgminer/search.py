"""Finding images: the vector index of the active version (one per version, loaded once per
process, built on a background thread after a round while the previous version's or the
pretrained one serves, the pretrained one kept in step with new embeddings), outside images
embedded into the served index's space, and the searches over the corpus (more like this, text search, browsing) as
:class:`Candidate` lists.

:class:`bgminer.project.Project` offers these as ``index``, ``embed_query``, ``search_like``,
``search_text`` and ``browse``.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .project import Project

log = logging.getLogger(__name__)

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
    reason: str | None = None  # why the review strategy picked it (the part of its mixture), in a few words

    def __post_init__(self) -> None:
        if (self.value is None) != (self.kind is None) or self.kind not in (None, *CANDIDATE_KINDS):
            raise ValueError(f"candidate value {self.value!r} with kind {self.kind!r}")


@dataclass(frozen=True)
class IndexStatus:
    """Which version's index serves search now.

    ``served`` is the model version whose index answers searches (None: the pretrained
    features' index); ``active`` the active model version (None before training); ``building``
    the version whose index a background thread is building (None when none is).
    """

    served: int | None
    active: int | None
    building: int | None

    @property
    def behind(self) -> bool:
        """True while search uses an older version's index (or the pretrained one) than the active version."""
        return self.served != self.active


class Finder:
    """A project's vector indexes and the searches that use them (thread-safe).

    A new version's index is built on a background thread (:meth:`build_in_background`) and
    swapped in when saved; until then searches use the newest version whose index exists, or the
    pretrained one (:meth:`status` says which), and uploaded queries are embedded with that
    version's model so query and index share one space.
    """

    def __init__(self, project: Project):
        self.project = project
        self._indexes: dict[int | None, Any] = {}
        self._lock = threading.Lock()
        self._builds: dict[int, threading.Thread] = {}
        self.build_errors: dict[int, str] = {}
        self.build_seconds: dict[int | None, float] = {}

    def index_path(self, model_id: int | None) -> Path:
        """The index file of a version (``model_id`` None: the pretrained features' index)."""
        return self.project.index_dir / ("pretrained.faiss" if model_id is None else f"v{operator.index(model_id):04d}.faiss")

    def build_index(self, model_id: int | None, vectors: np.ndarray, ids: np.ndarray):
        """Build, save (atomically) and keep the index of a version; older versions' indexes leave memory."""
        from .index import build_index

        started = time.perf_counter()
        index = build_index(np.asarray(vectors, dtype=np.float32), ids)
        self.project.index_dir.mkdir(parents=True, exist_ok=True)
        index.save(self.index_path(model_id))
        with self._lock:
            self._indexes[model_id] = index
            if model_id is not None:
                for older in [k for k in self._indexes if k is not None and k < model_id]:
                    del self._indexes[older]
            self.build_seconds[model_id] = time.perf_counter() - started
        return index

    def _build_version(self, model_id: int) -> None:
        """Build version ``model_id``'s index from the embeddings in its scores folder (on a build thread)."""
        from .scoring import read_version

        record = self.project.store.model(model_id)
        version = None if record is None else read_version(self.project.scores_dir, model_id, record.categories)
        if version is None:
            raise ValueError(f"model version {model_id} has no scores to index")
        self.build_index(model_id, version.embeddings(), version.ids)

    def _run_build(self, model_id: int) -> None:
        from .index.base import in_background

        in_background()
        try:
            self._build_version(model_id)
            self.build_errors.pop(model_id, None)
        except Exception as exc:  # the previous index keeps serving; the next index() call tries again
            self.build_errors[model_id] = f"{type(exc).__name__}: {exc}"
            log.exception("building the index of model version %s failed", model_id)
        finally:
            with self._lock:
                if self._builds.get(model_id) is threading.current_thread():
                    del self._builds[model_id]

    def build_in_background(self, model_id: int) -> threading.Thread:
        """Build version ``model_id``'s index on a thread (one per version at a time) and swap it in when saved.

        The thread is not a daemon: a process that ends normally finishes the build first
        (the CLI also waits explicitly, :meth:`wait`).
        """
        with self._lock:
            thread = self._builds.get(model_id)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=self._run_build, args=(model_id,), name=f"bgminer-index-v{model_id:04d}")
                self._builds[model_id] = thread
                thread.start()
        return thread

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background index builds started so far; raise if one of them failed."""
        with self._lock:
            threads = dict(self._builds)
        for thread in threads.values():
            thread.join(timeout)
        failed = {k: self.build_errors[k] for k in threads if k in self.build_errors}
        if failed:
            raise RuntimeError("building the search index failed: " + "; ".join(f"v{k}: {e}" for k, e in failed.items()))

    def building(self) -> int | None:
        """The newest version whose index is being built now, or None."""
        with self._lock:
            alive = [k for k, t in self._builds.items() if t.is_alive()]
        return max(alive) if alive else None

    def _version_index(self, model_id: int, categories: list[str]):
        """Version ``model_id``'s index from memory or disk, or None when it has none yet.

        A saved index that misses images the version has since scored (a re-scoring whose rebuild
        never finished) keeps serving while a fresh one builds in the background.
        """
        from .index import VectorIndex
        from .scoring import read_version

        with self._lock:
            index = self._indexes.get(model_id)
        if index is not None:
            return index
        path = self.index_path(model_id)
        if not path.exists():
            return None
        index = VectorIndex.load(path)
        with self._lock:
            index = self._indexes.setdefault(model_id, index)
        version = read_version(self.project.scores_dir, model_id, categories)
        if version is not None and not np.array_equal(np.sort(index.ids()), version.ids):
            self.build_in_background(model_id)
        return index

    def _pretrained_index(self):
        from .index import VectorIndex

        with self._lock:
            index = self._indexes.get(None)
        if index is None:
            path = self.index_path(None)
            if path.exists():
                index = VectorIndex.load(path)
                with self._lock:
                    index = self._indexes.setdefault(None, index)
            else:
                ids = np.asarray(self.project.store.image_ids(embedded=True), dtype=np.int64)
                if len(ids) == 0:
                    raise ValueError("no embedded images yet: ingest and embed a corpus first")
                return self.build_index(None, self.project.features.read("pooled", ids), ids)
        # keep the pretrained index in step with newly embedded images
        new = np.setdiff1d(np.asarray(self.project.store.image_ids(embedded=True), dtype=np.int64), index.ids())
        if len(new):
            with self._lock:
                index.add(self.project.features.read("pooled", new), new)
                index.save(self.index_path(None))
        return index

    def served(self) -> tuple[int | None, Any]:
        """(version, index) that answers searches now: the active version's index once it exists;
        until then the newest older ready version's, else the pretrained features' (and the active
        version's index starts building in the background)."""
        active = self.project.store.active_model()
        if active is not None:
            index = self._version_index(active.id, active.categories)
            if index is not None:
                return active.id, index
            self.build_in_background(active.id)
            for m in self.project.store.models():
                if m.state == "ready" and m.id < active.id:
                    index = self._version_index(m.id, m.categories)
                    if index is not None:
                        return m.id, index
        return None, self._pretrained_index()

    def index(self):
        """The vector index that serves search now (see :meth:`served`); loaded from disk once per process."""
        return self.served()[1]

    def status(self) -> IndexStatus:
        """Which version's index serves search, which is active, which is being built. Starts the
        active version's build when its index is missing (as :meth:`served` does); loads no index."""
        active = self.project.store.active_model()
        served = None
        if active is not None:
            for m in self.project.store.models():
                if m.state == "ready" and m.id <= active.id:
                    with self._lock:
                        loaded = m.id in self._indexes
                    if loaded or self.index_path(m.id).exists():
                        served = m.id
                        break
        if active is not None and served != active.id:
            self.build_in_background(active.id)
        return IndexStatus(served=served, active=None if active is None else active.id, building=self.building())

    def embed_query(self, image_file: str | Path | bytes, model_id: int | None | object = ...) -> np.ndarray:
        """Embed an image that is not in the corpus into the space of the index that serves search
        (``model_id``: that of a given version, None for the pretrained features; see :func:`bgminer.modes.embed_query`)."""
        import io

        import torch

        from .backbone import Preprocess
        from .imageio import load_rgb, to_tensor_uint8
        from .modes import embed_query

        if model_id is ...:
            model_id = self.served()[0]
        source = io.BytesIO(image_file) if isinstance(image_file, bytes) else image_file
        preprocess = self.project.backbone.preprocess
        pixels = Preprocess(preprocess)(to_tensor_uint8(load_rgb(source, draft_size=preprocess.resize)))
        model = None if model_id is None else self.project.load_model(model_id)
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
        model_id, index = self.served()
        if image_id is not None:
            query = index.vectors([image_id])
            exclude = [image_id]
        elif image_file is not None:
            query, exclude = self.embed_query(image_file, model_id=model_id), None
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
