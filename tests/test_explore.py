"""The rankers over pretrained features (bgminer.explore) and the default strategy (bgminer.strategies).

The synthetic corpus has 8 clusters of pooled features; the rare class is cluster 0 plus cluster 5,
a second "style" whose pooled features look nothing like cluster 0's but whose ImageNet logits put
mass on the same classes, as a drawn bird and a photographed bird do.
"""

from __future__ import annotations

import numpy as np
import pytest

from bgminer import explore, strategies
from bgminer.explore import (
    ClassLift,
    NamePrior,
    ProbeRanker,
    RankFusion,
    SemanticNeighbours,
    UnexploredClusters,
    hellinger,
    scan_pool,
)
from bgminer.probe import fit_logistic
from bgminer.rank import MostLikely, RankContext
from bgminer.textsearch import name_classes

N, DIM = 480, 16


class Features:
    def __init__(self, ids: np.ndarray, pooled: np.ndarray, logits: np.ndarray):
        self.row = {int(i): r for r, i in enumerate(ids)}
        self.arrays = {"pooled": pooled, "logits": logits}

    def read(self, name: str, ids) -> np.ndarray:
        return self.arrays[name][[self.row[int(i)] for i in ids]]


def corpus(seed: int = 0):
    rng = np.random.default_rng(seed)
    cluster = np.arange(N) % 8
    centers = rng.standard_normal((8, DIM)) * 3
    pooled = (centers[cluster] + rng.standard_normal((N, DIM))).astype(np.float32)
    logits = rng.standard_normal((N, 1000)).astype(np.float32)
    concept = np.array([0, 1, 2, 3, 4, 0, 6, 7])[cluster]  # cluster 5 shares cluster 0's classes
    for c in range(8):
        logits[concept == c, 10 * c : 10 * c + 5] += 6.0
    ids = np.arange(100, 100 + N, dtype=np.int64)
    positive = np.isin(cluster, [0, 5])
    return ids, cluster, positive, Features(ids, pooled, logits.astype(np.float16))


def ctx_for(positives, negatives=(), scores=None, seed: int = 0) -> RankContext:
    ids, _, _, features = corpus(seed)
    return RankContext(ids=ids, scores=scores, positive_ids=positives, negative_ids=negatives, features=features)


def test_logistic_probe_separates_and_refuses_one_class():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5))
    y = x[:, 0] > 0.5
    probe = fit_logistic(x, y)
    assert np.corrcoef(probe(x), x[:, 0])[0, 1] > 0.9
    with pytest.raises(ValueError, match="positive and negative"):
        fit_logistic(x, np.ones(200, bool))


