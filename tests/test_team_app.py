"""Sharing the app with a team: loopback by default, the refusal to serve openly without
sign-in, projects only from the projects folder, who is signed in and what they may do, and
the job limits that keep one visitor from starving the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import streamlit.config
import test_app  # first: it puts the repo (app_pages) on sys.path
import tomllib
from streamlit.runtime.context import StreamlitHeaders
from streamlit.testing.v1 import AppTest
from test_app import APP, REPO, TIMEOUT, animal_ids, texts, wait_for_jobs

from app_pages import common
from app_pages.text import md_escape
from bgminer.demo import DEMO_CATEGORY
from bgminer.jobs import JobLimitError, JobRunner
from bgminer.project import Project
from bgminer.settings import Settings, local_user
from bgminer.store import Store

ALICE, BOB = "alice@example.org", "bob@example.org"
# The 50-image demo slice (embedded) and its copy with a trained model, each built once per session.
small_demo, small_trained = test_app.small_demo, test_app.small_trained


@pytest.fixture(autouse=True)
def plain_settings(monkeypatch):
    """Each test starts from no BGMINER_* settings at all (a laptop install)."""
    for name in [n for n in os.environ if n.startswith("BGMINER_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def server_address():
    """Set Streamlit's server.address for one test, restoring it after."""
    before = streamlit.config.get_option("server.address")
    yield lambda value: streamlit.config.set_option("server.address", value)
    streamlit.config.set_option("server.address", before)


@pytest.fixture
def projects(tmp_path, monkeypatch) -> Path:
    """A projects folder with two empty projects, a folder that is no project, and BGMINER_PROJECTS_DIR on it."""
    root = tmp_path / "projects"
    for slug in ("birds", "zebras"):
        Project.create(root / slug)
    (root / "notes").mkdir()
    monkeypatch.setenv("BGMINER_PROJECTS_DIR", str(root))
    return root


