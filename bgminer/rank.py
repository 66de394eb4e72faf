"""Review strategies: which unreviewed images to show next for one category.

Each strategy is a small object with one method, ``query(ctx, n) -> ids`` (small-text style);
``CandidatePool`` wraps any of them to restrict it to the positives' neighbourhoods (SEALS,
Coleman et al., AAAI 2022; ``Miner(pool_neighbors=)``, ``bgminer rank --pool-neighbors``).
Strategies never return an id that is labeled or reviewed, and by default drop near-duplicates
so one page is not many copies of one picture. :class:`bgminer.loop.Miner` builds the context.

When a strategy's input is missing it falls back to the next one that can run: a score-based
strategy before the first model -> ``NearestToPositives`` -> ``RandomStrategy`` (no positives or
no embeddings yet). The registry of named strategies, and the default one, are in
:mod:`bgminer.strategies`; rankers over the pretrained features are in :mod:`bgminer.explore`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .index import VectorIndex, exact_knn, normalize

DEDUP_THRESHOLD = 0.97
SEARCH_CHUNK_ROWS = 65_536


def _id_array(values: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    return np.asarray(values if values is not None else [], dtype=np.int64).reshape(-1)


@dataclass
class RankContext:
    """What a strategy may look at. Row i of ``scores`` and of an ``embeddings`` array belongs to ``ids[i]``."""

    ids: np.ndarray  # int64 [N]: the images that may be shown (and the labeled ones, whose scores Uncertain uses)
    scores: np.ndarray | None = None  # float32 [N]: the active model's probability for the category; None before training
    embeddings: np.ndarray | VectorIndex | None = None  # [N, D] aligned with ids, or an index keyed by id
    positive_ids: np.ndarray = field(default_factory=_id_array)
    negative_ids: np.ndarray = field(default_factory=_id_array)
    reviewed_ids: np.ndarray = field(default_factory=_id_array)  # seen, skipped or rejected: never shown again
    validation_ids: np.ndarray = field(default_factory=_id_array)  # the estimator's importance sample, in draw order
    seed: int = 0
    features: Any = None  # pretrained feature rows by image id: ``read("pooled" | "logits", ids)`` (bgminer.explore)
    category: str = ""  # the category's name (bgminer.explore.NamePrior reads what it means)

    def __post_init__(self) -> None:
        self.ids = _id_array(self.ids)
        self.positive_ids = _id_array(self.positive_ids)
        self.negative_ids = _id_array(self.negative_ids)
        self.reviewed_ids = _id_array(self.reviewed_ids)
        self.validation_ids = _id_array(self.validation_ids)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if self.scores.shape != self.ids.shape:
                raise ValueError(f"{self.scores.size} scores for {self.ids.size} ids")
        if isinstance(self.embeddings, np.ndarray) and len(self.embeddings) != len(self.ids):
            raise ValueError(f"{len(self.embeddings)} embedding rows for {self.ids.size} ids")

    @property
    def excluded_ids(self) -> np.ndarray:
        """Labeled (either way) or reviewed ids, sorted."""
        return np.unique(np.concatenate([self.positive_ids, self.negative_ids, self.reviewed_ids]))

    def available(self) -> np.ndarray:
        """Boolean mask over ``ids``: rows a strategy may return."""
        return ~np.isin(self.ids, self.excluded_ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of ``ids`` in ``self.ids``; -1 where absent."""
        ids = _id_array(ids)
        if len(self.ids) == 0:
            return np.full(len(ids), -1, np.int64)
        order = np.argsort(self.ids, kind="stable")
        found = order[np.searchsorted(self.ids, ids, sorter=order).clip(max=len(order) - 1)]
        return np.where(self.ids[found] == ids, found, -1)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings of ``ids`` (which must have one)."""
        if isinstance(self.embeddings, VectorIndex):
            return self.embeddings.vectors(ids)
        rows = self.rows(ids)
        if (rows < 0).any():
            raise KeyError(f"ids without embeddings: {ids[rows < 0][:5].tolist()}")
        return normalize(self.embeddings[rows])

    def embedded(self, ids: np.ndarray) -> np.ndarray:
        """The subset of ``ids`` that has an embedding."""
        known = self.embeddings.ids() if isinstance(self.embeddings, VectorIndex) else self.ids
        return ids[np.isin(ids, known)]

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact or indexed cosine top-k among available ids: (similarities [Q, k], ids [Q, k], -1 padded)."""
        if isinstance(self.embeddings, VectorIndex):
            outside = np.setdiff1d(self.embeddings.ids(), self.ids, assume_unique=True)
            return self.embeddings.search(queries, k, exclude_ids=np.concatenate([self.excluded_ids, outside]))
        chunks = (
            (self.embeddings[start : start + SEARCH_CHUNK_ROWS], self.ids[start : start + SEARCH_CHUNK_ROWS])
            for start in range(0, len(self.ids), SEARCH_CHUNK_ROWS)
        )
        return exact_knn(queries, chunks, k, exclude_ids=self.excluded_ids)

    def restricted(self, ids: np.ndarray) -> RankContext:
        """The same context over a subset of ``ids`` (labels and seed unchanged)."""
        rows = self.rows(ids)
        rows = np.sort(rows[rows >= 0])
        embeddings = self.embeddings if not isinstance(self.embeddings, np.ndarray) else self.embeddings[rows]
        scores = self.scores[rows] if self.scores is not None else None
        return replace(self, ids=self.ids[rows], scores=scores, embeddings=embeddings)


