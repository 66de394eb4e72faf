"""Calibrated scores (bgminer.calibration) and the status of a category's estimate (bgminer.category_status):
Platt scaling that never reorders, its fallback with few labels, which labels it may use, and a
validation sample that grows when its interval is too wide to act on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bgminer.calibration import MIN_EACH, fit_platt
from bgminer.cli import main as cli
from bgminer.loop import Miner
from bgminer.project import Project
from bgminer.train import TrainConfig

QUICK = TrainConfig(epochs=1, min_steps=1)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_platt_scaling_recovers_a_known_map():
    rng = np.random.default_rng(0)
    scores = _sigmoid(rng.normal(-4, 2, 5000))  # raw scores far too low, like a rare class's
    labels = rng.random(5000) < _sigmoid(1.5 * np.log(scores / (1 - scores)) + 4)
    cal = fit_platt(scores, labels)
    assert cal.fitted and cal.a == pytest.approx(1.5, abs=0.15) and cal.b == pytest.approx(4.0, abs=0.4)
    assert 0.09 < cal.probability(_sigmoid(-4.0)) < 0.15  # what the raw score calls 1.8% is 12% likely


def test_calibration_never_changes_the_order_of_scores():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.random(500), rng.random(500) * 1e-3, [0.0, 1.0, 0.5]])
    for labels in (rng.random(len(scores)) < scores, scores > 0.3, rng.random(len(scores)) < 0.5 + 0.1 * scores):
        cal = fit_platt(scores[:200], labels[:200])
        assert cal.fitted and cal.a > 0
        p = cal.probability(scores)
        order = np.argsort(-scores, kind="stable")
        assert (np.diff(p[order]) <= 0).all()  # never increases down the ranking
        assert ((p >= 0) & (p <= 1)).all()
    separated = fit_platt([0.01, 0.02, 0.03, 0.9, 0.95, 0.99], [False, False, False, True, True, True])
    assert separated.fitted and np.isfinite([separated.a, separated.b]).all()  # Platt's targets keep it finite
    assert 0.5 < separated.probability(0.9) < 1.0 and 0.0 < separated.probability(0.03) < 0.5


def test_too_few_labels_fall_back_to_the_raw_score_and_say_why():
    scores = [0.9, 0.8, 0.1, 0.2, 0.3, 0.05]
    cal = fit_platt(scores, [True, True, False, False, False, False])
    assert not cal.fitted and (cal.positives, cal.negatives) == (2, 4)
    assert f"{MIN_EACH} of each" in cal.reason
    assert np.allclose(cal.probability(scores), scores) and cal.probability(0.048) == pytest.approx(0.048)
    backwards = fit_platt([0.9, 0.8, 0.7, 0.1, 0.2, 0.3], [False, False, False, True, True, True])
    assert not backwards.fitted and "do not rise" in backwards.reason  # a map that would reorder is refused


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, image_folder_module):
    project = Project.create(tmp_path_factory.mktemp("calibration") / "p")
    project.ingest([image_folder_module])
    project.embed()
    project.add_category("cat")
    return project


@pytest.fixture
def trained(embedded, tmp_path):
    """A copy of the 12-image project: images 1-3 positive, 4-5 negative (not in review), a model on them."""
    import shutil

    shutil.copytree(embedded.root, tmp_path / "p")
    project = Project(tmp_path / "p")
    project.label("cat", [1, 2, 3], "positive", author="bob")
    project.label("cat", [4, 5], "negative", author="bob")
    project.train("cat", QUICK)
    return project


def test_the_project_calibrates_on_reviews_made_since_the_model_was_trained(trained, capsys):
    cal = trained.calibration("cat")
    assert not cal.fitted and (cal.positives, cal.negatives) == (0, 0)  # the training labels do not count
    ids, scores = trained.scores("cat")
    unlabeled = [int(i) for i in ids[np.argsort(-scores, kind="stable")] if i > 5]
    alice = Miner(trained, "cat", "alice")
    alice.decide_many(unlabeled[:3], "positive")  # the top three of the ranking turn out positive
    alice.decide_many(unlabeled[-3:], "negative")
    trained.label("cat", [unlabeled[3]], "positive", author="carol")  # Find page: chosen for what it shows
    cal = trained.calibration("cat")
    assert cal.fitted and (cal.positives, cal.negatives) == (3, 3) and cal.model_id == trained.active_model("cat").id
    assert cal.probability(scores.max()) > cal.probability(scores.min())
    assert cli(["rank", str(trained.root), "--category", "cat", "--limit", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["candidates"]
    assert all(r["probability"] == pytest.approx(cal.probability(r["score"])) for r in rows)
    trained.train("cat", QUICK)  # a new version starts uncalibrated: it was trained on those reviews
    assert not trained.calibration("cat").fitted


def test_status_reports_the_width_and_grows_the_sample_when_asked(trained):
    sample = trained.validation_sample("cat", n=3)
    assert sample["stages"][0]["size"] == len(sample["ids"]) and sample["n"] == 3
    reviewer = Miner(trained, "cat", "alice", "validate")
    for c in reviewer.query(100):
        reviewer.decide(c.image_id, "negative")
    est = trained.status("cat")["estimate"]
    assert est["width"] == pytest.approx(est["remaining_high"] - est["remaining_low"])
    assert est["useful"] == (est["width"] <= est["useful_width"])  # 7 unreviewed images: a few labels pin it down
    grown = trained.grow_validation_sample("cat", 6)
    assert grown["ids"][: len(sample["ids"])] == sample["ids"] and len(grown["stages"]) == 2
    assert grown["model_id"] == sample["model_id"] and trained.validation_sample("cat") == grown
    status = trained.status("cat")
    pending = len(grown["ids"]) - len(sample["ids"])
    assert status["estimate"]["sample_size"] == len(sample["ids"])  # the first stage until the added ones are labeled
    assert pending > 0 and f"{pending} added validation images" in status["estimate_note"]
    for c in reviewer.query(100):
        reviewer.decide(c.image_id, "negative")
    assert trained.status("cat")["estimate"]["sample_size"] == len(grown["ids"])


def test_a_too_wide_interval_says_how_many_more_labels_would_do(trained):
    """On 7 unreviewed images every interval is narrow, so the pool is made to look large: a stored
    sample that stands for 3,000 unreviewed images (the form validation_sample writes)."""
    trained.validation_sample("cat", n=3)
    key = f"validation:{trained.store.category_id('cat')}"
    sample = json.loads(trained.store.get_meta(key))
    ids = [6, 7, 8]
    sample.update(ids=ids, unreviewed=3000, n=3, stages=[{"n": 3, "size": 3, "pi": [0.5, 0.01, 0.001]}])
    trained.store.set_meta(key, json.dumps(sample))
    trained.label("cat", ids, "negative", source="review", author="alice")
    trained.label("cat", [6], "positive", source="review", author="alice")
    status = trained.status("cat")
    est = status["estimate"]
    assert not est["useful"] and est["width"] > est["useful_width"]
    assert est["labels_needed"] > 10 and est["grow_to"] == 3 + est["labels_needed"]
    assert f"about {est['labels_needed']:,} more validation labels" in status["estimate_note"]
    with pytest.raises(ValueError, match="redraw"):  # it stands for images that are not there: it cannot grow
        trained.grow_validation_sample("cat", est["grow_to"])


def test_a_sample_stored_before_stages_is_read_as_one_stage(trained):
    key = f"validation:{trained.store.category_id('cat')}"
    model_id = trained.active_model("cat").id
    trained.store.set_meta(key, json.dumps({"model_id": model_id, "ids": [6, 7], "pi": [0.5, 0.25], "unreviewed": 7, "found": 3}))
    sample = trained.validation_sample("cat")
    assert sample["stages"] == [{"n": 2, "size": 2, "pi": [0.5, 0.25]}] and "pi" not in sample
    trained.label("cat", [6, 7], "negative", source="review", author="alice")
    assert trained.status("cat")["estimate"]["sample_size"] == 2
    with pytest.raises(ValueError, match="redraw"):
        trained.grow_validation_sample("cat", 4)


def test_the_review_page_shows_probabilities_and_how_many_more_labels_would_do(trained):
    import sys
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))  # the app's own modules (app_pages), as `streamlit run app.py` sees them
    ids, scores = trained.scores("cat")
    ranked = [int(i) for i in ids[np.argsort(-scores, kind="stable")] if i > 5]
    alice = Miner(trained, "cat", "alice")
    alice.decide_many(ranked[:3], "positive")
    alice.decide_many(ranked[-3:], "negative")
    trained.validation_sample("cat", n=3)  # then made to stand for 3,000 images, as above: far too few labels
    key = f"validation:{trained.store.category_id('cat')}"
    sample = json.loads(trained.store.get_meta(key))
    sample.update(ids=ranked[-3:], unreviewed=3000, n=3, stages=[{"n": 3, "size": 3, "pi": [0.5, 0.01, 0.001]}])
    trained.store.set_meta(key, json.dumps(sample))

    at = AppTest.from_file(str(repo / "app.py"), default_timeout=60)
    at.session_state["project_root"] = str(trained.root)
    at.run()
    at.switch_page("app_pages/review.py").run()
    assert not at.exception, [e.value for e in at.exception]
    captions = " ".join(str(c.value) for c in at.caption)
    assert "% likely (score 0." in captions  # the calibrated probability, the raw score beside it
    assert "width" in captions and "more validation labels would narrow it" in captions
    at.button(key="review-grow-validation").click().run()  # this sample cannot grow: a new, larger one is drawn
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["review_strategy"] == "validate"
    assert trained.validation_sample("cat")["unreviewed"] == 1  # drawn over the one image nobody has labeled
