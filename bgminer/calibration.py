"""Scores a person can read: Platt scaling of the active model's scores, fitted on review decisions.

A model's score is its main head's probability for the category, and it is not calibrated: the
training set holds ~10 background images per positive and the rounds stop early, so the best
unlabeled image of a category may score 0.05 while half of such images turn out positive. The
Review page shows ``p = sigmoid(a * logit(score) + b)`` instead (Platt 1999), two parameters fitted
by logistic regression on the reviewed images; ``a > 0`` makes it increasing in the score, so the
ranking (which always uses the raw score) and the order of the displayed numbers agree.

Which labels, and how they bias the fit:

- **Only labels made after the active model was trained.** The model was fitted to the earlier
  ones, so its scores on them are optimistic (on the quality benchmark the training positives
  score ~0.98, the best unlabeled image ~0.05): fitted on them, the map would call every candidate
  hopeless. Each model version therefore starts uncalibrated and is calibrated once enough of its
  own candidates have been reviewed.
- **Only review decisions** (``source == "review"``): a label given on the Find page or imported
  was chosen for what the image shows (selection on the label), which inflates the positive rate.
- **The reviewed images are the top of the ranking**, a sample selected on the score. Selection on
  the score alone leaves ``P(positive | score)`` unbiased, so the fit is right where the reviewed
  scores lie; below them the two-parameter curve extrapolates the trend into the low scores,
  where few labels exist. Validation-sample images (review strategy "validate") are drawn over
  all scores and supply labels there. They enter unweighted: weighting by 1 / inclusion
  probability would make the fit represent the whole pool, whose bulk is low-scored background,
  at the expense of the high scores the page displays the probability for; and where the
  logistic shape is right, both fits estimate the same curve.
- **Few labels**: Platt's smoothed targets (``(n+ + 1) / (n+ + 2)`` for positives, ``1 / (n- + 2)``
  for negatives) and a weak Gaussian prior around the identity map (``a = 1, b = 0``, sd 10) keep
  the fit finite when the reviewed positives and negatives are perfectly separated. With fewer
  than ``MIN_EACH`` positives or negatives, or when the fit does not increase with the score,
  :class:`Calibration` falls back to the raw score and says why (``fitted`` False, ``reason``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .project import Project

MIN_EACH = 3  # positives and negatives needed to fit
PRIOR_SD = 10.0  # of a and b around the identity map
MIN_SLOPE = 1e-3  # a fit flatter than this does not rank: fall back
EDGE = 1e-7  # scores are clipped to [EDGE, 1 - EDGE] before the logit


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(a * logit(score) + b)`` when ``fitted``; the raw score otherwise."""

    a: float = 1.0
    b: float = 0.0
    fitted: bool = False
    positives: int = 0  # labels the fit used
    negatives: int = 0
    model_id: int | None = None
    reason: str = ""  # what it was fitted on, or why it was not

    def probability(self, scores: float | Sequence[float] | np.ndarray) -> np.ndarray | float:
        """Calibrated probability of each score (the score itself, clipped to [0, 1], when not fitted)."""
        s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        if not self.fitted:
            return float(s) if s.ndim == 0 else s
        p = _sigmoid(self.a * _logit(s) + self.b)
        return float(p) if p.ndim == 0 else p


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, EDGE, 1.0 - EDGE)
    return np.log(s) - np.log1p(-s)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def fit_platt(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    min_each: int = MIN_EACH,
    prior_sd: float = PRIOR_SD,
    model_id: int | None = None,
) -> Calibration:
    """Platt scaling of ``scores`` (in [0, 1]) against ``labels`` (True = positive), by Newton's method on
    the penalised log-likelihood; falls back to the raw score with fewer than ``min_each`` of either class."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos < min_each or neg < min_each:
        return Calibration(
            positives=pos, negatives=neg, model_id=model_id,
            reason=f"{pos} positive and {neg} negative reviews so far; {min_each} of each are needed to calibrate",
        )
    x = _logit(np.clip(s, 0.0, 1.0))
    t = np.where(y, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))  # Platt's smoothed targets
    design = np.column_stack([x, np.ones_like(x)])
    center = np.array([1.0, 0.0])
    precision = 1.0 / prior_sd**2

    def loss(theta: np.ndarray) -> float:
        z = design @ theta  # cross-entropy with the smoothed targets, computed stably, plus the prior
        return float(np.sum(np.logaddexp(0.0, z) - t * z) + 0.5 * precision * np.sum((theta - center) ** 2))

    theta = center.copy()
    current = loss(theta)
    for _ in range(100):  # Newton's method with step halving: the loss is convex, each step must lower it
        p = _sigmoid(design @ theta)
        gradient = design.T @ (p - t) + precision * (theta - center)
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + precision * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and loss(theta - scale * step) > current:
            scale /= 2
        theta = theta - scale * step
        previous, current = current, loss(theta)
        if previous - current < 1e-12 * max(1.0, abs(current)):
            break
    a, b = float(theta[0]), float(theta[1])
    if not a > MIN_SLOPE:
        return Calibration(
            positives=pos, negatives=neg, model_id=model_id,
            reason="the reviewed labels do not rise with the score, so it cannot be calibrated",
        )
    return Calibration(
        a=a, b=b, fitted=True, positives=pos, negatives=neg, model_id=model_id,
        reason=f"fitted on {pos} positive and {neg} negative reviews made since model v{model_id} was trained"
        if model_id is not None
        else f"fitted on {pos} positive and {neg} negative labels",
    )


def calibration_data(project: Project, category: str) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(model id, scores, labels) of the review decisions made since the active model was trained
    (the labels the module docstring allows); None before the first model."""
    found = project.version_scores(category)
    if found is None:
        return None
    record, version = found
    trained_on = {e.image_id for e in project.store.label_history(category, limit=10**9) if e.created_at <= record.created_at}
    rows = [
        (int(r["image_id"]), r["label"] == "positive")
        for r in project.store.label_table(category)
        if r["source"] == "review" and int(r["image_id"]) not in trained_on
    ]
    ids = np.array([i for i, _ in rows], dtype=np.int64)
    if len(ids) == 0 or len(version.ids) == 0:
        return record.id, np.zeros(0), np.zeros(0, dtype=bool)
    position = np.searchsorted(version.ids, ids)
    scored = (position < len(version.ids)) & (version.ids[np.minimum(position, len(version.ids) - 1)] == ids)
    column = version.column(category)
    scores = np.asarray(column[position[scored]], dtype=np.float64)
    labels = np.array([y for (_, y), ok in zip(rows, scored, strict=True) if ok], dtype=bool)
    return record.id, scores, labels


def calibration(project: Project, category: str) -> Calibration:
    """The active model's calibration for ``category`` (raw scores, flagged, before the first model)."""
    data = calibration_data(project, category)
    if data is None:
        return Calibration(reason="no model yet")
    model_id, scores, labels = data
    return fit_platt(scores, labels, model_id=model_id)
