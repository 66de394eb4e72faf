"""Where a category stands: the decisions made in review, the validation sample and the estimate
of how many positives are still hidden (:mod:`bgminer.evaluate` holds the statistics).

:class:`bgminer.project.Project` offers these as ``review_stats``, ``validation_sample`` and ``status``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .evaluate import discovery_curve, draw_validation_sample, estimate_remaining

if TYPE_CHECKING:
    from .project import Project


@dataclass
class ReviewStats:
    reviewed: int
    found: int
    precision_last20: float | None
    curve: list[int] = field(default_factory=list)  # positives found after each review decision


def review_stats(project: Project, category: str) -> ReviewStats:
    """Decisions made in review for ``category`` (undone ones removed), in order."""
    events = project.store.label_history(category, limit=1_000_000)[::-1]
    undone = {e.undoes for e in events if e.undoes is not None}
    decisions = [e.value == "positive" for e in events if e.source == "review" and e.undoes is None and e.id not in undone]
    curve = discovery_curve(decisions).tolist()
    last = decisions[-20:]
    return ReviewStats(
        reviewed=len(decisions),
        found=curve[-1] if curve else 0,
        precision_last20=(sum(last) / len(last)) if last else None,
        curve=curve,
    )


def validation_sample(project: Project, category: str, n: int = 30, redraw: bool = False) -> dict[str, Any]:
    """The importance sample of unreviewed images used to estimate remaining positives.

    Drawn once from the active model's scores (tilted towards high scores, see
    :mod:`bgminer.evaluate`) and kept until ``redraw``, so it stays fixed while it is labeled.
    """
    key = f"validation:{project.store.category_id(category)}"  # by id: a rename keeps the sample
    stored = project.store.get_meta(key)
    if stored and not redraw:
        return json.loads(stored)
    found = project.version_scores(category)
    if found is None:
        raise ValueError("train a model first: the validation sample is drawn from its scores")
    record, version = found
    labels = project.store.labels(category)
    unlabeled = ~np.isin(version.ids, np.fromiter(labels, dtype=np.int64, count=len(labels)))
    pool_ids, pool_scores = version.ids[unlabeled], version.column(category)[unlabeled]
    rng = np.random.default_rng(record.id)
    positions, pi = draw_validation_sample(pool_scores, n, rng)
    sample = {
        "model_id": record.id,
        "ids": pool_ids[positions].tolist(),
        "pi": pi.tolist(),
        "unreviewed": len(pool_ids),
        "found": sum(v == "positive" for v in labels.values()),
        "drawn_at": time.time(),
    }
    project.store.set_meta(key, json.dumps(sample))
    return sample


def status(project: Project, category: str) -> dict[str, Any]:
    """How far along the user is: labels, reviews, positives found, estimated positives left."""
    labels = project.store.labels(category)
    positives = sum(v == "positive" for v in labels.values())
    review = review_stats(project, category)
    record = project.store.active_model(category)
    out: dict[str, Any] = {
        "category": category,
        "positives": positives,
        "negatives": len(labels) - positives,
        "reviewed": review.reviewed,
        "found_in_review": review.found,
        "model_version": None if record is None else record.id,
        "estimate": None,
    }
    if record is None:
        out["estimate_note"] = "train a model to estimate how many positives remain"
        return out
    sample = validation_sample(project, category)
    labeled = [labels.get(i) for i in sample["ids"]]
    done = sum(v is not None for v in labeled)
    out["validation_labeled"] = f"{done}/{len(labeled)}"
    if done < len(labeled):
        out["estimate_note"] = (
            f"label the {len(labeled) - done} remaining validation images (review strategy 'validate') to estimate what is left"
        )
        return out
    positive = [v == "positive" for v in labeled]
    est = estimate_remaining(sample["ids"], positive, sample["pi"], sample["unreviewed"], found=sample["found"])
    # The sample estimates the positives that were hidden when it was drawn; positives found since are no longer hidden.
    total, low_total, high_total = (sample["found"] + x for x in (est.remaining, est.low, est.high))
    out["estimate"] = {
        "remaining": max(0.0, total - positives),
        "remaining_low": max(0.0, low_total - positives),
        "remaining_high": max(0.0, high_total - positives),
        "recall": positives / total if total else None,
        "recall_low": positives / high_total if high_total else None,
        "recall_high": min(1.0, positives / low_total) if low_total else None,
        "confidence": est.confidence,
        "sample_size": est.sample_size,
        "sample_positives": est.sample_positives,
    }
    return out
