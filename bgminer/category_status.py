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

from .evaluate import discovery_curve, draw_validation_sample, estimate_remaining, extend_validation_sample, labels_for_width

if TYPE_CHECKING:
    from .project import Project

USEFUL_FLOOR = 10.0  # an interval this narrow (in images) is always useful


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
    :mod:`bgminer.evaluate`) and kept until ``redraw``, so it stays fixed while it is labeled;
    :func:`grow_validation_sample` adds to it. ``ids`` in draw order; ``stages`` the sample's sizes
    as it grew, each with the inclusion probabilities of its images.
    """
    key = f"validation:{project.store.category_id(category)}"  # by id: a rename keeps the sample
    stored = project.store.get_meta(key)
    if stored and not redraw:
        return _stages(json.loads(stored))
    found = project.version_scores(category)
    if found is None:
        raise ValueError("train a model first: the validation sample is drawn from its scores")
    record, version = found
    labels = project.store.labels(category)
    labeled = np.fromiter(labels, dtype=np.int64, count=len(labels))
    unlabeled = ~np.isin(version.ids, labeled)
    pool_ids, pool_scores = version.ids[unlabeled], version.column(category)[unlabeled]
    rng = np.random.default_rng(record.id)
    positions, pi = draw_validation_sample(pool_scores, n, rng)
    sample = {
        "model_id": record.id,
        "ids": pool_ids[positions].tolist(),
        "n": n,
        "stages": [{"n": n, "size": len(positions), "pi": pi.tolist()}],
        "unreviewed": len(pool_ids),
        "found": sum(v == "positive" for v in labels.values()),
        "excluded": sorted(int(i) for i in labeled[np.isin(labeled, version.ids)]),  # the pool is the rest: a stage can grow it
        "drawn_at": time.time(),
    }
    project.store.set_meta(key, json.dumps(sample))
    return sample


def _stages(sample: dict[str, Any]) -> dict[str, Any]:
    """A stored sample in the staged form (samples stored before stages had one Poisson stage of ~30)."""
    if "stages" not in sample:
        size = len(sample["ids"])
        sample = {**sample, "n": size, "stages": [{"n": size, "size": size, "pi": sample["pi"]}]}
        sample.pop("pi")
    return sample


def grow_validation_sample(project: Project, category: str, n: int) -> dict[str, Any]:
    """The validation sample grown to expected size ``n`` over the pool it was drawn from (a new stage:
    the images added go to the end of ``ids``; the estimate uses the largest stage labeled in full).
    Raises ValueError when that pool can no longer be rebuilt (a sample stored before stages existed,
    or a version re-scored over more images since): redraw it then."""
    sample = validation_sample(project, category)
    if n <= sample["n"]:
        return sample
    record = project.store.model(sample["model_id"]) if "excluded" in sample else None
    version = None
    if record is not None and record.state == "ready" and category in record.categories:
        from .scoring import read_version

        version = read_version(project.scores_dir, record.id, record.categories)
    if version is not None:
        in_pool = ~np.isin(version.ids, np.asarray(sample["excluded"], dtype=np.int64))
        pool_ids, pool_scores = version.ids[in_pool], version.column(category)[in_pool]
    if version is None or len(pool_ids) != sample["unreviewed"]:
        raise ValueError("this validation sample cannot grow (the images it was drawn from changed): redraw it")
    positions = np.searchsorted(pool_ids, np.asarray(sample["ids"], dtype=np.int64))
    rng = np.random.default_rng([record.id, len(sample["stages"]), n])
    added, pi = extend_validation_sample(pool_scores, positions, sample["n"], n, rng)
    everything = np.concatenate([positions, added])
    stage = {"n": n, "size": len(everything), "pi": pi[everything].tolist()}
    grown = {**sample, "ids": pool_ids[everything].tolist(), "n": n, "stages": [*sample["stages"], stage]}
    project.store.set_meta(f"validation:{project.store.category_id(category)}", json.dumps(grown))
    return grown


def useful_width(total: float) -> float:
    """The widest interval on the positives left that still says something: half the estimated total
    of positives (found plus left), and never under ``USEFUL_FLOOR`` images."""
    return max(USEFUL_FLOOR, 0.5 * total)


def status(project: Project, category: str) -> dict[str, Any]:
    """How far along the user is: labels, reviews, positives found, estimated positives left.

    The estimate (once a stage of the validation sample is labeled in full) carries its interval,
    the interval's ``width``, whether that width is ``useful`` (:func:`useful_width`) and, when it is
    not, ``labels_needed``: about how many more validation labels would narrow it enough
    (:func:`bgminer.evaluate.labels_for_width`), with the sentence to show in ``estimate_note``.
    """
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
    complete = [s for s in sample["stages"] if all(v is not None for v in labeled[: s["size"]])]
    if not complete:
        first = sample["stages"][0]["size"]
        left = sum(v is None for v in labeled[:first])
        out["estimate_note"] = (
            f"label the {left} remaining validation images (review strategy 'validate') to estimate what is left"
        )
        return out
    stage = complete[-1]
    ids, pi = sample["ids"][: stage["size"]], stage["pi"]
    positive = [v == "positive" for v in labeled[: stage["size"]]]
    est = estimate_remaining(ids, positive, pi, sample["unreviewed"], found=sample["found"])
    # The sample estimates the positives that were hidden when it was drawn; positives found since are no longer hidden.
    total, low_total, high_total = (sample["found"] + x for x in (est.remaining, est.low, est.high))
    low, high = max(0.0, low_total - positives), max(0.0, high_total - positives)
    target = useful_width(total)
    estimate = {
        "remaining": max(0.0, total - positives),
        "remaining_low": low,
        "remaining_high": high,
        "width": high - low,
        "recall": positives / total if total else None,
        "recall_low": positives / high_total if high_total else None,
        "recall_high": min(1.0, positives / low_total) if low_total else None,
        "confidence": est.confidence,
        "sample_size": est.sample_size,
        "sample_positives": est.sample_positives,
        "useful": high - low <= target,
        "useful_width": target,
        "labels_needed": None,
    }
    out["estimate"] = estimate
    pending = len(labeled) - stage["size"]
    if pending:
        out["estimate_note"] = f"{sum(v is None for v in labeled[stage['size']:])} added validation images still to label"
    elif not estimate["useful"]:
        more = labels_for_width(ids, positive, pi, sample["unreviewed"], target, est.confidence)
        if more is not None:
            estimate["labels_needed"] = more
            estimate["grow_to"] = sample["n"] + more
            out["estimate_note"] = (
                f"The interval is too wide to say how many are left: about {more:,} more validation labels "
                f"would narrow it to about {target:.0f}."
            )
    return out
