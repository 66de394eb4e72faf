"""The named review strategies, and the default one.

``auto`` (the default of the Review page, the CLI and :class:`bgminer.loop.Miner`) is chosen
by the multi-style benchmark (``bench/multimode.py``, protocol C; ``docs/quality.md``). Its main
order is a reciprocal-rank fusion of rankers over the pretrained features, joined by the
trained model once a category has ``COLD_START_POSITIVES`` positives and a model:

- the few-shot probe on the pooled features (what the positives look like);
- what the category's *name* means in WordNet, while the labels agree with it
  (:class:`bgminer.explore.NamePrior`: "bird" finds drawn, photographed and emoji birds);
- from ``SEMANTIC_PROBE_FROM`` positives on, the probe on the ImageNet probabilities, which a
  drawn and a photographed bird share (fewer positives overfit it: it lost at 0.1%).

While a category has fewer than ``EXPLORE_BELOW`` positives, a share of every page
(``EXPLORE_SHARE``) explores the ImageNet-probability neighbourhoods of every positive found so
far, so a second style, once one member is found, is followed up at once; from then on the
semantic probe, fitted on every style found, does that job inside the main order. The other
shares (clusters no positive has reached, classes lifted among the positives, the model's
boundary) gained nothing on the benchmark and stay at 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .explore import ClassLift, NamePrior, ProbeRanker, RankFusion, SemanticNeighbours, UnexploredClusters
from .rank import (
    CandidatePool,
    Mixture,
    MostLikely,
    NearestToPositives,
    RandomStrategy,
    RankContext,
    Strategy,
    Uncertain,
    ValidationSample,
)

COLD_START_POSITIVES = 20  # below this, the pretrained-feature rankers alone (5 and 40 did no better: docs/quality.md)
EXPLORE_SHARE = 0.1  # of each queue: neighbourhoods of every found positive, any style (0 lost at 0.1%: docs/quality.md)
EXPLORE_BELOW: int | None = 10  # the explore share applies below this many positives (None: always; docs/quality.md)
UNEXPLORED_SHARE = 0.0  # of each queue: central images of clusters that hold no positive
CLASS_LIFT_SHARE = 0.0  # of each queue: mass on the ImageNet classes lifted among the positives (0.1 lost 2 points, C)
UNCERTAIN_SHARE = 0.0  # of each queue, once a model exists: scores nearest the boundary
WARM_MAIN = "fusion"  # with a model and enough positives: "fusion" (model + probe) or "model"
SEMANTIC_PROBE_FROM: int | None = 10  # from this many positives, also fuse a probe on the ImageNet probabilities (None: never)
NAME_PRIOR = 1.0  # weight of the category name's ImageNet classes in the main order's fusion (0: ignore names)


class Auto(Strategy):
    """The default: a mixture chosen per query by what the benchmark showed wins at this count."""

    label = "auto"

    def __init__(self, dedup_threshold: float | None = None):
        super().__init__(dedup_threshold)
        self.current: Strategy = Mixture([(ProbeRanker(), 1.0)])

    def choose(self, ctx: RankContext) -> Strategy:
        positives = len(ctx.positive_ids)
        warm = ctx.scores is not None and positives >= COLD_START_POSITIVES
        rankers: list[Strategy] = [ProbeRanker()]
        if warm:
            rankers = [MostLikely(None), ProbeRanker()] if WARM_MAIN == "fusion" else [MostLikely(None)]
        if SEMANTIC_PROBE_FROM is not None and positives >= SEMANTIC_PROBE_FROM:
            rankers.append(ProbeRanker("semantic"))
        weights = [1.0] * len(rankers)
        prior = NamePrior()
        if NAME_PRIOR > 0 and prior.can_run(ctx):
            rankers.append(prior)
            weights.append(NAME_PRIOR)
        main = RankFusion(rankers, weights=weights) if len(rankers) > 1 else rankers[0]
        explore = EXPLORE_SHARE if EXPLORE_BELOW is None or positives < EXPLORE_BELOW else 0.0
        shares = [
            (SemanticNeighbours(), explore),
            (UnexploredClusters(), UNEXPLORED_SHARE),
            (ClassLift(), CLASS_LIFT_SHARE),
        ]
        if ctx.scores is not None:
            shares.append((Uncertain(None), UNCERTAIN_SHARE))
        parts = [(main, 1.0 - sum(w for _, w in shares))] + [(s, w) for s, w in shares if w > 0]
        return Mixture(parts, dedup_threshold=None)

    def rank(self, ctx: RankContext, limit: int) -> np.ndarray:
        self.current = self.choose(ctx)
        return self.current.rank(ctx, limit)

    def reasons(self, ids) -> list[str]:
        return self.current.reasons(ids)

    def shares(self) -> dict[str, float]:
        return self.current.shares()


def _mixed() -> Strategy:
    return Mixture([(MostLikely(), 0.5), (NearestToPositives(), 0.2), (Uncertain(), 0.2), (RandomStrategy(), 0.1)])


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "auto": Auto,
    "most-likely": MostLikely,
    "uncertain": Uncertain,
    "near-positives": NearestToPositives,
    "probe": ProbeRanker,
    "new-modes": SemanticNeighbours,
    "class-lift": ClassLift,
    "name": NamePrior,
    "unexplored": UnexploredClusters,
    "random": RandomStrategy,
    "mixed": _mixed,
    "validate": ValidationSample,
}
DEFAULT_STRATEGY = "auto"
NEEDS_MODEL = frozenset({"most-likely", "uncertain", "mixed", "validate"})  # fall back (or fail) before the first model


def make_strategy(name: str | Strategy, pool_neighbors: int | None = None) -> Strategy:
    """A registered strategy by name (or a Strategy as is), wrapped in a SEALS :class:`CandidatePool`
    when ``pool_neighbors`` is set."""
    if isinstance(name, Strategy):
        strategy = name
    elif name in STRATEGIES:
        strategy = STRATEGIES[name]()
    else:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
    return CandidatePool(strategy, pool_neighbors) if pool_neighbors else strategy
