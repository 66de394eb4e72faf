"""Rankers that look past the trained model, for rare classes that come in several styles.

A model trained from a few seeds learns the seeds' mode (their style: photos, icons, line art)
and ranks the class's other modes no higher than background. The pretrained ImageNet
classifier is the one signal here that is semantic across styles: a drawn bird and a photo of
a bird both put mass on bird classes. These rankers read the pretrained features through
``RankContext.features`` (the project's :class:`~bgminer.feature_cache.FeatureCache`, rows by
image id) and are mixed into the default strategy (:func:`bgminer.rank.make_strategy`):

- :class:`ProbeRanker`: a logistic-regression probe on the pretrained pooled features, the
  labeled positives against the labeled negatives plus a sample of the corpus as background.
  The strongest ranker at a handful of positives (``docs/quality.md``, protocols A and C).
- :class:`SemanticNeighbours`: SEALS-style neighbourhoods of *every* positive, in the
  ImageNet-probability space (Hellinger: cosine of square-root probabilities), visited
  round-robin so a mode with one found member is explored as fast as the seeds' mode.
- :class:`ClassLift`: the probability mass on the ImageNet classes lifted among the positives.
- :class:`NamePrior`: the probability mass on the ImageNet classes the category's *name* denotes
  in WordNet ("bird": all 59 bird classes), used once the found positives confirm it.
- :class:`RankFusion`: reciprocal-rank fusion of several rankers' orders.

Each reads at most ``MAX_BACKGROUND`` rows to fit and streams the rest in chunks, so memory
stays flat with the corpus; once a model has scored the corpus, a query scores at most
``MAX_SCAN`` rows (:func:`scan_pool`), so its cost stops growing with the corpus. Their cost is
in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from .probe import fit_logistic
from .rank import RankContext, Strategy, _id_array, _top
from .textsearch import ClassMatch, class_probability, name_classes, softmax

CHUNK_ROWS = 32_768
MAX_BACKGROUND = 5_000  # corpus rows sampled as background for the probe and the class lift
MAX_SCAN = 200_000  # feature rows one ranker scores per query once a model exists (scan_pool)
PROBE_C = 1.0
PROBE_ITERATIONS = 100  # L-BFGS steps: the ranking settles long before the loss does
LIFT_CLASSES = 10
MIN_CLASS_MASS = 0.01  # a lifted class must hold this much of the positives' mean probability
FUSION_K = 60  # reciprocal-rank fusion constant (Cormack et al., 2009)
NAME_PRIOR_MIN_REJECTED = 10  # negatives from which the positives must outscore them on the name's classes
NAME_PRIOR_TRUSTED_BELOW = 10  # positives: fewer cannot tell a name that means the class from one that does not
NAME_PRIOR_MIN_AUC = 0.6  # from then on the name's classes must rank the positives above the corpus this well


class FeatureSource(Protocol):
    """Pretrained feature rows by image id: ``read("pooled" | "logits", ids)``."""

    def read(self, name: str, ids: np.ndarray) -> np.ndarray: ...


def chunked(ids: np.ndarray, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    for start in range(0, len(ids), rows):
        yield ids[start : start + rows]


def hellinger(logits: np.ndarray) -> np.ndarray:
    """Square roots of the softmax probabilities: unit rows whose dot product is the Bhattacharyya coefficient."""
    p = softmax(logits)
    return np.sqrt(p, out=p)


def scan_pool(ctx: RankContext, rows: int | None = None) -> np.ndarray:
    """The available ids a feature ranker scores. All of them up to ``MAX_SCAN`` (``rows``); past that,
    once a model has scored the corpus, its ``MAX_SCAN / 2`` best plus a seeded sample of the rest as large,
    so that a query at a million images reads a fixed number of feature rows, not the whole cache. Before
    the first model every available image is scanned: there is no score to pick the pool by."""
    rows = MAX_SCAN if rows is None else rows
    mask = ctx.available()
    available = ctx.ids[mask]
    if len(available) <= rows or ctx.scores is None:
        return available
    scores = ctx.scores[mask]
    best = np.argpartition(-scores, rows // 2 - 1)[: rows // 2]
    rest = np.setdiff1d(np.arange(len(available)), best, assume_unique=True)
    sample = np.random.default_rng(len(ctx.ids)).choice(rest, rows - len(best), replace=False)
    return np.sort(available[np.concatenate([best, sample])])


def background_sample(ctx: RankContext, n: int = MAX_BACKGROUND) -> np.ndarray:
    """Up to ``n`` unlabeled ids, fixed by the context's ids (not its seed, so a page's queue is stable)."""
    unlabeled = ctx.ids[~np.isin(ctx.ids, np.concatenate([ctx.positive_ids, ctx.negative_ids]))]
    if len(unlabeled) <= n:
        return unlabeled
    return np.sort(np.random.default_rng(len(ctx.ids)).choice(unlabeled, n, replace=False))


class _FeatureRanker(Strategy):
    """A ranker over the pretrained features; falls back to ``fallback`` when it cannot run."""

    def __init__(self, dedup_threshold: float | None = None):
        super().__init__(dedup_threshold)

    def can_run(self, ctx: RankContext) -> bool:
        return ctx.features is not None and len(ctx.positive_ids) > 0

    def scores(self, ctx: RankContext, ids: np.ndarray) -> np.ndarray:
        """Higher first, one per id of ``ids``."""
        raise NotImplementedError

    def prepare(self, ctx: RankContext) -> None:
        """Fit whatever :meth:`scores` needs (once per :meth:`rank`)."""

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        if not self.can_run(ctx):
            from .rank import NearestToPositives

            return NearestToPositives().rank(ctx, limit)
        self.prepare(ctx)
        available = scan_pool(ctx)
        keys = np.concatenate([self.scores(ctx, chunk) for chunk in chunked(available)] or [np.zeros(0, np.float32)])
        return _top(available, keys, limit)


class ProbeRanker(_FeatureRanker):
    """Logistic regression on pretrained features: positives vs. negatives and background.

    ``space="pooled"``: the trunk's pooled features (style and content); ``"semantic"``: the
    square-root ImageNet probabilities (:func:`hellinger`), which a drawn and a photographed
    bird share more than their pooled features."""

    label = "few-shot probe"

    def __init__(self, space: str = "pooled", dedup_threshold: float | None = None):
        super().__init__(dedup_threshold)
        if space not in ("pooled", "semantic"):
            raise ValueError(f"unknown probe space {space!r}: pooled or semantic")
        self.space = space
        if space == "semantic":
            self.label = "few-shot probe on ImageNet classes"

    def _x(self, ctx: RankContext, ids: np.ndarray) -> np.ndarray:
        return ctx.features.read("pooled", ids) if self.space == "pooled" else hellinger(ctx.features.read("logits", ids))

    def prepare(self, ctx: RankContext) -> None:
        background = background_sample(ctx)
        negatives = np.union1d(ctx.negative_ids, background)
        ids = np.concatenate([ctx.positive_ids, negatives])
        y = np.r_[np.ones(len(ctx.positive_ids), bool), np.zeros(len(negatives), bool)]
        # the sample stands in for the whole unlabeled corpus
        unlabeled = len(ctx.ids) - len(np.union1d(ctx.positive_ids, ctx.negative_ids))
        weight = np.where(np.isin(ids, background), max(1.0, unlabeled / max(len(background), 1)), 1.0)
        self.probe = fit_logistic(self._x(ctx, ids), y, c=PROBE_C, weight=weight, max_iter=PROBE_ITERATIONS, dtype=np.float32)

    def scores(self, ctx: RankContext, ids: np.ndarray) -> np.ndarray:
        return self.probe(self._x(ctx, ids))


class ClassLift(_FeatureRanker):
    """Mass on the ImageNet classes most lifted among the positives relative to the corpus,
    each weighted by its log-lift."""

    label = "ImageNet classes of the positives"

    def prepare(self, ctx: RankContext) -> None:
        positive = softmax(ctx.features.read("logits", ctx.positive_ids))
        corpus = np.zeros(positive.shape[1], np.float64)
        background = background_sample(ctx)
        for chunk in chunked(background):
            corpus += softmax(ctx.features.read("logits", chunk)).sum(axis=0)
        corpus /= max(len(background), 1)
        p = positive.mean(axis=0)
        lift = np.log((p + 1e-4) / (corpus + 1e-4))
        classes = np.argsort(-(p * np.maximum(lift, 0)))[:LIFT_CLASSES]
        classes = classes[(lift[classes] > 0) & (p[classes] >= MIN_CLASS_MASS)]
        self.classes, self.weights = classes, lift[classes].astype(np.float32)

    def scores(self, ctx: RankContext, ids: np.ndarray) -> np.ndarray:
        probs = softmax(ctx.features.read("logits", ids))
        return probs[:, self.classes] @ self.weights if len(self.classes) else np.zeros(len(ids), np.float32)


class NamePrior(_FeatureRanker):
    """The pretrained model's mass on the ImageNet classes the category's name denotes
    (:func:`bgminer.textsearch.name_classes`): semantic in every style, and known before any
    example of a second style is found.

    Used only while the labels agree with the name (:meth:`can_run`):

    - the positives score above the images rejected so far (AUC >= 0.5, once there are
      ``NAME_PRIOR_MIN_REJECTED``): a name that means something else ("fruit" for birds) fills the
      first page with its own meaning, which the person rejects, and is dropped after one round;
    - from ``NAME_PRIOR_TRUSTED_BELOW`` positives on, they also outrank a sample of the corpus on it
      (AUC >= ``NAME_PRIOR_MIN_AUC``). Fewer positives cannot tell: five seeds of one style may
      score low on the name (emoji birds do) while it still finds the drawn and photographed ones.
    """

    label = "what the category's name means"

    def classes(self, ctx: RankContext) -> tuple[ClassMatch, ...]:
        return name_classes(ctx.category) if ctx.category else ()

    def _mass(self, ctx: RankContext, ids: np.ndarray) -> np.ndarray:
        """The name's mass per id, computed once per image and name for the life of ``ctx.features``
        (a reviewer's next page reads it from memory, not from every scanned row's logits again)."""
        ids = np.asarray(ids, dtype=np.int64)
        memo = name_mass_memo(ctx.features, ctx.category)
        if len(ids) and ids.max() >= len(memo.mass):
            grown = np.full(max(int(ids.max()) + 1, 2 * len(memo.mass)), np.nan, np.float32)
            grown[: len(memo.mass)] = memo.mass
            memo.mass = grown
        mass = memo.mass
        missing = ids[np.isnan(mass[ids])]
        if len(missing):
            mass[missing] = class_probability(ctx.features.read("logits", missing), list(self.classes(ctx)))
        return mass[ids]

    def agreement(self, ctx: RankContext, against: str = "corpus") -> float | None:
        """AUC of the name's class mass: the labeled positives against a sample of the corpus
        (``against="corpus"``) or against the labeled negatives ("rejected"); None: cannot tell."""
        if ctx.features is None or not self.classes(ctx) or len(ctx.positive_ids) == 0:
            return None
        others = background_sample(ctx, 2_000) if against == "corpus" else ctx.negative_ids
        if len(others) == 0:
            return None
        pos, other = self._mass(ctx, ctx.positive_ids), np.sort(self._mass(ctx, others))
        below = np.searchsorted(other, pos, side="left") + np.searchsorted(other, pos, side="right")
        return float(below.mean() / (2 * len(other)))

    def can_run(self, ctx: RankContext) -> bool:
        """Whether the labels agree with the name; decided once per context (``Auto`` asks before
        fusing this ranker, and :meth:`rank` asks again on the same context)."""
        checked = getattr(self, "_checked", None)
        if checked is not None and checked[0] is ctx:
            return checked[1]
        self._checked = (ctx, self._agrees(ctx))
        return self._checked[1]

    def _agrees(self, ctx: RankContext) -> bool:
        corpus = self.agreement(ctx)
        if corpus is None:
            return False
        if len(ctx.negative_ids) >= NAME_PRIOR_MIN_REJECTED and self.agreement(ctx, "rejected") < 0.5:
            return False
        return len(ctx.positive_ids) < NAME_PRIOR_TRUSTED_BELOW or corpus >= NAME_PRIOR_MIN_AUC

    def scores(self, ctx: RankContext, ids: np.ndarray) -> np.ndarray:
        return self._mass(ctx, ids)


class _NameMass:
    """One name's mass per image id (NaN: not computed yet), tied to one feature source."""

    def __init__(self, features: object):
        self.features = weakref.ref(features)
        self.mass = np.zeros(0, np.float32)


