"""A round: train the model for the labeled categories (warm-started where the mode allows),
re-score the corpus into the new version's folder, make it active, and build its index on a
background thread (:meth:`bgminer.search.Finder.build_in_background`; search uses the previous
index until it is ready); and re-scoring the
active version after more images were embedded. The optimisation itself is :mod:`bgminer.train`.

:class:`bgminer.project.Project` offers these as ``train`` and ``rescore``; torch loads only
when a round runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from .evaluate import average_precision
from .modes import get_mode
from .progress import Cancelled, CancelToken, ProgressFn

if TYPE_CHECKING:
    from .project import Project
    from .records import ModelRecord
    from .train import TrainConfig


def train_round(
    project: Project,
    categories: str | Sequence[str] | None = None,
    config: TrainConfig | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ModelRecord:
    """One round: train (warm-started in the modes that do), re-score the corpus, activate the new
    version, then start building its index in the background (returns without waiting for it;
    ``project.finder.wait()`` does).

    Trains every category with a positive label unless ``categories`` narrows it. The new
    version becomes active only once its checkpoint and scores are on disk; a failed or cancelled
    round leaves the previous version active. ``metrics`` records ``fit_seconds`` and
    ``score_seconds``, the two phases before activation.
    """
    from .model import build_model, grow_categories, save_checkpoint
    from .scoring import rescore_version
    from .train import TrainConfig, build_training_set, train

    config = config or TrainConfig()
    counts = project.store.label_counts()
    if categories is None:
        cats = [c for c, n in counts.items() if n["positive"] > 0]
    else:
        cats = [categories] if isinstance(categories, str) else list(categories)
        for c in cats:
            project.store.category_id(c)  # unknown category -> clear error
    if not cats or not any(counts[c]["positive"] for c in cats):
        raise ValueError("label at least one positive image before training")
    config = config.resolved(min(counts[c]["positive"] for c in cats))  # mode="auto" picks this round's mode
    ids = np.asarray(project.store.image_ids(embedded=True), dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("no embedded images yet: ingest and embed a corpus first")

    spec = get_mode(config.mode)
    parent = source = None
    if config.warm_start:
        cat_ids = {project.store.category_id(c) for c in cats}
        ready = [m for m in project.store.models() if m.state == "ready" and set(m.category_ids) <= cat_ids]
        parent = next((m for m in ready if m.mode == config.mode), None)
        if parent is None and spec.warm_from is not None:  # e.g. full mode's first round starts from last-stage
            source = next((m for m in ready if m.mode == spec.warm_from[0]), None)
    if parent is not None:
        model = project.load_model(parent.id)
        cats = list(model.categories) + [c for c in cats if c not in model.categories]
        if cats != list(model.categories):
            model = grow_categories(model, cats)
    else:
        model = build_model(config.mode, project.backbone, cats, fixed_background_logit=config.fixed_background_logit)
        if source is not None:
            model = spec.warm_from[1](model, project.load_model(source.id))
            parent = source
    model_id = project.store.add_model(cats, config.mode, asdict(config), parent.id if parent else None)
    started = time.perf_counter()
    try:
        inputs = spec.inputs(project)
        labels = {k: project.store.labels(c) for k, c in enumerate(cats)}
        training_set = build_training_set(inputs, labels, ids, project.features.open("logits"), config)

        def record_losses(epochs) -> None:  # live loss curve for the Train page
            project.store.update_model(model_id, losses=[asdict(e) for e in epochs])

        result = train(model, training_set, config, progress=progress, cancel=cancel, on_epoch=record_losses)
        checkpoint = save_checkpoint(result.model, project.models_dir / f"v{model_id:04d}.pt", extra={"model_id": model_id})
        fitted = time.perf_counter()
        version = rescore_version(result.model, inputs, ids, project.scores_dir, model_id, device=config.device, cancel=cancel)
        metrics = _training_metrics(labels, ids, version.scores, cats, result)
        metrics["fit_seconds"] = fitted - started
        metrics["score_seconds"] = time.perf_counter() - fitted
    except Cancelled:
        project.store.update_model(model_id, state="cancelled", train_seconds=time.perf_counter() - started)
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        project.store.update_model(model_id, state="failed", error=error, train_seconds=time.perf_counter() - started)
        raise
    project.store.update_model(
        model_id,
        state="ready",
        checkpoint=str(checkpoint.relative_to(project.root)),
        losses=[asdict(e) for e in result.epochs],
        label_counts={c: counts[c] for c in cats if c in counts},
        metrics=metrics,
        train_seconds=time.perf_counter() - started,
    )
    project.finder.build_in_background(model_id)  # the queue re-ranks now; search swaps indexes when ready
    return project.store.model(model_id)


def rescore_active(
    project: Project,
    engine: str = "local",
    ray_config: Any = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ModelRecord:
    """Re-score every embedded image with the active model and rebuild its index in the background (after embedding more images).

    Streams chunk by chunk into the version's memory-mapped folder, in process or on Ray
    (``engine="ray"``, ``ray_config`` a :class:`bgminer.ray_engine.RayConfig`); the version's
    old scores and index keep serving until the new ones are complete.
    """
    from .scoring import rescore_version

    record = project.store.active_model()
    if record is None:
        raise ValueError("no trained model yet: label a few positives and train first")
    model = project.load_model(record.id)
    ids = np.asarray(project.store.image_ids(embedded=True), dtype=np.int64)
    rescore_version(
        model, get_mode(model.mode).inputs(project), ids, project.scores_dir, record.id,
        engine=engine, ray_config=ray_config, device=device, progress=progress, cancel=cancel,
    )
    project.finder.build_in_background(record.id)  # the old index keeps serving until the new one is saved
    return record


def _training_metrics(
    labels: dict[int, dict[int, str]], ids: np.ndarray, scores: np.ndarray, cats: list[str], result
) -> dict[str, Any]:
    """In-sample AP on the labeled images (optimistic; a sanity signal, not a test score)."""
    position = {int(i): k for k, i in enumerate(ids)}
    metrics: dict[str, Any] = {"steps": result.steps, "device": result.device}
    for k, c in enumerate(cats):
        rows = [(position[i], v == "positive") for i, v in labels[k].items() if i in position]
        if rows and any(y for _, y in rows) and not all(y for _, y in rows):
            metrics[f"train_ap/{c}"] = float(average_precision(np.array([y for _, y in rows]), scores[[r for r, _ in rows], k]))
    return metrics
