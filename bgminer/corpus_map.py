"""A 2-D map of the corpus: where the images lie in embedding space, which regions hold labeled
positives, and which clusters hold none yet.

A deterministic sample (every labeled image, the top-scored unlabeled ones, the rest drawn at
random) is reduced with PCA (to :data:`PCA_DIMS`) and then t-SNE (openTSNE) or PCA alone to two
dimensions. Every other image is placed beside its nearest sample points (PCA: projected), so the
density grid behind the points counts the whole corpus (a sample of :data:`PLACE_LIMIT` past
that). k-means over the 2-D sample cuts the map into clusters; each cluster's positives, size and
best score tell the user where nothing has been found yet.

The geometry is cached per (category, embeddings, method, sample size) in the project's
``maps/`` folder; labels and scores are read fresh every time the map is shown, so a decision
shows at once. Vectors are the active version's trunk embeddings for the category, or the
pretrained pooled features before it has a model, L2-normalised (the index's cosine space).
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .fsutil import atomic_path
from .progress import CancelToken, ProgressFn, check, report

if TYPE_CHECKING:
    from .project import Project

METHODS = {"tsne": "t-SNE (openTSNE)", "pca": "PCA"}
DEFAULT_SAMPLE = 5000
PCA_DIMS = 50
GRID = (32, 64)  # density cells per side: fewest, most (half the square root of the corpus size between)
NEIGHBOURS = 5  # sample points an unsampled image is placed among
PLACE_LIMIT = 200_000  # images placed in the density; past it a deterministic sample, counts scaled up
TOP_SCORED_SHARE = 0.1  # of the sample: the unlabeled images the model scores highest
LIKELY = 0.5  # a score from which an unlabeled image counts as a likely positive
TSNE_ITERATIONS = (200, 400)  # early-exaggeration, then normal iterations
FFT_FROM = 2000  # t-SNE sample size from which the FFT gradient beats Barnes-Hut (10x slower at 400, 1.7x faster at 5,000)
CHUNK = 16_384  # rows read, projected and placed at a time
FORMAT = 1

Rows = Callable[[np.ndarray], np.ndarray]  # positions in the source -> vectors [n, D]


class MapError(ValueError):
    """No map can be made (no embedded image, an unknown method); the message says why."""


@dataclass(frozen=True)
class Source:
    """The vectors a map is made of: ids (ascending), the active model's scores (None before a
    model) and a reader of rows by position; ``name`` ("v0007" / "pretrained") and ``digest`` say
    which embeddings these are."""

    name: str
    model_id: int | None
    ids: np.ndarray
    scores: np.ndarray | None
    rows: Rows
    digest: str


@dataclass(frozen=True)
class Cluster:
    number: int  # 1 = the largest
    images: int  # images of the corpus in it (estimated past PLACE_LIMIT)
    positives: int
    negatives: int
    max_score: float | None  # best score of its unlabeled images (None before a model)
    likely: int | None  # its unlabeled images scored >= LIKELY
    x: float  # centre on the map
    y: float


@dataclass
class CorpusMap:
    """One map: the sample points drawn (``ids``, ``xy``, ``cluster`` index, ``label``, ``score``),
    every placed image (``all_*``), the density grid over ``extent`` (x0, x1, y0, y1; rows are y),
    the clusters (numbered by size), and how it was made."""

    category: str | None
    method: str
    source: str
    model_id: int | None
    ids: np.ndarray
    xy: np.ndarray
    cluster: np.ndarray
    label: np.ndarray  # 'positive' / 'negative' / 'none'
    score: np.ndarray | None
    all_ids: np.ndarray
    all_xy: np.ndarray
    all_cluster: np.ndarray
    all_score: np.ndarray | None  # NaN where the model has not scored an image
    density: np.ndarray
    extent: tuple[float, float, float, float]
    clusters: list[Cluster]
    images: int
    placed: int
    seconds: dict[str, float]
    created_at: float
    stale: bool = False  # computed from other embeddings than the category's current ones
    late: int = 0  # labeled images not in the sample (labeled since), placed when read

    def smoothed_density(self, sigma: float | None = None) -> np.ndarray:
        """The density grid blurred by ``sigma`` cells (default: wide enough that a kernel covers about ten
        placed images, at least 0.8 cells): shading that reads as density, not as squares."""
        from scipy.ndimage import gaussian_filter

        if sigma is None:
            sigma = float(np.clip(self.density.shape[0] * 1.26 / np.sqrt(max(self.placed, 1)), 0.8, 4.0))
        return gaussian_filter(self.density.astype(np.float64), sigma, mode="constant").astype(np.float32)

    def without_positive(self) -> list[Cluster]:
        """Clusters that hold no labeled positive, largest first: where to look next."""
        return [c for c in self.clusters if c.positives == 0]

    def in_box(self, x: tuple[float, float], y: tuple[float, float]) -> np.ndarray:
        """Ids of the placed images inside the box, in review order (see :meth:`_ordered`)."""
        (x0, x1), (y0, y1) = sorted(x), sorted(y)
        inside = (self.all_xy[:, 0] >= x0) & (self.all_xy[:, 0] <= x1) & (self.all_xy[:, 1] >= y0) & (self.all_xy[:, 1] <= y1)
        return self._ordered(inside)

    def members(self, number: int, unlabeled_only: bool = True) -> np.ndarray:
        """Ids in cluster ``number`` (see :attr:`Cluster.number`), ordered as :meth:`in_box`."""
        mask = self.all_cluster == number - 1
        if unlabeled_only:
            mask &= ~np.isin(self.all_ids, self.ids[self.label != "none"])
        return self._ordered(mask)

    def scores_of(self, ids: np.ndarray) -> np.ndarray:
        """The scores of placed images ``ids`` (NaN before a model or where unscored)."""
        return _lookup(np.asarray(ids, dtype=np.int64), self.all_ids, self.all_score)

    def _ordered(self, mask: np.ndarray) -> np.ndarray:
        """Unlabeled before labeled, drawn points before the rest, then best score first."""
        rows = np.flatnonzero(mask)
        ids = self.all_ids[rows]
        labeled, sampled = np.isin(ids, self.ids[self.label != "none"]), np.isin(ids, self.ids)
        score = self.all_score[rows] if self.all_score is not None else np.zeros(len(rows))
        return ids[np.lexsort((ids, -np.nan_to_num(score, nan=-1.0), ~sampled, labeled))]


# -- the source ------------------------------------------------------------------------------
def source(project: Project, category: str | None) -> Source:
    """The category's active version (trunk embeddings and scores), else the pretrained pooled features."""
    found = project.version_scores(category) if category is not None else None
    if found is not None:
        record, version = found
        emb, ids = version.embeddings(), version.ids
        return Source(f"v{record.id:04d}", record.id, ids, version.column(category), lambda pos: emb[pos], _digest(ids))
    ids = np.asarray(project.store.image_ids(embedded=True), dtype=np.int64)
    # project.features loads the backbone: only when rows are read, not to show a cached map
    return Source("pretrained", None, ids, None, lambda pos: project.features.read("pooled", ids[pos]), _digest(ids))


