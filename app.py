"""bgminer web app entry: refuses to serve where it would be unsafe, signs the visitor in, then
navigation over the five task pages and the shared sidebar (who you are, project picker,
active category, active model version, live job panel).

Run with ``streamlit run app.py``; settings come from ``BGMINER_*`` variables or bgminer.toml
(see docs/deploy.md). ``BGMINER_PROJECT`` (a project name or folder) preselects a project.
"""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.demo import build_demo_project
from bgminer.project import Project
from bgminer.settings import Settings, SettingsError, serving_problem

STYLE = Path(__file__).parent / "assets" / "style.css"
ACTIVE_JOB_IDS = "jobs_active_ids"  # session: jobs seen running at the last panel refresh
PROJECT_SELECT = "project_select"
NEW_PROJECT = "project_new_slug"
NEW_BACKBONE = "project_new_backbone"
# What each offline backbone buys and costs (docs/quality.md protocol C, docs/benchmarks.md);
# resnet50 needs a weights file on the server, so it is created from the CLI only.
BACKBONE_CHOICES = {
    "efficientnet_lite0": "Lite0 · fastest",
    "efficientnet_lite1": "Lite1",
    "efficientnet_lite2": "Lite2 · varied classes",
}
BACKBONE_HELP = (
    "The pretrained EfficientNet that embeds every image, fixed for the project's life. Lite2 finds more of a "
    "rare class that comes in several styles (drawings, photos, icons) but embeds about 2x slower than Lite0."
)

st.set_page_config(page_title="bgminer", page_icon="🔎", layout="wide")
try:
    settings = common.settings()
except SettingsError as exc:
    st.error(md_escape(exc), icon=":material/error:")
    st.stop()
if problem := serving_problem(st.get_option("server.address"), settings):
    st.error(problem, icon=":material/gpp_bad:")
    st.stop()
if STYLE.exists():
    st.html(f"<style>{STYLE.read_text()}</style>")
user = common.require_user()

navigation = st.navigation(
    [
        st.Page(common.PAGES["corpus"], title="Corpus", icon=":material/photo_library:", default=True),
        st.Page(common.PAGES["find"], title="Find", icon=":material/search:"),
        st.Page(common.PAGES["train"], title="Train", icon=":material/model_training:"),
        st.Page(common.PAGES["review"], title="Review", icon=":material/fact_check:"),
        st.Page("app_pages/map.py", title="Map", icon=":material/scatter_plot:"),
        st.Page(common.PAGES["export"], title="Export", icon=":material/download:"),
    ]
)


def _open(root: str) -> None:
    st.session_state[common.PROJECT_ROOT] = root
    st.session_state.pop(common.CATEGORY, None)
    st.session_state.pop(ACTIVE_JOB_IDS, None)


def _on_select() -> None:
    _open(st.session_state[PROJECT_SELECT])


def _on_create() -> None:
    """Create the project named in the slug box (admins only) and open it."""
    slug = st.session_state.get(NEW_PROJECT, "").strip()
    try:
        if not common.is_admin():
            raise PermissionError("only an admin may create projects")
        root = settings.project_path(slug)
        backbone = st.session_state.get(NEW_BACKBONE) or "efficientnet_lite0"
        if backbone not in BACKBONE_CHOICES:
            raise ValueError(f"unknown backbone {backbone!r}")
        Project.create(root, backbone=backbone)
    except common.BAD_INPUT as exc:
        st.session_state["project_error"] = f"Could not create project {code(slug)}: {md_escape(exc)}"
        return
    st.session_state[NEW_PROJECT] = ""
    _open(str(root))


def _on_build_demo(root: str) -> None:
    if not common.is_admin():
        st.session_state["project_error"] = "Only an admin may build the demo project."
        return
    def build(progress, cancel) -> dict:
        return build_demo_project(root, progress=progress).info()

    try:
        project = common.open_project(Project.create(root).root)
        common.job_runner(project).start("demo", build, {})
    except (*common.BAD_INPUT, RuntimeError) as exc:
        st.session_state["project_error"] = f"Could not build the demo: {md_escape(exc)}"


def project_name(config: Settings, root: str) -> str:
    """How the picker shows a project: its name inside the projects folder, else its name and folder."""
    path = Path(root)
    return path.name if path.parent == config.projects_root else f"{path.name} ({path.parent})"


