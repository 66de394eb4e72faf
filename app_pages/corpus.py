"""Corpus: add images (server folder, uploaded files or .zip), see counts and rejected files,
and page through the corpus as thumbnails."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import common
from bgminer.corpus import IngestError, extract_zip
from bgminer.imageio import ImageRejected, read_image

UPLOAD_LIMIT_MB = 200
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
GRID_COLUMNS = 6
GRID_ROWS = 4
FOLDER_INPUT = "corpus_folder"
UPLOADER = "corpus_upload"
GRID_PAGE = "corpus_grid_page"

project = common.require_project()
store = project.store

st.header("Corpus", anchor=False)
st.caption("The images bgminer searches. Files stay where they are; only uploads are copied into the project.")

cols = st.columns(4)
cols[0].metric("Images", f"{store.image_count('ok'):,}")
cols[1].metric("Embedded", f"{store.embedded_count():,}")
cols[2].metric("Rejected", f"{store.image_count('rejected'):,}")
cols[3].metric("Categories", len(store.categories()))

running = common.active_jobs(project, "ingest")
if running:
    st.info(f"Adding images (job #{running[0].id}); progress is in the sidebar. New images appear here when it finishes.", icon=":material/hourglass_top:")


def start(sources: list[str | Path]) -> None:
    try:
        job_id = common.start_ingest(project, sources)
    except RuntimeError as exc:  # one ingest job at a time
        st.warning(str(exc))
        return
    st.success(f"Started job #{job_id}: ingest + embed. Follow it in the sidebar.", icon=":material/rocket_launch:")


def folder_problem(path: Path) -> str | None:
    """Why a server-side path cannot be ingested (None when it can)."""
    if not path.exists():
        return f"`{path}` does not exist on the server."
    if path.is_file() and path.suffix.lower() not in (".zip", ".csv"):
        return f"`{path}` is a file; give a folder, a .zip archive or a .csv list."
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return f"`{path}` is not readable by the server (permission denied)."
    return None


def save_upload(name: str, data: bytes, target: Path) -> Path:
    """Check one uploaded file and save it under ``target``; a .zip is unpacked (its folder is
    returned). Raises ValueError with a message for the user; nothing is kept on refusal."""
    if len(data) > UPLOAD_LIMIT_MB * 1024 * 1024:
        raise ValueError(f"{name}: {len(data) / 2**20:.0f} MB is over the {UPLOAD_LIMIT_MB} MB upload limit.")
    if not name.lower().endswith(".zip"):
        try:
            read_image(io.BytesIO(data))
        except ImageRejected as exc:
            raise ValueError(f"{name}: not a usable image ({exc}).") from exc
    target.mkdir(parents=True, exist_ok=True)
    path = target / name
    path.write_bytes(data)
    if not name.lower().endswith(".zip"):
        return path
    try:
        return extract_zip(path, project.uploads_dir)
    except IngestError as exc:
        raise ValueError(str(exc)) from exc
    finally:
        path.unlink()


add_folder, add_upload = st.tabs(["Server folder", "Upload files or .zip"])
with add_folder:
    with st.form("corpus_folder_form", border=False):
        st.text_input(
            "Folder on the server",
            key=FOLDER_INPUT,
            placeholder="/data/camera-trap/2024",
            help="Searched recursively. A .zip archive or a .csv list of paths works too.",
        )
        submitted = st.form_submit_button("Add folder", icon=":material/create_new_folder:", type="primary", key="corpus_add_folder")
    if submitted:
        raw = st.session_state[FOLDER_INPUT].strip()
        if not raw:
            st.error("Type a folder path first.")
        elif problem := folder_problem(Path(raw).expanduser()):
            st.error(problem, icon=":material/folder_off:")
        else:
            start([Path(raw).expanduser().resolve()])

with add_upload:
    with st.form("corpus_upload_form", border=False, clear_on_submit=True):
        files = st.file_uploader(
            "Images or .zip archives",
            type=IMAGE_TYPES + ["zip"],
            accept_multiple_files=True,
            key=UPLOADER,
            max_upload_size=UPLOAD_LIMIT_MB,
        )
        submitted = st.form_submit_button("Add uploaded files", icon=":material/upload:", type="primary", key="corpus_add_upload")
    if submitted:
        if not files:
            st.error("Choose one or more image files or a .zip archive first.")
        else:
            target = project.uploads_dir / "web" / time.strftime("%Y%m%d-%H%M%S")
            saved: list[Path] = []
            with st.spinner("Checking uploads…"):
                for upload in files:
                    try:
                        saved.append(save_upload(Path(upload.name).name, upload.getvalue(), target))
                    except ValueError as exc:
                        st.error(str(exc), icon=":material/block:")
            if saved:
                start(saved)

st.subheader("Browse", anchor=False)
total = store.image_count("ok")
if total == 0:
    st.info("No images yet. Add a server folder or upload images above; they are embedded in the background.", icon=":material/photo_library:")
else:
    per_page = GRID_COLUMNS * GRID_ROWS
    pages = (total + per_page - 1) // per_page
    page = st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1, key=GRID_PAGE)
    rows = store.images("ok", limit=per_page, offset=(int(page) - 1) * per_page)
    items = [(r["id"], f"#{r['id']} · {r['width']}×{r['height']}") for r in rows]
    common.thumbnail_grid(project, None, items, key="corpus", columns=GRID_COLUMNS)

rejected = store.images("rejected", limit=1000)
if rejected:
    st.subheader("Rejected files", anchor=False)
    st.caption("These files were not added. Nothing else was affected; fix them and add them again if needed.")
    st.dataframe(
        pd.DataFrame([{"file": r["path"], "reason": r["reason"], "detail": r["detail"]} for r in rejected]),
        hide_index=True,
        width="stretch",
    )
