"""bgminer web app entry: navigation over the five task pages and the shared sidebar
(project picker, active category, active model version, live job panel).

Run with ``streamlit run app.py`` (``BGMINER_PROJECT=folder`` preselects a project).
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from app_pages import common
from bgminer.cli import build_demo_project
from bgminer.project import Project

STYLE = Path(__file__).parent / "assets" / "style.css"
ACTIVE_JOB_IDS = "jobs_active_ids"  # session: jobs seen running at the last panel refresh
PROJECT_INPUT = "project_path_input"

st.set_page_config(page_title="bgminer", page_icon="🔎", layout="wide")
if STYLE.exists():
    st.html(f"<style>{STYLE.read_text()}</style>")

navigation = st.navigation(
    [
        st.Page(common.PAGES["corpus"], title="Corpus", icon=":material/photo_library:", default=True),
        st.Page(common.PAGES["find"], title="Find", icon=":material/search:"),
        st.Page(common.PAGES["train"], title="Train", icon=":material/model_training:"),
        st.Page(common.PAGES["review"], title="Review", icon=":material/fact_check:"),
        st.Page(common.PAGES["export"], title="Export", icon=":material/download:"),
    ]
)


def _open(root: str) -> None:
    st.session_state[common.PROJECT_ROOT] = root
    st.session_state.pop(common.CATEGORY, None)
    st.session_state.pop(ACTIVE_JOB_IDS, None)


def _on_open() -> None:
    _open(st.session_state[PROJECT_INPUT].strip())


def _on_create() -> None:
    root = st.session_state[PROJECT_INPUT].strip()
    try:
        Project.create(root)
    except common.BAD_INPUT as exc:
        st.session_state["project_error"] = f"Could not create a project in `{root}`: {exc}"
        return
    _open(root)


def _on_build_demo(root: str) -> None:
    project = common.open_project(Project.create(root).root)
    common.job_runner(project).start("demo", lambda progress, cancel: build_demo_project(project.root, progress=progress).info(), {})


def project_picker() -> Project | None:
    root = common.project_root()
    st.session_state.setdefault(PROJECT_INPUT, root)
    st.text_input("Project folder", key=PROJECT_INPUT, help="A folder on the server; each project is one folder.")
    with st.container(horizontal=True, gap="small"):
        st.button("Open", icon=":material/folder_open:", on_click=_on_open, key="project_open")
        st.button("Create new", icon=":material/create_new_folder:", on_click=_on_create, key="project_create")
    if error := st.session_state.pop("project_error", None):
        st.error(error)
    project = common.current_project()
    if project is None:
        st.warning(f"`{root}` is not a bgminer project yet.", icon=":material/folder_off:")
        st.button(
            "Build the demo project here",
            icon=":material/auto_awesome:",
            key="project_build_demo",
            on_click=_on_build_demo,
            args=(root,),
            help="Creates the project and ingests + embeds the bundled demo images (a background job).",
        )
    return project


def category_picker(project: Project) -> None:
    categories = project.store.categories()
    if not categories:
        st.caption("No categories yet: create one on the Find page.")
        return
    st.session_state[common.CATEGORY] = common.active_category(project)
    st.selectbox("Active category", categories, key=common.CATEGORY)


def model_badge(project: Project) -> None:
    category = common.active_category(project)
    model = project.store.active_model(category) if category else None
    if model is None:
        st.caption("Model: none yet (train one on the Train page)")
        return
    age = common.format_seconds(time.time() - model.created_at)
    st.caption(f"Model **v{model.id}** · {model.mode} · trained {age} ago")


def job_panel(project: Project) -> None:
    """Running jobs with progress, ETA and cancel; the last finished job; reruns the page when a job ends."""
    jobs = project.store.jobs(limit=10)
    active = [j for j in jobs if j.active]
    seen = st.session_state.get(ACTIVE_JOB_IDS, set())
    now_active = {j.id for j in active}
    st.session_state[ACTIVE_JOB_IDS] = now_active
    if seen - now_active:
        st.rerun()  # a job finished: refresh the page's counts, tables and the panel's pace
    st.markdown("**Jobs**")
    for job in active:
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"{job.kind} #{job.id}: {job.message or job.state}")
        eta = common.eta_seconds(job)
        with st.container(horizontal=True, vertical_alignment="center"):
            st.caption(f"ETA {common.format_seconds(eta)}" if eta is not None else "starting…")
            st.button(
                "Cancel",
                key=f"job-cancel-{job.id}",
                icon=":material/cancel:",
                type="tertiary",
                disabled=job.cancel_requested,
                on_click=common.job_runner(project).cancel,
                args=(job.id,),
            )
    finished = [j for j in jobs if not j.active]
    if not active and not finished:
        st.caption("No jobs yet.")
    if finished and not active:
        last = finished[0]
        text = f"{last.kind} #{last.id} {last.state}"
        if last.state == "failed":
            st.error(f"{text}: {last.error}", icon=":material/error:")
        elif last.state == "cancelled":
            st.caption(f":orange[{text}]")
        else:
            st.caption(f":green[{text}]")


with st.sidebar:
    st.title("bgminer", anchor=False)
    project = project_picker()
    if project is not None:
        st.divider()
        category_picker(project)
        model_badge(project)
        st.divider()
        refresh = 1.0 if common.active_jobs(project) else None
        st.fragment(run_every=refresh)(job_panel)(project)

navigation.run()