_NAME_MEMOS: dict[tuple[int, str], _NameMass] = {}
NAME_MEMOS_KEPT = 8  # (feature source, name) pairs remembered per process: 4 bytes per image id each


def name_mass_memo(features: object, name: str) -> _NameMass:
    """The memo of ``name``'s mass over ``features`` (a project's feature cache lives as long as its
    project; image ids are never reused, and an image's logits never change)."""
    key = (id(features), name)
    memo = _NAME_MEMOS.get(key)
    if memo is None or memo.features() is not features:
        memo = _NAME_MEMOS[key] = _NameMass(features)
        while len(_NAME_MEMOS) > NAME_MEMOS_KEPT:
            _NAME_MEMOS.pop(next(iter(_NAME_MEMOS)))
    return memo


class SemanticNeighbours(_FeatureRanker):
    """Each positive's nearest available images in ImageNet-probability space, taken round-robin
    over the positives (the latest found first), so every mode found so far is explored."""

    label = "like a found positive, any style"

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        if not self.can_run(ctx):
            return super().rank(ctx, limit)
        positives = ctx.positive_ids[::-1][:MAX_POSITIVES_EXPLORED]
        queries = hellinger(ctx.features.read("logits", positives))
        per = min(limit, len(ctx.ids))  # positives may share neighbours: each brings up to ``limit``
        available = scan_pool(ctx)
        best_sim = np.full((len(positives), per), -np.inf, np.float32)
        best_ids = np.full((len(positives), per), -1, np.int64)
        for chunk in chunked(available):
            sims = queries @ hellinger(ctx.features.read("logits", chunk)).T  # [P, chunk]
            merged_sim = np.concatenate([best_sim, sims], axis=1)
            merged_ids = np.concatenate([best_ids, np.broadcast_to(chunk, sims.shape)], axis=1)
            keep = np.argpartition(-merged_sim, per - 1, axis=1)[:, :per] if merged_sim.shape[1] > per else None
            if keep is not None:
                merged_sim = np.take_along_axis(merged_sim, keep, axis=1)
                merged_ids = np.take_along_axis(merged_ids, keep, axis=1)
            keep = np.lexsort((merged_ids, -merged_sim), axis=1)[:, :per]
            best_sim = np.take_along_axis(merged_sim, keep, axis=1)
            best_ids = np.take_along_axis(merged_ids, keep, axis=1)
        order = best_ids.T.ravel()  # round-robin: every positive's best, then every positive's second, ...
        order = order[order >= 0]
        _, first = np.unique(order, return_index=True)
        return order[np.sort(first)][:limit]


