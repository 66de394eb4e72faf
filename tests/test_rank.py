from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bgminer.index import build_index
from bgminer.rank import (
    CandidatePool,
    Mixture,
    MostLikely,
    NearestToPositives,
    RandomStrategy,
    RankContext,
    Strategy,
    Uncertain,
    ValidationSample,
    suppress_near_duplicates,
)
from bgminer.strategies import STRATEGIES, make_strategy

N, DIM = 400, 32


def corpus(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, embeddings in 8 clusters, and model scores that favour cluster 0 (the 'rare class')."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, DIM)) * 2
    cluster = np.arange(N) % 8
    emb = (centers[cluster] + 0.5 * rng.standard_normal((N, DIM))).astype(np.float32)
    scores = np.where(cluster == 0, 0.6, 0.1) + 0.3 * rng.random(N)
    return np.arange(10, 10 + N, dtype=np.int64), emb, scores.astype(np.float32)


class Features:
    """Pretrained rows by image id, as a project's feature cache serves them: pooled = the embeddings,
    logits that put cluster c's mass on ImageNet classes 10c..10c+9."""

    def __init__(self, ids: np.ndarray, emb: np.ndarray):
        self.row = {int(i): r for r, i in enumerate(ids)}
        cluster = np.arange(len(ids)) % 8
        self.arrays = {"pooled": emb, "logits": np.zeros((len(ids), 1000), np.float16)}
        for c in range(8):
            self.arrays["logits"][cluster == c, 10 * c : 10 * c + 10] = 4.0

    def read(self, name: str, ids) -> np.ndarray:
        return self.arrays[name][[self.row[int(i)] for i in ids]]


def context(embeddings: str = "array", **overrides) -> RankContext:
    ids, emb, scores = corpus()
    source = build_index(emb, ids, kind="exact") if embeddings == "index" else emb
    fields = {
        "ids": ids,
        "scores": scores,
        "embeddings": source,
        "positive_ids": ids[[0, 8, 16]],  # cluster 0
        "negative_ids": ids[[1, 2, 3]],
        "reviewed_ids": ids[[24, 32, 40, 4, 5]],
        "validation_ids": ids[::-3],  # the estimator's sample, excluded ids among it
        "seed": 3,
        "features": Features(ids, emb),
    }
    fields.update(overrides)
    return RankContext(**fields)


ALL_STRATEGIES = [*STRATEGIES] + ["pool:most-likely", "pool:near-positives"]


def named(name: str) -> Strategy:
    if name.startswith("pool:"):
        return make_strategy(name.removeprefix("pool:"), pool_neighbors=20)
    return make_strategy(name)


@pytest.mark.parametrize("embeddings", ["array", "index"])
@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_strategies_never_return_labeled_or_reviewed_ids(name, embeddings):
    ctx = context(embeddings)
    got = named(name).query(ctx, 30)
    assert got.dtype == np.int64 and len(got) == 30 and len(np.unique(got)) == 30
    assert not np.isin(got, ctx.excluded_ids).any()
    assert np.isin(got, ctx.ids).all()


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_strategies_run_before_the_first_model_and_before_any_label(name):
    ctx = context(scores=None, positive_ids=[], negative_ids=[])
    got = named(name).query(ctx, 10)
    assert len(got) == 10 and not np.isin(got, ctx.excluded_ids).any()


def test_strategies_return_fewer_ids_when_the_corpus_runs_out():
    ids, emb, scores = corpus()
    ctx = RankContext(ids=ids[:6], scores=scores[:6], embeddings=emb[:6], reviewed_ids=ids[:2])
    assert sorted(MostLikely().query(ctx, 50).tolist()) == ids[2:6].tolist()


def test_most_likely_orders_by_score():
    ctx = context()
    got = MostLikely(dedup_threshold=None).query(ctx, 20)
    mask = ctx.available()
    expected = ctx.ids[mask][np.argsort(-ctx.scores[mask], kind="stable")][:20]
    assert got.tolist() == expected.tolist()


def test_uncertain_uses_the_midpoint_of_labeled_medians_as_boundary():
    ctx = context()
    boundary = Uncertain().decision_boundary(ctx)
    pos = np.median(ctx.scores[ctx.rows(ctx.positive_ids)])
    neg = np.median(ctx.scores[ctx.rows(ctx.negative_ids)])
    assert boundary == pytest.approx((pos + neg) / 2)
    got = Uncertain(dedup_threshold=None).query(ctx, 10)
    distance = np.abs(ctx.scores[ctx.rows(got)] - boundary)
    others = np.abs(ctx.scores[ctx.available()] - boundary)
    assert (np.diff(distance) >= 0).all() and distance.max() <= np.sort(others)[9] + 1e-7


def test_uncertain_defaults_to_one_half_without_both_kinds_of_label():
    assert Uncertain().decision_boundary(context(negative_ids=[])) == 0.5


@pytest.mark.parametrize("embeddings", ["array", "index"])
def test_nearest_to_positives_ranks_the_positives_cluster_first(embeddings):
    ctx = context(embeddings, scores=None)
    got = NearestToPositives().query(ctx, 20)
    assert ((got - 10) % 8 == 0).all()  # ids 10 + 8k are cluster 0


def test_most_likely_without_scores_falls_back_to_nearest_to_positives():
    ctx = context(scores=None)
    assert MostLikely().query(ctx, 15).tolist() == NearestToPositives().query(ctx, 15).tolist()


def test_random_is_reproducible_per_seed():
    assert RandomStrategy().query(context(), 10).tolist() == RandomStrategy().query(context(), 10).tolist()
    assert RandomStrategy().query(context(), 10).tolist() != RandomStrategy().query(context(seed=4), 10).tolist()


def test_mixture_interleaves_by_weight_without_duplicates():
    ctx = context()
    likely, unlikely = MostLikely(dedup_threshold=None), Uncertain(boundary=0.0, dedup_threshold=None)  # lowest scores
    mixed = Mixture([(likely, 3.0), (unlikely, 1.0), (MostLikely(dedup_threshold=None), 1.0)], dedup_threshold=None)
    got = mixed.query(ctx, 40)
    assert len(np.unique(got)) == 40
    top, bottom = set(likely.query(ctx, 40).tolist()), set(unlikely.query(ctx, 40).tolist())
    first = got[:20].tolist()
    assert sum(i in bottom for i in first) == 4  # weight 1 of 5
    assert sum(i in top for i in first) == 16  # weights 3 + 1 of 5, the second MostLikely yields new ids only


def test_candidate_pool_restricts_the_base_to_the_positives_neighbourhoods():
    ctx = context()
    pool = CandidatePool(RandomStrategy(), k_neighbors=10)
    allowed = pool.pool(ctx)
    assert 0 < len(allowed) <= 30
    got = pool.query(ctx, 50)
    assert set(got.tolist()) <= set(allowed.tolist())
    assert set(got.tolist()) == set(allowed.tolist())  # pool smaller than the page: all of it


def test_suppress_near_duplicates_keeps_the_first_of_each_group_of_copies():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, DIM))
    vectors = np.stack([a, a + 1e-3 * rng.standard_normal(DIM), b, 2 * a, b + 1e-3 * rng.standard_normal(DIM)])
    ids = np.array([7, 8, 9, 10, 11])
    assert suppress_near_duplicates(ids, vectors).tolist() == [7, 9]
    assert suppress_near_duplicates(ids, vectors, n=1).tolist() == [7]
    assert suppress_near_duplicates(ids, vectors, threshold=1.01).tolist() == ids.tolist()


