"""Nearest-neighbour index over image embeddings: one interface, exact and IVF backends behind it.

Vectors are L2-normalised on the way in, so every score is a cosine similarity. Ids are the
caller's int64 ids (image ids); results are padded with id -1 and score -inf.

Backends (``build_index(kind="auto")`` picks by size, see :func:`auto_kind`; exact up to 2**24
floats, IVF up to 2**31, IVF-PQ above):

- ``ExactIndex``: faiss ``IndexFlatIP`` behind ``IndexIDMap2``. Exact; a query costs N*D
  multiply-adds, so it is used while N*D <= ``EXACT_MAX_FLOATS`` (2**24, ~13k vectors at 1280-d).
- ``IVFIndex``: two stages. The *probe* stage reduces vectors with PCA to ``reduce_dim``
  (128) dimensions and searches an IVF-Flat index (L2 metric: PCA centres the data, which
  would bias inner products, while L2 on unit vectors ranks exactly like cosine). The
  *rerank* stage re-scores the probe stage's best ``rerank_candidates`` (100) per query with
  the full vectors, kept as float16 (half the memory of float32, score error ~1e-3). PCA cuts
  the probe stage's memory traffic 10x at 1280-d; the rerank restores exact cosine order.
  Rules: ``nlist = round(4 * sqrt(N))``, at most N/39 (faiss wants >= 39 training points per
  list); k-means on a sample of ``40 * nlist`` vectors, 10 iterations; ``nprobe`` is tuned at
  build time to the smallest value (doubling, then bisecting) whose recall@10 against exact
  search reaches ``target_recall`` (0.96, i.e. 0.95 plus a margin for sampling noise) on 200
  of the corpus's own vectors; ``tuned_recall`` records what it reached.
  Measured with bench/knn.py on 2 pinned Xeon cores, synthetic CNN-like 1280-d vectors:
  100k: build 17 s, 0.3 GB, p50 1.2 ms, recall@10 0.96 (exact float32: 50 ms/query);
  1M: build 102 s, 3.0 GB (float16 store 2.5 GB + probe 0.5 GB), p50 1.3 ms, recall@10 0.96.
  On structureless data (uniform on the sphere) PCA keeps no neighbourhoods: recall@10 0.02
  even at nprobe = nlist, which ``tuned_recall`` exposes.

- ``IVFPQIndex`` (tens of millions): used when N*D > ``IVF_MAX_FLOATS`` (2**31, ~1.68M vectors at
  1280-d, where the float16 copy alone would pass 4 GB). The *probe* stage is PCA to 128-d +
  IVF-PQ held in RAM: residuals to the coarse centroid coded in 32 bytes (32 sub-quantizers of
  8 bits), ``nlist = min(4 * sqrt(N), N/39, 4096)`` (4096 caps the cost of assigning every vector
  on CPU), trained on at most 2**18 sample vectors; faiss keeps a distance table per list
  (nlist * 32 KB). The *rerank* stage re-scores the probe's best 512 per query from SQ8 codes of
  the full vectors (1 byte per dimension, scale per dimension fitted on the sample) kept in a file
  beside the index and memory-mapped: RAM holds ~48 bytes per vector, disk 1280 bytes per vector
  at 1280-d, and the OS page cache holds what it can of the codes. On bench/knn.py's synthetic
  vectors, re-scoring the exact top 200 of 1M from SQ8 codes keeps recall@10 at 0.987 (float16:
  0.998) while PCA-384 float16 codes reach only 0.83 and SQ4 0.86: the isotropic part of CNN-like
  features is what ranks close neighbours, and only a code of every dimension keeps it. nprobe is
  tuned as for ``IVFIndex``. ``save(path)`` moves the codes file to ``<path>.<token>.codes`` (the
  header names it, so replacing an index file is still atomic) and deletes codes files that no
  saved index names. Measured (bench/scale.py): see docs/scaling.md.

nprobe tuning stops early when doubling nprobe gains less than ``PLATEAU_GAIN`` recall (the
rerank, not the probe, is then the limit), so an unreachable target does not scan every list.

Incremental ``add`` never retrains: new vectors go to their nearest existing list (and, for
IVF-PQ, are coded with the trained quantizers and appended to the codes file). Rebuild when the
corpus has grown several times past the size an index was trained for, or for a new model
version: :class:`IndexBuilder` builds the new index on a thread while the current one keeps
serving, then swaps it in. Searches may run from several threads; ``add``/``remove`` must not
run concurrently with anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import threading
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from .fsutil import atomic_path
from .progress import Cancelled, CancelToken, ProgressFn, check, report

EXACT_MAX_FLOATS = 1 << 24
IVF_MAX_FLOATS = 1 << 31  # ~1.68M vectors at 1280-d, whose float16 copy is 4 GB
IVFPQ_MAX_NLIST = 4096
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 40
CHUNK_ROWS = 32_768
PCA_TRAIN_MAX = 16_384
PARALLEL_MIN_QUERIES = 16
PLATEAU_GAIN = 0.005  # nprobe tuning stops doubling when recall@10 grows less than this
_MAGIC = b"BGMVIDX1"


def _use_threads(n_queries: int | None = None) -> None:
    """Set faiss's OpenMP threads for the calling thread (OpenMP keeps the setting per thread).

    Building uses every core; a search of fewer than ``PARALLEL_MIN_QUERIES`` queries uses one:
    on a busy 2-core machine an OpenMP team that waits for a core held by another process made
    one exact query 4x slower (40 ms vs 10 ms at 10k x 1280).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    faiss.omp_set_num_threads(1 if n_queries is not None and n_queries < PARALLEL_MIN_QUERIES else cores)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a C-contiguous float32 copy (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True, ndmin=2)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return x


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _selector(exclude_ids: Iterable[int] | np.ndarray | None) -> faiss.IDSelector | None:
    """A faiss selector that accepts every id except ``exclude_ids`` (None when nothing is excluded)."""
    if exclude_ids is None:
        return None
    excluded = np.unique(_as_ids(exclude_ids))
    if excluded.size == 0:
        return None
    batch = faiss.IDSelectorBatch(excluded)
    sel = faiss.IDSelectorNot(batch)
    sel.referenced = batch  # keep the wrapped selector alive as long as ``sel``
    return sel


