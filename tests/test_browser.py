"""End to end in a real browser: `streamlit run app.py` on a free port against a fresh copy of the
demo project, driven by headless Debian Chromium through Playwright. Label seeds on Find, train,
review three candidates with the keyboard, and check the store holds exactly those decisions.
Screenshots of every page go to test-artifacts/."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
from streamlit_server import ARTIFACTS, CHROMIUM, WAIT_MS, chromium, streamlit_app

from bgminer.demo import DEMO_CATEGORY, DEMO_DIR, build_demo_project
from bgminer.store import Store

TRAIN_WAIT_MS = 300_000  # one adapter round; seconds on an idle laptop, minutes on a loaded 2-core box

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian Chromium (/usr/bin/chromium) is not installed; `make system-deps` installs it"
    ),
]
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory) -> Path:
    """The demo project, built once per test session."""
    root = tmp_path_factory.mktemp("demo") / "project"
    build_demo_project(root)
    return root


@pytest.fixture
def app_url(demo_project, tmp_path):
    """`streamlit run app.py` on a free port, against a private copy of the demo project."""
    project = tmp_path / "project"
    shutil.copytree(demo_project, project)
    with streamlit_app({**os.environ, "BGMINER_PROJECT": str(project)}, tmp_path / "streamlit.log") as url:
        yield url, project


@pytest.fixture
def page(app_url):
    with chromium() as browser:
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.set_default_timeout(WAIT_MS)
        yield tab


def settle(page) -> None:
    """Wait until the app has finished its current run."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=WAIT_MS)
    page.wait_for_timeout(300)


def go(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).click()
    page.get_by_role("heading", name=re.compile(title if title != "Find" else "Find seed positives")).first.wait_for()
    settle(page)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def current_review_id(page) -> int:
    caption = page.locator(".st-key-review-current [data-testid='stCaptionContainer']").first.inner_text()
    return int(re.match(r"#(\d+)", caption).group(1))


def test_label_train_and_review_with_the_keyboard(page, app_url):
    url, project = app_url
    with open(DEMO_DIR / "labels.csv") as fp:
        animals = {(DEMO_DIR / r["path"]).resolve().name for r in csv.DictReader(fp) if r["category"] == DEMO_CATEGORY}

    page.goto(url)
    page.get_by_role("heading", name="Corpus").wait_for()
    page.locator("[class*='st-key-card-corpus-'] img").first.wait_for()
    settle(page)
    shot(page, "1-corpus")

    # Find: text search, then label the animals among the results as seeds.
    go(page, "Find")
    page.get_by_role("radio", name=re.compile("Text")).click()
    query = page.locator(".st-key-find_text_query input")
    query.fill("animal")
    query.press("Enter")
    page.get_by_text(re.compile("Matched .* ImageNet classes")).wait_for()
    settle(page)
    store = Store(project / "bgminer.sqlite")
    shown = [
        int(k.split("-")[-1])
        for k in page.locator("[class*='st-key-find-positive-']").evaluate_all(
            "els => els.map(e => [...e.classList].find(c => c.startsWith('st-key-find-positive-')))"
        )
    ]
    seeds = [i for i in shown if Path(store.image(i)["path"]).name in animals][:4]
    assert seeds, "the text search should surface some demo animals"
    for image_id in seeds:
        page.locator(f".st-key-find-positive-{image_id} button").first.click()
        settle(page)
    assert store.labels(DEMO_CATEGORY) == {i: "positive" for i in seeds}
    shot(page, "2-find")

    # Train: one background round; the page refreshes itself when the job ends.
    go(page, "Train")
    page.locator(".st-key-train_start button").first.click()
    page.locator("[data-testid='stMetricValue']", has_text="v1").wait_for(timeout=TRAIN_WAIT_MS)
    settle(page)
    assert store.active_model(DEMO_CATEGORY) is not None
    shot(page, "3-train")

    # Review: three decisions with the keyboard (A positive, N negative, X then Backspace undo, Y positive).
    go(page, "Review")
    page.locator(".st-key-review-current img").wait_for()
    settle(page)
    shot(page, "4-review")
    decided = {}
    for key, value in (("a", "positive"), ("n", "negative"), ("x", "negative")):
        image_id = current_review_id(page)
        page.keyboard.press(key)
        page.wait_for_function(
            "id => !document.querySelector('.st-key-review-current "
            "[data-testid=stCaptionContainer]')?.innerText.startsWith('#' + id + ' ')",
            arg=image_id,
        )
        settle(page)
        decided[image_id] = value
        assert store.labels(DEMO_CATEGORY).get(image_id) == value, f"{key} should store {value} for #{image_id}"
    last = image_id
    page.keyboard.press("Backspace")
    page.wait_for_function(
        "id => document.querySelector('.st-key-review-current "
        "[data-testid=stCaptionContainer]')?.innerText.startsWith('#' + id + ' ')",
        arg=last,
    )
    settle(page)
    assert last not in store.labels(DEMO_CATEGORY)
    page.keyboard.press("y")
    page.wait_for_function(
        "id => !document.querySelector('.st-key-review-current "
        "[data-testid=stCaptionContainer]')?.innerText.startsWith('#' + id + ' ')",
        arg=last,
    )
    settle(page)
    decided[last] = "positive"
    labels = store.labels(DEMO_CATEGORY)
    assert {i: labels.get(i) for i in decided} == decided
    assert len(labels) == len(seeds) + 3
    shot(page, "5-review-after")

    go(page, "Export")
    page.locator(".st-key-export-model button").first.wait_for()
    shot(page, "6-export")
