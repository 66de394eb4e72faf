"""The corpus map: the engine on small clustered embeddings (clusters found, labeled images always
drawn, determinism, the cache, bad input) and the Map page through Streamlit's AppTest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_app  # first: it puts the repo (app_pages) on sys.path
from test_app import app, texts, wait_for_jobs

from bgminer import corpus_map
from bgminer.corpus_map import MapError
from bgminer.demo import DEMO_CATEGORY
from bgminer.project import Project

small_demo, small_trained, demo, trained = test_app.small_demo, test_app.small_trained, test_app.demo, test_app.trained
CLUSTERS = 4


def clustered(n: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors in CLUSTERS well-separated gaussian clusters, and each one's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32) * 3
    truth = np.arange(n) % CLUSTERS
    return centres[truth] + rng.normal(size=(n, dim)).astype(np.float32) * 0.5, truth


def purity(m_xy: np.ndarray, truth: np.ndarray, k: int = 5) -> float:
    """Share of each point's k nearest 2-D neighbours that come from its own true cluster."""
    d = ((m_xy[:, None] - m_xy[None]) ** 2).sum(axis=2)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    return float((truth[nearest] == truth[:, None]).mean())


# -- the computation --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_the_map_keeps_clusters_apart_and_draws_every_labeled_image(method):
    vectors, truth = clustered(600)
    ids = np.arange(600, dtype=np.int64) * 2 + 5  # ids are not positions
    labeled = ids[[7, 11, 301, 599]]
    g = corpus_map.compute(ids, lambda pos: vectors[pos], labeled=labeled, method=method, sample_size=150)
    assert len(g["ids"]) == 150 and set(labeled) <= set(g["ids"].tolist())
    assert np.array_equal(g["all_ids"], ids) and g["density"].sum() == pytest.approx(600)
    sample_truth = truth[np.searchsorted(ids, g["ids"])]
    assert purity(g["xy"], sample_truth) > 0.95
    everyone = purity(g["all_xy"], truth)  # unsampled images are placed among their own cluster too
    assert everyone > 0.95
    # k-means on the map: each of its clusters lies inside one true cluster
    for c in np.unique(g["all_cluster"]):
        members = truth[g["all_cluster"] == c]
        assert np.bincount(members).max() / len(members) > 0.95


def test_the_map_is_deterministic():
    vectors, _ = clustered(300)
    ids = np.arange(1, 301)
    first = corpus_map.compute(ids, lambda pos: vectors[pos], labeled=[3, 4], sample_size=100)
    again = corpus_map.compute(ids, lambda pos: vectors[pos], labeled=[3, 4], sample_size=100)
    for key in ("ids", "xy", "all_xy", "all_cluster", "density", "centroids"):
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    other_seed = corpus_map.compute(ids, lambda pos: vectors[pos], labeled=[3, 4], sample_size=100, seed=1)
    assert not np.array_equal(first["ids"], other_seed["ids"])


def test_the_sample_takes_the_best_scored_unlabeled_images():
    vectors, _ = clustered(400)
    ids = np.arange(1, 401)
    scores = np.linspace(0, 1, 400, dtype=np.float32)
    g = corpus_map.compute(ids, lambda pos: vectors[pos], labeled=[1], scores=scores, method="pca", sample_size=100)
    top = ids[np.argsort(-scores)[: int(99 * corpus_map.TOP_SCORED_SHARE)]]
    assert set(top.tolist()) <= set(g["ids"].tolist())


