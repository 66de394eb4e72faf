"""The review loop (bgminer.loop.Miner) on a small embedded project of real images: what it
shows, what it records and for whom, skips, undo, and when it retrains."""

import json
import shutil

import pytest

from bgminer.cli import main as cli
from bgminer.jobs import JobRunner
from bgminer.loop import Miner
from bgminer.project import Project
from bgminer.settings import Limits
from bgminer.store import UndoConflict
from bgminer.strategies import NEEDS_MODEL, STRATEGIES
from bgminer.train import TrainConfig

ALICE, BOB = "alice@example.org", "bob@example.org"
QUICK = TrainConfig(epochs=1, min_steps=1)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, image_folder_module):
    project = Project.create(tmp_path_factory.mktemp("loop") / "p")
    project.ingest([image_folder_module])
    project.embed()
    project.add_category("cat")
    return project


@pytest.fixture
def project(embedded, tmp_path):
    """A fresh copy of the embedded project (12 images, category 'cat', no labels)."""
    shutil.copytree(embedded.root, tmp_path / "p")
    return Project(tmp_path / "p")


@pytest.fixture
def trained(project):
    """The copy with images 1-3 positive (by bob, not in review) and a model trained on them."""
    project.label("cat", [1, 2, 3], "positive", author=BOB)
    project.train("cat", QUICK)
    return project


def _ids(candidates) -> set[int]:
    return {c.image_id for c in candidates}


def test_query_never_returns_labeled_or_skipped_images_with_or_without_a_model(project):
    project.label("cat", [1, 2], "positive", author=BOB)
    Miner(project, "cat", BOB).decide_many([3, 4, 5], "negative")
    alice = Miner(project, "cat", ALICE)
    alice.skip(6)
    alice.skip(7)
    for strategy in (s for s in STRATEGIES if s not in NEEDS_MODEL):
        page = Miner(project, "cat", ALICE, strategy).query(12)
        assert _ids(page) == set(range(8, 13)), strategy  # before a model: everything else, nothing more
        assert all(c.value is None and c.kind is None for c in page), strategy  # nothing scored them yet
    project.train("cat", QUICK)
    for strategy in STRATEGIES:
        page = Miner(project, "cat", ALICE, strategy).query(12)
        assert _ids(page) and _ids(page) <= set(range(8, 13)), strategy
        assert all(c.kind == "score" and 0 <= c.value <= 1 for c in page), strategy


def test_skips_persist_across_miners_and_belong_to_one_person(project):
    project.label("cat", [1, 2, 3, 4, 5, 6, 7], "positive", author=BOB)
    Miner(project, "cat", ALICE).skip(9)
    assert Miner(Project(project.root), "cat", ALICE).skipped() == [9]  # a new session (a reload) still has it
    assert _ids(Miner(project, "cat", ALICE, "random").query(12)) == {8, 10, 11, 12}
    assert Miner(project, "cat", BOB).skipped() == []
    assert _ids(Miner(project, "cat", BOB, "random").query(12)) == {8, 9, 10, 11, 12}
    assert 9 not in project.store.labels("cat")  # a skip is no label


def test_decide_records_the_person_and_review_and_says_whose_label_it_replaced(trained):
    alice = Miner(trained, "cat", ALICE)
    first = alice.decide(1, "negative")  # bob had labeled #1 positive
    assert (first.replaced, first.replaced_author) == ("positive", BOB)
    again = alice.decide(1, "positive")  # her own label: nobody else's is replaced
    assert again.replaced is None and again.replaced_author is None
    fresh = alice.decide(8, "negative")
    assert fresh.replaced is None
    latest = trained.store.label_history("cat", limit=1)[0]
    assert (latest.image_id, latest.author, latest.source, latest.value) == (8, ALICE, "review", "negative")
    assert trained.store.label_authors("cat")[1] == ALICE
    assert trained.review_stats("cat").reviewed == 3


def test_undo_takes_back_only_this_persons_latest_decision(trained):
    alice, bob = Miner(trained, "cat", ALICE), Miner(trained, "cat", BOB)
    assert alice.undo() is None  # nothing of hers yet
    alice.decide(8, "positive")
    bob.decide(8, "negative")
    with pytest.raises(UndoConflict) as conflict:
        alice.undo()
    assert conflict.value.changed_by == BOB and trained.store.labels("cat")[8] == "negative"
    assert bob.undo().image_id == 8
    assert trained.store.labels("cat")[8] == "positive"  # back to alice's
    assert alice.undo().image_id == 8
    assert 8 not in trained.store.labels("cat")


def test_validate_strategy_returns_the_unlabeled_part_of_the_validation_sample(trained):
    sample = list(dict.fromkeys(trained.validation_sample("cat", n=6)["ids"]))
    Miner(trained, "cat", ALICE).decide(sample[0], "negative")
    Miner(trained, "cat", BOB).skip(sample[1])
    shown = [c.image_id for c in Miner(trained, "cat", BOB, "validate").query(100)]
    assert shown == sample[2:]
    assert Miner(trained, "cat", ALICE, "validate").query(100)[0].image_id == sample[1]  # bob's skip is his own


