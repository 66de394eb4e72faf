"""Map: the corpus in two dimensions (a sample of points over the density of every image),
coloured by label and score. Drag a box to open the images inside it for labeling; the
clusters that hold no positive yet are listed, each with its images one click away.

Computing a map is a background job (:func:`bgminer.corpus_map.layout`); the page only reads the
cached geometry and today's labels and scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_pages import common
from app_pages.text import md_escape
from bgminer import corpus_map
from bgminer.corpus_map import METHODS, CorpusMap

METHOD = "map_method"
SAMPLE = "map_sample"
CHART = "map_chart"
FOCUS = "map_focus"  # session: ("box", x-range, y-range) or ("cluster", number): the images shown below the map
SAMPLES = (1000, 2000, 5000, 10000)
SHOWN = 24
COLUMNS = 6
CLUSTER_BUTTONS = 8
HEIGHT = 560
SHADE_FROM = 0.04  # share of the densest cell below which the background stays blank
POSITIVE, NEGATIVE, EMPTY = "#1a9850", "#d73027", "#e6550d"

project = common.require_project()
common.require_images(project)
category = common.active_category(project)  # None: a map of the pretrained features, without labels

st.header("Map" if category is None else f"Map · {md_escape(category)}", anchor=False)
if category is None:
    st.caption("No category yet: the map shows the pretrained features. Create a category on the Find page to see labels.")

left, middle, right = st.columns([2, 2, 3], vertical_alignment="bottom")
method = left.segmented_control("Layout", list(METHODS), format_func=METHODS.get, key=METHOD, default="tsne", required=True)
sample = middle.selectbox("Points drawn", SAMPLES, index=SAMPLES.index(corpus_map.DEFAULT_SAMPLE), key=SAMPLE,
                          format_func=lambda n: f"{n:,}", help="Every labeled image is drawn, plus a sample of the rest. "
                          "The shading behind the points counts every image.")
running = common.active_jobs(project, "map")


def start() -> None:
    chosen_category, chosen_method, chosen_sample = category, method, int(sample)

    def work(progress, cancel) -> dict:
        made = corpus_map.layout(project, chosen_category, chosen_method, chosen_sample, refresh=True,
                                 progress=progress, cancel=cancel)
        return {"points": len(made.ids), "images": made.images, "seconds": made.seconds}

    try:
        common.job_runner(project).start("map", work, {"category": chosen_category, "method": chosen_method,
                                                       "sample": chosen_sample})
    except (RuntimeError, *common.BAD_INPUT) as exc:
        st.session_state["map_error"] = str(exc)


try:
    cmap = corpus_map.cached(project, category, method, int(sample))
except common.BAD_INPUT as exc:
    st.error(md_escape(exc), icon=":material/error:")
    st.stop()
with right.container(horizontal=True):
    st.button("Compute map" if cmap is None else "Recompute", icon=":material/scatter_plot:", type="primary" if cmap is None
              or cmap.stale else "secondary", on_click=start, disabled=bool(running), key="map_compute")
    if running:
        st.button("Cancel", icon=":material/stop:", on_click=common.job_runner(project).cancel, args=(running[0].id,),
                  disabled=running[0].cancel_requested, key="map_cancel")
if error := st.session_state.pop("map_error", None):
    st.error(md_escape(error))


def progress_panel() -> None:
    """The newest map job's progress; reruns the page when it ends."""
    jobs = [j for j in project.jobs(20) if j.kind == "map"]
    if not jobs:
        return
    job = jobs[0]
    if job.active:
        st.progress(min(max(job.progress, 0.0), 1.0), text=f"Map #{job.id}: {md_escape(job.message or job.state)}")
    elif running and running[0].id == job.id:
        st.rerun()  # it ended since this page was drawn: show the new map
    elif job.state == "failed":
        st.error(f"Map #{job.id} failed: {md_escape(job.error)}", icon=":material/error:")


st.fragment(run_every=1.0 if running else None)(progress_panel)()

if cmap is None:
    if not running:
        st.info("No map yet for these settings. **Compute map** lays out a sample of the corpus in two dimensions "
                "(a background job: seconds for a few thousand images, about a minute for 100,000).",
                icon=":material/scatter_plot:")
    st.stop()


