"""The web app, page by page, through Streamlit's AppTest: empty states, the demo flow,
labels and undo reaching the store, training jobs, bad input, export buttons."""

from __future__ import annotations

import csv
import io
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from bgminer.demo import DEMO_CATEGORY, DEMO_DIR
from bgminer.progress import CancelToken
from bgminer.project import Project
from bgminer.settings import local_user

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
sys.path.insert(0, str(REPO))  # the app's own modules (app_pages), as `streamlit run app.py` sees them
TIMEOUT = 60


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A 50-image slice of the demo corpus (all 16 animals), ingested and embedded once."""
    root = tmp_path_factory.mktemp("small-demo")
    images = root / "images"
    images.mkdir()
    with open(DEMO_DIR / "labels.csv") as fp:
        rows = list(csv.DictReader(fp))
    animals = [r["path"] for r in rows if r["category"] == DEMO_CATEGORY]
    others = [r["path"] for r in rows if r["category"] != DEMO_CATEGORY][: 50 - len(animals)]
    for rel in animals + others:
        shutil.copy(DEMO_DIR / rel, images / Path(rel).name)
    project = Project.create(root / "project")
    project.ingest([images])
    project.embed()
    project.add_category(DEMO_CATEGORY)
    (root / "animals.txt").write_text("\n".join(str((images / Path(p).name).resolve()) for p in animals))
    return root


@pytest.fixture(scope="session")
def small_trained(small_demo, tmp_path_factory) -> Path:
    """The small demo with five animal seeds and one trained model (trained once)."""
    root = tmp_path_factory.mktemp("small-trained") / "project"
    shutil.copytree(small_demo / "project", root)
    project = Project(root)
    project.label(DEMO_CATEGORY, animal_ids(project, small_demo)[:5], "positive")
    project.train(DEMO_CATEGORY)
    return root


@pytest.fixture
def demo(small_demo, tmp_path) -> Project:
    """A private copy of the small demo project (the images themselves are shared, read-only)."""
    shutil.copytree(small_demo / "project", tmp_path / "project")
    return Project(tmp_path / "project")


@pytest.fixture
def trained(small_trained, tmp_path) -> Project:
    """A private copy of the small demo with seeds and a trained model."""
    shutil.copytree(small_trained, tmp_path / "project")
    return Project(tmp_path / "project")


def animal_ids(project: Project, small_demo: Path) -> list[int]:
    return [project.store.image_id_for_path(p) for p in (small_demo / "animals.txt").read_text().splitlines()]


def app(root: Path | str, page: str | None = None, user: str | None = None) -> AppTest:
    """The app on ``root`` (optionally switched to ``page``), run once; ``user``: signed in as that email (st.user)."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if user is not None:
        at.user = {"is_logged_in": True, "email": user}
    at.session_state["project_root"] = str(root)
    at.run()
    if page is not None:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_for_jobs(project: Project, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while project.store.jobs(active_only=True):
        assert time.monotonic() < deadline, "background job did not finish"
        time.sleep(0.2)


def texts(elements) -> str:
    return " ".join(str(e.value) for e in elements)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> bytes:
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:] = color
    arr[size // 4 : size // 2, size // 4 : size // 2] = 255 - np.array(color, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# -- no project, empty project ----------------------------------------------------------
def test_sidebar_offers_to_build_the_demo_when_the_folder_is_no_project(tmp_path):
    at = app(tmp_path / "nothing-here")
    assert "is not a bgminer project yet" in texts(at.sidebar.warning)
    assert at.sidebar.button(key="project_build_demo").label == "Build the demo project here"


@pytest.mark.parametrize("page", ["corpus", "find", "train", "review", "export"])
def test_every_page_without_a_project_points_to_the_sidebar(tmp_path, page):
    at = app(tmp_path / "nothing-here", page)
    assert "No project is open" in texts(at.info)
    assert at.sidebar.button(key="project_build_demo")


def test_sidebar_creates_a_new_project_by_name_in_the_projects_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BGMINER_PROJECTS_DIR", str(tmp_path))
    at = app(tmp_path / "nothing-here")
    at.sidebar.text_input(key="project_new_slug").set_value("new")
    at.sidebar.button(key="project_create").click().run()
    assert (tmp_path / "new" / "bgminer.sqlite").exists()
    assert at.sidebar.selectbox(key="project_select").value == str(tmp_path / "new")
    assert metric(at, "Images") == "0"
    assert "No images yet" in texts(at.info)
    assert Project(tmp_path / "new").backbone_name == "efficientnet_lite0"


def test_a_new_project_can_use_a_stronger_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("BGMINER_PROJECTS_DIR", str(tmp_path))
    at = app(tmp_path / "nothing-here")
    at.sidebar.text_input(key="project_new_slug").set_value("styles")
    at.sidebar.selectbox(key="project_new_backbone").set_value("efficientnet_lite2")
    at.sidebar.button(key="project_create").click().run()
    assert Project(tmp_path / "styles").backbone_name == "efficientnet_lite2"
    assert "efficientnet_lite2" in texts(at.caption)


@pytest.mark.parametrize("page", ["find", "train", "review"])
def test_pages_of_an_empty_project_send_the_user_to_corpus(tmp_path, page):
    Project.create(tmp_path / "p")
    at = app(tmp_path / "p", page)
    assert "no images yet" in texts(at.info).lower()


def test_job_panel_shows_a_running_job_and_cancels_it(demo):
    from app_pages import common

    at = app(demo.root)
    runner = common.job_runner(common.open_project(demo.root))  # the app's runner (cached per project)

    def wait_for_cancel(progress, cancel: CancelToken) -> None:
        progress(1, 4, "waiting")
        while True:
            cancel.check()
            time.sleep(0.02)

    job_id = runner.start("ingest", wait_for_cancel)
    while demo.store.job(job_id).progress == 0:
        time.sleep(0.02)
    at.run()
    bar = at.sidebar.progress[0]
    assert (bar.value, bar.text) == (25, f"ingest #{job_id}: waiting")
    at.sidebar.button(key=f"job-cancel-{job_id}").click().run()
    assert runner.wait(job_id, timeout=10).state == "cancelled"


# -- corpus -----------------------------------------------------------------------------
def test_corpus_shows_counts_and_a_page_of_thumbnails(demo):
    at = app(demo.root)
    assert metric(at, "Images") == "50"
    assert metric(at, "Embedded") == "50"
    assert len(at.image) == 24


def test_corpus_refuses_a_missing_folder_and_keeps_the_corpus(demo, tmp_path):
    at = app(demo.root)
    at.text_input(key="corpus_folder").set_value(str(tmp_path / "missing"))
    at.button(key="corpus_add_folder").click().run()
    assert "does not exist" in texts(at.error)
    assert demo.store.image_count("ok") == 50
    assert not demo.store.jobs()


def test_corpus_refuses_a_non_image_upload(demo):
    at = app(demo.root)
    at.file_uploader(key="corpus_upload").set_value(("notes.png", b"this is text, not pixels", "image/png"))
    at.button(key="corpus_add_upload").click().run()
    assert "not a usable image" in texts(at.error)
    assert demo.store.image_count(None) == 50
    assert not demo.store.jobs()


def test_corpus_refuses_a_zip_with_unsafe_paths(demo):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../escape.png", png_bytes())
    at = app(demo.root)
    at.file_uploader(key="corpus_upload").set_value(("evil.zip", buf.getvalue(), "application/zip"))
    at.button(key="corpus_add_upload").click().run()
    assert "refused" in texts(at.error)
    assert not (demo.uploads_dir.parent / "escape.png").exists()
    assert demo.store.image_count(None) == 50


def test_corpus_upload_is_ingested_and_embedded_in_the_background(demo):
    at = app(demo.root)
    files = [("red.png", png_bytes((220, 20, 20)), "image/png"), ("blue.png", png_bytes((20, 20, 220)), "image/png")]
    at.file_uploader(key="corpus_upload").set_value(files)
    at.button(key="corpus_add_upload").click().run()
    assert "Started job" in texts(at.success)
    wait_for_jobs(demo)
    assert demo.store.jobs()[0].state == "done"
    at.run()
    assert metric(at, "Images") == "52"
    assert metric(at, "Embedded") == "52"


# -- find -------------------------------------------------------------------------------
def test_find_creates_a_category_and_makes_it_active(demo):
    at = app(demo.root, "find")
    at.text_input(key="find_new_category").set_value("zebra").run()
    at.button(key="find_create_category").click().run()
    assert "zebra" in demo.store.categories()
    assert at.session_state["category"] == "zebra"


def test_find_thumbnail_buttons_write_labels_to_the_store(demo):
    at = app(demo.root, "find")
    first = demo.browse(n=24, seed=0)[0].image_id
    at.button(key=f"find-positive-{first}").click().run()
    assert demo.store.labels(DEMO_CATEGORY) == {first: "positive"}
    at.button(key=f"find-positive-{first}").click().run()  # a second click clears it
    assert demo.store.labels(DEMO_CATEGORY) == {}


def test_find_text_search_names_the_imagenet_classes_it_matched(demo):
    at = app(demo.root, "find")
    at.segmented_control(key="find_mode").set_value("text").run()
    at.text_input(key="find_text_query").set_value("dog").run()
    assert "ImageNet classes:" in texts(at.caption)
    assert len(at.image) == 24


def test_find_more_like_this_shows_neighbours_of_the_clicked_image(demo):
    at = app(demo.root, "find")
    first = demo.browse(n=24, seed=0)[0].image_id
    at.button(key=f"find-like-{first}").click().run()
    assert at.session_state["find_mode"] == "similar"
    assert f"#{first}" in texts(at.caption) or len(at.image) == 25


def test_find_example_upload_shows_the_most_similar_images(demo, small_demo):
    example = Path((small_demo / "animals.txt").read_text().splitlines()[0])
    at = app(demo.root, "find")
    at.segmented_control(key="find_mode").set_value("upload").run()
    at.file_uploader(key="find_upload").set_value((example.name, example.read_bytes(), "image/png")).run()
    assert not at.error
    assert len(at.image) == 1 + 24  # the example, then its neighbours
    assert at.button(key=f"find-positive-{demo.store.image_id_for_path(str(example))}")  # the same picture ranks among them


def test_find_refuses_a_non_image_example(demo):
    at = app(demo.root, "find")
    at.segmented_control(key="find_mode").set_value("upload").run()
    at.file_uploader(key="find_upload").set_value(("cat.jpg", b"GIF? no", "image/jpeg")).run()
    assert "not a usable image" in texts(at.error)


# -- train ------------------------------------------------------------------------------
def test_train_without_positives_explains_and_disables_the_button(demo):
    at = app(demo.root, "train")
    assert "No positives" in texts(at.info)
    assert at.button(key="train_start").disabled


def test_train_button_runs_a_round_in_the_background(demo, small_demo):
    demo.label(DEMO_CATEGORY, animal_ids(demo, small_demo)[:5], "positive")
    at = app(demo.root, "train")
    at.button(key="train_start").click().run()
    job = demo.store.jobs()[0]
    assert job.kind == "train"
    wait_for_jobs(demo)
    assert demo.store.job(job.id).state == "done", demo.store.job(job.id).error
    at.run()
    assert metric(at, "Model") == "v1"
    assert at.dataframe[-1].value["version"].tolist() == ["v1"]


def test_auto_retrain_setting_is_kept_in_the_project(demo):
    at = app(demo.root, "train")
    at.toggle(key="train_auto_retrain").set_value(True).run()
    assert demo.auto_retrain_after == 20


# -- review -----------------------------------------------------------------------------
def test_review_without_positives_sends_the_user_to_find(demo):
    at = app(demo.root, "review")
    assert "label a few" in texts(at.info)


def test_review_decisions_reach_the_store_before_the_next_image(trained):
    at = app(trained.root, "review")
    queue = at.session_state["review_queue"].items
    first, second = queue[0].image_id, queue[1].image_id
    at.button(key="review-positive").click().run()
    assert trained.store.labels(DEMO_CATEGORY)[first] == "positive"
    assert at.session_state["review_queue"].items[0].image_id == second
    at.button(key="review-negative-alt").click().run()  # the N twin of X
    assert trained.store.labels(DEMO_CATEGORY)[second] == "negative"


def test_review_undo_restores_the_previous_label_and_image(trained):
    at = app(trained.root, "review")
    first = at.session_state["review_queue"].items[0].image_id
    at.button(key="review-negative").click().run()
    at.button(key="review-undo").click().run()
    assert first not in trained.store.labels(DEMO_CATEGORY)
    assert at.session_state["review_queue"].items[0].image_id == first


def test_review_skip_moves_on_without_labeling(trained):
    at = app(trained.root, "review")
    first = at.session_state["review_queue"].items[0].image_id
    before = dict(trained.store.labels(DEMO_CATEGORY))
    at.button(key="review-skip").click().run()
    assert trained.store.labels(DEMO_CATEGORY) == before
    assert at.session_state["review_queue"].items[0].image_id != first
    assert trained.store.skipped(DEMO_CATEGORY, local_user()) == [first]  # in the store: the CLI sees it
    reloaded = app(trained.root, "review")  # a new session (a reload) keeps the skip
    assert first not in {c.image_id for c in reloaded.session_state["review_queue"].items}


def test_review_shows_counters_and_every_strategy(trained):
    at = app(trained.root, "review")
    assert {m.label for m in at.metric} >= {"Reviewed", "Found", "Precision, last 20"}
    assert set(at.selectbox(key="review_strategy").options) >= {
        "Most likely",
        "Uncertain",
        "Near seeds",
        "Random",
        "Mixed",
    }


def test_review_grid_saves_ticked_positive_and_the_rest_negative(trained):
    at = app(trained.root, "review")
    at.segmented_control(key="review_view").set_value("grid").run()
    batch = [c.image_id for c in at.session_state["review_queue"].items[:12]]
    at.checkbox(key=f"review-grid-{batch[0]}").check()
    at.button(key="review-grid-save").click().run()
    labels = trained.store.labels(DEMO_CATEGORY)
    assert labels[batch[0]] == "positive"
    assert all(labels[i] == "negative" for i in batch[1:])


# -- export -----------------------------------------------------------------------------
def test_export_before_training_offers_labels_only(demo):
    at = app(demo.root, "export")
    assert "No trained model" in texts(at.info)
    assert at.download_button(key="export-scores").disabled


def test_export_offers_model_labels_and_scores(trained):
    at = app(trained.root, "export")
    keys = {b.key for b in at.download_button}
    assert keys >= {"export-model", "export-labels", "export-scores"}
    assert not at.download_button(key="export-model").disabled
    assert len(at.code) == 1


def test_auto_retrain_starts_a_round_once_enough_new_labels_arrive(trained):
    trained.auto_retrain_after = 2
    at = app(trained.root, "review")
    at.button(key="review-negative").click().run()
    assert not trained.store.jobs()
    at.button(key="review-negative").click().run()
    assert [j.kind for j in trained.store.jobs()] == ["train"]
    wait_for_jobs(trained)
    assert trained.store.active_model(DEMO_CATEGORY).id == 2
