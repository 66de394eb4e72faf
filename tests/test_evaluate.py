from __future__ import annotations

import math

import numpy as np
import pytest

from bgminer.evaluate import (
    average_precision,
    discovery_curve,
    draw_validation_sample,
    estimate_remaining,
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
    assert 300 < estimate.high < 500  # ~3.7 / 0.01: more would likely have shown up in the sample
    assert estimate.recall == 1.0 and estimate.recall_low < 0.02
