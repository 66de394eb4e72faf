"""Export: download the trained classifier with its metadata, the labels CSV and the scores CSV,
and see how to use the model outside the app."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.packaging import export_model
from bgminer.tables import write_labels_csv, write_scores

project = common.require_project()
category = common.require_category(project)
model = project.active_model(category)
slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in category)
folder = f"bgminer-{slug}-v{model.id}" if model is not None else ""


def model_zip() -> bytes:
    """The export folder (model.ts, metadata.json, state_dict.pt) as one zip, built on click."""
    with tempfile.TemporaryDirectory() as tmp:
        result = export_model(project, category, Path(tmp) / folder)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in (result.model, result.metadata, result.state_dict):
                zf.write(path, f"{folder}/{path.name}")
        return buf.getvalue()


def labels_csv() -> bytes:
    buf = io.StringIO()
    write_labels_csv(project, buf)
    return buf.getvalue().encode("utf-8")


def scores_csv() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.csv"
        write_scores(project, path, format="csv")
        return path.read_bytes()


st.header(f"Export · {md_escape(category)}", anchor=False)
counts = common.label_counts(project, category)
cols = st.columns(3)
cols[0].metric("Positives", counts["positive"])
cols[1].metric("Negatives", counts["negative"])
cols[2].metric("Model", "none" if model is None else f"v{model.id} · {model.mode}")

if not common.is_admin():
    st.caption(f"Exporting the model, labels and scores is for admins ({code('BGMINER_ADMINS')}).")
    st.stop()

st.subheader("Classifier", anchor=False)
if model is None:
    st.info(
        f"No trained model for **{md_escape(category)}** yet. Train one on the Train page to export it.",
        icon=":material/model_training:",
    )
    st.page_link(common.PAGES["train"], label="Go to Train", icon=":material/arrow_forward:")
else:
    st.download_button(
        f"Download model v{model.id} (.zip)",
        data=model_zip,
        file_name=f"{folder}.zip",
        mime="application/zip",
        icon=":material/deployed_code:",
        type="primary",
        on_click="ignore",
        key="export-model",
    )
    st.caption(
        "One TorchScript file (`model.ts`: preprocessing + network, uint8 images of any size in, "
        f"probabilities for {', '.join(md_escape(c) for c in model.categories)} out), "
        "its `metadata.json` (labels, config, metrics) "
        "and the plain `state_dict.pt`."
    )
    st.code(
        f"""# With bgminer installed (same decoding as the app, whole folders at once):
from bgminer.packaging import predict
for path, scores in predict({folder!r}, ["new-photos/"]):
    print(path, scores[{category!r}])

# With torch alone: model.ts takes uint8 RGB tensors [3, H, W] of any size
# (composite transparent images onto white first, as the app does).
import torch
from torchvision.io import ImageReadMode, read_image
model = torch.jit.load({folder + "/model.ts"!r})
probs = model([read_image("photo.jpg", ImageReadMode.RGB)])   # [1, {len(model.categories)}], columns = model.categories""",
        language="python",
    )
    st.caption(f"The command line does the same: {code(f'bgminer predict {folder} new-photos/ --json')}.")

st.subheader("Labels and scores", anchor=False)
labeled = sum(sum(n.values()) for n in project.label_counts().values())
with st.container(horizontal=True):
    st.download_button(
        "Labels CSV",
        data=labels_csv,
        file_name="labels.csv",
        mime="text/csv",
        icon=":material/table:",
        on_click="ignore",
        key="export-labels",
        disabled=labeled == 0,
    )
    st.download_button(
        "Scores CSV",
        data=scores_csv,
        file_name="scores.csv",
        mime="text/csv",
        icon=":material/leaderboard:",
        on_click="ignore",
        key="export-scores",
        disabled=model is None,
    )
st.caption(
    "Labels: one row per current decision (path, category, label, source, author, time, score, sha256), every category. "
    "Scores: every image with one column per trained category."
)
