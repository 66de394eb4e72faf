"""IVF backends' shared base (probe stage, rerank, nprobe tuning) and the IVF-Flat backend.

Both IVF backends search in two stages: a *probe* stage (PCA to ``reduce_dim``, then an inverted
file of ``nlist`` lists, ``nprobe`` of them scanned) returns ``rerank_candidates`` per query, and
a *rerank* stage recomputes their similarities with (a compact copy of) the full vectors. They differ in how
the probe stage codes vectors and where the full vectors live. Sizing rules, tuning and measured
figures: docs/index.md.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import faiss
import numpy as np

from .base import VectorIndex, read_faiss, register
from .knn import TopK, normalize, pad_invalid, recall_at_k

if TYPE_CHECKING:
    from .ivfpq import IVFPQConfig

IVF_MAX_FLOATS = 1 << 31  # ~1.68M vectors at 1280-d, whose float16 copy is 4 GB
MIN_POINTS_PER_LIST = 39
TRAIN_POINTS_PER_LIST = 40
PCA_TRAIN_MAX = 16_384
PLATEAU_GAIN = 0.005  # nprobe tuning stops doubling when recall@10 grows less than this
RERANK_BLOCK_FLOATS = 1 << 24  # full vectors gathered per rerank block (~64 MB as float32)


def nlist_for(n: int) -> int:
    """IVF list count for ``n`` vectors: 4*sqrt(n), capped so each list gets >= 39 training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def rerank(
    queries: np.ndarray, cand: np.ndarray, k: int, vectors_of: Callable[[np.ndarray], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query's candidates (-1 = none) by inner product with ``vectors_of(candidates)``, padded to k."""
    valid = cand >= 0
    sims = np.full(cand.shape, -np.inf, np.float32)
    sims[valid] = np.einsum("nd,nd->n", vectors_of(cand[valid]), queries[np.nonzero(valid)[0]])
    if sims.shape[1] < k:
        sims = np.pad(sims, ((0, 0), (0, k - sims.shape[1])), constant_values=-np.inf)
        cand = np.pad(cand, ((0, 0), (0, k - cand.shape[1])), constant_values=-1)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(sims, top, axis=1)
    return pad_invalid(sims, np.where(np.isfinite(sims), np.take_along_axis(cand, top, axis=1), -1))


class IVFBase(VectorIndex):
    """What the IVF backends share: the trained probe index, its clustering, the two-stage search and
    ``tune()`` (the smallest nprobe that reaches ``config.target_recall``).

    A backend sets ``config``, ``_probe`` (keyed by what :meth:`_full_vectors` takes) and implements
    :meth:`train`, :meth:`train_size`, :meth:`_full_vectors` and, when the probe is not keyed by the
    caller's ids, :meth:`_ids_of_keys`.
    """

    config: IVFConfig | IVFPQConfig
    nprobe: int | None
    tuned_recall: float | None  # recall@10 that tune() measured at the chosen nprobe
    _probe: faiss.Index | None

    @abstractmethod
    def train(self, sample: np.ndarray, expected_size: int) -> None:
        """Fit the probe stage (and whatever codes the full vectors) on a sample of the corpus."""

    @abstractmethod
    def train_size(self, expected_size: int) -> int:
        """How many sample vectors :meth:`train` wants for a corpus of ``expected_size``."""

    @abstractmethod
    def _full_vectors(self, keys: np.ndarray) -> np.ndarray:
        """Full vectors (float32) of probe-stage keys, for the rerank."""

    def _ids_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """The caller's ids of probe-stage keys (-1 stays -1)."""
        return keys

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

    def _train_for(self, vectors: np.ndarray, ids: np.ndarray) -> TopK | None:
        n = len(ids)
        if n == 0:
            raise ValueError("an IVF index is trained on the vectors it indexes: none were given")
        rng = np.random.default_rng(self.config.seed)
        self.train(vectors[np.sort(rng.choice(n, self.train_size(n), replace=False))], expected_size=n)
        query_rows = np.sort(rng.choice(n, min(n, self.config.tuning_queries), replace=False))
        if self.config.nprobe is not None:
            return None
        # the tuning queries are corpus vectors: leave them out so a query does not find itself
        return TopK(normalize(vectors[query_rows]), 10, ids[query_rows])

    def _tune(self, truth: TopK) -> None:
        self.tune(truth.queries, truth.ids, truth.exclude)

    def _search(self, queries: np.ndarray, k: int, sel: faiss.IDSelector | None) -> tuple[np.ndarray, np.ndarray]:
        n_cand = min(len(self), max(self.config.rerank_candidates, 2 * k))
        params = faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist))
        if sel is not None:
            params.sel = sel
        _, cand = self._probe.search(queries, n_cand, params=params)
        step = max(1, RERANK_BLOCK_FLOATS // (n_cand * self.dim))
        parts = [rerank(queries[s : s + step], cand[s : s + step], k, self._full_vectors) for s in range(0, len(queries), step)]
        sims, keys = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return sims, self._ids_of_keys(keys)

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

    def _settings(self) -> dict:
        """The header settings both IVF backends write (and read back in ``_read``)."""
        return {"config": asdict(self.config), "nprobe": self.nprobe, "tuned_recall": self.tuned_recall}


@dataclass
class IVFConfig:
    """Settings of :class:`IVFIndex`; None means "derive from the data" (rules in docs/index.md)."""

    nlist: int | None = None
    nprobe: int | None = None
    reduce_dim: int | None = 128  # PCA dimensions of the probe stage; None or >= D keeps all
    rerank_candidates: int = 100  # probe-stage results re-ranked with full vectors (at least 2k)
    target_recall: float = 0.96  # recall@10 vs exact search that nprobe tuning aims for (0.95 + margin for sampling noise)
    tuning_queries: int = 200
    kmeans_iterations: int = 10
    seed: int = 0


@register
class IVFIndex(IVFBase):
    """PCA + IVF-Flat probe stage, exact rerank from float16 full vectors held in RAM."""

    kind = "ivf"
    config_class = IVFConfig
    max_floats = IVF_MAX_FLOATS

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
        self.tuned_recall = tuned_recall

    @classmethod
    def _read(cls, dim: int, header: dict, f: BinaryIO, path: Path) -> IVFIndex:
        probe = read_faiss(f)
        store = read_faiss(f)
        return cls(dim, IVFConfig(**header["config"]), probe, store, nprobe=header["nprobe"], tuned_recall=header["tuned_recall"])

    def train_size(self, expected_size: int) -> int:
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

    def _full_vectors(self, keys: np.ndarray) -> np.ndarray:
        return self._store.reconstruct_batch(keys)

    def describe(self) -> str:
        reduce = f"PCA{self.config.reduce_dim} " if self.config.reduce_dim and self.config.reduce_dim < self.dim else ""
        return f"{reduce}IVF{self.nlist},Flat -> float16 rerank {self.config.rerank_candidates}, nprobe {self.nprobe}"

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return self._settings(), [self._probe, self._store]

