"""Review: the ranked queue for the active category, one large image at a time (keyboard first)
or as a grid for batch decisions, with running counters, the discovery curve and the score
histogram. The page drives :class:`bgminer.loop.Miner`: every decision and skip is in the
store before the next image shows; the session keeps only the displayed queue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.imageio import ImageRejected, load_rgb, make_thumbnail
from bgminer.store import UndoConflict
from bgminer.strategies import NEEDS_MODEL, STRATEGIES
from bgminer.textsearch import name_classes

QUEUE_SIZE = 50
STRIP = 8
GRID = 12
PREVIEW_SIZE = 768
HISTOGRAM_BINS = 20
STRATEGY_NAMES = {
    "auto": "Auto",
    "most-likely": "Most likely",
    "uncertain": "Uncertain",
    "near-positives": "Near seeds",
    "random": "Random",
    "probe": "Few-shot probe",
    "new-modes": "New styles",
    "class-lift": "ImageNet classes",
    "name": "The name's meaning",
    "unexplored": "Unexplored clusters",
    "mixed": "Mixed",
    "validate": "Validation sample",
}
# Plain Vega-Lite specs: the page reruns on every decision and these skip Altair's schema validation.
DISCOVERY_SPEC = {
    "mark": {"type": "line", "interpolate": "step-after"},
    "encoding": {
        "x": {"field": "reviewed", "type": "quantitative", "title": "reviewed", "axis": {"tickMinStep": 1, "format": "d"}},
        "y": {"field": "found", "type": "quantitative", "title": "found", "axis": {"tickMinStep": 1, "format": "d"}},
    },
}
HISTOGRAM_SPEC = {
    "mark": "bar",
    "encoding": {
        "x": {"field": "score", "type": "quantitative", "bin": {"binned": True, "step": 1 / HISTOGRAM_BINS}, "title": "score"},
        "x2": {"field": "score_end"},
        "y": {"field": "images", "type": "quantitative", "scale": {"type": "symlog"}, "title": "images"},
        "tooltip": [{"field": "score", "format": ".2f"}, {"field": "images"}],
    },
}
STRATEGY = "review_strategy"
VIEW = "review_view"
QUEUE = "review_queue"  # session: ReviewQueue for the current (project, category, strategy, model)
NOTICES = "review_notices"  # session: Markdown lines to toast on the next run
# Keys: visible button, then a hidden twin so both documented keys work.
KEYS = {"positive": ("a", "y"), "negative": ("x", "n"), "skip": ("space", "s"), "undo": ("backspace", "u")}


@dataclass
class ReviewQueue:
    key: tuple
    items: list  # Candidates still to show, best first
    shares: dict  # the strategy's mixture: part -> its share of the queue ("why this image")


project = common.require_project()
common.require_images(project)
category = common.require_category(project)
model = project.active_model(category)
counts = common.label_counts(project, category)
calibration = project.calibration(category) if model is not None else None


def score_text(candidate, short: bool = False) -> str:
    """A score as a person reads it: the calibrated probability ("72% likely", with the raw score beside it
    unless ``short``); the raw number alone before there is a calibration or when it is not a score."""
    raw = common.value_text(candidate, 3)
    if candidate.kind != "score" or calibration is None or not calibration.fitted:
        return raw
    likely = f"{calibration.probability(candidate.value):.0%} likely"
    return likely if short else f"{likely} ({raw})"


def grow_validation(n: int) -> None:
    """Grow the validation sample to ``n`` (a new one when it cannot grow) and review it next."""
    try:
        project.grow_validation_sample(category, n)
    except ValueError:
        project.validation_sample(category, n=n, redraw=True)
    st.session_state[STRATEGY] = "validate"


@st.cache_data(max_entries=128, show_spinner=False)
def preview(path: str) -> bytes | None:
    """JPEG bytes of the image scaled for the large view (None when the file became unreadable)."""
    try:
        return make_thumbnail(load_rgb(path, draft_size=PREVIEW_SIZE), size=PREVIEW_SIZE, quality=88)
    except ImageRejected:
        return None


@st.cache_data(max_entries=16, show_spinner=False)
def score_histogram(root: str, category: str, model_id: int) -> pd.DataFrame | None:
    scored = project.scores(category)
    if scored is None:
        return None
    counts, edges = np.histogram(np.asarray(scored[1], dtype=np.float64), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return pd.DataFrame({"score": edges[:-1], "score_end": edges[1:], "images": counts})


def queue() -> ReviewQueue:
    """The session's queue, refilled from the Miner when empty or when its inputs changed."""
    loop = common.miner(project, category, strategy)
    key = (str(project.root), category, strategy, None if model is None else model.id)
    current = st.session_state.get(QUEUE)
    if current is not None and current.key[:3] == key[:3] and current.key[3] != key[3] and model is not None:
        st.toast(f"Model v{model.id} is ready: the queue is re-ranked.", icon=":material/model_training:")
    if current is not None and current.key == key:
        gone = set(project.labels(category)) | set(loop.skipped())  # another tab (or the CLI) may have acted meanwhile
        current.items = [c for c in current.items if c.image_id not in gone]
        if current.items:
            return current
    items = loop.query(QUEUE_SIZE)
    st.session_state[QUEUE] = ReviewQueue(key, items, loop.shares())
    return st.session_state[QUEUE]