def chart_data(m: CorpusMap) -> pd.DataFrame:
    """One table for every layer: the density cells, the points and the names of the clusters without a positive."""
    x0, x1, y0, y1 = m.extent
    density = m.smoothed_density()
    rows, cols = np.nonzero(density >= SHADE_FROM * density.max())
    dx, dy = (x1 - x0) / density.shape[1], (y1 - y0) / density.shape[0]
    cells = pd.DataFrame({"kind": "cell", "x": x0 + cols * dx, "x2": x0 + (cols + 1) * dx, "y": y0 + rows * dy,
                          "y2": y0 + (rows + 1) * dy, "images": density[rows, cols]})
    points = pd.DataFrame({"kind": "point", "x": m.xy[:, 0], "y": m.xy[:, 1], "id": m.ids, "label": m.label.astype(str),
                           "cluster": m.cluster + 1})
    if m.score is not None:
        points["score"] = m.score
    empty = m.without_positive()
    names = pd.DataFrame({"kind": "name", "x": [c.x for c in empty], "y": [c.y for c in empty],
                          "name": [f"C{c.number}" for c in empty]})
    return pd.concat([cells, points, names], ignore_index=True)


def chart_spec(m: CorpusMap) -> dict:
    x0, x1, y0, y1 = m.extent
    x = {"field": "x", "type": "quantitative", "scale": {"domain": [x0, x1], "nice": False, "zero": False}, "axis": None}
    y = {"field": "y", "type": "quantitative", "scale": {"domain": [y0, y1], "nice": False, "zero": False}, "axis": None}
    tip = [{"field": "id", "title": "image"}, {"field": "cluster"}]
    if m.score is not None:
        tip.append({"field": "score", "format": ".2f"})
        colour = {"field": "score", "type": "quantitative", "scale": {"scheme": "viridis", "domain": [0, 1]},
                  "legend": {"title": "score", "orient": "right"}}
    else:
        colour = {"value": "#4c78a8"}
    return {
        "height": HEIGHT,
        "layer": [
            {"transform": [{"filter": "datum.kind == 'cell'"}], "mark": {"type": "rect", "opacity": 0.7},
             "encoding": {"x": x, "x2": {"field": "x2"}, "y": y, "y2": {"field": "y2"},
                          "color": {"field": "images", "type": "quantitative", "legend": None,
                                    "scale": {"type": "sqrt", "range": ["#f4f4f4", "#7f7f7f"]}},
                          "tooltip": [{"field": "images", "title": "images here (smoothed)", "format": ",.1f"}]}},
            {"transform": [{"filter": "datum.kind == 'point' && datum.label == 'none'"}],
             "params": [{"name": "box", "select": {"type": "interval", "encodings": ["x", "y"]}}],
             "mark": {"type": "circle", "size": 16, "opacity": 0.8},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip}},
            {"transform": [{"filter": "datum.kind == 'point' && datum.label != 'none'"}],
             "mark": {"type": "point", "filled": True, "size": 90, "stroke": "white", "strokeWidth": 1, "opacity": 1},
             "encoding": {"x": x, "y": y, "shape": {"field": "label", "type": "nominal", "legend": None},
                          "color": {"field": "label", "type": "nominal", "legend": {"title": "label", "orient": "right"},
                                    "scale": {"domain": ["positive", "negative"], "range": [POSITIVE, NEGATIVE]}},
                          "tooltip": [*tip, {"field": "label"}]}},
            {"transform": [{"filter": "datum.kind == 'name'"}],
             "mark": {"type": "text", "fontSize": 13, "fontWeight": "bold", "color": EMPTY, "dy": -10},
             "encoding": {"x": x, "y": y, "text": {"field": "name"}}},
        ],
        "resolve": {"scale": {"color": "independent", "shape": "independent"}},
    }


def set_focus(value: tuple) -> None:
    st.session_state[FOCUS] = value


