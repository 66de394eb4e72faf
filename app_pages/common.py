"""Pieces every page shares: the settings and the signed-in person, the open project and its
job runner (cached per folder), the active category, labeling with auto-retrain,
background-job launchers and the thumbnail card.

Durable state lives in the project's store; this module only keeps UI state in
``st.session_state`` under the names in :data:`STATE_KEYS`. No ML logic here: every
decision is a call into :class:`bgminer.project.Project`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import streamlit as st
from streamlit.runtime.context import StreamlitHeaders

from app_pages.text import md_escape
from bgminer.imageio import IMAGE_SUFFIXES
from bgminer.jobs import JobRunner
from bgminer.loop import Decision, Miner
from bgminer.progress import CancelToken, ProgressFn
from bgminer.project import Project, ProjectError
from bgminer.records import JobRecord, LabelEvent
from bgminer.schema import StoreError
from bgminer.search import Candidate
from bgminer.settings import Settings, SettingsError, clean_identity, load_settings, local_user
from bgminer.strategies import DEFAULT_STRATEGY
from bgminer.train import TrainConfig

DEMO_SLUG = "demo"
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
LABEL_ICONS = {"positive": ":material/thumb_up:", "negative": ":material/thumb_down:"}
BAD_INPUT = (ProjectError, StoreError, SettingsError, ValueError, OSError)
IMAGE_TYPES = sorted(suffix[1:] for suffix in IMAGE_SUFFIXES)  # what file uploaders accept: every image suffix
VALUE_NAMES = {"score": "score", "similarity": "similarity", "class_probability": "p(class)"}  # Candidate.kind as shown


# -- settings + people --------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _load_settings(environment: tuple[tuple[str, str], ...]) -> Settings:
    return load_settings(dict(environment))


def settings() -> Settings:
    """The server's settings (``BGMINER_*`` and bgminer.toml), loaded once per environment."""
    return _load_settings(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("BGMINER_"))))


def resolve_user(config: Settings, headers: StreamlitHeaders, user_info: Mapping[str, Any]) -> str | None:
    """Who is signing this request: the OS user without sign-in, the proxy's identity header
    (proxy mode only; refused when sent twice), or the OIDC e-mail (or subject) when logged in."""
    if config.auth == "none":
        return local_user()
    if config.auth == "proxy":
        values = headers.get_all(config.auth_header)
        return clean_identity(values[0]) if len(values) == 1 else None
    if not user_info.get("is_logged_in"):
        return None
    return clean_identity(str(user_info.get("email") or user_info.get("sub") or ""))


def current_user() -> str | None:
    """The signed-in person of this session (None when sign-in is on and nobody is signed in)."""
    return resolve_user(settings(), st.context.headers, st.user.to_dict())


def is_admin() -> bool:
    """Whether the current person may add data, create projects, train freely and export."""
    return settings().is_admin(current_user())


def require_user() -> str:
    """The signed-in person, or stop the page with how to sign in."""
    user = current_user()
    if user is not None:
        return user
    config = settings()
    if config.auth == "proxy":
        st.error(
            f"Not signed in: no {md_escape(config.auth_header)} header: is the proxy in front? "
            "Open bgminer through the sign-in proxy (see docs/deploy.md).",
            icon=":material/lock:",
        )
    else:
        st.info("bgminer is shared: sign in to browse, search and label.", icon=":material/lock:")
        st.button("Sign in", icon=":material/login:", type="primary", on_click=st.login, key="sign_in")
    st.stop()


# -- project + runner ---------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def _open_project(root: str) -> Project:
    return Project(root)


@st.cache_resource(show_spinner=False)
def _job_runner(root: str) -> JobRunner:
    project = _open_project(root)
    # A new runner means no job of this app process is alive: rows still marked running
    # were left by a process that died.
    project.fail_orphaned_jobs()
    return project.job_runner()


def initial_project_root() -> str:
    """The folder shown first: ``BGMINER_PROJECT``, else the first project listed, else the demo's
    slot in the projects folder. Raises SettingsError for a folder outside ``BGMINER_PROJECTS_DIR``."""
    config = settings()
    return str(config.initial_project() or config.project_path(DEMO_SLUG))


def project_root() -> str:
    """The open project's folder (raises SettingsError when the operator's project is refused)."""
    if PROJECT_ROOT not in st.session_state:
        st.session_state[PROJECT_ROOT] = initial_project_root()
    return st.session_state[PROJECT_ROOT]


def open_project(root: str | Path) -> Project:
    """The cached :class:`Project` for a folder; raises ProjectError when it is not one and
    SettingsError when it lies outside ``BGMINER_PROJECTS_DIR``."""
    return _open_project(str(settings().check_project_folder(root)))


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
            "No project is open: pick one in the sidebar"
            + (", create one or build the demo." if is_admin() else ", or ask an admin to create one."),
            icon=":material/folder_open:",
        )
        st.stop()
    return project