def test_retrain_if_due_starts_a_round_exactly_when_the_threshold_is_reached(trained):
    trained.auto_retrain_after = 3
    alice = Miner(trained, "cat", ALICE)
    first = trained.store.active_model("cat").id
    alice.decide_many([8, 9], "negative")
    assert not alice.retrain_if_due(config=QUICK).due
    alice.decide(10, "negative")
    outcome = alice.retrain_if_due(config=QUICK)
    assert outcome.due and outcome.model is not None and outcome.model.id > first
    assert trained.store.active_model("cat").id == outcome.model.id
    assert not alice.retrain_if_due(config=QUICK).due  # the count starts again from the new model
    trained.auto_retrain_after = 0
    alice.decide_many([11, 12], "negative")
    assert not alice.retrain_if_due(config=QUICK).due  # 0: auto-retrain off


def test_retrain_if_due_holds_a_non_admin_to_the_caps(trained):
    trained.auto_retrain_after = 1
    models = len(trained.store.models())
    capped = Miner(trained, "cat", ALICE, limits=Limits(user_max_epochs=1))
    capped.decide(8, "negative")
    outcome = capped.retrain_if_due(config=TrainConfig(epochs=2))
    assert outcome.due and outcome.model is None and "more than 1 epochs" in outcome.refused
    outcome = Miner(trained, "cat", ALICE, limits=Limits(user_modes=())).retrain_if_due(config=QUICK)
    assert "adapter mode" in outcome.refused
    assert len(trained.store.models()) == models
    assert Miner(trained, "cat", ALICE, limits=Limits()).retrain_if_due(config=QUICK).model is not None


def test_retrain_if_due_respects_the_job_limits(trained):
    trained.auto_retrain_after = 1
    alice = Miner(trained, "cat", ALICE)
    alice.decide(8, "negative")
    busy = alice.retrain_if_due(JobRunner(trained.store, max_jobs=0), config=QUICK)
    assert busy.due and "server is busy" in busy.refused
    running = trained.store.add_job("train")
    assert "already running" in alice.retrain_if_due(JobRunner(trained.store, max_jobs=2), config=QUICK).refused
    trained.store.update_job(running, state="done")
    runner = JobRunner(trained.store, max_jobs=2)
    started = alice.retrain_if_due(runner, config=QUICK)
    assert started.job_id is not None and runner.wait(started.job_id, timeout=120).state == "done"
    assert trained.store.active_model("cat").label_counts["cat"]["negative"] == 1


def test_cli_skips_leave_the_authors_queue_and_review_labels_retrain_when_due(project, capsys):
    root, paths = str(project.root), project.store.image_paths(range(1, 13))
    assert cli(["label", root, "--category", "cat", "--positive", *(paths[i] for i in range(1, 8)), "--author", BOB]) == 0
    capsys.readouterr()
    assert cli(["skip", root, "--category", "cat", paths[10], "11", "--author", ALICE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    for author, expected in ((ALICE, {8, 9, 12}), (BOB, {8, 9, 10, 11, 12})):
        assert (
            cli(["rank", root, "--category", "cat", "--strategy", "random", "--limit", "12", "--author", author, "--json"]) == 0
        )
        assert {c["image_id"] for c in json.loads(capsys.readouterr().out)["candidates"]} == expected
    assert cli(["rank", root, "--category", "cat", "--pool-neighbors", "1", "--limit", "12", "--author", BOB, "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["candidates"]
    assert 0 < len(ranked) < 5  # at most one neighbour per positive
    assert all(row.keys() == {"image_id", "path", "score"} and row["score"] is None for row in ranked)  # no model yet
    assert cli(["search", root, "--like", paths[1], "--limit", "3", "--json"]) == 0
    assert all(row.keys() == {"image_id", "path", "similarity"} for row in json.loads(capsys.readouterr().out)["results"])

    first = project.train("cat", QUICK).id
    assert cli(["rank", root, "--category", "cat", "--limit", "3", "--author", BOB, "--json"]) == 0
    assert all(0 <= row["score"] <= 1 for row in json.loads(capsys.readouterr().out)["candidates"])
    project.auto_retrain_after = 2
    assert cli(["label", root, "--category", "cat", "--negative", paths[8], "--review", "--author", ALICE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["retrain"]["due"] is False
    assert cli(["label", root, "--category", "cat", "--negative", paths[9], "--review", "--author", ALICE, "--json"]) == 0
    retrain = json.loads(capsys.readouterr().out)["retrain"]
    assert retrain["due"] and retrain["model_version"] > first == 1
    assert project.store.label_history("cat", limit=1)[0].source == "review"
    assert cli(["undo", root, "--category", "cat", "--author", ALICE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["undone"]["image_id"] == 9