MAX_POSITIVES_EXPLORED = 256  # the newest positives whose neighbourhoods one query visits


class RankFusion(Strategy):
    """Reciprocal-rank fusion: each id scores ``sum_i w_i / (FUSION_K + rank_i)`` over the parts' orders
    (``weights``: one per part, 1 each by default)."""

    def __init__(
        self, parts: Sequence[Strategy], depth: int = 2_000, dedup_threshold: float | None = None,
        weights: Sequence[float] | None = None,
    ):
        super().__init__(dedup_threshold)
        self.parts, self.depth = list(parts), depth
        self.weights = [1.0] * len(self.parts) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.parts):
            raise ValueError(f"{len(self.weights)} weights for {len(self.parts)} parts")
        self.label = " + ".join(p.label for p in self.parts)

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        depth = max(self.depth, limit)
        fused: dict[int, float] = {}
        lead: dict[int, tuple[float, str]] = {}  # the part that gave each id its largest share
        for part, weight in zip(self.parts, self.weights, strict=True):
            for r, i in enumerate(part.rank(ctx, depth).tolist()):
                share = weight / (FUSION_K + r + 1)
                fused[i] = fused.get(i, 0.0) + share
                if share > lead.get(i, (0.0, ""))[0]:
                    lead[i] = (share, part.label)
        self.lead = {i: label for i, (_, label) in lead.items()}
        if not fused:
            return _id_array()
        ids = np.fromiter(fused, np.int64, len(fused))
        return _top(ids, np.fromiter(fused.values(), np.float64, len(fused)), limit)

    def reasons(self, ids: Sequence[int]) -> list[str]:
        """The part that ranked each id highest (every part's vote counts; this one counted most)."""
        lead = getattr(self, "lead", {})
        return [lead.get(int(i), self.label) for i in ids]


