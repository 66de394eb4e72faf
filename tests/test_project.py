"""The mining loop through the Project API, on a small corpus of real photos (skimage's samples)."""

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from bgminer.cli import main as cli
from bgminer.evaluate import average_precision
from bgminer.loop import Miner
from bgminer.progress import Cancelled, CancelToken
from bgminer.project import Candidate, CorpusCounts, Project
from bgminer.train import TrainConfig

BACKGROUND = ["astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo"]


def _crops(image: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    img = Image.fromarray(image).convert("RGB")
    w, h = img.size
    out = []
    for _ in range(n):
        s = rng.uniform(0.6, 1.0)
        cw, ch = int(w * s), int(h * s)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = img.crop((x, y, x + cw, y + ch)).resize((160, int(160 * ch / cw)))
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """10 cat photos (the rare class) among 48 other photos, ingested and embedded once."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    truth = {}
    for name in BACKGROUND:
        for k, crop in enumerate(_crops(getattr(data, name)(), 6, rng)):
            crop.save(root / f"{name}_{k}.png")
            truth[str(root / f"{name}_{k}.png")] = False
    for k, crop in enumerate(_crops(data.chelsea(), 10, rng)):
        crop.save(root / f"c{k}.png")
        truth[str(root / f"c{k}.png")] = True
    project = Project.create(tmp_path_factory.mktemp("project") / "p")
    project.ingest([root])
    project.embed()
    project.add_category("cat")
    is_cat = {project.store.image_id_for_path(p): t for p, t in truth.items()}
    return project, is_cat


def _fresh(corpus, tmp_path):
    """A copy of the embedded project, so tests do not see each other's labels."""
    import shutil

    project, is_cat = corpus
    shutil.copytree(project.root, tmp_path / "p")
    return Project(tmp_path / "p"), is_cat


def test_a_round_of_training_ranks_the_rare_class_first(corpus, tmp_path):
    project, is_cat = _fresh(corpus, tmp_path)
    cats = [i for i, t in is_cat.items() if t]
    project.label("cat", cats[:3], "positive")
    record = project.train("cat")
    assert record.state == "ready" and record.categories == ["cat"]
    ids, scores = project.scores("cat")
    rest = ~np.isin(ids, cats[:3])
    y = np.array([is_cat[int(i)] for i in ids])[rest]
    assert average_precision(y, scores[rest]) > 0.8 > y.mean()
    page = Miner(project, "cat", "tester").query(5)
    assert sum(is_cat[c.image_id] for c in page) >= 4
    by_id = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    assert all(c.kind == "score" and c.value == pytest.approx(by_id[c.image_id]) for c in page)


def test_cancelled_training_leaves_the_previous_version_active(corpus, tmp_path):
    project, is_cat = _fresh(corpus, tmp_path)
    project.label("cat", [i for i, t in is_cat.items() if t][:2], "positive")
    first = project.train("cat")
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        project.train("cat", cancel=token)
    assert project.store.active_model("cat").id == first.id
    assert project.store.models()[0].state == "cancelled"


def test_rounds_warm_start_from_the_previous_version_when_asked(corpus, tmp_path):
    project, is_cat = _fresh(corpus, tmp_path)
    cats = [i for i, t in is_cat.items() if t]
    project.label("cat", cats[:2], "positive")
    first = project.train("cat")
    assert first.parent_id is None
    project.label("cat", cats[2:4], "positive")
    second = project.train("cat", TrainConfig(epochs=1, warm_start=True))
    assert second.parent_id == first.id and second.label_counts["cat"]["positive"] == 4
    third = project.train("cat")  # adapter mode's default: a fresh start from the pretrained model
    assert third.parent_id is None and not TrainConfig().warm_start and TrainConfig(mode="full").warm_start


def test_search_by_image_and_by_text(corpus, tmp_path):
    project, is_cat = _fresh(corpus, tmp_path)
    cat_id = next(i for i, t in is_cat.items() if t)
    similar = project.search_like(image_id=cat_id, n=5)
    assert cat_id not in {c.image_id for c in similar}
    assert sum(is_cat[c.image_id] for c in similar) >= 4 and {c.kind for c in similar} == {"similarity"}
    uploaded = project.search_like(image_file=project.store.image(cat_id)["path"], n=3)
    assert uploaded[0].image_id == cat_id and uploaded[0].value == pytest.approx(1.0, abs=1e-3)
    classes, found = project.search_text("cat", n=5)
    assert "tabby" in classes and sum(is_cat[c.image_id] for c in found) >= 4
    assert {c.kind for c in found} == {"class_probability"} and all(0 <= c.value <= 1 for c in found)
    assert all(c.value is None and c.kind is None for c in project.browse(n=5))
    for value, kind in ((0.5, None), (None, "score"), (0.5, "probability")):
        with pytest.raises(ValueError):
            Candidate(1, "x.jpg", value, kind)  # a number always says what it is, and only with one of the three names


def test_undo_reverts_the_last_decision(corpus, tmp_path):
    project, _ = _fresh(corpus, tmp_path)
    project.label("cat", [1], "positive", source="review")
    project.label("cat", [2], "negative", source="review")
    assert project.undo("cat").image_id == 2
    assert project.store.labels("cat") == {1: "positive"}
    assert project.review_stats("cat").reviewed == 1


def test_status_estimates_remaining_positives_once_the_sample_is_labeled(corpus, tmp_path):
    project, is_cat = _fresh(corpus, tmp_path)
    assert project.status("cat")["estimate"] is None  # no model yet
    project.label("cat", [i for i, t in is_cat.items() if t][:3], "positive")
    project.train("cat")
    status = project.status("cat")
    assert status["estimate"] is None and status["validation_labeled"].startswith("0/")
    loop = Miner(project, "cat", "tester", "validate")
    for c in loop.query(1000):
        loop.decide(c.image_id, "positive" if is_cat[c.image_id] else "negative")
    est = project.status("cat")["estimate"]
    assert est is not None and est["remaining_low"] <= est["remaining"] <= est["remaining_high"]


def test_cli_label_train_rank_status(corpus, tmp_path, capsys):
    project, is_cat = _fresh(corpus, tmp_path)
    cats = [project.store.image(i)["path"] for i, t in is_cat.items() if t][:3]
    root = str(project.root)
    assert cli(["label", root, "--category", "cat", "--positive", *cats, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"]["cat"]["positive"] == 3
    assert cli(["train", root, "--category", "cat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == 1
    assert cli(["rank", root, "--category", "cat", "--limit", "4", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["candidates"]
    assert len(ranked) == 4 and all(c["path"] not in cats for c in ranked)
    assert cli(["search", root, "--like", cats[0], "--limit", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    assert cli(["status", root, "--category", "cat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == 1
    assert cli(["rank", root, "--category", "dog"]) == 2
    assert "unknown category 'dog'" in capsys.readouterr().err


def test_cli_info_reports_counts_as_one_json_object(corpus, capsys):
    project, _ = corpus
    assert cli(["info", str(project.root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images"] == info["embedded"] == 58 and info["rejected"] == 0


def test_the_facade_reports_an_empty_project(tmp_path):
    project = Project.create(tmp_path / "p")
    assert project.corpus_counts() == CorpusCounts(images=0, embedded=0, rejected=0)
    assert project.categories() == [] and project.label_counts() == {}
    assert project.active_model() is None and project.models() == [] and project.jobs() == []
    assert project.image_page(10) == [] and project.rejected_files() == []


def test_categories_are_renamed_with_their_labels_through_the_facade(tmp_path):
    project = Project.create(tmp_path / "p")
    project.add_category("cat")
    project.rename_category("cat", "tabby")
    assert project.categories() == ["tabby"]
    assert project.label_counts() == {"tabby": {"positive": 0, "negative": 0}}
    assert project.labels("tabby") == {} and project.label_authors("tabby") == {}


def test_the_auto_retrain_threshold_is_a_setting_of_the_project(tmp_path):
    project = Project.create(tmp_path / "p")
    assert project.auto_retrain_after == 0  # off until someone turns it on
    project.auto_retrain_after = 20
    assert Project(project.root).auto_retrain_after == 20  # kept in the store, seen by every process
    with pytest.raises(ValueError, match="0 \\(off\\) or a positive number"):
        project.auto_retrain_after = -1
    assert project.auto_retrain_after == 20
