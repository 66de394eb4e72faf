"""The review loop in one object: rank what one person has not seen, record their decisions,
remember their skips, undo their last decision, and retrain when enough new labels arrived.

The Review page, the CLI (``bgminer rank/label/skip/undo``) and ``bench/quality.py`` all drive
:class:`Miner`, so the quality figures measure the product's loop. Like modAL's
``ActiveLearner``, it composes parts that live elsewhere: strategies (:mod:`bgminer.rank`),
the store (labels, skips, models, jobs) and :meth:`bgminer.project.Project.train`.

What a ``project`` must offer: ``store`` (:class:`bgminer.store.Store`), ``label``, ``undo``,
``train``, ``ranking_inputs``, ``validation_sample``, ``auto_retrain_after`` and ``features``
(pretrained feature rows by image id, for the rankers of :mod:`bgminer.explore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .jobs import JobLimitError, JobRunner
from .rank import RankContext, Strategy
from .records import LabelEvent, ModelRecord
from .search import Candidate
from .settings import Limits
from .strategies import DEFAULT_STRATEGY, make_strategy
from .train import TrainConfig


@dataclass(frozen=True)
class Decision:
    """One recorded decision; ``replaced``/``replaced_author``: someone else's label it overwrote."""

    image_id: int
    value: str
    replaced: str | None = None
    replaced_author: str | None = None


@dataclass(frozen=True)
class Retrain:
    """What :meth:`Miner.retrain_if_due` did: nothing (not due), started a round, or was refused."""

    due: bool
    job_id: int | None = None  # the background round (with a runner)
    model: ModelRecord | None = None  # the finished round (inline)
    refused: str | None = None  # why a due round did not start (a later decision retries)


def labels_since_model(project: Any, category: str) -> int | None:
    """Labels of ``category`` added since its active model was trained (None without a model)."""
    model = project.store.active_model(category)
    if model is None:
        return None
    then = model.label_counts.get(category, {})
    now = project.store.label_counts().get(category, {})
    return max(0, sum(now.values()) - int(then.get("positive", 0)) - int(then.get("negative", 0)))


def check_training_allowed(config: TrainConfig, limits: Limits | None) -> None:
    """Raise :class:`JobLimitError` when ``config`` exceeds a non-admin's ``limits`` (None: no caps)."""
    if limits is None:
        return
    if config.mode not in limits.user_modes:
        raise JobLimitError(f"only an admin may train in {config.mode} mode (allowed: {', '.join(limits.user_modes) or 'none'})")
    if (config.epochs or 0) > limits.user_max_epochs:
        raise JobLimitError(f"only an admin may train more than {limits.user_max_epochs} epochs (asked for {config.epochs})")