def _digest(ids: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def cache_path(project: Project, category: str | None, src_name: str, method: str, sample_size: int) -> Path:
    folder = "all" if category is None else f"c{project.store.category_id(category)}"
    return project.root / "maps" / folder / f"{src_name}-{method}-n{int(sample_size)}.npz"


# -- the project-level calls -----------------------------------------------------------------
def layout(project: Project, category: str | None, method: str = "tsne", sample_size: int = DEFAULT_SAMPLE,
           refresh: bool = False, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> CorpusMap:
    """The map of ``category`` (None: no labels, pretrained features): the cached one when it was
    made from the current embeddings (unless ``refresh``), else computed and cached."""
    _check_method(method)
    src = source(project, category)
    path = cache_path(project, category, src.name, method, sample_size)
    if not refresh and path.exists():
        found = _read(project, category, src, path)
        if found is not None and not found.stale:
            return found
    labels = project.labels(category) if category is not None else {}
    geometry = compute(src.ids, src.rows, labeled=list(labels), scores=src.scores, method=method,
                       sample_size=sample_size, progress=progress, cancel=cancel)
    geometry["meta"].update(source=src.name, model_id=src.model_id, digest=src.digest, category=category)
    _write(path, geometry)
    return _attach(geometry, category, labels, src, late=None)


def cached(project: Project, category: str | None, method: str = "tsne", sample_size: int = DEFAULT_SAMPLE) -> CorpusMap | None:
    """The newest map made for ``category`` with ``method`` and ``sample_size`` (never computes);
    ``stale`` when it was made from other embeddings than the current ones. None when there is none."""
    _check_method(method)
    src = source(project, category)
    path = cache_path(project, category, src.name, method, sample_size)
    if not path.exists():
        others = sorted(path.parent.glob(f"*-{method}-n{int(sample_size)}.npz"), key=lambda p: p.stat().st_mtime)
        if not others:
            return None
        path = others[-1]
    return _read(project, category, src, path)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise MapError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")


def _write(path: Path, geometry: dict) -> None:
    arrays = {k: v for k, v in geometry.items() if k != "meta"}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(geometry["meta"])), **arrays)


