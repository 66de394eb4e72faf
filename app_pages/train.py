"""Train: start or cancel a background-splitting training round for the active category,
watch its loss, compare model versions, and let the loop retrain itself while you review."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.loop import labels_since_model
from bgminer.modes import MODES
from bgminer.train import TrainConfig

MODE = "train_mode"
AUX_WEIGHT = "train_aux_weight"
EPOCHS = "train_epochs"
AUTO = "train_auto_retrain"
AUTO_EVERY = "train_auto_every"

project = common.require_project()
common.require_images(project)
category = common.require_category(project)

st.header(f"Train · {md_escape(category)}", anchor=False)
admin = common.is_admin()
counts = common.label_counts(project, category)
model = project.active_model(category)
fresh = labels_since_model(project, category)
cols = st.columns(4)
cols[0].metric("Positives", counts["positive"])
cols[1].metric("Negatives", counts["negative"])
cols[2].metric("Model", "none" if model is None else f"v{model.id}")
cols[3].metric("New labels since model", "–" if fresh is None else fresh)

if counts["positive"] == 0:
    st.info(
        f"No positives for **{md_escape(category)}** yet. Label a few on the Find page, then train.",
        icon=":material/thumb_up:",
    )
    st.page_link(common.PAGES["find"], label="Go to Find", icon=":material/arrow_forward:")

config = TrainConfig()  # a non-admin's round: the defaults (start_training holds it to the caps)
if not admin:
    st.caption(f"Training uses the default settings; choosing the mode and epochs is for admins ({code('BGMINER_ADMINS')}).")
else:
    with st.expander("Advanced", icon=":material/tune:"):
        mode = st.selectbox("Mode", list(MODES), key=MODE, format_func=lambda m: f"{m} — {MODES[m].help}")
        defaults = TrainConfig(mode=mode)
        left, right = st.columns(2)
        aux_weight = left.number_input(
            "Auxiliary loss weight",
            min_value=0.0,
            max_value=10.0,
            value=defaults.aux_weight,
            step=0.01,
            key=AUX_WEIGHT,
            help="Weight of the ImageNet pseudo-label loss that splits the background. "
            "Default 0.04 (measured best on clip art; the paper used 0.1).",
        )
        epochs = right.number_input(
            "Epochs", min_value=1, max_value=200, value=int(defaults.epochs), step=1, key=f"{EPOCHS}-{mode}"
        )
        config = TrainConfig(mode=mode, aux_weight=float(aux_weight), epochs=int(epochs))

training = common.active_jobs(project, "train")


def start() -> None:
    try:
        common.start_training(project, category, config)
    except (RuntimeError, *common.BAD_INPUT) as exc:  # a job limit, or the project is busy
        st.session_state["train_error"] = str(exc)


with st.container(horizontal=True):
    st.button(
        "Train now",
        icon=":material/play_arrow:",
        type="primary",
        disabled=bool(training) or counts["positive"] == 0,
        on_click=start,
        key="train_start",
    )
    if training:
        st.button(
            "Cancel training",
            icon=":material/stop:",
            on_click=common.job_runner(project).cancel,
            args=(training[0].id,),
            disabled=training[0].cancel_requested,
            key="train_cancel",
        )
if error := st.session_state.pop("train_error", None):
    st.error(md_escape(error))


def progress_panel() -> None:
    """Progress and loss of the newest round; refreshes itself while a round runs."""
    jobs = [j for j in project.jobs(20) if j.kind == "train"]
    if not jobs:
        st.caption("No training round yet.")
        return
    job = jobs[0]
    if job.active:
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"Training #{job.id}: {md_escape(job.message or job.state)}")
    elif job.state == "failed":
        st.error(f"Training #{job.id} failed: {md_escape(job.error)}", icon=":material/error:")
    elif job.state == "cancelled":
        st.warning(f"Training #{job.id} was cancelled; the previous model stays active.")
    latest = project.models()[:1]
    if latest and latest[0].losses:
        losses = pd.DataFrame(latest[0].losses)
        losses.index = pd.RangeIndex(1, len(losses) + 1, name="epoch")
        st.caption(f"Loss per epoch · model v{latest[0].id} ({latest[0].state})")
        curves = losses.select_dtypes("number").drop(columns=["epoch"], errors="ignore")
        st.line_chart(curves, x_label="epoch", y_label="loss", height=220)


st.subheader("Progress", anchor=False)
st.fragment(run_every=1.0 if training else None)(progress_panel)()


def save_auto_retrain() -> None:
    every = int(st.session_state[AUTO_EVERY]) if st.session_state[AUTO] else 0
    project.auto_retrain_after = every


st.subheader("Keep the model fresh", anchor=False)
every = project.auto_retrain_after
left, right = st.columns([2, 3], vertical_alignment="bottom")
left.toggle(
    "Auto-retrain while I review",
    value=every > 0,
    key=AUTO,
    on_change=save_auto_retrain,
    disabled=not admin,
    help=None if admin else "A setting of the whole project: admins change it.",
)
right.number_input(
    "after this many new labels",
    min_value=1,
    max_value=1000,
    value=every or 20,
    step=5,
    key=AUTO_EVERY,
    on_change=save_auto_retrain,
    disabled=every == 0 or not admin,
)

st.subheader("Model versions", anchor=False)
models = project.models()
if not models:
    st.caption("Models appear here after the first training round.")
else:
    rows = []
    for m in models:
        row = {
            "version": f"v{m.id}",
            "categories": ", ".join(m.categories),
            "mode": m.mode,
            "state": m.state,
            "active": "✓" if model is not None and m.id == model.id else "",
            "positives": m.label_counts.get(category, {}).get("positive"),
            "negatives": m.label_counts.get(category, {}).get("negative"),
            "seconds": None if m.train_seconds is None else round(m.train_seconds, 1),
            "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created_at)),
        }
        row.update({k: v for k, v in m.metrics.items() if isinstance(v, (int, float, str))})
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