def why_text(reason: str | None, shares: dict[str, float]) -> str:
    """"Why this image: <the part of the mixture that picked it>", then each part's share of the queue."""
    mix = " · ".join(f"{share:.0%} {md_escape(part)}" for part, share in sorted(shares.items(), key=lambda kv: -kv[1]))
    why = f"Why this image: {md_escape(reason)}" if reason else "Why this image: ranked by the strategy"
    return f"{why}. This queue: {mix}" if len(shares) > 1 else why


def notify(message: str) -> None:
    st.session_state.setdefault(NOTICES, []).append(message)


def record(image_ids: list[int], value: str) -> None:
    """Record this person's decision, saying so when someone else labeled one of the images meanwhile."""
    for d in common.apply_label(project, category, image_ids, value, source="review"):
        if d.replaced_author is not None:
            notify(f"{md_escape(d.replaced_author)} had labeled #{d.image_id} {d.replaced} meanwhile; your {value} replaces it.")


def decide(image_id: int, value: str) -> None:
    record([image_id], value)
    drop(image_id)


def skip(image_id: int) -> None:
    common.miner(project, category).skip(image_id)
    drop(image_id)


def drop(image_id: int) -> None:
    q = st.session_state.get(QUEUE)
    if q is not None:
        q.items = [c for c in q.items if c.image_id != image_id]


def undo() -> None:
    """Revert this person's newest decision in this category and show that image again."""
    try:
        event = common.undo_label(project, category)
    except UndoConflict as exc:  # someone else's newer decision is never overwritten
        notify(md_escape(exc))
        return
    if event is None:
        notify("Nothing of yours to undo.")
        return
    notify(f"Undid {event.value} on #{event.image_id}.")
    q = st.session_state.get(QUEUE)
    if q is not None and all(c.image_id != event.image_id for c in q.items):
        from bgminer.search import Candidate

        q.items.insert(0, Candidate(event.image_id, project.image_path(event.image_id), reason="undone: decide again"))


def save_grid(image_ids: list[int]) -> None:
    positives = [i for i in image_ids if st.session_state.get(f"review-grid-{i}")]
    negatives = [i for i in image_ids if i not in positives]
    if positives:
        record(positives, "positive")
    if negatives:
        record(negatives, "negative")
    for i in image_ids:
        drop(i)
        st.session_state.pop(f"review-grid-{i}", None)


st.header(f"Review · {md_escape(category)}", anchor=False)
for notice in st.session_state.pop(NOTICES, []):  # before any early stop: undoing the last seed still says so
    st.toast(notice)
if model is None and counts["positive"] == 0:
    st.info(
        f"Nothing to rank yet: label a few **{md_escape(category)}** positives on the Find page, then train a model.",
        icon=":material/thumb_up:",
    )
    st.page_link(common.PAGES["find"], label="Go to Find", icon=":material/arrow_forward:")
    st.stop()
if model is None:
    st.info(
        "No model yet: candidates come from the pretrained features alone (like your seeds, or what the "
        "category's name means). Train one for the background-splitting ranking.",
        icon=":material/model_training:",
    )

options = list(STRATEGIES) if model is not None else [s for s in STRATEGIES if s not in NEEDS_MODEL]
if st.session_state.get(STRATEGY) not in options:
    st.session_state[STRATEGY] = options[0]
top = st.columns([3, 1], vertical_alignment="bottom")
strategy = top[0].selectbox(  # a select box: eleven strategies do not fit one row of buttons
    "Strategy", options, format_func=lambda s: STRATEGY_NAMES.get(s, s), key=STRATEGY
)
view = top[1].segmented_control("View", ["one", "grid"], format_func=str.title, key=VIEW, default="one", required=True)
if strategy in ("auto", "name") and (meaning := name_classes(category)):
    shown = ", ".join(m.name for m in meaning[:4]) + (", …" if len(meaning) > 4 else "")
    st.caption(
        f"“{md_escape(category)}” reads as {len(meaning)} ImageNet class{'es' if len(meaning) > 1 else ''} ({md_escape(shown)}): "
        "the queue leans on them while your positives score high on them, and ignores them otherwise."
    )

