"""Export: download the trained classifier with its metadata, the labels CSV and the scores CSV,
and see how to use the model outside the app."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

from bgminer import export
from pages import common

project = common.require_project()
category = common.require_category(project)
store = project.store
model = store.active_model(category)
slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in category)


def model_zip() -> bytes:
    """The exported model folder as one zip (built when the button is clicked)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"bgminer-{slug}-v{model.id}"
        export.export_model(project, category, out)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(out.parent))
        return buf.getvalue()


def csv_bytes(write, *args) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.csv"
        write(project, *args, path)
        return path.read_bytes()


st.header(f"Export · {category}", anchor=False)
counts = common.label_counts(project, category)
cols = st.columns(3)
cols[0].metric("Positives", counts["positive"])
cols[1].metric("Negatives", counts["negative"])
cols[2].metric("Model", "none" if model is None else f"v{model.id} · {model.mode}")

st.subheader("Classifier", anchor=False)
if model is None:
    st.info(f"No trained model for **{category}** yet. Train one on the Train page to export it.", icon=":material/model_training:")
    st.page_link(common.PAGES["train"], label="Go to Train", icon=":material/arrow_forward:")
else:
    st.download_button(
        f"Download model v{model.id} (.zip)",
        data=model_zip,
        file_name=f"bgminer-{slug}-v{model.id}.zip",
        mime="application/zip",
        icon=":material/deployed_code:",
        type="primary",
        on_click="ignore",
        key="export-model",
    )
    st.caption("A self-contained folder: weights, preprocessing, class names and metadata (labels, config, metrics).")
    st.code(
        f"""# pip install torch timm pillow   (no bgminer needed)
from bgminer_model import load          # shipped inside the zip
model = load("bgminer-{slug}-v{model.id}")
print(model.predict(["photo1.jpg", "photo2.jpg"]))   # probability of "{category}" per image""",
        language="python",
    )

st.subheader("Labels and scores", anchor=False)
with st.container(horizontal=True):
    st.download_button(
        "Labels CSV",
        data=lambda: csv_bytes(export.export_labels_csv),
        file_name="labels.csv",
        mime="text/csv",
        icon=":material/table:",
        on_click="ignore",
        key="export-labels",
        disabled=not any(common.label_counts(project, c)["positive"] + common.label_counts(project, c)["negative"] for c in store.categories()),
    )
    st.download_button(
        f"Scores CSV · {category}",
        data=lambda: csv_bytes(export.export_scores_csv, category),
        file_name=f"scores-{slug}.csv",
        mime="text/csv",
        icon=":material/leaderboard:",
        on_click="ignore",
        key="export-scores",
        disabled=model is None,
    )
st.caption("Labels: one row per current decision (image, path, category, label, source, time). Scores: the active model's score for every image.")
