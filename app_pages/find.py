"""Find: create categories and collect seed positives by browsing, text search over ImageNet
class names, uploading an example, or "more like this" on any thumbnail."""

from __future__ import annotations

import io

import pandas as pd
import streamlit as st

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.imageio import ImageRejected, read_image

RESULTS = 24
MAX_CLASSES_SHOWN = 12
COLUMNS = 6
MODES = {
    "browse": ":material/shuffle: Browse",
    "text": ":material/text_fields: Text",
    "upload": ":material/upload: Example image",
    "similar": ":material/image_search: More like this",
}
MODE = "find_mode"
LIKE_ID = "find_like_id"
BROWSE_SEED = "find_browse_seed"
BROWSE_PAGE = "find_browse_page"
TEXT_QUERY = "find_text_query"
NEW_CATEGORY = "find_new_category"
RENAME_TO = "find_rename_to"

project = common.require_project()
common.require_images(project)


def more_like_this(image_id: int) -> None:
    st.session_state[MODE] = "similar"
    st.session_state[LIKE_ID] = image_id


def create_category() -> None:
    name = st.session_state[NEW_CATEGORY].strip()
    try:
        project.add_category(name)
    except common.BAD_INPUT as exc:
        st.session_state["find_category_error"] = str(exc)
        return
    common.set_category(name)
    st.session_state[NEW_CATEGORY] = ""


def rename_category(old: str) -> None:
    new = st.session_state[RENAME_TO].strip()
    try:
        project.rename_category(old, new)
    except common.BAD_INPUT as exc:
        st.session_state["find_category_error"] = str(exc)
        return
    common.set_category(new)
    st.session_state[RENAME_TO] = ""


def shuffle() -> None:
    st.session_state[BROWSE_SEED] = st.session_state.get(BROWSE_SEED, 0) + 1
    st.session_state[BROWSE_PAGE] = 1


st.header("Find seed positives", anchor=False)
category = common.active_category(project)

with st.expander("Categories", expanded=category is None, icon=":material/label:"):
    left, right = st.columns(2)
    with left:
        st.text_input(
            "New category",
            key=NEW_CATEGORY,
            placeholder="e.g. zebra",
            help="Name it with a plain word for the thing (zebra, bird, footwear): the Auto review queue reads what the "
            "word means and looks for it in every style, for as long as your positives agree.",
        )
        st.button("Create category", icon=":material/add:", on_click=create_category, key="find_create_category")
    with right:
        if category is not None:
            st.text_input(f"Rename {code(category)} to", key=RENAME_TO)
            st.button("Rename", icon=":material/edit:", on_click=rename_category, args=(category,), key="find_rename_category")
    if error := st.session_state.pop("find_category_error", None):
        st.error(md_escape(error))
    counts = project.label_counts()
    if counts:
        table = [{"category": c, "positive": n.get("positive", 0), "negative": n.get("negative", 0)} for c, n in counts.items()]
        st.dataframe(pd.DataFrame(table), hide_index=True)

if category is None:
    st.info(
        "Create a category above (the rare thing you are looking for); then label examples of it here.",
        icon=":material/label:",
    )
else:
    n = common.label_counts(project, category)
    cols = st.columns(3)
    cols[0].metric(f"Positives · {md_escape(category)}", n["positive"])
    cols[1].metric("Negatives", n["negative"])
    with cols[2]:
        if n["positive"] == 0:
            st.caption("Mark a few positives (:material/thumb_up:) to start. Five to ten is plenty for a first model.")
        else:
            st.caption("Enough seeds? Train a model, then review its best guesses.")
            st.page_link(common.PAGES["train"], label="Go to Train", icon=":material/arrow_forward:")

mode = st.segmented_control("Find by", list(MODES), format_func=MODES.get, key=MODE, default="browse", required=True)
candidates = []

if mode == "browse":
    with st.container(horizontal=True, vertical_alignment="bottom"):
        page = st.number_input("Page", min_value=1, value=1, step=1, key=BROWSE_PAGE, width=140)
        st.button("Shuffle", icon=":material/shuffle:", on_click=shuffle, key="find_shuffle")
    seed = st.session_state.get(BROWSE_SEED, 0)
    candidates = project.browse(n=RESULTS, seed=seed, offset=(int(page) - 1) * RESULTS)

elif mode == "text":
    query = st.text_input(
        "Describe what you look for with ImageNet words",
        key=TEXT_QUERY,
        placeholder="e.g. zebra, tabby cat, fire engine",
        help="Offline: the words are matched to the 1000 ImageNet classes the backbone knows, by name or by any "
        "broader WordNet word (furniture, footwear, musical instrument).",
    )
    if query.strip():
        classes, candidates = project.search_text(query.strip(), n=RESULTS)
        if classes:
            shown = ", ".join(code(c) for c in classes[:MAX_CLASSES_SHOWN])
            more = f" and {len(classes) - MAX_CLASSES_SHOWN} more" if len(classes) > MAX_CLASSES_SHOWN else ""
            st.caption(f"Matched {len(classes)} ImageNet classes: {shown}{more}")
        else:
            st.warning("No ImageNet class name matches those words; try a more common word or browse instead.")

elif mode == "upload":
    upload = st.file_uploader("An example image", type=common.IMAGE_TYPES, key="find_upload")
    if upload is not None:
        data = upload.getvalue()
        try:
            read_image(io.BytesIO(data))
        except ImageRejected as exc:
            st.error(f"{md_escape(upload.name)} is not a usable image ({md_escape(exc)}).", icon=":material/block:")
        else:
            left, right = st.columns([1, 5])
            left.image(data, caption="your example", width="stretch")
            right.caption("Closest images in the corpus; label the true matches positive.")
            candidates = project.search_like(image_file=data, n=RESULTS)

else:
    like = st.session_state.get(LIKE_ID)
    if like is None:
        st.info("Click :material/image_search: under any thumbnail to see the images most similar to it.")
    else:
        left, right = st.columns([1, 5])
        left.image(str(project.thumbnail(like)), caption=f"#{like}", width="stretch")
        right.caption("Images most similar to this one.")
        candidates = [c for c in project.search_like(image_id=like, n=RESULTS + 1) if c.image_id != like][:RESULTS]

if mode in ("upload", "similar") and candidates:
    index = project.index_status()
    if index.behind:
        served = "the pretrained features'" if index.served is None else f"model v{index.served}'s"
        doing = "is being built" if index.building == index.active else "is not built yet"
        st.caption(f"Searching with {served} index; v{index.active}'s {doing}.")

if candidates:
    items = [(c.image_id, " · ".join(part for part in (f"#{c.image_id}", common.value_text(c)) if part)) for c in candidates]
    common.thumbnail_grid(project, category, items, key="find", columns=COLUMNS, on_more_like_this=more_like_this)
elif mode == "browse":
    st.info("No more images on this page; go back a page or shuffle.")