main, side = st.columns([3, 1], gap="large")
with side:
    stats = project.review_stats(category)
    st.metric("Reviewed", stats.reviewed)
    st.metric("Found", stats.found, help="Positives found in review (seeds not counted)")
    st.metric("Precision, last 20", "–" if stats.precision_last20 is None else f"{stats.precision_last20:.0%}")
    if model is not None:
        status = project.status(category)
        estimate = status["estimate"]
        if estimate is None:
            st.caption(status.get("estimate_note", ""))
        else:
            st.metric(
                "Est. positives left",
                f"{estimate['remaining']:.0f}",
                help=f"from {estimate['sample_size']} validation images, {estimate['sample_positives']} of them positive",
            )
            st.caption(
                f"{estimate['confidence']:.0%} interval {estimate['remaining_low']:.0f}–{estimate['remaining_high']:.0f} "
                f"(width {estimate['width']:.0f})"
            )
            if status.get("estimate_note"):
                st.caption(md_escape(status["estimate_note"]))
            if estimate.get("labels_needed"):
                st.button(
                    f"Add {estimate['labels_needed']:,} to the validation sample",
                    icon=":material/playlist_add:",
                    on_click=grow_validation,
                    args=(estimate["grow_to"],),
                    key="review-grow-validation",
                )
        if calibration is not None and not calibration.fitted:
            st.caption(f"Raw model scores, not probabilities: {md_escape(calibration.reason)}.")
    if stats.curve:
        st.caption("Discovery curve: positives found vs. reviewed")
        curve = pd.DataFrame({"reviewed": range(1, len(stats.curve) + 1), "found": stats.curve})
        st.vega_lite_chart(curve, DISCOVERY_SPEC, height=160)
    if model is not None and (hist := score_histogram(str(project.root), category, model.id)) is not None:
        st.caption(f"Scores of model v{model.id} over the corpus (log scale)")
        st.vega_lite_chart(hist, HISTOGRAM_SPEC, height=160)

with main:
    try:
        q = queue()
    except ValueError as exc:  # the engine explains what it needs (e.g. a model for this strategy)
        st.warning(md_escape(exc))
        st.stop()
    if not q.items:
        st.success(
            "The queue is empty: every candidate of this strategy is labeled. Retrain or pick another strategy.",
            icon=":material/done_all:",
        )
        st.button("Undo last", icon=":material/undo:", on_click=undo, shortcut="Backspace", key="review-undo-empty")
        st.stop()

    if view == "one":
        head = q.items[0]
        with st.container(key="review-current", border=True):
            image = preview(head.path)
            if image is None:
                st.error(f"#{head.image_id} can no longer be read from {code(head.path)}; skip it.")
            else:
                st.image(image, width="content")
            parts = (f"#{head.image_id}", score_text(head), f"{len(q.items)} in queue", code(head.path))
            st.caption(" · ".join(part for part in parts if part))
            st.caption(why_text(head.reason, q.shares))
        actions = {
            "positive": ("Positive", ":material/thumb_up:", "primary", decide, (head.image_id, "positive")),
            "negative": ("Negative", ":material/thumb_down:", "secondary", decide, (head.image_id, "negative")),
            "skip": ("Skip", ":material/skip_next:", "secondary", skip, (head.image_id,)),
            "undo": ("Undo", ":material/undo:", "tertiary", undo, ()),
        }
        with st.container(horizontal=True, key="review-actions"):
            for name, (label, icon, kind, fn, args) in actions.items():
                st.button(label, icon=icon, type=kind, on_click=fn, args=args, shortcut=KEYS[name][0], key=f"review-{name}")
        with st.container(key="review-alt-keys"):
            for name, (label, _icon, _kind, fn, args) in actions.items():
                st.button(label, on_click=fn, args=args, shortcut=KEYS[name][1], key=f"review-{name}-alt")
        st.caption("Keys: **A**/**Y** positive · **X**/**N** negative · **Space**/**S** skip · **Backspace**/**U** undo")
        upcoming = q.items[1 : STRIP + 1]
        if upcoming:
            st.caption("Next up")
            with st.container(key="strip-review"):
                strip = st.columns(STRIP)
            for cell, c in zip(strip, upcoming, strict=False):  # fewer items than columns at the end
                cell.image(str(project.thumbnail(c.image_id)), caption=score_text(c, True) or f"#{c.image_id}", width="stretch")
    else:
        batch = q.items[:GRID]
        ids = [c.image_id for c in batch]
        st.caption("Tick the positives; saving marks the rest negative.")
        with st.form("review-grid", border=False), st.container(key="grid-review"):
            for start in range(0, len(batch), 6):
                cells = st.columns(6)
                for cell, c in zip(cells, batch[start : start + 6], strict=False):
                    with cell, st.container(border=True, key=f"card-review-{c.image_id}"):
                        st.image(str(project.thumbnail(c.image_id)), width="stretch")
                        value = score_text(c, short=True)
                        st.checkbox(
                            f"#{c.image_id}" + (f" · {value}" if value else ""),
                            key=f"review-grid-{c.image_id}",
                            help=common.value_text(c, 3) or None,  # the raw score behind "72% likely"
                        )
            st.form_submit_button(
                f"Save {len(batch)}: ticked positive, others negative",
                icon=":material/done_all:",
                type="primary",
                on_click=save_grid,
                args=(ids,),
                key="review-grid-save",
            )
        st.button("Undo last", icon=":material/undo:", on_click=undo, shortcut="Backspace", key="review-undo-grid")