def suppress_near_duplicates(
    ids: np.ndarray,
    vectors: np.ndarray | VectorIndex,
    threshold: float = DEDUP_THRESHOLD,
    n: int | None = None,
) -> np.ndarray:
    """Greedy, in order: keep an id unless its cosine to an already kept one exceeds ``threshold``.

    ``vectors`` is an index keyed by id or an array aligned with ``ids``. Stops after ``n`` kept.
    """
    ids = _id_array(ids)
    n = len(ids) if n is None else n
    if len(ids) == 0 or n <= 0:
        return ids[:0]
    x = vectors.vectors(ids) if isinstance(vectors, VectorIndex) else normalize(vectors)
    blocked = np.zeros(len(ids), bool)
    kept: list[int] = []
    for i in range(len(ids)):
        if blocked[i]:
            continue
        kept.append(i)
        if len(kept) == n:
            break
        blocked[i + 1 :] |= x[i + 1 :] @ x[i] > threshold
    return ids[kept]


def _top(ids: np.ndarray, keys: np.ndarray, limit: int) -> np.ndarray:
    """``ids`` with the ``limit`` largest ``keys``, best first; ties broken by smaller id."""
    if limit < len(ids):
        part = np.argpartition(-keys, limit - 1)[:limit]
        # argpartition breaks ties arbitrarily: also keep every id tied with the cut-off key
        cut = keys[part].min()
        part = np.nonzero(keys >= cut)[0]
        ids, keys = ids[part], keys[part]
    return ids[np.lexsort((ids, -keys))][:limit]


class Strategy(ABC):
    """Ranks available ids for review. Subclasses implement :meth:`rank`; :meth:`query` adds de-duplication."""

    uses_validation_sample = False  # True: the caller fills ``RankContext.validation_ids``
    label = "ranked"  # why an image is shown, in a few words (the Review page's "why this image")

    def __init__(self, dedup_threshold: float | None = DEDUP_THRESHOLD):
        self.dedup_threshold = dedup_threshold

    def reasons(self, ids: Sequence[int]) -> list[str]:
        """Why each of ``ids`` (from the latest :meth:`query`) was picked."""
        return [self.label] * len(ids)

    def shares(self) -> dict[str, float]:
        """Each part's share of the queue (one part: everything)."""
        return {self.label: 1.0}

    @abstractmethod
    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        """Up to ``limit`` available ids, best first (no de-duplication)."""

    def query(self, ctx: RankContext, n: int) -> np.ndarray:
        """The next ``n`` ids to review (fewer when the corpus runs out), int64."""
        if n <= 0:
            return _id_array()
        if self.dedup_threshold is None or ctx.embeddings is None:
            return self.rank(ctx, n)
        limit = 2 * n
        while True:
            ranked = self.rank(ctx, limit)
            kept = suppress_near_duplicates(ranked, ctx.vectors(ranked), self.dedup_threshold, n)
            if len(kept) == n or len(ranked) < limit:
                return kept
            limit *= 4


class RandomStrategy(Strategy):
    """A uniform random order of the available ids (fixed by ``ctx.seed``)."""

    label = "random pick"

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        available = ctx.ids[ctx.available()]
        order = np.random.default_rng(ctx.seed).permutation(len(available))
        return available[order[:limit]]


class NearestToPositives(Strategy):
    """Nearest neighbours of the labeled positives, merged by each id's best cosine to any positive."""

    label = "near a positive"

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        positives = ctx.embedded(ctx.positive_ids) if ctx.embeddings is not None else ctx.positive_ids[:0]
        if len(positives) == 0:
            return RandomStrategy().rank(ctx, limit)
        similarities, ids = ctx.neighbours(ctx.vectors(positives), limit)
        similarities, ids = similarities.ravel(), ids.ravel()
        valid = ids >= 0
        similarities, ids = similarities[valid], ids[valid]
        best_first = np.lexsort((ids, -similarities))
        unique_ids, first = np.unique(ids[best_first], return_index=True)  # first occurrence = best similarity
        return _top(unique_ids, similarities[best_first][first], limit)


class _Scored(Strategy):
    """A strategy that orders available ids by a key computed from the model's scores."""

    @abstractmethod
    def key(self, ctx: RankContext) -> np.ndarray:
        """Higher is shown first; one value per row of ``ctx``."""

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        if ctx.scores is None:
            return NearestToPositives().rank(ctx, limit)
        mask = ctx.available()
        return _top(ctx.ids[mask], self.key(ctx)[mask], limit)