class Miner:
    """One person's review loop for one category.

    ``limits``: a non-admin's caps on the rounds this loop starts (None: an admin or the CLI).
    ``pool_neighbors``: rank only within the positives' nearest neighbours (SEALS candidate pool).
    """

    def __init__(
        self,
        project: Any,
        category: str,
        user: str,
        strategy: str | Strategy = DEFAULT_STRATEGY,
        *,
        limits: Limits | None = None,
        pool_neighbors: int | None = None,
        seed: int = 0,
    ):
        self.project, self.store, self.category, self.user = project, project.store, category, user
        self.store.category_id(category)  # unknown category -> clear error now
        self.strategy_name = strategy if isinstance(strategy, str) else strategy.label
        self.strategy = make_strategy(strategy, pool_neighbors=pool_neighbors)
        self.limits = limits
        self.seed = seed

    # -- query ---------------------------------------------------------------------------
    def skipped(self) -> list[int]:
        """The images this person skipped for this category (any session, app or CLI)."""
        return self.store.skipped(self.category, self.user)

    def query(self, n: int) -> list[Candidate]:
        """The next ``n`` images to review: never labeled (by anyone), never skipped by this person."""
        labels = self.store.labels(self.category)
        ids, scores, embeddings = self.project.ranking_inputs(self.category)
        ctx = RankContext(
            ids=ids,
            scores=scores,
            embeddings=embeddings,
            positive_ids=[i for i, v in labels.items() if v == "positive"],
            negative_ids=[i for i, v in labels.items() if v == "negative"],
            reviewed_ids=self.skipped(),
            validation_ids=self.project.validation_sample(self.category)["ids"] if self.strategy.uses_validation_sample else (),
            seed=self.seed,
            features=getattr(self.project, "features", None),
            category=self.category,
        )
        chosen = self.strategy.query(ctx, n).tolist()
        paths = self.store.image_paths(chosen)
        reasons = dict(zip(chosen, self.strategy.reasons(chosen), strict=True))
        by_id = dict(zip(ids.tolist(), scores.tolist(), strict=True)) if scores is not None else {}  # none before a model
        return [
            Candidate(i, paths[i], by_id.get(i), "score" if i in by_id else None, reasons[i]) for i in chosen if i in paths
        ]

    def shares(self) -> dict[str, float]:
        """The share of the latest queue each part of the strategy's mixture was meant to fill."""
        return self.strategy.shares()

    # -- teach ---------------------------------------------------------------------------
    def decide(self, image_id: int, value: str) -> Decision:
        """Record this person's decision (durable on return); says whose label it replaced, if someone else's."""
        return self.decide_many([image_id], value)[0]

    def decide_many(self, image_ids: Sequence[int], value: str, source: str = "review") -> list[Decision]:
        """:meth:`decide` for several images at once (one transaction); ``source="user"`` for a
        label given outside review (the Find page), which counts toward retraining all the same."""
        labels, authors = self.store.labels(self.category), self.store.label_authors(self.category)
        out = []
        for i in map(int, image_ids):
            other = i in labels and authors.get(i) != self.user
            out.append(Decision(i, value, labels[i] if other else None, authors[i] if other else None))
        self.project.label(self.category, [d.image_id for d in out], value, source=source, author=self.user)
        return out

    def skip(self, image_id: int) -> None:
        """Never show this image to this person for this category again (others still see it)."""
        self.store.add_skips(self.category, self.user, [int(image_id)])

    def undo(self) -> LabelEvent | None:
        """Undo this person's latest decision (None: nothing to undo); raises
        :class:`bgminer.store.UndoConflict` when someone else changed that image since."""
        return self.project.undo(self.category, author=self.user)

    # -- retrain -------------------------------------------------------------------------
    def retrain_if_due(self, runner: JobRunner | None = None, config: TrainConfig | None = None) -> Retrain:
        """Start a round once ``project.auto_retrain_after`` labels (0: never) arrived since the
        active model and no round is running; a limit's refusal is returned, not raised."""
        every = self.project.auto_retrain_after
        fresh = labels_since_model(self.project, self.category)
        if every <= 0 or fresh is None or fresh < every:
            return Retrain(due=False)
        if any(j.kind == "train" for j in self.store.jobs(limit=50, active_only=True)):
            return Retrain(due=True, refused="a training round is already running")
        try:
            started = self.train(config, runner)
        except JobLimitError as exc:
            return Retrain(due=True, refused=str(exc))
        return Retrain(due=True, job_id=started) if isinstance(started, int) else Retrain(due=True, model=started)

    def train(self, config: TrainConfig | None = None, runner: JobRunner | None = None) -> int | ModelRecord:
        """One round within this loop's caps: a background job on ``runner`` (returns its id),
        or inline when ``runner`` is None (returns the new version). JobLimitError when refused."""
        config = config or TrainConfig()
        check_training_allowed(config, self.limits)
        if runner is None:
            return self.project.train(self.category, config)
        category = self.category

        def work(progress, cancel) -> dict[str, Any]:
            record = self.project.train(category, config, progress=progress, cancel=cancel)
            return {"model_id": record.id, "state": record.state}

        return runner.start("train", work, {"category": category, "config": asdict(config)})
