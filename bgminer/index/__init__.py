"""Nearest-neighbour index over image embeddings: one interface, backends behind it.

Vectors are L2-normalised on the way in, so search returns cosine similarities. Ids are the
caller's int64 ids (image ids); results are padded with id -1 and similarity -inf.

- :mod:`.base`: the :class:`VectorIndex` interface, the file format, the backend registry
  (:func:`register`, :data:`BACKENDS`) behind :func:`make_index`, :func:`auto_kind` and
  :meth:`VectorIndex.load`, and :func:`build_index`.
- Backends, one per module, each with its own config: :mod:`.exact` (brute force, up to 2**24
  floats), :mod:`.ivf` (PCA + IVF-Flat probe, float16 rerank; up to 2**31 floats) and :mod:`.ivfpq`
  (PCA + IVF-PQ probe, rerank from SQ8 codes on disk; above).
- :mod:`.knn`: exact streamed top-k and recall, for tuning and benchmarks.

Sizing rules and measured figures: docs/index.md. Incremental ``add`` never retrains; rebuild
for a new model version, or when the corpus has grown several times past the size an index was
trained for. Searches may run from several threads; ``add``/``remove`` must not run
concurrently with anything.
"""

from .base import BACKENDS, VectorIndex, auto_kind, build_index, make_index, register, side_files
from .exact import EXACT_MAX_FLOATS, ExactIndex
from .ivf import IVF_MAX_FLOATS, IVFBase, IVFConfig, IVFIndex, nlist_for
from .ivfpq import IVFPQ_MAX_NLIST, IVFPQConfig, IVFPQIndex
from .knn import exact_knn, normalize, recall_at_k

__all__ = [
    "BACKENDS",
    "EXACT_MAX_FLOATS",
    "IVFPQ_MAX_NLIST",
    "IVF_MAX_FLOATS",
    "ExactIndex",
    "IVFBase",
    "IVFConfig",
    "IVFIndex",
    "IVFPQConfig",
    "IVFPQIndex",
    "VectorIndex",
    "auto_kind",
    "build_index",
    "exact_knn",
    "make_index",
    "nlist_for",
    "normalize",
    "recall_at_k",
    "register",
    "side_files",
]