def require_images(project: Project) -> None:
    if project.corpus_counts().images == 0:
        st.info(
            "This project has no images yet. Add a folder, files or a .zip on the Corpus page.",
            icon=":material/photo_library:",
        )
        st.page_link(PAGES["corpus"], label="Go to Corpus", icon=":material/arrow_forward:")
        st.stop()


def active_category(project: Project) -> str | None:
    """The sidebar's category if it still exists, else the first one (or None)."""
    categories = project.categories()
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
    counts = project.label_counts().get(category, {})
    return {"positive": int(counts.get("positive", 0)), "negative": int(counts.get("negative", 0))}


def miner(project: Project, category: str, strategy: str = DEFAULT_STRATEGY) -> Miner:
    """The current person's review loop for ``category``, held to a non-admin's training caps."""
    return Miner(project, category, _author(), strategy, limits=None if is_admin() else settings().limits)


def apply_label(project: Project, category: str, image_ids: Sequence[int], value: str, source: str = "user") -> list[Decision]:
    """Write the current person's decision (durable on return), then retrain in the background if
    the project asks for it (skipped while a limit refuses it: a later label retries). Returns
    the decisions, each saying whose label it replaced when that was someone else's."""
    loop = miner(project, category)
    decisions = loop.decide_many(image_ids, value, source=source)
    loop.retrain_if_due(job_runner(project))
    return decisions


def undo_label(project: Project, category: str) -> LabelEvent | None:
    """Undo the current person's latest decision in ``category`` (None when there is none).
    Raises :class:`bgminer.store.UndoConflict` when someone else changed that image since."""
    return miner(project, category).undo()


def _author() -> str:
    user = current_user()
    if user is None:
        raise PermissionError("sign in first: decisions are recorded with who made them")
    return user


# -- background jobs ----------------------------------------------------------------------
def active_jobs(project: Project, kind: str | None = None) -> list[JobRecord]:
    return [j for j in project.jobs(50, active_only=True) if kind is None or j.kind == kind]


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


def start_training(project: Project, category: str, config: TrainConfig | None = None) -> int:
    """One training round as a background job, within the caps on what a non-admin may start
    (:class:`bgminer.jobs.JobLimitError` when refused)."""
    return miner(project, category).train(config, runner=job_runner(project))


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
def value_text(candidate: Candidate, digits: int = 2) -> str:
    """What put ``candidate`` on screen, named: "score 0.93", "similarity 0.81", "p(class) 0.40"; "" when nothing did."""
    if candidate.value is None or candidate.kind is None:
        return ""
    return f"{VALUE_NAMES[candidate.kind]} {candidate.value:.{digits}f}"


def thumbnail_card(
    project: Project,
    category: str | None,
    image_id: int,
    caption: str,
    current: str | None,
    key: str,
    on_more_like_this: Callable[[int], None] | None = None,
    labeled_by: str | None = None,
) -> None:
    """One grid cell: square thumbnail, caption (with who labeled it, when that was someone
    else: ``labeled_by``), and positive / negative / more-like-this buttons."""
    with st.container(border=True, key=f"card-{key}-{image_id}"):
        st.image(str(project.thumbnail(image_id)), width="stretch")
        badge = {"positive": " · :green[positive]", "negative": " · :red[negative]"}.get(current or "", "")
        by = f"  \nby {md_escape(labeled_by)}" if badge and labeled_by else ""  # a second line: whose label it is
        st.caption(f"{caption}{badge}{by}")
        if category is None and on_more_like_this is None:
            return
        with st.container(horizontal=True, gap="small"):
            if category is not None:
                for value, icon in LABEL_ICONS.items():
                    st.button(
                        "",
                        icon=icon,
                        key=f"{key}-{value}-{image_id}",
                        help=f"Label {value} for {md_escape(category)}",
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
    """A grid of :func:`thumbnail_card` for ``(image_id, caption)`` pairs; a label someone else
    made shows who made it."""
    labels = project.labels(category) if category is not None else {}
    me = current_user()
    others = {i: a for i, a in project.label_authors(category).items() if a != me} if category is not None else {}
    with st.container(key=f"grid-{key}"):
        for start in range(0, len(items), columns):
            cells = st.columns(columns)
            row = items[start : start + columns]
            for cell, (image_id, caption) in zip(cells[: len(row)], row, strict=True):
                with cell:
                    current, by = labels.get(image_id), others.get(image_id)
                    thumbnail_card(project, category, image_id, caption, current, key, on_more_like_this, by)