def test_probe_fitted_in_float32_ranks_as_in_float64():
    """The review strategies fit in float32 for speed; the order they show must not change."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((3000, 64)), 0).astype(np.float32)
    y = np.zeros(3000, bool)
    y[:12] = True
    x[:12, :8] += 1.0
    exact = fit_logistic(x, y, max_iter=100)(x)
    fast = fit_logistic(x, y, max_iter=100, dtype=np.float32)(x)
    top = 100
    assert len(np.intersect1d(np.argsort(-exact)[:top], np.argsort(-fast)[:top])) >= 0.97 * top
    assert np.corrcoef(exact, fast)[0, 1] > 0.999


def test_probe_ranks_the_seed_cluster_first():
    ids, cluster, _, _ = corpus()
    got = ProbeRanker().rank(ctx_for(ids[cluster == 0][:3]), 30)
    assert (cluster[np.searchsorted(ids, got)] == 0).mean() > 0.9


def test_semantic_neighbours_cross_styles_and_visit_every_positive():
    ids, cluster, _, _ = corpus()
    seeds = ids[cluster == 0][:3]
    got = SemanticNeighbours().rank(ctx_for(seeds), 40)
    # the other style (cluster 5) shares the ImageNet classes: it is reached with no example of it
    assert np.isin(cluster[np.searchsorted(ids, got)], [0, 5]).all()
    assert (cluster[np.searchsorted(ids, got)] == 5).any()
    # round-robin: with one positive of cluster 3 found, its neighbours come up in the first turn
    found = np.r_[seeds, ids[cluster == 3][:1]]
    first = SemanticNeighbours().rank(ctx_for(found), len(found))
    assert (cluster[np.searchsorted(ids, first)] == 3).any()


def test_hellinger_rows_are_unit_and_class_lift_finds_the_concepts_classes():
    ids, cluster, _, features = corpus()
    rows = hellinger(features.read("logits", ids[:10]))
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-4)
    ranker = ClassLift()
    got = ranker.rank(ctx_for(ids[cluster == 0][:3]), 60)
    assert set(ranker.classes.tolist()) <= set(range(5))
    assert np.isin(cluster[np.searchsorted(ids, got)], [0, 5]).all()


def named_corpus():
    """:func:`corpus` whose rare clusters (0 and the other style, 5) put their mass on real bird classes
    and every other cluster on fish and on classes of its own that are no birds."""
    ids, cluster, positive, features = corpus()
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((N, 1000)).astype(np.float32)
    birds = [m.index for m in name_classes("bird")]
    fish = [m.index for m in name_classes("fish")]
    others = [i for i in range(400, 1000) if i not in birds and i not in fish]
    logits[np.ix_(positive, birds[:5])] += 6.0
    logits[np.ix_(~positive, fish)] += 2.0
    for c in (1, 2, 3, 4, 6, 7):
        logits[np.ix_(cluster == c, others[5 * c : 5 * c + 5])] += 6.0
    return ids, cluster, Features(ids, features.arrays["pooled"], logits.astype(np.float16))


def test_name_prior_reaches_the_other_style_and_stops_where_the_positives_contradict_the_name():
    ids, cluster, features = named_corpus()
    seeds = ids[cluster == 0][:3]
    ctx = RankContext(ids=ids, positive_ids=seeds, features=features, category="rare_bird")
    ranker = NamePrior()
    assert ranker.agreement(ctx) > 0.85 and ranker.can_run(ctx)  # at most ~0.875: a quarter of the corpus is rare
    got = cluster[np.searchsorted(ids, ranker.rank(ctx, 100))]
    assert np.isin(got, [0, 5]).all() and (got == 5).sum() >= 40  # the style no seed shows
    # a name WordNet does not know is never used; none is confirmed before the first positive
    for name in ("positive", ""):
        assert not NamePrior().can_run(RankContext(ids=ids, positive_ids=seeds, features=features, category=name))
    assert not NamePrior().can_run(RankContext(ids=ids, features=features, category="bird"))
    # a name the positives contradict (their mass is on birds, the rest's on fish) is trusted only
    # while there are too few labels to tell: until its own picks are rejected, or from 10 positives
    many = ids[cluster == 0][: explore.NAME_PRIOR_TRUSTED_BELOW]
    assert NamePrior().can_run(RankContext(ids=ids, positive_ids=seeds, features=features, category="fish"))
    rejected = ids[cluster == 1][: explore.NAME_PRIOR_MIN_REJECTED]
    for name, used in (("fish", False), ("bird", True)):
        after_a_round = RankContext(ids=ids, positive_ids=seeds, negative_ids=rejected, features=features, category=name)
        assert NamePrior().can_run(after_a_round) is used
    fish = RankContext(ids=ids, positive_ids=many, features=features, category="fish")
    assert NamePrior().agreement(fish) < 0.2 and not NamePrior().can_run(fish)
    assert NamePrior().can_run(RankContext(ids=ids, positive_ids=many, features=features, category="bird"))


def test_the_names_mass_is_computed_once_per_image_while_its_feature_source_lives():
    ids, cluster, features = named_corpus()
    reads = []
    features.read = lambda name, rows, read=features.read: (reads.append((name, len(rows))), read(name, rows))[1]
    ctx = RankContext(ids=ids, positive_ids=ids[cluster == 0][:3], features=features, category="bird")
    first = NamePrior().rank(ctx, 50)
    scanned = sum(n for name, n in reads if name == "logits")
    reads.clear()
    assert np.array_equal(NamePrior().rank(ctx, 50), first)  # the next page: same order ...
    assert sum(n for name, n in reads if name == "logits") < scanned / 4  # ... without rescanning every row
    other = named_corpus()[2]  # another source (a new project) starts afresh, with its own values
    assert explore.name_mass_memo(other, "bird") is not explore.name_mass_memo(features, "bird")


def test_auto_fuses_the_name_into_its_main_order_only_where_it_is_confirmed(monkeypatch):
    ids, cluster, features = named_corpus()
    seeds = ids[cluster == 0][: explore.NAME_PRIOR_TRUSTED_BELOW]
    auto = strategies.make_strategy("auto")
    auto.query(RankContext(ids=ids, positive_ids=seeds, features=features, category="bird"), 20)
    assert any("what the category's name means" in part for part in auto.shares())
    auto.query(RankContext(ids=ids, positive_ids=seeds, features=features, category="fish"), 20)
    assert not any("name" in part for part in auto.shares())
    monkeypatch.setattr(strategies, "NAME_PRIOR", 0)
    auto.query(RankContext(ids=ids, positive_ids=seeds, features=features, category="bird"), 20)
    assert not any("name" in part for part in auto.shares())


def test_unexplored_clusters_stay_away_from_the_positives_clusters():
    ids, cluster, _, _ = corpus()
    ranker = UnexploredClusters(clusters=8)
    got = ranker.rank(ctx_for(ids[cluster == 0][:3]), 24)
    picked = cluster[np.searchsorted(ids, got)]
    assert 0 not in picked and len(set(picked.tolist())) >= 5  # one per unexplored cluster first


def test_fusion_keeps_what_both_parts_agree_on():
    ids, cluster, _, _ = corpus()
    scores = np.where(cluster == 0, 0.9, 0.1).astype(np.float32)
    ctx = ctx_for(ids[cluster == 0][:3], scores=scores)
    fusion = RankFusion([MostLikely(None), ProbeRanker()])
    got = fusion.rank(ctx, 20)
    assert (cluster[np.searchsorted(ids, got)] == 0).all()
    # each id is explained by the part that ranked it highest; a heavier weight leads more often
    assert set(fusion.reasons(got)) <= {MostLikely(None).label, ProbeRanker().label}
    heavy = RankFusion([MostLikely(None), ProbeRanker()], weights=[1.0, 5.0])
    assert heavy.reasons(heavy.rank(ctx, 20)) == [ProbeRanker().label] * 20
    with pytest.raises(ValueError, match="weights"):
        RankFusion([MostLikely(None)], weights=[1.0, 2.0])


def test_auto_is_cold_then_warm_and_says_why(monkeypatch):
    ids, cluster, _positive, _ = corpus()
    auto = strategies.make_strategy("auto")
    cold = ctx_for(ids[cluster == 0][:3])
    got = auto.query(cold, 20)
    assert len(got) == 20 and not np.isin(got, cold.excluded_ids).any()
    reasons = auto.reasons(got)
    assert "few-shot probe" in reasons and "like a found positive, any style" in reasons
    assert abs(sum(auto.shares().values()) - 1) < 1e-9
    # the semantic probe joins the fused order; each image is explained by the ranker that put it highest
    monkeypatch.setattr(strategies, "SEMANTIC_PROBE_FROM", 0)
    monkeypatch.setattr(strategies, "EXPLORE_SHARE", 0.0)
    got = auto.query(cold, 20)
    assert set(auto.reasons(got)) <= {"few-shot probe", "few-shot probe on ImageNet classes"}
    assert list(auto.shares()) == ["few-shot probe + few-shot probe on ImageNet classes"]
    # both are gated by the count of positives: the probe from SEMANTIC_PROBE_FROM, exploring below EXPLORE_BELOW
    monkeypatch.setattr(strategies, "SEMANTIC_PROBE_FROM", 4)
    monkeypatch.setattr(strategies, "EXPLORE_SHARE", 0.1)
    monkeypatch.setattr(strategies, "EXPLORE_BELOW", 3)
    auto.query(cold, 20)
    assert list(auto.shares()) == ["few-shot probe"]
    monkeypatch.setattr(strategies, "EXPLORE_BELOW", 4)
    auto.query(cold, 20)
    assert list(auto.shares()) == ["few-shot probe", "like a found positive, any style"]
    monkeypatch.setattr(strategies, "COLD_START_POSITIVES", 2)
    warm = ctx_for(ids[cluster == 0][:3], scores=np.where(cluster == 0, 0.8, 0.2).astype(np.float32))
    auto.query(warm, 20)
    assert any("model score" in part for part in auto.shares())


def test_auto_without_features_falls_back_to_what_can_run():
    ids, _cluster, _, _ = corpus()
    ctx = RankContext(ids=ids, positive_ids=ids[:2])
    got = strategies.make_strategy("auto").query(ctx, 10)
    assert len(got) == 10 and not np.isin(got, ids[:2]).any()


def test_scan_pool_caps_the_rows_a_query_reads_once_a_model_has_scored_them():
    ids = np.arange(1, 1001)
    scores = np.linspace(0, 1, 1000).astype(np.float32)
    ctx = RankContext(ids=ids, scores=scores, positive_ids=[1000], negative_ids=[999], reviewed_ids=[998])
    pool = scan_pool(ctx, rows=100)
    assert len(pool) == 100 and len(np.unique(pool)) == 100
    assert not np.isin([998, 999, 1000], pool).any()  # never a labeled or reviewed image
    assert np.isin(np.arange(948, 998), pool).all()  # the model's 50 best available images
    assert (pool < 948).sum() == 50  # and as many drawn from the rest
    np.testing.assert_array_equal(pool, scan_pool(ctx, rows=100))  # seeded: the same pool on a rerun
    cold = RankContext(ids=ids, positive_ids=[1000])
    assert len(scan_pool(cold, rows=100)) == 999  # before the first model: every available image
    assert len(scan_pool(ctx, rows=5000)) == 997
