"""The index interface, its file format, the backend registry and the one build path for every backend.

A backend subclasses :class:`VectorIndex`, names its ``kind`` (the key in the registry and in the file
header), its ``config_class`` and the largest corpus :func:`auto_kind` gives it (``max_floats``), reads
itself back in ``_read``, and registers with :func:`register`.

File format (version 1, stable: files written by earlier releases must keep loading): the 8 bytes
``BGMVIDX1``, a little-endian uint32 header length, a JSON header ``{"kind", "dim", **settings}``,
then the backend's faiss indexes (faiss serialisation) and numpy arrays (``.npy`` format), in the
order its ``_state``/``_arrays`` give them. Side files (IVF-PQ codes) are named in the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, ClassVar, TypeVar

import faiss
import numpy as np

from ..fsutil import atomic_path
from ..progress import CancelToken, ProgressFn, check, report
from .knn import TopK, as_ids, normalize

CHUNK_ROWS = 32_768
PARALLEL_MIN_QUERIES = 16
MAGIC = b"BGMVIDX1"


_thread_role = threading.local()


def in_background() -> None:
    """Mark the calling thread as a background builder: its builds leave one core to the foreground."""
    _thread_role.background = True


def use_threads(n_queries: int | None = None) -> None:
    """Set faiss's OpenMP threads for the calling thread (OpenMP keeps the setting per thread).

    Building uses every core, one fewer on a background builder thread (:func:`in_background`: the
    index that builds after a round must not stall the reviewer's first page); a search of fewer than
    ``PARALLEL_MIN_QUERIES`` queries uses one: on a busy 2-core machine an OpenMP team that waits for a
    core held by another process made one exact query 4x slower (40 ms vs 10 ms at 10k x 1280).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if n_queries is not None and n_queries < PARALLEL_MIN_QUERIES:
        cores = 1
    elif getattr(_thread_role, "background", False):
        cores = max(1, cores - 1)
    faiss.omp_set_num_threads(cores)


def selector(exclude_ids: Iterable[int] | np.ndarray | None) -> faiss.IDSelector | None:
    """A faiss selector that accepts every id except ``exclude_ids`` (None when nothing is excluded)."""
    if exclude_ids is None:
        return None
    excluded = np.unique(as_ids(exclude_ids))
    if excluded.size == 0:
        return None
    batch = faiss.IDSelectorBatch(excluded)
    sel = faiss.IDSelectorNot(batch)
    sel.referenced = batch  # keep the wrapped selector alive as long as ``sel``
    return sel


def read_faiss(f: BinaryIO) -> faiss.Index:
    """The next faiss index in an open index file."""
    return faiss.read_index(faiss.PyCallbackIOReader(f.read))


def _read_header(f: BinaryIO, path: str | Path) -> dict:
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError(f"{path} is not a bgminer vector index")
    (size,) = struct.unpack("<I", f.read(4))
    return json.loads(f.read(size))


class VectorIndex(ABC):
    """Cosine-similarity kNN over vectors keyed by int64 id."""

    kind: ClassVar[str]
    config_class: ClassVar[type | None] = None  # the backend's settings dataclass; None when it has none
    max_floats: ClassVar[int | None] = None  # largest N*D that auto_kind gives this backend; None: no limit

    def __init__(self, dim: int):
        self.dim = int(dim)

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def ids(self) -> np.ndarray:
        """All ids in the index (int64, insertion order)."""

    @abstractmethod
    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    @abstractmethod
    def _remove(self, ids: np.ndarray) -> int: ...

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def _vectors(self, ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _state(self) -> tuple[dict, list[faiss.Index]]:
        """JSON-able settings and the faiss indexes to write, for :meth:`save`."""

    @classmethod
    @abstractmethod
    def _read(cls, dim: int, header: dict, f: BinaryIO, path: Path) -> VectorIndex:
        """The index whose header (less kind and dim) was just read from ``f``; its parts follow."""

    def _train_for(self, vectors: np.ndarray, ids: np.ndarray) -> TopK | None:
        """Before :func:`build_index` adds ``vectors``: fit what the backend learns from data. Returns the
        exact top-k of tuning queries to fill while the vectors are added (for :meth:`_tune`), or None."""
        return None

    def _tune(self, truth: TopK) -> None:
        """After :func:`build_index` added every vector: set search settings against ``truth``. Nothing to set by default."""
        return

    def add(self, vectors: np.ndarray, ids: Iterable[int] | np.ndarray) -> None:
        """Add vectors [N, D] under new int64 ids (no retraining; raises if an id is already present)."""
        self._add_normalized(normalize(vectors), as_ids(ids))

    def _add_normalized(self, x: np.ndarray, new_ids: np.ndarray) -> None:
        if x.shape != (new_ids.size, self.dim):
            raise ValueError(f"expected vectors of shape ({new_ids.size}, {self.dim}), got {x.shape}")
        if np.unique(new_ids).size != new_ids.size:
            raise ValueError("ids passed to add() repeat")
        present = new_ids[self._present(new_ids)]
        if present.size:
            raise ValueError(f"{present.size} ids are already in the index, e.g. {present[:5].tolist()}")
        self._add(x, new_ids)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are in the index (bool mask)."""
        return np.isin(ids, self.ids())

    def describe(self) -> str:
        """The settings in a few words, for logs and benchmarks."""
        return self.kind

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove ids (unknown ids are ignored); returns how many were removed. Costs O(N)."""
        ids = as_ids(ids)
        return self._remove(ids) if ids.size else 0

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine for each query: (similarities [Q, k] float32, ids [Q, k] int64), best first.

        ``exclude_ids`` are never returned. Missing results (fewer than k candidates) are id -1, similarity -inf.
        """
        q = normalize(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have {q.shape[1]} dimensions, index has {self.dim}")
        if k < 1:
            raise ValueError("k must be >= 1")
        if len(self) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        use_threads(len(q))
        return self._search(q, k, selector(exclude_ids))

    def vectors(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The stored (unit-norm) vectors of ``ids`` [n, D] float32; KeyError for an unknown id."""
        ids = as_ids(ids)
        if ids.size == 0:
            return np.zeros((0, self.dim), np.float32)
        try:
            return self._vectors(ids)
        except RuntimeError as err:
            missing = ids[~np.isin(ids, self.ids())]
            raise KeyError(f"ids not in the index: {missing[:5].tolist()}") from err

    def save(self, path: str | Path) -> None:
        """Write the index to one file atomically (a temporary name unique to this writer, fsync, rename, fsync of the folder)."""
        path = Path(path)
        settings, parts = self._state()
        settings.update(self._attach(path))
        header = json.dumps({"kind": self.kind, "dim": self.dim, **settings}).encode()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            for part in parts:
                faiss.write_index(part, faiss.PyCallbackIOWriter(f.write))
            for array in self._arrays():
                np.lib.format.write_array(f, array, allow_pickle=False)
        self._saved(path)

    def _attach(self, path: Path) -> dict:
        """Before :meth:`save` writes ``path``: put side files in place; returns extra header settings."""
        return {}

    def _arrays(self) -> list[np.ndarray]:
        """Arrays written after the faiss indexes, for :meth:`save`."""
        return []

    def _saved(self, path: Path) -> None:
        """After :meth:`save` replaced ``path``: drop side files no saved index refers to. None by default."""
        return

    @staticmethod
    def load(path: str | Path) -> VectorIndex:
        """Read an index written by :meth:`save`, whatever its backend."""
        with open(path, "rb") as f:
            header = _read_header(f, path)
            kind = header.pop("kind")
            dim = header.pop("dim")
            if kind not in BACKENDS:
                raise ValueError(f"unknown index kind {kind!r} in {path}")
            return BACKENDS[kind]._read(dim, header, f, Path(path))


# -- backend registry -------------------------------------------------------------------------
BACKENDS: dict[str, type[VectorIndex]] = {}
_Backend = TypeVar("_Backend", bound=type[VectorIndex])


def register(cls: _Backend) -> _Backend:
    """Class decorator: make a backend available to :func:`make_index`, :func:`auto_kind` and :meth:`VectorIndex.load`."""
    if cls.kind in BACKENDS:
        raise ValueError(f"index kind {cls.kind!r} is already registered by {BACKENDS[cls.kind].__name__}")
    BACKENDS[cls.kind] = cls
    return cls


def auto_kind(n: int, dim: int) -> str:
    """The backend :func:`build_index` picks for ``n`` vectors of ``dim`` dimensions: the one with the
    smallest ``max_floats`` that holds ``n * dim`` floats."""
    by_size = sorted(BACKENDS.values(), key=lambda cls: math.inf if cls.max_floats is None else cls.max_floats)
    return next(cls.kind for cls in by_size if cls.max_floats is None or n * dim <= cls.max_floats)


def make_index(kind: str, dim: int, config: object | None = None) -> VectorIndex:
    """An empty index of ``kind`` (a key of :data:`BACKENDS`); ``config`` applies when it is that kind's config."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown index kind {kind!r}; use {', '.join(map(repr, BACKENDS))} or 'auto'")
    cls = BACKENDS[kind]
    if cls.config_class is None:
        return cls(dim)
    return cls(dim, config if isinstance(config, cls.config_class) else None)


def side_files(path: str | Path) -> list[Path]:
    """The files beside an index file that it refers to (an IVF-PQ index's codes), to copy it whole."""
    with open(path, "rb") as f:
        header = _read_header(f, path)
    return [Path(path).parent / header["codes_file"]] if "codes_file" in header else []


def build_index(
    vectors: np.ndarray,
    ids: Iterable[int] | np.ndarray,
    kind: str = "auto",
    config: object | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> VectorIndex:
    """Index ``vectors`` [N, D] (any float dtype, may be a memmap; read in chunks) under ``ids``.

    ``kind``: a registered backend or "auto" (:func:`auto_kind`). A backend that learns from data
    (IVF) is trained on a random sample, filled chunk by chunk, and tuned against exact search
    computed on the same pass.
    """
    use_threads()
    ids = as_ids(ids)
    n, dim = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{n} vectors but {len(ids)} ids")
    index = make_index(auto_kind(n, dim) if kind == "auto" else kind, dim, config)
    truth = index._train_for(vectors, ids)
    for start in range(0, n, CHUNK_ROWS):
        check(cancel)
        chunk_vectors, chunk_ids = normalize(vectors[start : start + CHUNK_ROWS]), ids[start : start + CHUNK_ROWS]
        index._add_normalized(chunk_vectors, chunk_ids)
        if truth is not None:
            truth.update(chunk_vectors, chunk_ids)
        report(progress, min(n, start + CHUNK_ROWS), n, "indexing vectors")
    if truth is not None:
        index._tune(truth)
    return index