class MostLikely(_Scored):
    """Highest score first: the default way to find positives."""

    label = "model score"

    def key(self, ctx: RankContext) -> np.ndarray:
        return ctx.scores


class Uncertain(_Scored):
    """Scores nearest the decision boundary first: the labels that teach the model most.

    The boundary is ``boundary`` if given, else midway between the median scores of the labeled
    positives and negatives when both exist, else 0.5.
    """

    label = "uncertain"

    def __init__(self, boundary: float | None = None, dedup_threshold: float | None = DEDUP_THRESHOLD):
        super().__init__(dedup_threshold)
        self.boundary = boundary

    def decision_boundary(self, ctx: RankContext) -> float:
        if self.boundary is not None:
            return self.boundary
        medians = []
        for labeled in (ctx.positive_ids, ctx.negative_ids):
            rows = ctx.rows(labeled)
            rows = rows[rows >= 0]
            if len(rows) == 0:
                return 0.5
            medians.append(float(np.median(ctx.scores[rows])))
        return float(np.mean(medians))

    def key(self, ctx: RankContext) -> np.ndarray:
        return -np.abs(ctx.scores - self.decision_boundary(ctx))


class ValidationSample(Strategy):
    """The unlabeled images of the validation sample, in draw order: labeling them all lets
    :meth:`bgminer.project.Project.status` estimate the positives left to find."""

    uses_validation_sample = True
    label = "validation sample"

    def __init__(self, dedup_threshold: float | None = None):
        super().__init__(dedup_threshold)  # the sample is what it is: near-duplicates included

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        ids = ctx.validation_ids[~np.isin(ctx.validation_ids, ctx.excluded_ids)]
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)][:limit]


class Mixture(Strategy):
    """Interleaves strategies in proportion to their weights (smooth weighted round-robin), without duplicates."""

    label = "mixed"

    def __init__(self, parts: Sequence[tuple[Strategy, float]], dedup_threshold: float | None = DEDUP_THRESHOLD):
        super().__init__(dedup_threshold)
        if not parts or any(w <= 0 for _, w in parts):
            raise ValueError("a mixture needs at least one strategy, each with a positive weight")
        self.parts = list(parts)
        self.picked_by: dict[int, int] = {}  # id -> index of the part that chose it, in the latest rank

    def reasons(self, ids: Sequence[int]) -> list[str]:
        return [self.parts[self.picked_by[i]][0].reasons([i])[0] if i in self.picked_by else self.label for i in map(int, ids)]

    def shares(self) -> dict[str, float]:
        total = sum(w for _, w in self.parts)
        out: dict[str, float] = {}
        for strategy, w in self.parts:
            out[strategy.label] = out.get(strategy.label, 0.0) + w / total
        return out

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        queues = [list(strategy.rank(ctx, limit)) for strategy, _ in self.parts]
        self.picked_by = {}
        weights = np.array([w for _, w in self.parts], float)
        weights /= weights.sum()
        heads = [0] * len(queues)
        credit = np.zeros(len(queues))
        chosen: list[int] = []
        seen: set[int] = set()
        live = np.array([len(q) > 0 for q in queues])
        while len(chosen) < limit and live.any():
            credit += np.where(live, weights, 0.0)
            turn = int(np.argmax(np.where(live, credit, -np.inf)))
            queue = queues[turn]
            while heads[turn] < len(queue) and queue[heads[turn]] in seen:
                heads[turn] += 1
            if heads[turn] == len(queue):
                live[turn] = False
                continue
            credit[turn] -= 1.0
            chosen.append(queue[heads[turn]])
            seen.add(queue[heads[turn]])
            self.picked_by[int(queue[heads[turn]])] = turn
            heads[turn] += 1
        return _id_array(chosen)


class CandidatePool(Strategy):
    """SEALS: run ``base`` only over the union of the labeled positives' ``k_neighbors`` nearest neighbours.

    Keeps each round's cost proportional to the pool, not the corpus. Without positives or
    embeddings the pool would be empty, so ``base`` runs over everything.
    """

    def __init__(self, base: Strategy, k_neighbors: int = 100, dedup_threshold: float | None = DEDUP_THRESHOLD):
        super().__init__(dedup_threshold)
        self.base = base
        self.k_neighbors = k_neighbors
        self.uses_validation_sample = base.uses_validation_sample
        self.label = base.label

    def reasons(self, ids: Sequence[int]) -> list[str]:
        return self.base.reasons(ids)

    def shares(self) -> dict[str, float]:
        return self.base.shares()

    def pool(self, ctx: RankContext) -> np.ndarray | None:
        """The candidate ids, or None when there is no pool to build."""
        if ctx.embeddings is None:
            return None
        positives = ctx.embedded(ctx.positive_ids)
        if len(positives) == 0:
            return None
        _, ids = ctx.neighbours(ctx.vectors(positives), self.k_neighbors)
        return np.unique(ids[ids >= 0])

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        pool = self.pool(ctx)
        return self.base.rank(ctx if pool is None else ctx.restricted(pool), limit)