def _pad_invalid(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = scores.astype(np.float32, copy=False)
    scores[ids < 0] = -np.inf
    return scores, ids


def auto_kind(n: int, dim: int) -> str:
    """The backend :func:`build_index` picks for ``n`` vectors of ``dim`` dimensions."""
    if n * dim <= EXACT_MAX_FLOATS:
        return "exact"
    return "ivf" if n * dim <= IVF_MAX_FLOATS else "ivfpq"


def nlist_for(n: int) -> int:
    """IVF list count for ``n`` vectors: 4*sqrt(n), capped so each list gets >= 39 training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


class VectorIndex(ABC):
    """Cosine-similarity kNN over vectors keyed by int64 id."""

    kind: str

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

    def add(self, vectors: np.ndarray, ids: Iterable[int] | np.ndarray) -> None:
        """Add vectors [N, D] under new int64 ids (no retraining; raises if an id is already present)."""
        self._add_normalized(normalize(vectors), _as_ids(ids))

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
        ids = _as_ids(ids)
        return self._remove(ids) if ids.size else 0

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine for each query: (scores [Q, k] float32, ids [Q, k] int64), best first.

        ``exclude_ids`` are never returned. Missing results (fewer than k candidates) are id -1, score -inf.
        """
        q = normalize(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have {q.shape[1]} dimensions, index has {self.dim}")
        if k < 1:
            raise ValueError("k must be >= 1")
        if len(self) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        _use_threads(len(q))
        return self._search(q, k, _selector(exclude_ids))

    def vectors(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """The stored (unit-norm) vectors of ``ids`` [n, D] float32; KeyError for an unknown id."""
        ids = _as_ids(ids)
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
            f.write(_MAGIC + struct.pack("<I", len(header)) + header)
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
        """After :meth:`save` replaced ``path``: drop side files no saved index refers to."""

    @staticmethod
    def load(path: str | Path) -> VectorIndex:
        """Read an index written by :meth:`save`."""
        with open(path, "rb") as f:
            header = _read_header(f, path)
            kind = header.pop("kind")
            dim = header.pop("dim")
            reader = faiss.PyCallbackIOReader(f.read)
            if kind == "exact":
                return ExactIndex(dim, faiss.read_index(reader))
            if kind == "ivf":
                probe = faiss.read_index(reader)
                store = faiss.read_index(reader)
                config = IVFConfig(**header["config"])
                return IVFIndex(dim, config, probe, store, nprobe=header["nprobe"], tuned_recall=header["tuned_recall"])
            if kind == "ivfpq":
                probe = faiss.read_index(reader)
                codec = faiss.read_index(reader)
                row_ids = np.lib.format.read_array(f, allow_pickle=False)
                return IVFPQIndex(
                    dim,
                    IVFPQConfig(**header["config"]),
                    probe,
                    codec,
                    row_ids,
                    Path(path).parent / header["codes_file"],
                    nprobe=header["nprobe"],
                    tuned_recall=header["tuned_recall"],
                )
        raise ValueError(f"unknown index kind {kind!r} in {path}")


class ExactIndex(VectorIndex):
    """Brute-force inner product over float32 vectors (faiss IndexFlatIP in IndexIDMap2)."""

    kind = "exact"

    def __init__(self, dim: int, index: faiss.Index | None = None):
        super().__init__(dim)
        self._index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

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
        scores, ids = self._index.search(queries, k, params=params)
        return _pad_invalid(scores, ids)

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._index.reconstruct_batch(ids)

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return {}, [self._index]


class _IVFBase:
    """What the IVF backends share: the trained probe index, its clustering settings, and ``tune()``
    (the smallest nprobe that reaches ``config.target_recall``)."""

    nprobe: int | None
    tuned_recall: float | None
    config: IVFConfig | IVFPQConfig
    dim: int
    _probe: faiss.Index | None

    @property
    def is_trained(self) -> bool:
        return self._probe is not None

    @property
    def nlist(self) -> int:
        return self._ivf().nlist

    def _ivf(self) -> faiss.IndexIVF:
        if self._probe is None:
            raise RuntimeError(f"{type(self).__name__} is not trained yet")
        return faiss.extract_index_ivf(self._probe)

    def _clustering(self, ivf: faiss.IndexIVF) -> faiss.IndexIVF:
        """Seeded k-means for the coarse quantizer; the caller already chose the sample size."""
        ivf.cp.niter = self.config.kmeans_iterations
        ivf.cp.seed = self.config.seed
        ivf.cp.min_points_per_centroid = 1  # a small corpus may give fewer than 39 points per list
        ivf.cp.max_points_per_centroid = 1 << 30
        return ivf

    def _with_pca(self, ivf: faiss.IndexIVF, probe_dim: int, x: np.ndarray) -> faiss.Index:
        """``ivf`` behind a PCA to ``probe_dim`` fitted on the head of the (random) sample ``x``; bare when no reduction."""
        if probe_dim == self.dim:
            return ivf
        pca = faiss.PCAMatrix(self.dim, probe_dim)
        pca.train(x[:PCA_TRAIN_MAX])
        return faiss.IndexPreTransform(pca, ivf)  # its train() skips the trained PCA

    def tune(self, queries: np.ndarray, true_ids: np.ndarray, exclude_ids: np.ndarray | None = None) -> float:
        """Set nprobe to the smallest value whose recall@k on ``queries`` reaches the target; returns that recall.

        Doubles nprobe until the target is reached, then bisects between the last two values.
        ``true_ids`` [Q, k] are the exact neighbours (``exclude_ids`` left out of both searches).
        When nprobe reaches nlist, or a doubling gains less than ``PLATEAU_GAIN`` (from nprobe 8 on:
        the rerank, not the probe, limits recall), before the target, tuning stops there and the
        shortfall shows in the result.
        """

        def recall(nprobe: int) -> float:
            self.nprobe = nprobe
            return recall_at_k(self.search(queries, true_ids.shape[1], exclude_ids)[1], true_ids)

        target = self.config.target_recall
        low, high = 0, 1  # recall(low) < target (0 stands for "nothing probed")
        previous = -1.0
        while (achieved := recall(high)) < target and high < self.nlist:
            if high >= 8 and achieved - previous < PLATEAU_GAIN:
                break
            previous = achieved
            low, high = high, min(2 * high, self.nlist)
        if achieved >= target:
            while high - low > max(1, high // 8):  # bisect to within 1/8 of nprobe
                mid = (low + high) // 2
                if (mid_recall := recall(mid)) >= target:
                    high, achieved = mid, mid_recall
                else:
                    low = mid
        self.nprobe, self.tuned_recall = high, achieved
        return achieved


@dataclass
class IVFConfig:
    """Settings of :class:`IVFIndex`; None means "derive from the data" (rules in the module docstring)."""

    nlist: int | None = None
    nprobe: int | None = None
    reduce_dim: int | None = 128  # PCA dimensions of the probe stage; None or >= D keeps all
    rerank_candidates: int = 100  # probe-stage results re-scored with full vectors (at least 2k)
    target_recall: float = 0.96  # recall@10 vs exact search that nprobe tuning aims for (0.95 + margin for sampling noise)
    tuning_queries: int = 200
    kmeans_iterations: int = 10
    seed: int = 0


class IVFIndex(_IVFBase, VectorIndex):
    """PCA + IVF-Flat probe stage, exact rerank from float16 full vectors (see module docstring)."""

    kind = "ivf"

    def __init__(
        self,
        dim: int,
        config: IVFConfig | None = None,
        probe: faiss.Index | None = None,
        store: faiss.Index | None = None,
        nprobe: int | None = None,
        tuned_recall: float | None = None,
    ):
        super().__init__(dim)
        self.config = config or IVFConfig()
        self._probe = probe  # IndexPreTransform(PCA, IndexIVFFlat) or a bare IndexIVFFlat; set by train()
        self._store = (
            store if store is not None else faiss.IndexIDMap2(faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16))
        )
        self.nprobe = nprobe if nprobe is not None else self.config.nprobe
        self.tuned_recall = tuned_recall  # recall@10 that tune() measured at the chosen nprobe

    def train_size(self, expected_size: int) -> int:
        """How many sample vectors :meth:`train` wants for a corpus of ``expected_size``."""
        nlist = self.config.nlist or nlist_for(expected_size)
        return min(expected_size, TRAIN_POINTS_PER_LIST * nlist)

    def train(self, sample: np.ndarray, expected_size: int) -> None:
        """Fit PCA (on at most ``PCA_TRAIN_MAX`` of the sample) and the coarse quantizer on ``sample``."""
        x = normalize(sample)
        nlist = min(self.config.nlist or nlist_for(expected_size), len(x))
        reduce = self.config.reduce_dim
        probe_dim = reduce if reduce is not None and reduce < self.dim else self.dim
        ivf = self._clustering(faiss.IndexIVFFlat(faiss.IndexFlatL2(probe_dim), probe_dim, nlist, faiss.METRIC_L2))
        probe = self._with_pca(ivf, probe_dim, x)
        probe.train(x)
        self._store.train(x)
        self._probe = probe
        if self.nprobe is None:
            self.nprobe = max(1, nlist // 16)  # until tune() measures a better one

    def __len__(self) -> int:
        return int(self._store.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._store.id_map).astype(np.int64, copy=False)

    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._ivf()  # raises if untrained
        self._probe.add_with_ids(vectors, ids)
        self._store.add_with_ids(vectors, ids)

    def _remove(self, ids: np.ndarray) -> int:
        self._probe.remove_ids(faiss.IDSelectorBatch(ids))
        return int(self._store.remove_ids(faiss.IDSelectorBatch(ids)))

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._store.reconstruct_batch(ids)

    def _search(self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        n_cand = min(len(self), max(self.config.rerank_candidates, 2 * k))
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist))
        if sel is not None:
            params.sel = sel
        _, cand = self._probe.search(queries, n_cand, params=params)
        step = max(1, (1 << 24) // (n_cand * self.dim))  # bound the gathered vectors to ~64 MB
        parts = [self._rerank(queries[s : s + step], cand[s : s + step], k) for s in range(0, len(queries), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _rerank(self, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the candidate ids from the float16 store; top-k per query, padded to k."""
        return _rerank(queries, cand, k, self._store.reconstruct_batch)

    def describe(self) -> str:
        reduce = f"PCA{self.config.reduce_dim} " if self.config.reduce_dim and self.config.reduce_dim < self.dim else ""
        return f"{reduce}IVF{self.nlist},Flat -> float16 rerank {self.config.rerank_candidates}, nprobe {self.nprobe}"

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return {"config": asdict(self.config), "nprobe": self.nprobe, "tuned_recall": self.tuned_recall}, [
            self._probe,
            self._store,
        ]


@dataclass
class IVFPQConfig:
    """Settings of :class:`IVFPQIndex`; None means "derive from the data" (rules in the module docstring)."""

    nlist: int | None = None  # default min(4*sqrt(N), N/39, IVFPQ_MAX_NLIST)
    nprobe: int | None = None
    reduce_dim: int = 128  # PCA dimensions of the probe stage
    pq_bytes: int = 32  # bytes per vector in the probe stage's product quantizer (8 bits per sub-quantizer)
    rerank_candidates: int = 512  # probe-stage results re-scored from the on-disk codes (at least 2k)
    rerank_codec: str = "SQ8"  # faiss factory string of the on-disk code of full vectors used to re-score
    target_recall: float = 0.96
    tuning_queries: int = 200
    kmeans_iterations: int = 10
    train_max: int = 1 << 18  # largest training sample (coarse k-means, PQ and the rerank codec)
    scratch_dir: str | None = None  # where the codes file lives until save() (default: the system temp folder)
    seed: int = 0


class IVFPQIndex(_IVFBase, VectorIndex):
    """PCA + IVF-PQ probe stage in RAM; re-scoring from compact full-vector codes in a memory-mapped file.

    Inside, the probe stage and the codes file are keyed by *row* (insertion order); ``row_ids``
    maps rows to the caller's ids (-1 once removed).
    """

    kind = "ivfpq"

    def __init__(
        self,
        dim: int,
        config: IVFPQConfig | None = None,
        probe: faiss.Index | None = None,
        codec: faiss.Index | None = None,
        row_ids: np.ndarray | None = None,
        codes_path: Path | None = None,
        nprobe: int | None = None,
        tuned_recall: float | None = None,
    ):
        super().__init__(dim)
        self.config = config or IVFPQConfig()
        self._probe = probe  # IndexPreTransform(PCA, IndexIVFPQ); set by train()
        self._codec = codec  # standalone faiss codec (sa_encode / sa_decode) of the full vectors
        self._row_ids = np.zeros(0, np.int64) if row_ids is None else np.asarray(row_ids, np.int64)
        self._codes_path = codes_path
        self._codes: np.ndarray | None = None  # memory map of the codes file, reopened after add()
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, their rows), rebuilt lazily
        self._scratch: weakref.finalize | None = None  # deletes an unsaved codes file
        self.nprobe = nprobe if nprobe is not None else self.config.nprobe
        self.tuned_recall = tuned_recall

    def train_size(self, expected_size: int) -> int:
        """How many sample vectors :meth:`train` wants for a corpus of ``expected_size``."""
        nlist = self.config.nlist or min(nlist_for(expected_size), IVFPQ_MAX_NLIST)
        return min(expected_size, max(TRAIN_POINTS_PER_LIST * nlist, 1 << 16), self.config.train_max)

    def train(self, sample: np.ndarray, expected_size: int) -> None:
        """Fit PCA, the coarse quantizer, the product quantizer and the rerank codec on ``sample``."""
        x = normalize(sample)
        if len(x) < 256:
            raise ValueError("an IVF-PQ index trains 256 centroids per sub-quantizer: give it at least 256 vectors")
        cfg = self.config
        if cfg.reduce_dim % cfg.pq_bytes:
            raise ValueError(f"pq_bytes ({cfg.pq_bytes}) must divide reduce_dim ({cfg.reduce_dim})")
        nlist = min(cfg.nlist or min(nlist_for(expected_size), IVFPQ_MAX_NLIST), len(x))
        ivf = self._clustering(faiss.IndexIVFPQ(faiss.IndexFlatL2(cfg.reduce_dim), cfg.reduce_dim, nlist, cfg.pq_bytes, 8))
        ivf.pq.cp.min_points_per_centroid = 1  # a small corpus trains its 256 codes per sub-quantizer on fewer points
        probe = self._with_pca(ivf, cfg.reduce_dim, x)
        probe.train(x)
        codec = faiss.index_factory(self.dim, cfg.rerank_codec)
        codec.train(x)
        if cfg.scratch_dir is not None:
            Path(cfg.scratch_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="bgminer-ivfpq-", suffix=".codes", dir=cfg.scratch_dir)
        os.close(fd)
        self._probe, self._codec, self._codes_path, self._codes = probe, codec, Path(name), None
        self._row_ids, self._sorted = np.zeros(0, np.int64), None
        self._scratch = weakref.finalize(self, os.unlink, name)
        if self.nprobe is None:
            self.nprobe = max(1, nlist // 16)

    @property
    def code_size(self) -> int:
        return int(self._codec.sa_code_size())

    def __len__(self) -> int:
        return 0 if self._probe is None else int(self._probe.ntotal)

    def ids(self) -> np.ndarray:
        return self._row_ids[self._row_ids >= 0]

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (-1 where absent), by binary search over the sorted ids."""
        if self._sorted is None:
            order = np.argsort(self._row_ids, kind="stable")
            self._sorted = self._row_ids[order], order
        sorted_ids, order = self._sorted
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        found = (len(sorted_ids) > 0) & (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
        return np.where(found & (ids >= 0), order[pos] if len(order) else -1, -1)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        return self._rows_of(ids) >= 0

    def _codes_view(self) -> np.ndarray:
        if self._codes is None or len(self._codes) != len(self._row_ids):
            self._codes = np.memmap(self._codes_path, np.uint8, "r", shape=(len(self._row_ids), self.code_size))
        return self._codes

    def _add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._ivf()  # raises if untrained
        first = len(self._row_ids)
        with open(self._codes_path, "r+b") as f:  # at the row's offset: bytes an unsaved session appended are overwritten
            f.seek(first * self.code_size)
            f.write(self._codec.sa_encode(vectors).tobytes())
        self._probe.add_with_ids(vectors, np.arange(first, first + len(ids), dtype=np.int64))
        if self._sorted is not None and len(ids) and (not len(self._sorted[0]) or ids.min() > self._sorted[0][-1]) and (np.diff(ids) > 0).all():
            self._sorted = np.concatenate([self._sorted[0], ids]), np.concatenate([self._sorted[1], np.arange(first, first + len(ids))])
        else:
            self._sorted = None
        self._row_ids = np.concatenate([self._row_ids, ids])
        self._codes = None

    def _remove(self, ids: np.ndarray) -> int:
        rows = self._rows_of(ids)
        rows = rows[rows >= 0]
        if rows.size == 0:
            return 0
        removed = int(self._probe.remove_ids(faiss.IDSelectorBatch(rows)))
        self._row_ids[rows] = -1
        self._sorted = None
        return removed

    def _decode(self, rows: np.ndarray) -> np.ndarray:
        """Full vectors of ``rows`` from the codes file (read in file order)."""
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._codec.sa_decode(np.ascontiguousarray(self._codes_view()[unique]))[inverse]

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        rows = self._rows_of(ids)
        if (rows < 0).any():
            raise RuntimeError("unknown ids")
        return self._decode(rows)

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = None
        if exclude_ids is not None:
            rows = self._rows_of(_as_ids(exclude_ids))
            rows = rows[rows >= 0]
        return super().search(queries, k, rows)  # the probe stage is keyed by row

    def _search(self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        n_cand = min(len(self), max(self.config.rerank_candidates, 2 * k))
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist))
        if sel is not None:
            params.sel = sel
        _, cand = self._probe.search(queries, n_cand, params=params)
        step = max(1, (1 << 24) // (n_cand * self.dim))
        parts = [_rerank(queries[s : s + step], cand[s : s + step], k, self._decode) for s in range(0, len(queries), step)]
        scores, rows = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return scores, np.where(rows >= 0, self._row_ids[np.maximum(rows, 0)], -1)

    def describe(self) -> str:
        c = self.config
        return f"PCA{c.reduce_dim},IVF{self.nlist},PQ{c.pq_bytes} -> {c.rerank_codec} rerank {c.rerank_candidates} (on disk), nprobe {self.nprobe}"

    def memory_bytes(self) -> int:
        """Bytes held in RAM: probe stage (with its precomputed distance tables), row ids and their sorted
        lookup. The codes file is on disk and memory-mapped (the OS caches what RAM it can spare)."""
        if self._probe is None:
            return 0
        tables = faiss.downcast_index(self._ivf()).precomputed_table.size() * 4
        lookup = 0 if self._sorted is None else self._sorted[0].nbytes + self._sorted[1].nbytes
        return int(faiss.serialize_index(self._probe).nbytes + tables + self._row_ids.nbytes + lookup)

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return {"config": asdict(self.config), "nprobe": self.nprobe, "tuned_recall": self.tuned_recall}, [self._probe, self._codec]

    def _arrays(self) -> list[np.ndarray]:
        return [self._row_ids]

    def _attach(self, path: Path) -> dict:
        """Keep the codes file beside ``path`` as ``<name>.<token>.codes``: moved from scratch, copied from
        another index file, or left where it is when saving to the same place again."""
        current = self._codes_path
        if current.parent != path.parent or not current.name.startswith(f"{path.name}."):
            target = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.codes")
            if self._scratch is not None and self._scratch.alive:
                shutil.move(current, target)
                self._scratch.detach()
            else:
                shutil.copyfile(current, target)
            self._codes_path, self._codes = target, None
        with open(self._codes_path, "r+b") as f:
            os.fsync(f.fileno())
        return {"codes_file": self._codes_path.name, "rows": len(self._row_ids)}

    def _saved(self, path: Path) -> None:
        for stale in path.parent.glob(f"{path.name}.*.codes"):
            if stale != self._codes_path:
                stale.unlink(missing_ok=True)


def _read_header(f: BinaryIO, path: str | Path) -> dict:
    if f.read(len(_MAGIC)) != _MAGIC:
        raise ValueError(f"{path} is not a bgminer vector index")
    (size,) = struct.unpack("<I", f.read(4))
    return json.loads(f.read(size))


def side_files(path: str | Path) -> list[Path]:
    """The files beside an index file that it refers to (an IVF-PQ index's codes), to copy it whole."""
    with open(path, "rb") as f:
        header = _read_header(f, path)
    return [Path(path).parent / header["codes_file"]] if "codes_file" in header else []


def make_index(kind: str, dim: int, config: IVFConfig | IVFPQConfig | None = None) -> VectorIndex:
    """An empty index of ``kind`` ("exact", "ivf", "ivfpq"); ``config`` applies when it is that kind's config."""
    if kind == "exact":
        return ExactIndex(dim)
    if kind == "ivf":
        return IVFIndex(dim, config if isinstance(config, IVFConfig) else None)
    if kind == "ivfpq":
        return IVFPQIndex(dim, config if isinstance(config, IVFPQConfig) else None)
    raise ValueError(f"unknown index kind {kind!r}; use 'exact', 'ivf', 'ivfpq' or 'auto'")


def _rerank(queries: np.ndarray, cand: np.ndarray, k: int, vectors_of) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query's candidates (-1 = none) by inner product with ``vectors_of(candidates)``, padded to k."""
    valid = cand >= 0
    sims = np.full(cand.shape, -np.inf, np.float32)
    sims[valid] = np.einsum("nd,nd->n", vectors_of(cand[valid]), queries[np.nonzero(valid)[0]])
    if sims.shape[1] < k:
        sims = np.pad(sims, ((0, 0), (0, k - sims.shape[1])), constant_values=-np.inf)
        cand = np.pad(cand, ((0, 0), (0, k - cand.shape[1])), constant_values=-1)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(sims, top, axis=1)
    return _pad_invalid(scores, np.where(np.isfinite(scores), np.take_along_axis(cand, top, axis=1), -1))


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean fraction of each query's true neighbours (ids >= 0) that ``found_ids`` contains."""
    hits = total = 0
    for found, true in zip(found_ids, true_ids):
        true = true[true >= 0]
        hits += np.isin(true, found).sum()
        total += true.size
    return float(hits / total) if total else 1.0


@dataclass
class _TopK:
    """Running exact top-k (by inner product) of fixed queries over streamed chunks of vectors."""

    queries: np.ndarray
    k: int
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.scores = np.full((len(self.queries), self.k), -np.inf, np.float32)
        self.ids = np.full((len(self.queries), self.k), -1, np.int64)

    def update(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        sims = self.queries @ vectors.T
        sims[:, np.isin(ids, self.exclude)] = -np.inf
        if sims.shape[1] > self.k:  # keep each query's k best of this chunk before merging
            part = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
            sims, chunk_ids = np.take_along_axis(sims, part, axis=1), ids[part]
        else:
            chunk_ids = np.broadcast_to(ids, sims.shape)
        all_scores = np.concatenate([self.scores, sims], axis=1)
        all_ids = np.concatenate([self.ids, chunk_ids], axis=1)
        top = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, top, axis=1)
        self.ids = np.where(np.isfinite(self.scores), np.take_along_axis(all_ids, top, axis=1), -1)


def exact_knn(
    queries: np.ndarray,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    k: int,
    exclude_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k over (vectors, ids) chunks streamed once; for ground truth on corpora too big for RAM."""
    topk = _TopK(normalize(queries), k, _as_ids(exclude_ids if exclude_ids is not None else []))
    for vectors, ids in chunks:
        topk.update(normalize(vectors), _as_ids(ids))
    return topk.scores, topk.ids


def build_index(
    vectors: np.ndarray,
    ids: Iterable[int] | np.ndarray,
    kind: str = "auto",
    config: IVFConfig | IVFPQConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> VectorIndex:
    """Index ``vectors`` [N, D] (any float dtype, may be a memmap; read in chunks) under ``ids``.

    ``kind``: "exact", "ivf", "ivfpq" or "auto" (:func:`auto_kind`). An IVF index is trained on a random
    sample, filled chunk by chunk, and its nprobe tuned against exact search on the same pass.
    """
    _use_threads()
    ids = _as_ids(ids)
    n, dim = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{n} vectors but {len(ids)} ids")
    kind = auto_kind(n, dim) if kind == "auto" else kind
    index = make_index(kind, dim, config)
    if kind != "exact" and n == 0:
        raise ValueError("an IVF index is trained on the vectors it indexes: none were given")
    tracker = None
    if isinstance(index, (IVFIndex, IVFPQIndex)):
        rng = np.random.default_rng(index.config.seed)
        index.train(vectors[np.sort(rng.choice(n, index.train_size(n), replace=False))], expected_size=n)
        query_rows = np.sort(rng.choice(n, min(n, index.config.tuning_queries), replace=False))
        if index.config.nprobe is None:
            # the tuning queries are corpus vectors: leave them out so a query does not find itself
            tracker = _TopK(normalize(vectors[query_rows]), 10, ids[query_rows])
    for start in range(0, n, CHUNK_ROWS):
        check(cancel)
        chunk_vectors, chunk_ids = normalize(vectors[start : start + CHUNK_ROWS]), ids[start : start + CHUNK_ROWS]
        index._add_normalized(chunk_vectors, chunk_ids)
        if tracker is not None:
            tracker.update(chunk_vectors, chunk_ids)
        report(progress, min(n, start + CHUNK_ROWS), n, "indexing vectors")
    if tracker is not None:
        index.tune(tracker.queries, tracker.ids, tracker.exclude)
    return index


class IndexBuilder:
    """The index that serves searches now, and a replacement being built on a background thread.

    ``rebuild`` starts building (e.g. for a new model version) and returns at once; searches keep
    using :meth:`current` until the new index is complete (and saved, when a path is given), then it
    is swapped in atomically. A second ``rebuild`` cancels the one in flight. A failed build leaves
    the serving index in place and its error in :attr:`error`.
    """

    def __init__(self, index: VectorIndex | None = None, key: object = None):
        self._lock = threading.Lock()
        self._serving: tuple[object, VectorIndex | None] = (key, index)
        self._thread: threading.Thread | None = None
        self._cancel: CancelToken | None = None
        self._building: object = None
        self.error: BaseException | None = None

    def current(self) -> tuple[object, VectorIndex | None]:
        """(key, index) serving now; the pair always belongs together (one model version's index)."""
        with self._lock:
            return self._serving

    @property
    def building(self) -> object:
        """Key of the index being built, or None."""
        with self._lock:
            return self._building

    def rebuild(
        self,
        key: object,
        vectors: np.ndarray,
        ids: Iterable[int] | np.ndarray,
        kind: str = "auto",
        config: IVFConfig | IVFPQConfig | None = None,
        path: str | Path | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """Build an index over ``vectors`` (a memmap is read in chunks) in the background, then swap it in."""
        with self._lock:
            if self._cancel is not None:
                self._cancel.cancel()
            cancel = self._cancel = CancelToken()
            self._building = key
            previous = self._thread

        def work() -> None:
            if previous is not None:
                previous.join()
            try:
                index = build_index(vectors, ids, kind=kind, config=config, progress=progress, cancel=cancel)
                if path is not None:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    index.save(path)
            except Cancelled:
                return
            except Exception as exc:  # noqa: BLE001 (kept for the caller; the serving index stays)
                with self._lock:
                    if self._cancel is cancel:
                        self.error, self._building, self._cancel = exc, None, None
                return
            with self._lock:
                if self._cancel is cancel:
                    self._serving, self._building, self._cancel, self.error = (key, index), None, None, None

        self._thread = threading.Thread(target=work, name=f"index-build-{key}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> tuple[object, VectorIndex | None]:
        """Block until the build in flight (if any) ends; returns :meth:`current`. Raises the build's error."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.current()