@pytest.mark.parametrize("embeddings", ["array", "index"])
def test_a_page_holds_one_of_many_copies_of_a_picture(embeddings):
    ids, emb, scores = corpus()
    emb[[50, 51, 52, 53, 54, 55]] = emb[50] + 1e-4 * np.random.default_rng(1).standard_normal((6, DIM))
    scores[[50, 51, 52, 53, 54, 55]] = 1.0  # the copies are the top-scored images
    source = build_index(emb, ids, kind="exact") if embeddings == "index" else emb
    ctx = RankContext(ids=ids, scores=scores, embeddings=source)
    copies = ids[[50, 51, 52, 53, 54, 55]]
    page = MostLikely().query(ctx, 10)
    assert np.isin(page, copies).sum() == 1 and len(page) == 10
    assert np.isin(MostLikely(dedup_threshold=None).query(ctx, 10), copies).sum() == 6


def test_validate_returns_the_samples_unlabeled_ids_in_draw_order_once_each():
    ctx = context()
    sample = ctx.ids[[7, 3, 0, 99, 24, 99, 1, 7, 6]]  # 0, 1, 3 labeled, 24 reviewed, 7 and 99 drawn twice
    got = ValidationSample().query(replace(ctx, validation_ids=sample), 10)
    assert got.tolist() == ctx.ids[[7, 99, 6]].tolist()
    assert make_strategy("validate").uses_validation_sample and not make_strategy("most-likely").uses_validation_sample


def test_registry_names_and_unknown_names():
    assert set(STRATEGIES) == {
        "auto", "most-likely", "uncertain", "near-positives", "probe", "new-modes", "class-lift", "name", "unexplored", "random",
        "mixed", "validate",
    }
    assert isinstance(make_strategy("mixed"), Mixture)
    assert isinstance(make_strategy("uncertain", pool_neighbors=50), CandidatePool)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("best")
