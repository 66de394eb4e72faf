"""The web app is safe to share: user text (category names, identities, paths, job errors) is
shown literally, never as Markdown; only admins add data, pick training settings and export;
folders outside the data roots are refused without telling whether they exist; undo and
decisions say when someone else's label is in the way."""

from __future__ import annotations

import re
import sqlite3
import string
import time
from pathlib import Path

import pytest
import test_app
from streamlit.testing.v1 import AppTest
from test_app import DEMO_CATEGORY, app, metric, png_bytes, texts, wait_for_jobs

from app_pages import common
from app_pages.text import code, md_escape
from bgminer.project import Project

EVIL = "[click](http://evil.example) **bold** :red[x] :material/home: $x$ <b>hi</b> www.evil.example a@evil.example"
ADMIN = "alice@example.org"
USER = "bob@example.org"
# Elements whose strings Streamlit shows as plain text (user text goes there unescaped).
PLAIN = {"selectbox", "multiselect", "text", "code", "arrow_data_frame"}
# The small demo projects of test_app.py (fixtures), shared with these tests.
small_demo, small_trained, demo, trained = test_app.small_demo, test_app.small_trained, test_app.demo, test_app.trained


# -- md_escape -----------------------------------------------------------------------------
def unescape(markdown: str) -> str:
    """What CommonMark shows for a string made only of text and backslash escapes."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")


@pytest.mark.parametrize("char", list(string.punctuation))
def test_md_escape_escapes_every_ascii_punctuation_character(char):
    assert md_escape(f"a{char}b").startswith(f"a\\{char}")


def test_md_escape_leaves_no_markdown_and_shows_the_same_text():
    escaped = md_escape(EVIL + "\n# title\n1. item\n    code")
    assert unescape(escaped) == EVIL + "\n# title\n1. item\n    code"
    punctuation = re.escape(string.punctuation)
    assert not re.search(f"[{punctuation}]", re.sub(rf"\\[{punctuation}]", "", escaped))  # no punctuation left bare


@pytest.mark.parametrize(
    ("text", "broken"),
    [
        ("see http://evil.example", "http\\:\u2060"),  # GFM bare link
        ("www.evil.example", "www\u2060\\."),
        ("bob@example.org", "bob\\@\u2060"),  # bare e-mail link
        (":streamlit:", "\\:\u2060streamlit\\:\u2060"),  # Streamlit's logo shortcode
        (":smile: :material/home:", "\\:\u2060smile"),
        ("a -> b", "\\-\u2060\\>"),  # Streamlit's arrows
        ("a >= b", "\\>\u2060\\="),
    ],
)
def test_md_escape_breaks_what_is_found_after_parsing(text, broken):
    """Bare links, :streamlit: and arrows are matched in parsed text, past backslash escapes."""
    assert broken in md_escape(text)
    assert unescape(md_escape(text)) == text


@pytest.mark.parametrize("text", ["plain", "a`b", "``x``", "`edge", " pad ", ":material/home: `x`"])
def test_code_is_one_code_span_whatever_the_backticks(text):
    """A code span closes at the first backtick run as long as its opening one (CommonMark)."""
    span = code(text)
    fence = re.match(r"`+", span).group()
    assert re.search(r"`+$", span).group() == fence
    inner = span[len(fence) : -len(fence)]
    assert fence not in re.findall(r"`+", inner)
    shown = inner[1:-1] if inner.startswith(" ") and inner.endswith(" ") and inner.strip() else inner
    assert shown.replace("\u2060", "") == text


# -- what the pages render ---------------------------------------------------------------
def proto_strings(message) -> list[str]:
    out: list[str] = []
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        for item in items:
            if isinstance(item, str):
                out.append(item)
            elif hasattr(item, "ListFields"):
                out.extend(proto_strings(item))
    return out


def shown_markdown(at: AppTest) -> list[str]:
    """Every string the page renders as Markdown: element bodies, labels, help, captions, toasts,
    expander and tab labels (main area and sidebar)."""
    out: list[str] = []

    def walk(node) -> None:
        if getattr(node, "proto", None) is not None and getattr(node, "type", None) not in PLAIN:
            out.extend(proto_strings(node.proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)  # the whole page, sidebar included (AppTest has no public walk)
    return out


def assert_literal(at: AppTest, text: str, at_least: int) -> None:
    """``text`` shows only escaped (as md_escape or in a code span), at least ``at_least`` times."""
    marker = "evil"
    showing = [s for s in shown_markdown(at) if marker in s]
    assert len(showing) >= at_least, showing
    for s in showing:
        assert marker not in s.replace(md_escape(text), "").replace(code(text), ""), s


def add_legacy_category(project: Project, name: str) -> None:
    """A category created before names were validated: straight into the database."""
    with sqlite3.connect(project.root / "bgminer.sqlite") as db:
        db.execute("INSERT INTO categories (name, created_at) VALUES (?, ?)", (name, time.time()))


@pytest.mark.parametrize("page", ["find", "train", "review", "export"])
def test_a_markdown_category_name_renders_literally(demo, page):
    add_legacy_category(demo, EVIL)
    at = AppTest.from_file(test_app.APP, default_timeout=test_app.TIMEOUT)
    at.session_state["project_root"] = str(demo.root)
    at.session_state["category"] = EVIL
    at.run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert_literal(at, EVIL, 2)  # the header or metric, and a label or note


def test_a_failed_training_job_shows_its_error_literally(demo):
    error = "boom [click](http://evil.example) **evil** :red[x]"

    def fail(progress, cancel):
        raise RuntimeError(error)

    runner = common.job_runner(common.open_project(demo.root))
    job_id = runner.start("train", fail)
    assert runner.wait(job_id, timeout=30).state == "failed"
    at = app(demo.root, "train")
    failed = [e.value for e in at.error if f"Training #{job_id} failed" in e.value]
    assert failed and md_escape(error) in failed[0]
    assert_literal(at, error, 1)


# -- admins and users ----------------------------------------------------------------------
@pytest.fixture
def signed_in(monkeypatch):
    """Sign-in on (OIDC, as AppTest can seed st.user), with alice as the only admin."""
    monkeypatch.setenv("BGMINER_AUTH", "oidc")
    monkeypatch.setenv("BGMINER_ADMINS", ADMIN)

    def open_as(root: Path, user: str, page: str | None = None) -> AppTest:
        return app(root, page, user=user)

    return open_as


def test_only_admins_can_add_folders_or_uploads(demo, signed_in):
    user = signed_in(demo.root, USER)
    assert not [w for w in user.text_input if w.key == "corpus_folder"]
    assert not user.get("file_uploader")
    assert "BGMINER_ADMINS" in texts(user.caption)
    admin = signed_in(demo.root, ADMIN)
    assert admin.text_input(key="corpus_folder")
    assert admin.get("file_uploader")


def test_only_admins_choose_the_training_mode_and_epochs(demo, signed_in):
    user = signed_in(demo.root, USER, "train")
    assert not [w for w in user.selectbox if w.key == "train_mode"]
    assert "BGMINER_ADMINS" in texts(user.caption)
    assert user.toggle(key="train_auto_retrain").disabled
    admin = signed_in(demo.root, ADMIN, "train")
    assert admin.selectbox(key="train_mode")


def test_only_admins_can_export(trained, signed_in):
    user = signed_in(trained.root, USER, "export")
    assert not user.get("download_button")
    assert "BGMINER_ADMINS" in texts(user.caption)
    admin = signed_in(trained.root, ADMIN, "export")
    assert {b.key for b in admin.get("download_button")} >= {"export-model", "export-labels", "export-scores"}


# -- data roots ----------------------------------------------------------------------------
def add_folder(root: Path, folder: Path) -> AppTest:
    at = app(root)
    at.text_input(key="corpus_folder").set_value(str(folder))
    at.button(key="corpus_add_folder").click().run()
    return at


def test_a_folder_outside_the_data_roots_is_refused_alike_whether_it_exists_or_not(demo, tmp_path, monkeypatch):
    inside = tmp_path / "data"
    inside.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "a.png").write_bytes(b"not read")
    monkeypatch.setenv("BGMINER_DATA_ROOTS", str(inside))
    existing = add_folder(demo.root, outside)
    missing = add_folder(demo.root, tmp_path / "no-such-folder")
    said = [
        texts(at.error).replace(code(str(path)), "PATH")
        for at, path in ((existing, outside), (missing, tmp_path / "no-such-folder"))
    ]
    assert "outside the data roots" in said[0]
    assert said[0] == said[1]
    assert not demo.store.jobs()
    assert "does not exist" in texts(add_folder(demo.root, inside / "missing").error)


def test_a_symlink_out_of_the_data_roots_is_refused(demo, tmp_path, monkeypatch):
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "link").symlink_to(Path(demo.root).parent)
    monkeypatch.setenv("BGMINER_DATA_ROOTS", str(inside))
    at = add_folder(demo.root, inside / "link")
    assert "outside the data roots" in texts(at.error)
    assert not demo.store.jobs()


# -- uploads --------------------------------------------------------------------------------
def test_a_refused_upload_is_named_literally(demo):
    name = "[click](http://evil.example) **evil**.png"
    at = app(demo.root)
    at.file_uploader(key="corpus_upload").set_value((name, b"text, not pixels", "image/png"))
    at.button(key="corpus_add_upload").click().run()
    assert "not a usable image" in texts(at.error)
    assert_literal(at, name, 1)
    assert not demo.store.jobs()


def test_two_uploads_with_the_same_name_both_arrive(demo):
    at = app(demo.root)
    files = [("same.png", png_bytes((220, 20, 20)), "image/png"), ("same.png", png_bytes((20, 20, 220)), "image/png")]
    at.file_uploader(key="corpus_upload").set_value(files)
    at.button(key="corpus_add_upload").click().run()
    wait_for_jobs(demo)
    at.run()
    assert metric(at, "Images") == "52"


def test_an_upload_over_the_file_count_limit_is_refused_whole(demo, monkeypatch):
    monkeypatch.setenv("BGMINER_MAX_SUBMIT_FILES", "1")
    at = app(demo.root)
    at.file_uploader(key="corpus_upload").set_value(
        [("a.png", png_bytes((1, 2, 3)), "image/png"), ("b.png", png_bytes((4, 5, 6)), "image/png")]
    )
    at.button(key="corpus_add_upload").click().run()
    assert "Refused 2 of 2 files" in texts(at.error)
    assert not demo.store.jobs()


# -- review with two people ----------------------------------------------------------------
def test_undo_says_who_changed_the_image_since_and_undoes_nothing(trained, signed_in):
    at = signed_in(trained.root, ADMIN, "review")
    first = at.session_state["review_queue"].items[0].image_id
    at.button(key="review-negative").click().run()
    trained.label(DEMO_CATEGORY, [first], "positive", author=USER)
    at.button(key="review-undo").click().run()
    assert trained.store.labels(DEMO_CATEGORY)[first] == "positive"
    assert [t.value for t in at.toast] == [md_escape(f"{USER} changed #{first} since; nothing undone")]


def test_a_decision_on_an_image_someone_else_labeled_meanwhile_says_so(trained, signed_in):
    at = signed_in(trained.root, ADMIN, "review")
    first = at.session_state["review_queue"].items[0].image_id
    trained.label(DEMO_CATEGORY, [first], "positive", author=USER)
    at.button(key="review-negative").click().run()
    assert trained.store.labels(DEMO_CATEGORY)[first] == "negative"
    assert [t.value for t in at.toast] == [
        f"{md_escape(USER)} had labeled #{first} positive meanwhile; your negative replaces it."
    ]


def test_own_undo_in_review_still_works_when_signed_in(trained, signed_in):
    at = signed_in(trained.root, USER, "review")
    first = at.session_state["review_queue"].items[0].image_id
    at.button(key="review-negative").click().run()
    at.button(key="review-undo").click().run()
    assert first not in trained.store.labels(DEMO_CATEGORY)
    assert [t.value for t in at.toast] == [f"Undid negative on #{first}."]
