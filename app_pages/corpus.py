"""Corpus: add images (server folder, uploaded files or .zip), see counts and rejected files,
and page through the corpus as thumbnails."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.settings import MiB, OutsideDataRoots
from bgminer.uploads import save_uploads

GRID_COLUMNS = 6
GRID_ROWS = 4
FOLDER_INPUT = "corpus_folder"
UPLOADER = "corpus_upload"
GRID_PAGE = "corpus_grid_page"
REFUSALS_SHOWN = 20  # refused uploads listed one by one

project = common.require_project()
config = common.settings()

st.header("Corpus", anchor=False)
st.caption("The images bgminer searches. Files stay where they are; only uploads are copied into the project.")

corpus = project.corpus_counts()
cols = st.columns(4)
cols[0].metric("Images", f"{corpus.images:,}")
cols[1].metric("Embedded", f"{corpus.embedded:,}")
cols[2].metric("Rejected", f"{corpus.rejected:,}")
cols[3].metric("Categories", len(project.categories()))
st.caption(f"Backbone: {code(project.backbone_name)}")

running = common.active_jobs(project, "ingest")
if running:
    st.info(
        f"Adding images (job #{running[0].id}); progress is in the sidebar. New images appear here when it finishes.",
        icon=":material/hourglass_top:",
    )


def start(sources: list[str | Path]) -> None:
    try:
        job_id = common.start_ingest(project, sources)
    except (RuntimeError, *common.BAD_INPUT) as exc:  # a job limit, or the project is busy
        st.warning(md_escape(exc))
        return
    st.success(f"Started job #{job_id}: ingest + embed. Follow it in the sidebar.", icon=":material/rocket_launch:")


def folder_problem(raw: str) -> str | None:
    """Why a server-side path cannot be ingested (None when it can), as Markdown. Outside the data
    roots nothing about the path is looked at, so the answer is the same whether it exists or not."""
    try:
        path = config.check_data_source(raw)
    except OutsideDataRoots:
        roots = ", ".join(code(r) for r in config.data_roots)
        return f"{code(raw)} is outside the data roots ({roots}); only folders inside them can be added. Nothing was read."
    if not path.exists():
        return f"{code(raw)} does not exist on the server."
    if path.is_file() and path.suffix.lower() not in (".zip", ".csv"):
        return f"{code(raw)} is a file; give a folder, a .zip archive or a .csv list."
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return f"{code(raw)} is not readable by the server (permission denied)."
    return None


def add_uploads(files: list) -> None:
    """Store the uploaded files by content (zips unpacked) within the upload limits, then ingest them."""
    with st.spinner("Checking uploads…"):
        result = save_uploads(project.uploads_dir, [(f.name, f) for f in files], config.limits)
    if result.refused:
        lines = [f"- {md_escape(name)}: {md_escape(reason)}" for name, reason in result.refused[:REFUSALS_SHOWN]]
        if len(result.refused) > REFUSALS_SHOWN:
            lines.append(f"- and {len(result.refused) - REFUSALS_SHOWN:,} more")
        st.error(
            f"Refused {len(result.refused):,} of {len(files):,} files (nothing of them was kept):\n" + "\n".join(lines),
            icon=":material/block:",
        )
    if result.saved:
        start(result.saved)


if not common.is_admin():
    st.caption(f"Adding images is for admins (the people in {code('BGMINER_ADMINS')}); ask one to add a folder or upload files.")
else:
    add_folder, add_upload = st.tabs(["Server folder", "Upload files or .zip"])
    with add_folder:
        roots = f" Only folders inside the data roots ({code('BGMINER_DATA_ROOTS')}) can be added." if config.data_roots else ""
        with st.form("corpus_folder_form", border=False):
            st.text_input(
                "Folder on the server",
                key=FOLDER_INPUT,
                placeholder="/data/camera-trap/2024",
                help="Searched recursively. A .zip archive or a .csv list of paths works too." + roots,
            )
            submitted = st.form_submit_button(
                "Add folder", icon=":material/create_new_folder:", type="primary", key="corpus_add_folder"
            )
        if submitted:
            raw = st.session_state[FOLDER_INPUT].strip()
            if not raw:
                st.error("Type a folder path first.")
            elif problem := folder_problem(raw):
                st.error(problem, icon=":material/folder_off:")
            else:
                start([config.check_data_source(raw)])

    with add_upload:
        limits = config.limits
        with st.form("corpus_upload_form", border=False, clear_on_submit=True):
            files = st.file_uploader(
                "Images or .zip archives",
                type=[*common.IMAGE_TYPES, "zip"],
                accept_multiple_files=True,
                key=UPLOADER,
                max_upload_size=max(1, limits.upload_file_bytes // MiB),
                help=f"Up to {limits.upload_submit_files:,} files and {limits.upload_submit_bytes / MiB:,.0f} MB per submit.",
            )
            submitted = st.form_submit_button(
                "Add uploaded files", icon=":material/upload:", type="primary", key="corpus_add_upload"
            )
        if submitted:
            if not files:
                st.error("Choose one or more image files or a .zip archive first.")
            else:
                add_uploads(files)

st.subheader("Browse", anchor=False)
total = corpus.images
if total == 0:
    st.info(
        "No images yet. Add a server folder or upload images above; they are embedded in the background.",
        icon=":material/photo_library:",
    )
else:
    per_page = GRID_COLUMNS * GRID_ROWS
    pages = (total + per_page - 1) // per_page
    page = st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1, key=GRID_PAGE)
    rows = project.image_page(per_page, offset=(int(page) - 1) * per_page)
    items = [(r["id"], f"#{r['id']} · {r['width']}×{r['height']}") for r in rows]
    common.thumbnail_grid(project, None, items, key="corpus", columns=GRID_COLUMNS)

rejected = project.rejected_files(1000)
if rejected:
    st.subheader("Rejected files", anchor=False)
    st.caption("These files were not added. Nothing else was affected; fix them and add them again if needed.")
    st.dataframe(
        pd.DataFrame([{"file": r["path"], "reason": r["reason"], "detail": r["detail"]} for r in rejected]),
        hide_index=True,
        width="stretch",
    )
