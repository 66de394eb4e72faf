"""Pieces every page shares: the open project and its job runner (cached per folder), the
active category, labeling with auto-retrain, background-job launchers and the thumbnail card.

Durable state lives in the project's store; this module only keeps UI state in
``st.session_state`` under the names in :data:`STATE_KEYS`. No ML logic here: every
decision is a call into :class:`bgminer.project.Project`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from bgminer.jobs import JobRunner
from bgminer.progress import CancelToken, ProgressFn
from bgminer.project import Project, ProjectError
from bgminer.store import JobRecord, StoreError

DEFAULT_PROJECT = "projects/demo"
PAGES = {
    "corpus": "app_pages/corpus.py",
    "find": "app_pages/find.py",
    "train": "app_pages/train.py",
    "review": "app_pages/review.py",
    "export": "app_pages/export.py",
}
# Session-state names (UI state only; everything durable is in the store).
PROJECT_ROOT = "project_root"  # folder of the open project
CATEGORY = "category"  # active category (the sidebar selectbox writes it)
STATE_KEYS = (PROJECT_ROOT, CATEGORY)
AUTO_RETRAIN_META = "ui.auto_retrain_after"  # store meta: retrain after this many new labels (0 = off)
LABEL_ICONS = {"positive": ":material/thumb_up:", "negative": ":material/thumb_down:"}
BAD_INPUT = (ProjectError, StoreError, ValueError, OSError)


# -- project + runner ---------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _open_project(root: str) -> Project:
    return Project(root)


@st.cache_resource(show_spinner=False)
def _job_runner(root: str) -> JobRunner:
    project = _open_project(root)
    # A new runner means no job of this app process is alive: rows still marked running
    # were left by a process that died.
    project.store.fail_orphaned_jobs()
    return JobRunner(project.store)


def initial_project_root() -> str:
    return os.environ.get("BGMINER_PROJECT") or DEFAULT_PROJECT


def project_root() -> str:
    return st.session_state.setdefault(PROJECT_ROOT, initial_project_root())


def open_project(root: str | Path) -> Project:
    """The cached :class:`Project` for a folder; raises ProjectError when it is not one."""
    return _open_project(str(Path(root).expanduser().resolve()))


def current_project() -> Project | None:
    try:
        return open_project(project_root())
    except BAD_INPUT:
        return None


def job_runner(project: Project) -> JobRunner:
    return _job_runner(str(project.root))


def require_project() -> Project:
    """The open project, or stop the page with a pointer to the sidebar."""
    project = current_project()
    if project is None:
        st.info(
            f"No project is open. `{project_root()}` is not a bgminer project yet: "
            "create it, build the demo, or open another folder in the sidebar.",
            icon=":material/folder_open:",
        )
        st.stop()
    return project


def require_images(project: Project) -> None:
    if project.store.image_count("ok") == 0:
        st.info("This project has no images yet. Add a folder, files or a .zip on the Corpus page.", icon=":material/photo_library:")
        st.page_link(PAGES["corpus"], label="Go to Corpus", icon=":material/arrow_forward:")
        st.stop()


def active_category(project: Project) -> str | None:
    """The sidebar's category if it still exists, else the first one (or None)."""
    categories = project.store.categories()
    current = st.session_state.get(CATEGORY)
    if current in categories:
        return current
    return categories[0] if categories else None


def require_category(project: Project) -> str:
    category = active_category(project)
    if category is None:
        st.info("No category yet. Create one (for example `zebra`) on the Find page.", icon=":material/label:")
        st.page_link(PAGES["find"], label="Go to Find", icon=":material/arrow_forward:")
        st.stop()
    return category


def set_category(name: str) -> None:
    """Make ``name`` the active category (call from a widget callback)."""
    st.session_state[CATEGORY] = name


# -- labels -------------------------------------------------------------------------------
def label_counts(project: Project, category: str) -> dict[str, int]:
    counts = project.store.label_counts().get(category, {})
    return {"positive": int(counts.get("positive", 0)), "negative": int(counts.get("negative", 0))}


def auto_retrain_after(project: Project) -> int:
    return int(project.store.get_meta(AUTO_RETRAIN_META, "0") or 0)


def labels_since_model(project: Project, category: str) -> int | None:
    """Labels of ``category`` added since its active model was trained (None without a model)."""
    model = project.store.active_model(category)
    if model is None:
        return None
    then = model.label_counts.get(category, {})
    now = label_counts(project, category)
    return max(0, sum(now.values()) - int(then.get("positive", 0)) - int(then.get("negative", 0)))


