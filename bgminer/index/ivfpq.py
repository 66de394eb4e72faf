"""IVF-PQ backend, for tens of millions of vectors: a compact probe stage in RAM, full-vector codes on disk.

Inside, the probe stage and the codes file are keyed by *row* (insertion order); ``row_ids`` maps
rows to the caller's ids (-1 once removed). ``save(path)`` moves the codes file to
``<path>.<token>.codes`` (the header names it, so replacing an index file stays atomic) and
deletes codes files that no saved index names. Sizing rules and measurements: docs/index.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from .base import read_faiss, register
from .ivf import TRAIN_POINTS_PER_LIST, IVFBase, nlist_for
from .knn import as_ids, normalize

IVFPQ_MAX_NLIST = 4096


@dataclass
class IVFPQConfig:
    """Settings of :class:`IVFPQIndex`; None means "derive from the data" (rules in docs/index.md)."""

    nlist: int | None = None  # default min(4*sqrt(N), N/39, IVFPQ_MAX_NLIST)
    nprobe: int | None = None
    reduce_dim: int = 128  # PCA dimensions of the probe stage
    pq_bytes: int = 32  # bytes per vector in the probe stage's product quantizer (8 bits per sub-quantizer)
    rerank_candidates: int = 512  # probe-stage results re-ranked from the on-disk codes (at least 2k)
    rerank_codec: str = "SQ8"  # faiss factory string of the on-disk code of full vectors used to re-rank
    target_recall: float = 0.96
    tuning_queries: int = 200
    kmeans_iterations: int = 10
    train_max: int = 1 << 18  # largest training sample (coarse k-means, PQ and the rerank codec)
    scratch_dir: str | None = None  # where the codes file lives until save() (default: the system temp folder)
    seed: int = 0


@register
class IVFPQIndex(IVFBase):
    """PCA + IVF-PQ probe stage in RAM; re-ranking from compact full-vector codes in a memory-mapped file."""

    kind = "ivfpq"
    config_class = IVFPQConfig

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

    @classmethod
    def _read(cls, dim: int, header: dict, f: BinaryIO, path: Path) -> IVFPQIndex:
        probe = read_faiss(f)
        codec = read_faiss(f)
        row_ids = np.lib.format.read_array(f, allow_pickle=False)
        return cls(
            dim,
            IVFPQConfig(**header["config"]),
            probe,
            codec,
            row_ids,
            path.parent / header["codes_file"],
            nprobe=header["nprobe"],
            tuned_recall=header["tuned_recall"],
        )

    def train_size(self, expected_size: int) -> int:
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
        rows = np.arange(first, first + len(ids), dtype=np.int64)
        self._probe.add_with_ids(vectors, rows)
        sorted_ids = None if self._sorted is None else self._sorted[0]
        ascending = len(ids) > 0 and (np.diff(ids) > 0).all()
        if sorted_ids is not None and ascending and (not len(sorted_ids) or ids[0] > sorted_ids[-1]):
            self._sorted = np.concatenate([sorted_ids, ids]), np.concatenate([self._sorted[1], rows])  # still sorted: extend
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

    def _full_vectors(self, keys: np.ndarray) -> np.ndarray:
        """Full vectors of rows, decoded from the codes file (read in file order)."""
        unique, inverse = np.unique(keys, return_inverse=True)
        return self._codec.sa_decode(np.ascontiguousarray(self._codes_view()[unique]))[inverse]

    def _ids_of_keys(self, keys: np.ndarray) -> np.ndarray:
        return np.where(keys >= 0, self._row_ids[np.maximum(keys, 0)], -1)

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        rows = self._rows_of(ids)
        if (rows < 0).any():
            raise RuntimeError("unknown ids")
        return self._full_vectors(rows)

    def search(
        self, queries: np.ndarray, k: int, exclude_ids: Iterable[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = None
        if exclude_ids is not None:
            rows = self._rows_of(as_ids(exclude_ids))
            rows = rows[rows >= 0]
        return super().search(queries, k, rows)  # the probe stage is keyed by row

    def describe(self) -> str:
        c = self.config
        probe = f"PCA{c.reduce_dim},IVF{self.nlist},PQ{c.pq_bytes}"
        return f"{probe} -> {c.rerank_codec} rerank {c.rerank_candidates} (on disk), nprobe {self.nprobe}"

    def memory_bytes(self) -> int:
        """Bytes held in RAM: probe stage (with its precomputed distance tables), row ids and their sorted
        lookup. The codes file is on disk and memory-mapped (the OS caches what RAM it can spare)."""
        if self._probe is None:
            return 0
        tables = faiss.downcast_index(self._ivf()).precomputed_table.size() * 4
        lookup = 0 if self._sorted is None else self._sorted[0].nbytes + self._sorted[1].nbytes
        return int(faiss.serialize_index(self._probe).nbytes + tables + self._row_ids.nbytes + lookup)

    def _state(self) -> tuple[dict, list[faiss.Index]]:
        return self._settings(), [self._probe, self._codec]

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