CLUSTERS = 64
CLUSTER_SAMPLE = 20_000


class UnexploredClusters(_FeatureRanker):
    """The most central images of the corpus's k-means clusters (pretrained pooled features) that
    hold no labeled positive yet, largest cluster first, one per cluster per turn: a look at
    the parts of the corpus no positive has led to."""

    label = "a cluster with no positive yet"

    def __init__(self, clusters: int = CLUSTERS, dedup_threshold: float | None = None):
        super().__init__(dedup_threshold)
        self.clusters = clusters

    def can_run(self, ctx: RankContext) -> bool:
        return ctx.features is not None and len(ctx.ids) > self.clusters

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        if not self.can_run(ctx):
            return super().rank(ctx, limit)
        import faiss

        from .index import normalize

        rng = np.random.default_rng(len(ctx.ids))
        sample = np.sort(rng.choice(ctx.ids, min(CLUSTER_SAMPLE, len(ctx.ids)), replace=False))
        kmeans = faiss.Kmeans(ctx.features.read("pooled", sample[:1]).shape[1], self.clusters, niter=10, seed=1)
        kmeans.train(normalize(ctx.features.read("pooled", sample)))
        available = ctx.ids[ctx.available()]
        cluster_of, distance = {}, {}
        for chunk in chunked(np.union1d(available, ctx.positive_ids)):
            d, c = kmeans.index.search(normalize(ctx.features.read("pooled", chunk)), 1)
            cluster_of.update(zip(chunk.tolist(), c[:, 0].tolist(), strict=True))
            distance.update(zip(chunk.tolist(), d[:, 0].tolist(), strict=True))
        explored = {cluster_of[int(i)] for i in ctx.positive_ids if int(i) in cluster_of}
        members: dict[int, list[int]] = {}
        for i in available.tolist():
            if cluster_of[i] not in explored:
                members.setdefault(cluster_of[i], []).append(i)
        queues = [sorted(m, key=lambda i: (distance[i], i)) for m in sorted(members.values(), key=len, reverse=True)]
        order = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)]
        return _id_array(order[:limit])
