"""Rounds that return once the scores exist: the new version ranks at once, its search index builds
in the background while the previous index serves (and says so), on the photos of test_project."""

import json
import threading

import numpy as np
import pytest
from test_project import _fresh, corpus  # noqa: F401 (the module's embedded photo corpus)

from bgminer.cli import main as cli
from bgminer.index import VectorIndex
from bgminer.loop import Miner
from bgminer.project import Project
from bgminer.search import Finder


@pytest.fixture
def held_builds(monkeypatch):
    """Background index builds wait for the returned event before building (only the build itself is patched)."""
    release = threading.Event()
    build = Finder._build_version

    def held(self, model_id):
        assert release.wait(60), "the test never released the index build"
        build(self, model_id)

    monkeypatch.setattr(Finder, "_build_version", held)
    yield release
    release.set()


def _upload_hit(project, image_id):
    """The best match of a corpus image's file uploaded as a query: (id, similarity)."""
    best = project.search_like(image_file=project.store.image(image_id)["path"], n=1)[0]
    return best.image_id, best.value


def test_a_round_ranks_with_its_scores_while_the_previous_index_serves(corpus, tmp_path, held_builds):  # noqa: F811
    project, is_cat = _fresh(corpus, tmp_path)
    cats = [i for i, t in is_cat.items() if t]
    project.index()  # the pretrained index exists before the first round, as in the app
    project.label("cat", cats[:2], "positive")

    first = project.train("cat")
    status = project.index_status()
    assert (status.served, status.active, status.building, status.behind) == (None, first.id, first.id, True)
    assert not project.finder.index_path(first.id).exists()
    assert _upload_hit(project, cats[5]) == (cats[5], pytest.approx(1.0, abs=1e-3))  # pretrained space for query and index
    held_builds.set()
    project.wait_for_index()
    assert project.index_status().served == first.id and project.index_status().building is None

    held_builds.clear()
    project.label("cat", cats[2:4], "positive")
    second = project.train("cat")
    assert project.store.active_model("cat").id == second.id
    status = project.index_status()
    assert (status.served, status.active, status.building) == (first.id, second.id, second.id)
    assert not project.finder.index_path(second.id).exists()
    # the queue ranks with the new version's scores although its index does not exist yet
    ids, scores = project.scores("cat")
    by_id = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    page = Miner(project, "cat", "tester").query(10)
    assert page and all(c.kind == "score" and c.value == pytest.approx(by_id[c.image_id]) for c in page)
    assert page[0].value == max(v for i, v in by_id.items() if i not in cats[:4])  # the new version's best unlabeled image
    _, _, embeddings = project.ranking_inputs("cat")  # de-duplication in v2's space, from its scores folder
    assert not isinstance(embeddings, VectorIndex) and embeddings.shape == (len(ids), project.load_model(second.id).embedding_dim)
    # search uses v1's index: by id with its own vectors, an upload embedded by v1's model
    old = VectorIndex.load(project.finder.index_path(first.id))
    _, near = old.search(old.vectors([cats[5]]), 4, exclude_ids=[cats[5]])
    assert [c.image_id for c in project.search_like(image_id=cats[5], n=4)] == near[0].tolist()
    path = project.store.image(cats[5])["path"]
    query = project.embed_query(path)
    assert np.allclose(query, project.finder.embed_query(path, model_id=first.id), atol=1e-5)
    assert not np.allclose(query, project.finder.embed_query(path, model_id=second.id), atol=1e-3)
    assert _upload_hit(project, cats[5]) == (cats[5], pytest.approx(1.0, abs=1e-3))

    held_builds.set()
    project.wait_for_index()
    status = project.index_status()
    assert (status.served, status.building, status.behind) == (second.id, None, False)
    assert project.finder.index_path(second.id).exists()
    assert isinstance(project.ranking_inputs("cat")[2], VectorIndex)
    assert np.allclose(project.embed_query(path), project.finder.embed_query(path, model_id=second.id), atol=1e-5)
    assert _upload_hit(project, cats[5]) == (cats[5], pytest.approx(1.0, abs=1e-3))
    fresh = VectorIndex.load(project.finder.index_path(second.id))
    _, near = fresh.search(fresh.vectors([cats[5]]), 4, exclude_ids=[cats[5]])
    assert [c.image_id for c in project.search_like(image_id=cats[5], n=4)] == near[0].tolist()


def test_cli_train_waits_for_the_index_before_exiting(corpus, tmp_path, capsys, held_builds):  # noqa: F811
    project, is_cat = _fresh(corpus, tmp_path)
    project.label("cat", [i for i, t in is_cat.items() if t][:3], "positive")
    timer = threading.Timer(1.0, held_builds.set)  # the build finishes only a second after training
    timer.start()
    try:
        assert cli(["train", str(project.root), "--category", "cat", "--json"]) == 0
    finally:
        timer.join()
    version = json.loads(capsys.readouterr().out)["model_version"]
    assert Project(project.root).finder.index_path(version).exists()
    assert Project(project.root).index_status().served == version


def test_an_index_lost_in_a_crash_is_rebuilt_in_the_background(corpus, tmp_path, held_builds):  # noqa: F811
    project, is_cat = _fresh(corpus, tmp_path)
    project.index()
    project.label("cat", [i for i, t in is_cat.items() if t][:3], "positive")
    record = project.train("cat")
    held_builds.set()
    project.wait_for_index()
    project.finder.index_path(record.id).unlink()  # the process died before the atomic save
    held_builds.clear()
    reopened = Project(project.root)
    reopened.index()  # serves the pretrained index at once and starts the missing build
    status = reopened.index_status()
    assert (status.served, status.active, status.building) == (None, record.id, record.id)
    held_builds.set()
    reopened.wait_for_index()
    assert reopened.finder.index_path(record.id).exists() and reopened.index_status().served == record.id


def test_scoring_runs_the_main_head_only(corpus, tmp_path, monkeypatch):  # noqa: F811
    from bgminer.modes import get_mode
    from bgminer.scoring import score

    project, is_cat = _fresh(corpus, tmp_path)
    project.label("cat", [i for i, t in is_cat.items() if t][:3], "positive")
    project.train("cat")
    project.wait_for_index()
    model = project.load_model()

    def no_aux(*_args):
        raise AssertionError("the auxiliary head ran while scoring")

    monkeypatch.setattr(model.aux_head, "forward", no_aux)
    ids = np.asarray(project.store.image_ids(embedded=True), dtype=np.int64)
    embeddings, scores = score(model, get_mode(model.mode).inputs(project), ids)
    _, stored = project.scores("cat")
    assert np.allclose(scores[:, 0], stored, atol=1e-6) and embeddings.shape == (len(ids), model.embedding_dim)
