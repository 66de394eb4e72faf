from __future__ import annotations

import math

import numpy as np
import pytest

from bgminer.evaluate import (
    average_precision,
    discovery_curve,
    draw_validation_sample,
    estimate_remaining,
    extend_validation_sample,
    inclusion_probabilities,
    labels_for_width,
)


def test_average_precision_matches_a_hand_computed_value():
    # ranking: pos, neg, pos, neg -> precision at the hits 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    assert average_precision([0, 1, 1], [0.1, 0.9, 0.8]) == pytest.approx(1.0)


def test_average_precision_treats_tied_scores_as_one_threshold():
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert average_precision([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_average_precision_without_positives_is_nan():
    assert math.isnan(average_precision([0, 0], [0.2, 0.1]))


def test_discovery_curve_counts_positives_found_after_each_review():
    assert discovery_curve([True, False, True, True]).tolist() == [1, 1, 2, 3]


def scored_corpus(seed: int, n: int = 20_000, positives: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Unreviewed images with known truth: a few positives, 30% of which the model scores like background."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, bool)
    y[rng.choice(n, positives, replace=False)] = True
    hard = rng.random(n) < 0.3
    scores = np.where(y & ~hard, rng.beta(3, 2, n), rng.beta(1, 40, n))
    return scores, y


def test_validation_sample_has_the_requested_expected_size_and_favours_high_scores():
    scores, _ = scored_corpus(0)
    sizes, seen_q = [], np.zeros(len(scores))
    for seed in range(20):
        ids, q = draw_validation_sample(scores, 200, np.random.default_rng(seed))
        assert len(np.unique(ids)) == len(ids) and ((q > 0) & (q <= 1)).all()
        sizes.append(len(ids))
        seen_q[ids] = q
    assert abs(np.mean(sizes) - 200) < 10
    high, low = scores > 0.5, scores < 0.05
    assert seen_q[high & (seen_q > 0)].min() > seen_q[low & (seen_q > 0)].max()


def test_labeling_every_image_gives_the_exact_count():
    _scores, y = scored_corpus(1, n=500, positives=20)
    estimate = estimate_remaining(np.arange(500), y, np.ones(500), N=500, found=20)
    assert (estimate.remaining, estimate.low, estimate.high) == (20, 20, 20)
    assert estimate.recall == pytest.approx(0.5)


def test_interval_covers_the_true_remaining_count_in_most_runs():
    covered, estimates = 0, []
    for seed in range(100):
        scores, y = scored_corpus(seed)
        ids, q = draw_validation_sample(scores, 200, np.random.default_rng(1000 + seed))
        estimate = estimate_remaining(ids, y[ids], q, N=len(scores), found=50)
        covered += estimate.low <= y.sum() <= estimate.high
        estimates.append(estimate.remaining)
        assert estimate.recall_low <= estimate.recall <= estimate.recall_high
    assert covered >= 80  # nominal 95%; a loose bound keeps the test stable
    assert abs(np.mean(estimates) - 150) < 20  # Horvitz-Thompson is unbiased


def test_a_sample_without_positives_still_gives_an_upper_bound():
    ids = np.arange(100)
    estimate = estimate_remaining(ids, np.zeros(100, bool), np.full(100, 0.01), N=10_000, found=5)
    assert estimate.remaining == 0 and estimate.low == 0
    assert 200 < estimate.high < 400  # Jeffreys: ~2.5 / 100 of the pool; more would likely have shown up in the sample
    assert estimate.recall == 1.0 and estimate.recall_low < 0.03 and estimate.width == estimate.high


def confident_corpus(seed: int, n: int = 3000, positives: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """What the quality benchmark's loop leaves after 100 reviews: a confident model, most scores near 0,
    and 40% of the positives scored like the background (so a sample of 30 rarely draws one)."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, bool)
    y[rng.choice(n, positives, replace=False)] = True
    easy = y & (rng.random(n) >= 0.4)
    logit = np.where(easy, rng.normal(-2.0, 1.5, n), rng.normal(-9.0, 2.0, n))
    return 1 / (1 + np.exp(-logit)), y


@pytest.mark.parametrize("n", [30, 300])
def test_interval_covers_when_the_sample_misses_the_positives_scored_low(n):
    # The gamma interval this replaced covered 152 and 147 of these 200 draws (0.76 / 0.74).
    covered, widths = 0, []
    for seed in range(200):
        scores, y = confident_corpus(seed)
        ids, q = draw_validation_sample(scores, n, np.random.default_rng(1000 + seed))
        estimate = estimate_remaining(ids, y[ids], q, N=len(scores))
        covered += estimate.low <= y.sum() <= estimate.high
        widths.append(estimate.width)
    assert covered >= 0.9 * 200
    assert np.mean(widths) < {30: 0.2, 300: 0.05}[n] * len(scores)  # honest, not everything: ~430 and ~100 of 3000


def test_a_larger_sample_narrows_the_interval_as_labels_for_width_predicts():
    scores, y = confident_corpus(7)
    ids, q = draw_validation_sample(scores, 30, np.random.default_rng(0))
    now = estimate_remaining(ids, y[ids], q, N=len(scores))
    assert labels_for_width(ids, y[ids], q, len(scores), width=now.width + 1) == 0
    target = now.width / 4
    more = labels_for_width(ids, y[ids], q, len(scores), width=target)
    assert 30 < more < len(scores) - len(ids)
    assert labels_for_width(ids, y[ids], q, len(scores), width=target / 2) > more  # narrower asks for more
    widths = []
    for seed in range(20):  # grow the same sample by that many and see where the width lands
        added, pi = extend_validation_sample(scores, ids, 30, 30 + more, np.random.default_rng(seed))
        grown = np.concatenate([ids, added])
        widths.append(estimate_remaining(grown, y[grown], pi[grown], N=len(scores)).width)
    assert 0.5 * target < np.mean(widths) < 1.5 * target


def test_labels_for_width_can_ask_for_nearly_the_whole_pool():
    ids = np.arange(30)
    more = labels_for_width(ids, np.zeros(30, bool), np.full(30, 0.01), N=3000, width=1.0)
    assert 2000 < more <= 3000 - 30  # to bound a count below 1, nearly every image must be seen


def test_growing_a_sample_keeps_it_a_poisson_sample_of_the_larger_size():
    scores = np.random.default_rng(3).beta(0.5, 8, 400)
    first, _ = draw_validation_sample(scores, 20, np.random.default_rng(0))
    target = inclusion_probabilities(scores, 60)
    seen = np.zeros(len(scores))
    for seed in range(2000):
        start, _ = draw_validation_sample(scores, 20, np.random.default_rng(seed))
        added, pi = extend_validation_sample(scores, start, 20, 60, np.random.default_rng(10_000 + seed))
        assert not np.isin(added, start).any() and np.allclose(pi, target)
        seen[start] += 1
        seen[added] += 1
    assert np.abs(seen / 2000 - target).max() < 0.05  # each image is in the grown sample with probability pi'
    added, _ = extend_validation_sample(scores, first, 20, 20, np.random.default_rng(0))
    assert len(added) == 0
    with pytest.raises(ValueError):
        extend_validation_sample(scores, first, 20, 10, np.random.default_rng(0))
