"""How good is the model, and how many positives are still hidden in the unreviewed images?

Ranking metrics (average precision, precision@k, discovery curves) score a ranking against
labels. The remaining-positives estimator follows Poms et al., "Low-Shot Validation: Active
Importance Sampling for Estimating Classifier Performance on Rare Categories" (ICCV 2021):
label a small sample drawn with probability tilted towards high model scores, and weight
each label by the inverse of its inclusion probability.

Sampling design (documented choice): Poisson sampling, i.e. without replacement and each
unreviewed image i independently with probability ``pi_i = min(1, c * w_i)``, where
``w_i = (1 - eps) * sqrt(s_i) / sum(sqrt(s)) + eps / N`` and ``c`` makes the expected sample
size ``n``. The square root (Poms et al.'s proposals are of this shape) and the uniform share
``eps`` keep images the model scores low but that are positive reachable; in simulations
with 30% of positives scored like background, proposals proportional to the raw score gave
intervals covering the truth in ~75% of runs, the square root in ~97%. No image is shown
twice, and images with ``pi_i = 1`` are counted exactly.

Estimator: Horvitz-Thompson, ``T = sum(y_i / pi_i)`` (unbiased), variance estimate
``v = sum(y_i * (1 - pi_i) / pi_i**2)``. Images with ``pi_i = 1`` are counted exactly; the
interval covers the rest. It is the Korn-Graubard interval for a proportion estimated from an
unequal-probability sample (Korn & Graubard 1998), with Jeffreys' beta quantiles in place of
Clopper-Pearson's (Franco et al. 2019 compare the two): for the share ``p = T / N`` the
effective sample size is ``n* = p (1 - p) N^2 / v``, truncated at the number of sampled images
``n`` (and ``n* = n`` when the sample holds no positive), and the interval is the Jeffreys
interval of ``n* p`` successes in ``n*`` trials, times ``N``. Why not the variance alone: with 30
labels most of the sample sits on the few high scores, the many low-scored images get
inclusion probabilities near ``3/N`` and are rarely drawn; when the positives the model scores low
are missed, ``v`` is small exactly when ``T`` is too small, so any interval built from ``v``
(the normal one, the gamma interval this module used before) under-covers: 0.59-0.80 at a nominal
0.95 on the quality benchmark's 4% corpus. Truncating ``n*`` at ``n`` bounds the share of positives
among all those images by what ``n`` labels can show, which is what a sample of 30 can honestly
say: the interval is wide (docs/quality.md has the numbers) and :func:`labels_for_width` says how
many more labels would narrow it. Bounds are clipped to what the sample proves: at least its
positives, at most N minus its negatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_EPS = 0.1


def average_precision(y_true: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the precision-recall step curve (as sklearn's ``average_precision_score``); nan without positives.

    Tied scores form one threshold, so the order among ties does not matter.
    """
    y = np.asarray(y_true, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0, tp]) / tp[-1]
    return float(np.sum(recall_step * precision))


def discovery_curve(labels_in_review_order: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Cumulative positives found after each reviewed image (int64, same length as the input)."""
    return np.cumsum(np.asarray(labels_in_review_order, dtype=bool).reshape(-1), dtype=np.int64)


def draw_validation_sample(
    scores: Sequence[float] | np.ndarray, n: int, rng: np.random.Generator, eps: float = DEFAULT_EPS
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson importance sample of expected size ``n`` from the unreviewed images' scores in [0, 1].

    Returns (positions into ``scores`` int64, their inclusion probabilities float64). See the module docstring.
    """
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, None)
    if len(s) == 0 or n <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    pi = inclusion_probabilities(s, n, eps)
    chosen = np.nonzero(rng.random(len(s)) < pi)[0]
    return chosen.astype(np.int64), pi[chosen]