def run_app(user: dict | None = None, page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if user is not None:
        at.user = user
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page is not None:
        at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def signed_in(email: str) -> dict:
    return {"is_logged_in": True, "email": email}


def element_types(at: AppTest) -> list[str]:
    """Every element the run rendered, main area and sidebar, by type."""
    found = []

    def walk(node) -> None:
        children = getattr(node, "children", None)
        if children:
            for child in children.values():
                walk(child)
        elif getattr(node, "type", None) not in (None, "main", "sidebar", "event"):
            found.append(node.type)

    walk(at.main)
    walk(at.sidebar)
    return found


# -- safe defaults ------------------------------------------------------------------------
def test_streamlit_config_binds_loopback_and_hides_error_details():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert set(config["server"]["allowedHosts"]) == {"localhost", "127.0.0.1"}
    assert config["client"]["showErrorDetails"] == "none"
    assert config["client"]["toolbarMode"] == "minimal"


def test_make_app_binds_loopback():
    plan = subprocess.run(["make", "-n", "app"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    command = next(line for line in plan.splitlines() if "streamlit run app.py" in line)
    assert "--server.address 127.0.0.1" in command


def test_app_refuses_every_interface_without_sign_in(server_address):
    server_address("0.0.0.0")
    at = run_app()
    assert len(at.error) == 1
    assert "BGMINER_AUTH" in at.error[0].value and "0.0.0.0" in at.error[0].value
    assert element_types(at) == ["error"]  # the one line, and nothing else: no sidebar, no page


def test_app_behind_a_sign_in_proxy_serves_on_every_interface_and_asks_for_the_header(server_address, monkeypatch):
    server_address("0.0.0.0")
    monkeypatch.setenv("BGMINER_AUTH", "proxy")
    at = run_app()
    assert "refuses" not in texts(at.error)
    assert "no X\\-Forwarded\\-Email header: is the proxy in front?" in texts(at.error)  # AppTest sends no headers
    assert not at.sidebar.selectbox  # nothing of the app before sign-in


def test_a_bad_setting_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("BGMINER_AUTH", "ldap")
    at = run_app()
    assert element_types(at) == ["error"]
    assert "BGMINER\\_AUTH must be one of" in at.error[0].value


# -- projects only from the projects folder -----------------------------------------------
def test_project_picker_lists_only_the_projects_in_the_projects_folder(projects, tmp_path):
    Project.create(tmp_path / "elsewhere")
    at = run_app()
    picker = at.sidebar.selectbox(key="project_select")
    assert picker.options == ["birds", "zebras"]
    assert picker.value == str(projects / "birds")
    assert [w.key for w in at.sidebar.text_input] == ["project_new_slug"]  # a name, never a folder


def test_picking_a_project_opens_it(projects):
    at = run_app()
    at.sidebar.selectbox(key="project_select").set_value(str(projects / "zebras")).run()
    assert at.session_state["project_root"] == str(projects / "zebras")
    assert "No images yet" in texts(at.info)


def test_a_project_outside_the_projects_folder_is_refused(projects, tmp_path, monkeypatch):
    outside = Project.create(tmp_path / "outside").root
    monkeypatch.setenv("BGMINER_PROJECT", str(outside))
    at = run_app()
    assert "outside BGMINER\\_PROJECTS\\_DIR" in texts(at.sidebar.error)
    assert "No project is open" in texts(at.info)
    # A folder smuggled into the session is refused the same way.
    monkeypatch.delenv("BGMINER_PROJECT")
    at = run_app(project_root=str(outside))
    assert "No project is open" in texts(at.info)


def test_a_new_project_name_must_be_a_slug(projects):
    at = run_app()
    at.sidebar.text_input(key="project_new_slug").set_value("../../etc")
    at.sidebar.button(key="project_create").click().run()
    assert "lower\\-case letters" in texts(at.sidebar.error)
    assert sorted(p.name for p in projects.parent.iterdir()) == ["projects"]
    assert sorted(p.name for p in projects.iterdir()) == ["birds", "notes", "zebras"]


def test_without_settings_the_app_opens_the_demo_slot_and_offers_to_build_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./projects is the default projects folder
    at = run_app()
    assert at.session_state["project_root"] == str(tmp_path / "projects" / "demo")
    assert "is not a bgminer project yet" in texts(at.sidebar.warning)
    assert at.sidebar.button(key="project_build_demo")
    assert f"Local user {md_escape(local_user())} (admin)" in texts(at.sidebar.caption)


# -- people -------------------------------------------------------------------------------
def test_oidc_asks_to_sign_in_before_anything_else(monkeypatch):
    monkeypatch.setenv("BGMINER_AUTH", "oidc")
    at = run_app(user={"is_logged_in": False})
    assert at.button(key="sign_in").label == "Sign in"
    assert not at.sidebar.selectbox


def test_a_non_admin_cannot_create_projects_or_build_the_demo(projects, monkeypatch):
    monkeypatch.setenv("BGMINER_AUTH", "oidc")
    monkeypatch.setenv("BGMINER_ADMINS", ALICE)
    monkeypatch.setenv("BGMINER_PROJECT", "new-one")
    at = run_app(user=signed_in(BOB))
    assert f"Signed in as {md_escape(BOB)}" in texts(at.sidebar.caption)
    assert "(admin)" not in texts(at.sidebar.caption)
    assert not [b for b in at.sidebar.button if b.key in ("project_create", "project_build_demo")]
    assert "Ask an admin" in texts(at.sidebar.caption)
    assert at.sidebar.button(key="sign_out")


def test_an_admin_creates_a_project_by_name(projects, monkeypatch):
    monkeypatch.setenv("BGMINER_AUTH", "oidc")
    monkeypatch.setenv("BGMINER_ADMINS", ALICE.upper())  # e-mail addresses compare case-insensitively
    at = run_app(user=signed_in(ALICE))
    assert f"Signed in as {md_escape(ALICE)} (admin)" in texts(at.sidebar.caption)
    at.sidebar.text_input(key="project_new_slug").set_value("moths")
    at.sidebar.button(key="project_create").click().run()
    assert (projects / "moths" / "bgminer.sqlite").is_file()
    assert at.sidebar.selectbox(key="project_select").options == ["birds", "moths", "zebras"]


def headers(*pairs: tuple[str, str]) -> StreamlitHeaders:
    return StreamlitHeaders(pairs)


def test_identity_comes_from_the_proxy_header_only_in_proxy_mode():
    proxy, none, oidc = Settings(auth="proxy"), Settings(), Settings(auth="oidc")
    sent = headers(("x-forwarded-email", ALICE))
    assert common.resolve_user(proxy, sent, {}) == ALICE
    assert common.resolve_user(none, sent, {}) == local_user()  # a client-sent header means nothing without a proxy
    assert common.resolve_user(oidc, sent, {}) is None
    assert common.resolve_user(Settings(auth="proxy", auth_header="X-Auth-Request-User"), sent, {}) is None


@pytest.mark.parametrize("value", ["", "   ", "alice @example.org", "alice\n@example.org", "a" * 300])
def test_an_unusable_identity_header_signs_nobody_in(value):
    assert common.resolve_user(Settings(auth="proxy"), headers(("X-Forwarded-Email", value)), {}) is None


def test_an_identity_header_sent_twice_signs_nobody_in():
    twice = headers(("X-Forwarded-Email", BOB), ("X-Forwarded-Email", ALICE))  # a client's own next to the proxy's
    assert common.resolve_user(Settings(auth="proxy"), twice, {}) is None


def test_oidc_identity_is_the_email_or_the_subject():
    oidc = Settings(auth="oidc")
    assert common.resolve_user(oidc, headers(), {"is_logged_in": True, "email": ALICE, "sub": "123"}) == ALICE
    assert common.resolve_user(oidc, headers(), {"is_logged_in": True, "sub": "google-123"}) == "google-123"
    assert common.resolve_user(oidc, headers(), {"is_logged_in": False, "email": ALICE}) is None


# -- labels carry who made them -----------------------------------------------------------
def shared_copy(source: Path, tmp_path: Path, monkeypatch) -> Project:
    """A copy of ``source`` in a projects folder, signed in through OIDC, alice an admin."""
    root = tmp_path / "projects" / "shared"
    shutil.copytree(source, root)
    for name, value in {"BGMINER_PROJECTS_DIR": str(root.parent), "BGMINER_AUTH": "oidc", "BGMINER_ADMINS": ALICE}.items():
        monkeypatch.setenv(name, value)
    return Project(root)


@pytest.fixture
def shared(small_demo, tmp_path, monkeypatch) -> Project:
    return shared_copy(small_demo / "project", tmp_path, monkeypatch)


@pytest.fixture
def shared_trained(small_trained, tmp_path, monkeypatch) -> Project:
    return shared_copy(small_trained, tmp_path, monkeypatch)


def test_find_shows_who_labeled_an_image_when_it_was_someone_else(shared):
    first, second = (c.image_id for c in shared.browse(n=2, seed=0))
    at = run_app(signed_in(ALICE), "find")
    at.button(key=f"find-positive-{first}").click().run()
    assert shared.store.label_authors(DEMO_CATEGORY) == {first: ALICE}
    assert "by" not in texts(at.caption)  # your own label needs no name

    at = run_app(signed_in(BOB), "find")
    assert f"positive]  \nby {md_escape(ALICE)}" in texts(at.caption)
    at.button(key=f"find-negative-{second}").click().run()
    assert shared.store.label_authors(DEMO_CATEGORY) == {first: ALICE, second: BOB}


def test_review_undo_takes_back_only_your_own_decision(shared, small_demo):
    shared.label(DEMO_CATEGORY, animal_ids(shared, small_demo)[:3], "positive", author=ALICE)
    alice = run_app(signed_in(ALICE), "review")
    mine = alice.session_state["review_queue"].items[0].image_id
    alice.button(key="review-negative").click().run()
    bob = run_app(signed_in(BOB), "review")
    theirs = bob.session_state["review_queue"].items[0].image_id
    bob.button(key="review-positive").click().run()
    alice.button(key="review-undo").click().run()
    labels = shared.store.labels(DEMO_CATEGORY)
    assert mine not in labels and labels[theirs] == "positive"


# -- training caps and job limits ---------------------------------------------------------
def test_a_non_admins_auto_retrain_stays_within_the_epoch_cap(shared_trained, monkeypatch):
    monkeypatch.setenv("BGMINER_USER_MAX_EPOCHS", "2")  # the default adapter round takes 4
    shared_trained.auto_retrain_after = 1
    bob = run_app(signed_in(BOB), "review")
    first = bob.session_state["review_queue"].items[0].image_id
    bob.button(key="review-negative").click().run()
    assert shared_trained.store.labels(DEMO_CATEGORY)[first] == "negative"  # the label is kept
    assert not shared_trained.store.jobs()  # but bob may not start a 4-epoch round

    alice = run_app(signed_in(ALICE), "review")
    alice.button(key="review-negative").click().run()
    assert [j.kind for j in shared_trained.store.jobs()] == ["train"]  # an admin may
    wait_for_jobs(shared_trained)


def test_the_train_page_says_when_the_project_is_busy(shared_trained):
    runner = common.job_runner(common.open_project(shared_trained.root))  # the app's runner for this project
    release, work = blocker()
    job = runner.start("ingest", work)
    at = run_app(signed_in(ALICE), "train")
    at.button(key="train_start").click().run()
    assert f"ingest job (#{job}) is already running on this project" in texts(at.error).replace("\\", "")
    assert [j.kind for j in shared_trained.store.jobs()] == ["ingest"]  # no training row was added
    release.set()
    assert runner.wait(job, timeout=60).state == "done"


@pytest.fixture
def stores(tmp_path) -> tuple[Store, Store]:
    return Store(tmp_path / "a.sqlite"), Store(tmp_path / "b.sqlite")


def blocker() -> tuple[threading.Event, object]:
    """A job that runs until its event is set."""
    release = threading.Event()

    def work(progress, cancel) -> dict:
        assert release.wait(60), "the test never released the job"
        return {}

    return release, work


def test_a_second_heavy_job_on_the_same_project_is_refused(stores):
    first_store, _ = stores
    release, work = blocker()
    app_runner = JobRunner(first_store, max_jobs=4)
    job = app_runner.start("ingest", work)
    other = JobRunner(Store(first_store.path), max_jobs=4)  # another session's runner on the same project
    with pytest.raises(JobLimitError, match=f"ingest job \\(#{job}\\) is already running on this project"):
        other.start("train", lambda progress, cancel: {})
    assert other.start("export", lambda progress, cancel: {}) > job  # light jobs are not limited
    release.set()
    assert app_runner.wait(job, timeout=60).state == "done"
    done = other.start("train", lambda progress, cancel: {"ok": True})
    assert other.wait(done, timeout=60).result == {"ok": True}


def test_one_heavy_job_per_project_holds_across_processes(stores):
    store, _ = stores
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from bgminer.jobs import JobRunner; from bgminer.store import Store\n"
            f"runner = JobRunner(Store({str(store.path)!r}))\n"
            "job = runner.start('train', lambda progress, cancel: sys.stdin.readline())\n"
            "print(job, flush=True); runner.wait(job)\n"
        )],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        job = int(child.stdout.readline())
        with pytest.raises(JobLimitError, match=f"train job \\(#{job}\\)"):
            JobRunner(store, max_jobs=4).start("ingest", lambda progress, cancel: {})
    finally:
        child.stdin.write("go\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    assert store.job(job).state == "done"
    runner = JobRunner(store, max_jobs=4)
    assert runner.wait(runner.start("ingest", lambda progress, cancel: {}), timeout=60).state == "done"


def test_the_global_cap_counts_heavy_jobs_of_every_runner(stores, monkeypatch):
    monkeypatch.setenv("BGMINER_MAX_JOBS", "1")
    a, b = JobRunner(stores[0]), JobRunner(stores[1])
    release, work = blocker()
    job = a.start("train", work)
    with pytest.raises(JobLimitError, match="BGMINER_MAX_JOBS"):
        b.start("ingest", lambda progress, cancel: {})
    assert not stores[1].jobs()  # a refused job leaves no row
    release.set()
    a.wait(job, timeout=60)
    assert b.wait(b.start("ingest", lambda progress, cancel: {}), timeout=60).state == "done"


def test_different_heavy_jobs_on_different_projects_run_together(stores):
    a, b = JobRunner(stores[0], max_jobs=2), JobRunner(stores[1], max_jobs=2)
    release, work = blocker()
    jobs = [(a, a.start("train", work)), (b, b.start("ingest", work))]
    assert all(runner.store.job(job).active for runner, job in jobs)
    release.set()
    assert [runner.wait(job, timeout=60).state for runner, job in jobs] == ["done", "done"]