def _read(project: Project, category: str | None, src: Source, path: Path) -> CorpusMap | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            geometry = {k: z[k] for k in z.files}
        geometry["meta"] = json.loads(str(geometry["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable, or another format: recompute
        return None
    if geometry["meta"].get("format") != FORMAT:
        return None
    labels = project.labels(category) if category is not None else {}
    return _attach(geometry, category, labels, src, late=_late_vectors(geometry, labels, src))


def _late_vectors(geometry: dict, labels: dict[int, str], src: Source) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, vectors) of labeled images that are in the source but were not placed (labeled since the map was made)."""
    if geometry["meta"].get("source") != src.name or not len(src.ids):  # other embeddings: another space
        return None
    missing = np.setdiff1d(np.fromiter(labels, dtype=np.int64, count=len(labels)), geometry["all_ids"])
    pos = np.searchsorted(src.ids, missing)
    ok = src.ids[np.minimum(pos, len(src.ids) - 1)] == missing
    if not ok.any():
        return None
    return missing[ok], _normalised(src.rows(pos[ok]))


# -- the computation -------------------------------------------------------------------------
def compute(ids: np.ndarray, rows: Rows, labeled: list[int] | np.ndarray = (), scores: np.ndarray | None = None,
            method: str = "tsne", sample_size: int = DEFAULT_SAMPLE, seed: int = 0, place_limit: int = PLACE_LIMIT,
            progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> dict:
    """The map's geometry for images ``ids`` (ascending) whose vectors ``rows(positions)`` reads:
    arrays (sample ids, xy, PCA, clusters, every placed image, density) and ``meta``. ``labeled``
    ids are always in the sample; ``scores`` (aligned with ``ids``) pick the top-scored share."""
    _check_method(method)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        raise MapError("no embedded images to map yet: ingest and embed a corpus first")
    if len(ids) > 1 and np.any(np.diff(ids) <= 0):
        raise MapError("image ids must be ascending and distinct")
    if scores is not None and len(scores) != len(ids):
        raise MapError(f"{len(scores)} scores for {len(ids)} images")
    if sample_size < 2:
        raise MapError("a map needs a sample of at least 2 images")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def phase(name: str, share: float, message: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now
        report(progress, int(share * 1000), 1000, message)
        check(cancel)

    report(progress, 0, 1000, "drawing the sample")
    rng = np.random.default_rng(seed)
    pick = _sample(ids, labeled, scores, sample_size, rng)
    vectors = _normalised(rows(pick))
    mean, components = _pca(vectors, PCA_DIMS)
    sample_pca = ((vectors - mean) @ components).astype(np.float32)
    phase("sample_pca", 0.1, f"PCA of {len(pick)} images; {'t-SNE' if method == 'tsne' else 'placing'}")
    xy = _tsne(sample_pca, seed, progress, cancel) if method == "tsne" and len(pick) >= 8 else _first_two(sample_pca)
    phase("reduce", 0.7, "placing every image")
    placed = _placement_rows(len(ids), pick, place_limit, rng)
    all_xy = np.empty((len(placed), 2), dtype=np.float32)
    for start in range(0, len(placed), CHUNK):
        part = placed[start : start + CHUNK]
        projected = ((_normalised(rows(part)) - mean) @ components).astype(np.float32)
        all_xy[start : start + len(part)] = _place(projected, sample_pca, xy) if method == "tsne" else _first_two(projected)
        report(progress, 700 + int(250 * (start + len(part)) / len(placed)), 1000, f"placed {start + len(part)}/{len(placed)}")
        check(cancel)
    in_placed = np.searchsorted(placed, pick)
    all_xy[in_placed] = xy  # sample points keep their own coordinates
    phase("place", 0.95, "clusters and density")
    extent = _extent(all_xy)
    bins = int(np.clip(np.sqrt(len(ids)) / 2, *GRID))
    density = np.histogram2d(all_xy[:, 1], all_xy[:, 0], bins=bins, range=[extent[2:], extent[:2]])[0]
    density = (density * (len(ids) / len(placed))).astype(np.float32)
    centroids = _kmeans(xy, _n_clusters(len(pick)), seed)
    all_cluster = _nearest(all_xy, centroids)
    # Number clusters by size, largest first, so "cluster 1" is the biggest region.
    sizes = np.bincount(all_cluster, minlength=len(centroids))
    rank = np.empty(len(centroids), dtype=np.int32)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(centroids))
    all_cluster = rank[all_cluster].astype(np.int32)
    centroids = centroids[np.argsort(-sizes, kind="stable")]
    phase("clusters", 1.0, "done")
    meta = {"format": FORMAT, "method": method, "images": len(ids), "placed": len(placed), "seconds": seconds,
            "created_at": time.time(), "seed": seed, "sample_size": int(sample_size)}
    return {"meta": meta, "ids": ids[pick], "xy": xy.astype(np.float32), "mean": mean, "components": components,
            "sample_pca": sample_pca, "all_ids": ids[placed], "all_xy": all_xy, "all_cluster": all_cluster,
            "centroids": centroids.astype(np.float32), "density": density, "extent": np.asarray(extent, dtype=np.float64)}


def _sample(ids: np.ndarray, labeled, scores: np.ndarray | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions (ascending) of the sample: every labeled image, the best-scored unlabeled share, then at random."""
    is_labeled = np.isin(ids, np.asarray(list(labeled), dtype=np.int64))
    chosen = np.flatnonzero(is_labeled)
    room = max(size - len(chosen), 0)
    rest = np.flatnonzero(~is_labeled)
    if scores is not None and room and len(rest):
        top = rest[np.argsort(-scores[rest], kind="stable")[: int(room * TOP_SCORED_SHARE)]]
        chosen = np.concatenate([chosen, top])
        rest = np.setdiff1d(rest, top)
    room = max(size - len(chosen), 0)
    if room and len(rest):
        chosen = np.concatenate([chosen, rest[rng.choice(len(rest), min(room, len(rest)), replace=False)]])
    return np.sort(chosen)


def _placement_rows(n: int, pick: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    rest = np.setdiff1d(np.arange(n), pick)
    extra = rest[rng.choice(len(rest), max(limit - len(pick), 0), replace=False)]
    return np.sort(np.concatenate([pick, extra]))


def _normalised(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _pca(vectors: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components [D, k]) of the sample; signs fixed so the largest loading is positive."""
    from scipy.linalg import eigh

    mean = vectors.mean(axis=0)
    centred = vectors - mean
    d = vectors.shape[1]
    k = max(1, min(dims, len(vectors) - 1, d))
    if len(vectors) < d:
        _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        components = vt[:k].T
    else:  # only the top k of the D x D covariance
        values, vecs = eigh((centred.T @ centred).astype(np.float64), subset_by_index=[d - k, d - 1])
        components = vecs[:, np.argsort(-values)]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(k)])
    return mean.astype(np.float32), (components * np.where(signs == 0, 1, signs)).astype(np.float32)


def _first_two(projected: np.ndarray) -> np.ndarray:
    out = np.zeros((len(projected), 2), dtype=np.float32)
    out[:, : min(2, projected.shape[1])] = projected[:, :2]
    return out


def _tsne(x: np.ndarray, seed: int, progress: ProgressFn | None, cancel: CancelToken | None) -> np.ndarray:
    from openTSNE import TSNE

    early, normal = TSNE_ITERATIONS
    total = early + normal
    done = 0

    def step(iteration: int, error: float, embedding) -> bool:
        nonlocal done
        done += 10
        report(progress, 150 + int(550 * min(done, total) / total), 1000, f"t-SNE iteration {min(done, total)}/{total}")
        return cancel is not None and cancel.cancelled

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3 - 1)))
    gradient = "fft" if len(x) >= FFT_FROM else "bh"
    tsne = TSNE(perplexity=perplexity, early_exaggeration_iter=early, n_iter=normal, n_jobs=1, random_state=seed,
                negative_gradient_method=gradient, callbacks=step, callbacks_every_iters=10, verbose=False)
    report(progress, 100, 1000, "t-SNE: nearest neighbours")
    embedding = np.asarray(tsne.fit(x), dtype=np.float32)
    check(cancel)  # a cancel stops the optimisation early; do not keep a half-made map
    return embedding


def _place(points: np.ndarray, sample_pca: np.ndarray, sample_xy: np.ndarray) -> np.ndarray:
    """2-D positions of ``points``: the mean of their nearest sample points' positions, weighted by closeness."""
    import faiss

    index = faiss.IndexFlatL2(sample_pca.shape[1])
    index.add(np.ascontiguousarray(sample_pca))
    k = min(NEIGHBOURS, len(sample_pca))
    dist, nearest = index.search(np.ascontiguousarray(points, dtype=np.float32), k)
    weights = 1.0 / (np.sqrt(np.maximum(dist, 0)) + 1e-6)
    return ((weights[:, :, None] * sample_xy[nearest]).sum(axis=1) / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _extent(xy: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = xy.min(axis=0).astype(np.float64), xy.max(axis=0).astype(np.float64)
    pad = np.maximum((hi - lo) * 0.03, 1e-3)
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


def _n_clusters(n: int) -> int:
    return int(np.clip(round(np.sqrt(n / 4)), 2, 40)) if n >= 4 else 1


def _kmeans(xy: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means centres of the 2-D sample (deterministic for ``seed``)."""
    import faiss

    points = np.ascontiguousarray(xy, dtype=np.float32)
    k = min(k, len(np.unique(points, axis=0)))
    if k <= 1:
        return points.mean(axis=0, keepdims=True)
    km = faiss.Kmeans(2, k, niter=25, nredo=10, seed=seed + 1, verbose=False, min_points_per_centroid=1)
    km.train(points)
    return np.asarray(km.centroids, dtype=np.float32)


def _nearest(xy: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    out = np.empty(len(xy), dtype=np.int32)
    for start in range(0, len(xy), CHUNK):
        part = xy[start : start + CHUNK]
        out[start : start + len(part)] = ((part[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)
    return out


def _lookup(keys: np.ndarray, ids: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """values[ids == key] for each key (NaN where the key is not in the ascending ``ids``)."""
    out = np.full(len(keys), np.nan, dtype=np.float32)
    if values is None or not len(ids):
        return out
    pos = np.minimum(np.searchsorted(ids, keys), len(ids) - 1)
    hit = ids[pos] == keys
    out[hit] = values[pos[hit]]
    return out


# -- labels and scores on the geometry -------------------------------------------------------
def _attach(geometry: dict, category: str | None, labels: dict[int, str], src: Source, late) -> CorpusMap:
    meta = geometry["meta"]
    ids, xy, all_ids, all_xy = geometry["ids"], geometry["xy"], geometry["all_ids"], geometry["all_xy"]
    centroids, all_cluster = geometry["centroids"], geometry["all_cluster"]
    late_n = 0
    if late is not None:  # labeled since the map was made: placed beside their nearest sample points now
        late_ids, vectors = late
        projected = ((vectors - geometry["mean"]) @ geometry["components"]).astype(np.float32)
        late_xy = _place(projected, geometry["sample_pca"], xy) if meta["method"] == "tsne" else _first_two(projected)
        order = np.argsort(np.concatenate([all_ids, late_ids]), kind="stable")
        all_ids, all_xy = np.concatenate([all_ids, late_ids])[order], np.concatenate([all_xy, late_xy])[order]
        all_cluster = np.concatenate([all_cluster, _nearest(late_xy, centroids)])[order]
        late_n = len(late_ids)
    # Every labeled image that is placed is drawn as a point, in the sample or not.
    labeled = np.fromiter(labels, dtype=np.int64, count=len(labels))
    extra = np.setdiff1d(labeled[np.isin(labeled, all_ids)], ids)
    if len(extra):
        order = np.argsort(np.concatenate([ids, extra]), kind="stable")
        ids = np.concatenate([ids, extra])[order]
        xy = np.concatenate([xy, all_xy[np.searchsorted(all_ids, extra)]])[order]
    label = np.array([labels.get(int(i), "none") for i in ids], dtype=object)
    cluster = all_cluster[np.searchsorted(all_ids, ids)]
    fresh = meta.get("source") == src.name and meta.get("digest") == src.digest
    score = _lookup(ids, src.ids, src.scores) if src.scores is not None else None
    all_score = _lookup(all_ids, src.ids, src.scores) if src.scores is not None else None
    scale = meta["images"] / max(meta["placed"], 1)
    k = len(centroids)
    sizes = np.bincount(all_cluster, minlength=k) * scale
    positives = np.bincount(cluster[label == "positive"], minlength=k)
    negatives = np.bincount(cluster[label == "negative"], minlength=k)
    best = np.full(k, np.nan, dtype=np.float32)
    likely = np.zeros(k)
    if all_score is not None:  # over each cluster's unlabeled, scored images
        keep = ~np.isin(all_ids, ids[label != "none"]) & ~np.isnan(all_score)
        np.fmax.at(best, all_cluster[keep], all_score[keep])
        likely = np.bincount(all_cluster[keep & (all_score >= LIKELY)], minlength=k) * scale
    clusters = [
        Cluster(c + 1, round(float(sizes[c])), int(positives[c]), int(negatives[c]),
                None if np.isnan(best[c]) else float(best[c]), None if all_score is None else round(float(likely[c])),
                float(centroids[c, 0]), float(centroids[c, 1]))
        for c in range(k)
    ]
    extent = tuple(float(v) for v in geometry["extent"])
    return CorpusMap(category, meta["method"], meta.get("source", src.name), meta.get("model_id"), ids, xy,
                     cluster.astype(np.int32), label, score, all_ids, all_xy, all_cluster, all_score, geometry["density"], extent,
                     clusters, int(meta["images"]), int(meta["placed"]), dict(meta["seconds"]), float(meta["created_at"]),
                     stale=not fresh, late=late_n)