def project_picker(config: Settings, admin: bool) -> Project | None:
    """Pick among the projects in the projects folder (plus the operator's ``BGMINER_PROJECT``);
    admins create new ones by name. The browser never names a folder."""
    try:
        root = common.project_root()
    except SettingsError as exc:
        st.error(md_escape(exc), icon=":material/folder_off:")
        return None
    listed = [str(config.project_path(slug)) for slug in config.list_projects()]
    st.session_state[PROJECT_SELECT] = root
    st.selectbox(
        "Project",
        listed if root in listed else [root, *listed],
        key=PROJECT_SELECT,
        format_func=lambda r: project_name(config, r),
        on_change=_on_select,
        help=f"The projects in {config.projects_root}",
    )
    if admin:
        with st.expander("New project", icon=":material/create_new_folder:"):
            st.text_input("Name", key=NEW_PROJECT, placeholder="birds-2026", help="Lower-case letters, digits and dashes.")
            st.selectbox(
                "Backbone",
                list(BACKBONE_CHOICES),
                key=NEW_BACKBONE,
                format_func=BACKBONE_CHOICES.__getitem__,
                help=BACKBONE_HELP,
            )
            st.button("Create", icon=":material/add:", on_click=_on_create, key="project_create")
    if error := st.session_state.pop("project_error", None):
        st.error(error)
    project = common.current_project()
    if project is None:
        st.warning(f"{code(project_name(config, root))} is not a bgminer project yet.", icon=":material/folder_off:")
        if admin:
            st.button(
                "Build the demo project here",
                icon=":material/auto_awesome:",
                key="project_build_demo",
                on_click=_on_build_demo,
                args=(root,),
                help="Creates the project and ingests + embeds the bundled demo images (a background job).",
            )
        else:
            st.caption("Ask an admin to create a project.")
    return project


def identity(config: Settings, user: str, admin: bool) -> None:
    """Who the decisions of this session are recorded as."""
    role = " (admin)" if admin else ""
    if not config.signed_in:
        st.caption(f"Local user {md_escape(user)}{role} · no sign-in, this machine only")
        return
    with st.container(horizontal=True, vertical_alignment="center", key="signed-in"):
        st.caption(f"Signed in as {md_escape(user)}{role}")
        if config.auth == "oidc":
            st.button("Sign out", icon=":material/logout:", type="tertiary", on_click=st.logout, key="sign_out")


def category_picker(project: Project) -> None:
    categories = project.categories()
    if not categories:
        st.caption("No categories yet: create one on the Find page.")
        return
    st.session_state[common.CATEGORY] = common.active_category(project)
    st.selectbox("Active category", categories, key=common.CATEGORY)


def model_badge(project: Project) -> None:
    category = common.active_category(project)
    model = project.active_model(category) if category else None
    if model is None:
        st.caption("Model: none yet (train one on the Train page)")
        return
    age = common.format_seconds(time.time() - model.created_at)
    st.caption(f"Model **v{model.id}** · {model.mode} · trained {age} ago")


def job_panel(project: Project) -> None:
    """Running jobs with progress, ETA and cancel; the last finished job; reruns the page when a job ends."""
    jobs = project.jobs(10)
    active = [j for j in jobs if j.active]
    seen = st.session_state.get(ACTIVE_JOB_IDS, set())
    now_active = {j.id for j in active}
    st.session_state[ACTIVE_JOB_IDS] = now_active
    if seen - now_active:
        st.rerun()  # a job finished: refresh the page's counts, tables and the panel's pace
    st.markdown("**Jobs**")
    for job in active:
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"{job.kind} #{job.id}: {md_escape(job.message or job.state)}")
        eta = common.eta_seconds(job)
        with st.container(horizontal=True, vertical_alignment="center"):
            st.caption(f"ETA {common.format_seconds(eta)}" if eta is not None else "starting…")
            st.button(
                "Cancel",
                key=f"job-cancel-{job.id}",
                icon=":material/cancel:",
                type="tertiary",
                disabled=job.cancel_requested or not common.is_admin(),
                help=None if common.is_admin() else "Only an admin may cancel jobs.",
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
            st.error(f"{text}: {md_escape(last.error)}", icon=":material/error:")
        elif last.state == "cancelled":
            st.caption(f":orange[{text}]")
        else:
            st.caption(f":green[{text}]")


with st.sidebar:
    st.title("bgminer", anchor=False)
    admin = settings.is_admin(user)
    identity(settings, user, admin)
    project = project_picker(settings, admin)
    if project is not None:
        st.divider()
        category_picker(project)
        model_badge(project)
        st.divider()
        refresh = 1.0 if common.active_jobs(project) else None
        st.fragment(run_every=refresh)(job_panel)(project)

navigation.run()
