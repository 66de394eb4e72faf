"""Nearest-neighbour index over image embeddings: one interface, exact and IVF backends behind it.

Vectors are L2-normalised on the way in, so every score is a cosine similarity. Ids are the
caller's int64 ids (image ids); results are padded with id -1 and score -inf.

Backends (``build_index(kind="auto")`` picks by size, see :func:`auto_kind`):

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

Incremental ``add`` never retrains: new vectors go to their nearest existing list. Searches
may run from several threads; ``add``/``remove`` must not run concurrently with anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .progress import CancelToken, ProgressFn, check, report

EXACT_MAX_FLOATS = 1 << 24
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 40
CHUNK_ROWS = 32_768
PCA_TRAIN_MAX = 16_384
PARALLEL_MIN_QUERIES = 16
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
    return "exact" if n * dim <= EXACT_MAX_FLOATS else "ivf"


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
        present = new_ids[np.isin(new_ids, self.ids())]
        if present.size:
            raise ValueError(f"{present.size} ids are already in the index, e.g. {present[:5].tolist()}")
        self._add(x, new_ids)

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
        """Write the index to one file atomically (temporary file, fsync, rename)."""
        path = Path(path)
        settings, parts = self._state()
        header = json.dumps({"kind": self.kind, "dim": self.dim, **settings}).encode()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + struct.pack("<I", len(header)) + header)
                for part in parts:
                    faiss.write_index(part, faiss.PyCallbackIOWriter(f.write))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def load(path: str | Path) -> VectorIndex:
        """Read an index written by :meth:`save`."""
        with open(path, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError(f"{path} is not a bgminer vector index")
            (size,) = struct.unpack("<I", f.read(4))
            header = json.loads(f.read(size))
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


class IVFIndex(VectorIndex):
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

    @property
    def is_trained(self) -> bool:
        return self._probe is not None

    @property
    def nlist(self) -> int:
        return self._ivf().nlist

    def _ivf(self) -> faiss.IndexIVF:
        if self._probe is None:
            raise RuntimeError("IVFIndex is not trained yet")
        return faiss.extract_index_ivf(self._probe)

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
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(probe_dim), probe_dim, nlist, faiss.METRIC_L2)
        ivf.cp.niter = self.config.kmeans_iterations
        ivf.cp.seed = self.config.seed
        ivf.cp.min_points_per_centroid = 1  # a small corpus may give fewer than 39 points per list
        ivf.cp.max_points_per_centroid = 1 << 30  # the caller already chose the sample size
        if probe_dim == self.dim:
            probe = ivf
        else:
            pca = faiss.PCAMatrix(self.dim, probe_dim)
            pca.train(x[:PCA_TRAIN_MAX])  # the sample is random, so its head is too
            probe = faiss.IndexPreTransform(pca, ivf)  # train() below skips the trained PCA
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
        valid = cand >= 0
        sims = np.full(cand.shape, -np.inf, np.float32)
        sims[valid] = np.einsum("nd,nd->n", self._store.reconstruct_batch(cand[valid]), queries[np.nonzero(valid)[0]])
        if sims.shape[1] < k:
            sims = np.pad(sims, ((0, 0), (0, k - sims.shape[1])), constant_values=-np.inf)
            cand = np.pad(cand, ((0, 0), (0, k - cand.shape[1])), constant_values=-1)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(sims, top, axis=1)
        return _pad_invalid(scores, np.where(np.isfinite(scores), np.take_along_axis(cand, top, axis=1), -1))

    def tune(self, queries: np.ndarray, true_ids: np.ndarray, exclude_ids: np.ndarray | None = None) -> float:
        """Set nprobe to the smallest value whose recall@k on ``queries`` reaches the target; returns that recall.

        Doubles nprobe until the target is reached, then bisects between the last two values.
        ``true_ids`` [Q, k] are the exact neighbours (``exclude_ids`` left out of both searches).
        When even nprobe = nlist misses the target, nprobe = nlist and the shortfall shows in the result.
        """

        def recall(nprobe: int) -> float:
            self.nprobe = nprobe
            return recall_at_k(self.search(queries, true_ids.shape[1], exclude_ids)[1], true_ids)

        target = self.config.target_recall
        low, high = 0, 1  # recall(low) < target (0 stands for "nothing probed")
        while (achieved := recall(high)) < target and high < self.nlist:
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

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return {"config": asdict(self.config), "nprobe": self.nprobe, "tuned_recall": self.tuned_recall}, [
            self._probe,
            self._store,
        ]


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
    config: IVFConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> VectorIndex:
    """Index ``vectors`` [N, D] (any float dtype, may be a memmap; read in chunks) under ``ids``.

    ``kind``: "exact", "ivf" or "auto" (:func:`auto_kind`). An IVF index is trained on a random
    sample, filled chunk by chunk, and its nprobe tuned against exact search on the same pass.
    """
    _use_threads()
    ids = _as_ids(ids)
    n, dim = vectors.shape
    if len(ids) != n:
        raise ValueError(f"{n} vectors but {len(ids)} ids")
    kind = auto_kind(n, dim) if kind == "auto" else kind
    if kind == "exact":
        index: VectorIndex = ExactIndex(dim)
    elif kind == "ivf":
        if n == 0:
            raise ValueError("an IVF index is trained on the vectors it indexes: none were given")
        index = IVFIndex(dim, config)
    else:
        raise ValueError(f"unknown index kind {kind!r}; use 'exact', 'ivf' or 'auto'")
    tracker = None
    if isinstance(index, IVFIndex):
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