def extend_validation_sample(
    scores: Sequence[float] | np.ndarray,
    sampled: Sequence[int] | np.ndarray,
    n: int,
    new_n: int,
    rng: np.random.Generator,
    eps: float = DEFAULT_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Grow a sample drawn by :func:`draw_validation_sample` (``sampled``: its positions, expected size ``n``) to
    expected size ``new_n`` over the same ``scores``: each unsampled image joins with probability
    ``(pi' - pi) / (1 - pi)``, so the union is a Poisson sample with the larger ``pi'``.

    Returns (the added positions, the inclusion probabilities ``pi'`` of every position in ``scores``).
    """
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, None)
    if new_n < n:
        raise ValueError(f"a sample grows: {new_n} < {n}")
    old, new = inclusion_probabilities(s, n, eps), inclusion_probabilities(s, new_n, eps)
    new = np.maximum(new, old)  # equal up to rounding; the union needs pi' >= pi
    out = np.zeros(len(s), bool)
    out[np.asarray(sampled, dtype=np.int64)] = True
    join = (new - old) / np.where(old < 1.0, 1.0 - old, 1.0)
    added = np.nonzero(~out & (rng.random(len(s)) < join))[0]
    return added.astype(np.int64), new


def inclusion_probabilities(scores: np.ndarray, n: int, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Every image's inclusion probability in a sample of expected size ``n``: ``min(1, c * w)`` (module docstring)."""
    if not 0.0 < eps <= 1.0:
        raise ValueError("eps must be in (0, 1]")
    size = len(scores)
    root = np.sqrt(scores)
    w = (1 - eps) * (root / root.sum() if root.sum() > 0 else np.full(size, 1.0 / size)) + eps / size
    return _capped(w, min(n, size))


def _capped(w: np.ndarray, n: int) -> np.ndarray:
    """pi = min(1, c * w) with c such that sum(pi) = n."""
    capped = np.zeros(len(w), bool)
    while True:
        if capped.all():  # the sample is the whole pool
            return np.ones(len(w))
        c = (n - capped.sum()) / w[~capped].sum()
        newly = ~capped & (c * w >= 1.0)
        if not newly.any():
            return np.where(capped, 1.0, c * w)
        capped |= newly


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) by its continued fraction (Lentz's method)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-13:
            break
    return front * h


def _beta_quantile(p: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution, by bisection on :func:`_betainc` (to ~1e-12)."""
    lo, hi = 0.0, 1.0
    for _ in range(45):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _jeffreys(x: float, n: float, alpha: float) -> tuple[float, float]:
    """Jeffreys interval for a binomial proportion from ``x`` successes in ``n`` (both may be fractional)."""
    low = 0.0 if x <= 0 else _beta_quantile(alpha / 2, x + 0.5, n - x + 0.5)
    high = 1.0 if x >= n else _beta_quantile(1 - alpha / 2, x + 0.5, n - x + 0.5)
    return low, high


@dataclass(frozen=True)
class Estimate:
    """Positives still hidden among the unreviewed images, and the recall reached, with a confidence interval."""

    remaining: float
    low: float
    high: float
    recall: float
    recall_low: float
    recall_high: float
    found: int  # positives labeled before the sample was drawn
    sample_size: int
    sample_positives: int
    confidence: float
    effective_size: float  # the Korn-Graubard effective sample size behind the interval

    @property
    def width(self) -> float:
        return self.high - self.low


@dataclass(frozen=True)
class _Parts:
    """A validated sample split into its certainty units (pi = 1, counted exactly) and the rest."""

    exact: int  # positives among the certainty units
    total: float  # Horvitz-Thompson total of the rest
    var: float  # its variance estimate
    n: int  # sampled units with pi < 1
    population: int  # images with pi < 1: N minus the certainty units
    hits: int
    misses: int


def _parts(sample_ids, sample_labels, q, N: int) -> _Parts:
    ids = np.asarray(sample_ids).reshape(-1)
    y = np.asarray(sample_labels, dtype=bool).reshape(-1)
    pi = np.asarray(q, dtype=np.float64).reshape(-1)
    if not (len(ids) == len(y) == len(pi)):
        raise ValueError("sample_ids, sample_labels and q must have the same length")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("a Poisson sample holds each image at most once")
    if ((pi <= 0) | (pi > 1)).any():
        raise ValueError("inclusion probabilities must be in (0, 1]")
    certain = pi >= 1.0
    y_rest, pi_rest = y[~certain], pi[~certain]
    return _Parts(
        exact=int(y[certain].sum()),
        total=float(np.sum(y_rest / pi_rest)),
        var=float(np.sum(y_rest * (1.0 - pi_rest) / pi_rest**2)),
        n=int((~certain).sum()),
        population=max(0, N - int(certain.sum())),
        hits=int(y.sum()),
        misses=int((~y).sum()),
    )


def _effective(parts: _Parts, scale: float = 1.0) -> tuple[float, float]:
    """Korn-Graubard effective (successes, trials) for the share of positives among the uncertain images,
    truncated at the sample size; ``scale`` predicts them for a sample ``scale`` times as large.

    Both are divided by ``1 - f``, ``f`` the sampled fraction (the finite-population correction of a
    binomial interval), so that a sample that grows towards the whole pool narrows the interval to nothing.
    """
    n = parts.n * scale
    p = parts.total / parts.population if parts.population else 0.0
    if 0.0 < p < 1.0 and parts.var > 0:
        f = parts.n / parts.population  # the variance estimate already holds this correction
        n = min(n, p * (1.0 - p) / (parts.var / parts.population**2) * scale * (1.0 - f))
    f = min(parts.n * scale / parts.population, 1.0 - 1e-9) if parts.population else 0.0
    n /= 1.0 - f
    return n * min(p, 1.0), n


def estimate_remaining(
    sample_ids: Sequence[int] | np.ndarray,
    sample_labels: Sequence[bool] | np.ndarray,
    q: Sequence[float] | np.ndarray,
    N: int,
    found: int = 0,
    confidence: float = 0.95,
) -> Estimate:
    """Horvitz-Thompson estimate of the positives among ``N`` unreviewed images from a labeled Poisson sample,
    with the Korn-Graubard/Jeffreys interval of the module docstring.

    ``q`` are the sampled images' inclusion probabilities (from :func:`draw_validation_sample`),
    ``sample_labels`` their labels (True = positive), ``found`` the positives already labeled.
    """
    parts = _parts(sample_ids, sample_labels, q, N)
    alpha = 1.0 - confidence
    x, n = _effective(parts)
    share_low, share_high = _jeffreys(x, n, alpha) if n > 0 else (0.0, 0.0)
    ceiling = N - parts.misses
    remaining = min(parts.exact + parts.total, ceiling)
    low = min(max(parts.exact + share_low * parts.population, parts.hits, 0.0), remaining)
    high = max(min(parts.exact + share_high * parts.population, ceiling), remaining)

    def recall(hidden: float) -> float:
        return found / (found + hidden) if found + hidden > 0 else float("nan")

    return Estimate(
        remaining=remaining,
        low=low,
        high=high,
        recall=recall(remaining),
        recall_low=recall(high),
        recall_high=recall(low),
        found=found,
        sample_size=len(np.asarray(sample_labels).reshape(-1)),
        sample_positives=parts.hits,
        confidence=confidence,
        effective_size=n,
    )


def labels_for_width(
    sample_ids: Sequence[int] | np.ndarray,
    sample_labels: Sequence[bool] | np.ndarray,
    q: Sequence[float] | np.ndarray,
    N: int,
    width: float,
    confidence: float = 0.95,
) -> int | None:
    """How many more labels a sample of the same design would need for a ``confidence`` interval at most
    ``width`` wide, if the share of positives is what the sample estimates now: the effective sample
    size (the current variance estimate) grows in proportion to the sample. A sample without positives
    so far predicts the fewest labels that could do; more hits would ask for more.
    0 when the interval is already that narrow; None for a sample without uncertain images to scale.
    """
    parts = _parts(sample_ids, sample_labels, q, N)
    if parts.n == 0:  # nothing uncertain was sampled: no variance to scale
        return 0 if parts.population == 0 else None
    alpha = 1.0 - confidence
    x, n = _effective(parts)
    share = x / n
    top = parts.population / parts.n  # scale at which the sample is the whole pool: exact

    def predicted(scale: float) -> float:
        if scale >= top:
            return 0.0
        trials = _effective(parts, scale)[1]
        low, high = _jeffreys(share * trials, trials, alpha)
        return (high - low) * parts.population

    if predicted(1.0) <= width:
        return 0
    lo, hi = 1.0, top
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if predicted(mid) <= width else (mid, hi)
    return min(math.ceil(parts.n * (hi - 1.0)), parts.population - parts.n)