def test_a_corpus_larger_than_the_placement_limit_is_placed_from_a_sample_and_scaled():
    vectors, _ = clustered(500)
    g = corpus_map.compute(np.arange(500), lambda pos: vectors[pos], labeled=[0], method="pca", sample_size=50, place_limit=200)
    assert len(g["all_ids"]) == 200 and set(g["ids"].tolist()) <= set(g["all_ids"].tolist())
    assert g["density"].sum() == pytest.approx(500, rel=1e-4)


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (np.array([], dtype=np.int64), {}, "no embedded images"),
        (np.array([3, 2, 1]), {}, "ascending"),
        (np.arange(3), {"method": "umap"}, "unknown map method"),
        (np.arange(3), {"scores": np.zeros(2)}, "2 scores for 3 images"),
        (np.arange(3), {"sample_size": 1}, "at least 2"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(ids, kwargs, message):
    with pytest.raises(MapError, match=message):
        corpus_map.compute(ids, lambda pos: np.ones((len(pos), 4), dtype=np.float32), **kwargs)


def test_a_tiny_corpus_still_gets_a_map():
    vectors = np.eye(3, 8, dtype=np.float32)
    g = corpus_map.compute(np.arange(3), lambda pos: vectors[pos], method="tsne")
    assert g["xy"].shape == (3, 2) and np.isfinite(g["xy"]).all()


# -- through the project: cache, fresh labels, stale maps --------------------------------------
def synthetic_project(root: Path, n: int = 400) -> tuple[Project, np.ndarray]:
    """A project whose ``n`` image rows carry clustered pooled features (adapter mode never reads pixels)."""
    project = Project.create(root)
    project.store.add_images([{"path": f"/synthetic/{i}.png", "sha256": f"{i:064x}", "status": "ok"} for i in range(n)])
    vectors, truth = clustered(n, dim=project.backbone.feature_dim)
    ids = np.arange(1, n + 1)
    project.features.ensure_capacity(n + 1)
    project.features.open("pooled", writable=True)[ids] = vectors
    project.store.mark_embedded(ids.tolist())
    project.add_category("rare")
    return project, truth


def test_layout_is_cached_and_shows_todays_labels(tmp_path):
    project, truth = synthetic_project(tmp_path / "p")
    project.label("rare", [1, 5], "positive")  # both in true cluster 0
    first = corpus_map.layout(project, "rare", method="pca", sample_size=100)
    path = corpus_map.cache_path(project, "rare", "pretrained", "pca", 100)
    stamp = path.stat().st_mtime_ns
    again = corpus_map.layout(project, "rare", method="pca", sample_size=100)
    assert path.stat().st_mtime_ns == stamp and again.created_at == first.created_at and not again.stale
    np.testing.assert_array_equal(first.all_xy, again.all_xy)
    assert {1, 5} <= set(first.ids[first.label == "positive"].tolist())
    # the clusters without a positive are the ones away from true cluster 0
    empty = {c.number for c in first.without_positive()}
    assert empty and all(np.all(truth[first.all_ids[first.all_cluster == n - 1] - 1] != 0) for n in empty)
    # a label made after the map was computed shows at once, placed beside its neighbours
    unsampled = int(np.setdiff1d(np.arange(1, 401), first.ids)[0])
    project.label("rare", [unsampled], "negative")
    shown = corpus_map.cached(project, "rare", "pca", 100)
    assert shown.created_at == first.created_at and shown.late == 0  # it was already placed in the density
    assert shown.label[shown.ids == unsampled].tolist() == ["negative"]
    boxed = shown.in_box((10, -10), (-10, 10))  # the corners in either order
    assert len(boxed) == 400 and set(boxed[-3:].tolist()) == {1, 5, unsampled}  # labeled images come last
    assert len(shown.in_box((50, 60), (50, 60))) == 0
    members = shown.members(shown.clusters[0].number)
    assert len(members) and not np.isin(members, [1, 5, unsampled]).any()


def test_a_map_of_other_embeddings_is_shown_stale_and_layout_remakes_it(tmp_path):
    project, _ = synthetic_project(tmp_path / "p", n=300)
    made = corpus_map.layout(project, "rare", method="pca", sample_size=50)
    project.store.add_images([{"path": "/synthetic/new.png", "sha256": "f" * 64, "status": "ok"}])
    project.features.ensure_capacity(302)
    project.features.open("pooled", writable=True)[301] = np.ones(project.backbone.feature_dim, dtype=np.float32)
    project.store.mark_embedded([301])
    old = corpus_map.cached(project, "rare", "pca", 50)
    assert old.stale and old.created_at == made.created_at
    project.label("rare", [301], "positive")  # the same (pretrained) space: placed when read
    shown = corpus_map.cached(project, "rare", "pca", 50)
    assert shown.stale and shown.late == 1 and 301 in shown.ids
    remade = corpus_map.layout(project, "rare", method="pca", sample_size=50)
    assert not remade.stale and remade.images == 301 and 301 in remade.ids


def test_a_damaged_cache_file_is_made_again(tmp_path):
    project, _ = synthetic_project(tmp_path / "p", n=120)
    path = corpus_map.cache_path(project, "rare", "pretrained", "pca", 40)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not a whole archive")
    assert corpus_map.cached(project, "rare", "pca", 40) is None
    made = corpus_map.layout(project, "rare", method="pca", sample_size=40)
    assert made.images == 120 and corpus_map.cached(project, "rare", "pca", 40).created_at == made.created_at


def test_layout_refuses_an_empty_project(tmp_path):
    project = Project.create(tmp_path / "empty")
    with pytest.raises(MapError, match="no embedded images"):
        corpus_map.layout(project, None)
    assert corpus_map.cached(project, None) is None


def test_a_late_label_in_the_models_space_is_placed_when_the_map_is_read(trained):
    """With a model, a label on an image the map never placed (a corpus above the placement limit)
    is placed from its embedding when the map is read."""
    src = corpus_map.source(trained, DEMO_CATEGORY)
    assert src.model_id is not None and src.scores is not None
    labeled = list(trained.labels(DEMO_CATEGORY))
    geometry = corpus_map.compute(src.ids, src.rows, labeled=labeled, method="tsne", sample_size=20, place_limit=30)
    geometry["meta"].update(source=src.name, model_id=src.model_id, digest=src.digest, category=DEMO_CATEGORY)
    corpus_map._write(corpus_map.cache_path(trained, DEMO_CATEGORY, src.name, "tsne", 20), geometry)
    outside = int(np.setdiff1d(src.ids, geometry["all_ids"])[0])
    trained.label(DEMO_CATEGORY, [outside], "positive")
    shown = corpus_map.cached(trained, DEMO_CATEGORY, "tsne", 20)
    assert shown.late == 1 and outside in shown.ids and outside in shown.all_ids
    assert shown.label[shown.ids == outside].tolist() == ["positive"]
    assert np.isfinite(shown.scores_of([outside])).all()
    # a map made in another version's space is shown stale, and a late label is not placed in it
    geometry["meta"]["source"] = "v9999"
    corpus_map._write(corpus_map.cache_path(trained, DEMO_CATEGORY, src.name, "tsne", 20), geometry)
    other = corpus_map.cached(trained, DEMO_CATEGORY, "tsne", 20)
    assert other.stale and other.late == 0 and outside not in other.ids


# -- the page ---------------------------------------------------------------------------------
def test_map_page_without_a_project_points_to_the_sidebar(tmp_path):
    at = app(tmp_path / "nothing-here", "map")
    assert "No project is open" in texts(at.info)


def test_map_page_computes_shows_and_opens_a_cluster(trained):
    at = app(trained.root, "map")
    assert "No map yet" in texts(at.info)
    at.button(key="map_compute").click().run()
    wait_for_jobs(trained)
    job = trained.jobs(1)[0]
    assert (job.kind, job.state) == ("map", "done"), job.error
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "No map yet" not in texts(at.info)
    (chart,) = at.get("vega_lite_chart")
    assert '"box"' in chart.proto.spec and '"interval"' in chart.proto.spec  # the box selection is on
    empty = [b for b in at.button if b.key and b.key.startswith("map_cluster_")]
    assert empty, "the 5 seeds cannot cover every cluster of the 50 images"
    empty[0].click().run()  # open the first cluster without a positive: its unlabeled images, labelable
    assert not at.exception and len(at.image) > 0
    assert "unlabeled image" in " ".join(h.value for h in at.subheader)
    first = next(b for b in at.button if b.key and b.key.startswith("map-positive-"))
    first.click().run()
    image_id = int(first.key.rsplit("-", 1)[1])
    assert trained.labels(DEMO_CATEGORY)[image_id] == "positive"
    at.run()  # a rerun reads the cached map
    assert not at.exception and at.get("vega_lite_chart")


def test_map_page_before_a_model_maps_the_pretrained_features_with_pca(demo):
    at = app(demo.root, "map")
    at.segmented_control(key="map_method").set_value("pca").run()
    at.button(key="map_compute").click().run()
    wait_for_jobs(demo)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "PCA of pretrained features" in texts(at.caption)
    (chart,) = at.get("vega_lite_chart")
    assert '"score"' not in chart.proto.spec  # no model: no score colours
    assert corpus_map.cached(demo, DEMO_CATEGORY, "pca").images == 50