def apply_label(project: Project, category: str, image_ids: Sequence[int], value: str, source: str = "user") -> None:
    """Write a decision (durable on return), then retrain in the background if the user asked for it."""
    project.label(category, list(image_ids), value, source=source)
    every = auto_retrain_after(project)
    fresh = labels_since_model(project, category)
    if every > 0 and fresh is not None and fresh >= every and not active_jobs(project, "train"):
        start_training(project, category)


def undo_label(project: Project, category: str):
    return project.undo(category)


# -- background jobs ----------------------------------------------------------------------
def active_jobs(project: Project, kind: str | None = None) -> list[JobRecord]:
    return [j for j in project.store.jobs(limit=50, active_only=True) if kind is None or j.kind == kind]


def _staged(progress: ProgressFn, stage: int, stages: int, label: str) -> ProgressFn:
    """Map one stage's progress into its slice of a multi-stage job's bar."""

    def report(done: int, total: int, message: str = "") -> None:
        total = max(total, 1)
        progress(stage * total + min(done, total), stages * total, f"{label}: {message or f'{done}/{total}'}")

    return report


def start_ingest(project: Project, sources: Sequence[str | Path]) -> int:
    """Ingest then embed ``sources`` as one background job."""
    sources = [str(s) for s in sources]

    def work(progress: ProgressFn, cancel: CancelToken) -> dict[str, Any]:
        ingested = project.ingest(sources, progress=_staged(progress, 0, 2, "ingest"), cancel=cancel)
        embedded = project.embed(progress=_staged(progress, 1, 2, "embed"), cancel=cancel)
        return {
            "added": ingested.added,
            "duplicates": ingested.duplicates,
            "rejected": ingested.rejected,
            "embedded": embedded.embedded,
        }

    return job_runner(project).start("ingest", work, {"sources": sources})


def start_training(project: Project, category: str, config: Any = None) -> int:
    from dataclasses import asdict

    def work(progress: ProgressFn, cancel: CancelToken) -> Any:
        record = project.train(category, config, progress=progress, cancel=cancel)
        return {"model_id": record.id, "state": record.state}

    params = {"category": category, "config": asdict(config) if config is not None else None}
    return job_runner(project).start("train", work, params)


def eta_seconds(job: JobRecord, now: float | None = None) -> float | None:
    """Remaining seconds from elapsed time and progress (None until there is progress)."""
    if job.started_at is None or job.progress <= 0.01 or job.progress >= 1:
        return None
    elapsed = (now or time.time()) - job.started_at
    return elapsed * (1 - job.progress) / job.progress


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


# -- thumbnails ---------------------------------------------------------------------------
def thumbnail_card(
    project: Project,
    category: str | None,
    image_id: int,
    caption: str,
    current: str | None,
    key: str,
    on_more_like_this: Callable[[int], None] | None = None,
) -> None:
    """One grid cell: square thumbnail, caption, and positive / negative / more-like-this buttons."""
    with st.container(border=True, key=f"card-{key}-{image_id}"):
        st.image(str(project.thumbnail(image_id)), width="stretch")
        badge = {"positive": " · :green[positive]", "negative": " · :red[negative]"}.get(current or "", "")
        st.caption(f"{caption}{badge}")
        if category is None and on_more_like_this is None:
            return
        with st.container(horizontal=True, gap="small"):
            if category is not None:
                for value, icon in LABEL_ICONS.items():
                    st.button(
                        "",
                        icon=icon,
                        key=f"{key}-{value}-{image_id}",
                        help=f"Label {value} for {category}",
                        type="primary" if current == value else "secondary",
                        on_click=apply_label,
                        args=(project, category, [image_id], "cleared" if current == value else value),
                    )
            if on_more_like_this is not None:
                st.button(
                    "",
                    icon=":material/image_search:",
                    key=f"{key}-like-{image_id}",
                    help="More like this",
                    on_click=on_more_like_this,
                    args=(image_id,),
                )


def thumbnail_grid(
    project: Project,
    category: str | None,
    items: Sequence[tuple[int, str]],
    key: str,
    columns: int = 6,
    on_more_like_this: Callable[[int], None] | None = None,
) -> None:
    """A grid of :func:`thumbnail_card` for ``(image_id, caption)`` pairs."""
    labels = project.store.labels(category) if category is not None else {}
    with st.container(key=f"grid-{key}"):
        for start in range(0, len(items), columns):
            cells = st.columns(columns)
            for cell, (image_id, caption) in zip(cells, items[start : start + columns]):
                with cell:
                    thumbnail_card(project, category, image_id, caption, labels.get(image_id), key, on_more_like_this)