source = "pretrained features" if cmap.model_id is None else f"model v{cmap.model_id}'s embeddings"
st.caption(f"{METHODS[cmap.method]} of {source} · {len(cmap.ids):,} points drawn of {cmap.images:,} images; the grey "
           "shading counts every image" + ("" if cmap.placed == cmap.images else f" (from {cmap.placed:,} placed, scaled)")
           + f" · computed in {sum(cmap.seconds.values()):.1f} s")
if cmap.stale:
    st.warning("This map was made from other embeddings (an older model or fewer images). Labels and scores are "
               "today's; **Recompute** to redraw it in the current space.", icon=":material/update:")
if cmap.late:
    st.caption(f"{cmap.late} image(s) labeled since the map was made are placed beside their nearest neighbours.")

empty = cmap.without_positive()
chart_column, side = st.columns([4, 1])
with chart_column:
    event = st.vega_lite_chart(chart_data(cmap), chart_spec(cmap), on_select="rerun", selection_mode="box", key=CHART,
                               width="stretch")
    st.caption("Drag a box over the map to see those images; labeled images are the large marks, "
               ":orange[C numbers] mark the clusters without a positive.")
box = (event.get("selection") or {}).get("box") or {}
if box.get("x") and box.get("y"):
    chosen = ("box", tuple(box["x"]), tuple(box["y"]))
    if st.session_state.get("map_last_box") != chosen:  # a new box: show it (a cluster picked later wins until then)
        st.session_state["map_last_box"] = chosen
        st.session_state[FOCUS] = chosen

with side:
    st.markdown("**Clusters without a positive**")
    if not empty:
        st.caption("Every cluster holds at least one labeled positive.")
    for c in empty[:CLUSTER_BUTTONS]:
        best = "" if c.max_score is None else f", best score {c.max_score:.2f}"
        st.button(f"C{c.number} · {c.images:,} images", key=f"map_cluster_{c.number}", on_click=set_focus,
                  args=(("cluster", c.number),), width="stretch", help=f"{c.negatives} negative(s){best}: review its images",
                  type="primary" if st.session_state.get(FOCUS) == ("cluster", c.number) else "secondary")
    if len(empty) > CLUSTER_BUTTONS:
        more = len(empty) - CLUSTER_BUTTONS
        st.caption(f"and {more} smaller {'one' if more == 1 else 'ones'} (see All clusters)")

focus = st.session_state.get(FOCUS)
if focus is not None:
    if focus[0] == "box":
        chosen_ids = cmap.in_box(focus[1], focus[2])
        title = f"{len(chosen_ids):,} image(s) in the box"
    else:
        chosen_ids = cmap.members(int(focus[1])) if int(focus[1]) <= len(cmap.clusters) else np.array([], dtype=np.int64)
        title = f"Cluster C{focus[1]}: {len(chosen_ids):,} unlabeled image(s)"
    with st.container(horizontal=True, vertical_alignment="center"):
        st.subheader(title, anchor=False)
        st.button("Close", icon=":material/close:", type="tertiary", on_click=set_focus, args=(None,), key="map_close")
    if len(chosen_ids):
        st.caption(f"Showing {min(SHOWN, len(chosen_ids))}: unlabeled first, drawn points before the rest"
                   + (", best scores first." if cmap.score is not None else "."))
        shown = chosen_ids[:SHOWN]
        scores = cmap.scores_of(shown)
        items = [(int(i), f"#{i}" + ("" if np.isnan(s) else f" · score {s:.2f}")) for i, s in zip(shown, scores, strict=True)]
        common.thumbnail_grid(project, category, items, key="map", columns=COLUMNS)

with st.expander(f"All clusters ({len(cmap.clusters)})", icon=":material/table:"):
    table = pd.DataFrame([{"cluster": f"C{c.number}", "images": c.images, "positives": c.positives, "negatives": c.negatives,
                           "best score": c.max_score, "likely positives": c.likely} for c in cmap.clusters])
    if cmap.score is None:
        table = table.drop(columns=["best score", "likely positives"])
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"best score": st.column_config.NumberColumn(format="%.2f")})
    st.caption(f"Images are counted over the whole corpus; best score and likely positives (score >= {corpus_map.LIKELY}) "
               "are over each cluster's unlabeled images.")
