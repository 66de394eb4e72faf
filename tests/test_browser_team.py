"""Two people at once, in a real browser, behind a (simulated) sign-in proxy: `streamlit run
app.py` with BGMINER_AUTH=proxy, and two Chromium contexts that send the identity header a proxy
like oauth2-proxy sets, one for alice (an admin) and one for bob. Each sees the other's
authorship on Find, and each one's undo takes back only their own decision. Screenshots go to
test-artifacts/team-*.png."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import test_app  # puts the repo on sys.path; its small_demo fixture is reused below
from streamlit_server import ARTIFACTS, CHROMIUM, WAIT_MS, chromium, streamlit_app
from test_browser import settle

from bgminer.demo import DEMO_CATEGORY
from bgminer.store import Store

ALICE, BOB = "alice@example.org", "bob@example.org"
JOINER = "\u2060"  # md_escape breaks "@" links with an invisible word joiner
small_demo = test_app.small_demo  # the 50-image demo slice, embedded, built once per session

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="Debian Chromium (/usr/bin/chromium) is not installed; `make system-deps` installs it"
    ),
]
playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture
def team_server(small_demo, tmp_path):
    """`streamlit run app.py` in proxy mode on a free loopback port, alice an admin, one project."""
    project = tmp_path / "projects" / "team"
    shutil.copytree(small_demo / "project", project)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGMINER_")}
    env.update(BGMINER_AUTH="proxy", BGMINER_ADMINS=ALICE, BGMINER_PROJECTS_DIR=str(project.parent), BGMINER_PROJECT=str(project))
    with streamlit_app(env, tmp_path / "streamlit.log") as url:
        yield url, project


@pytest.fixture
def browser():
    with chromium() as launched:
        yield launched


def signed_in_tab(browser, url: str, email: str):
    """A tab whose every request (the app's websocket included) carries the proxy's identity header."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, extra_http_headers={"X-Forwarded-Email": email})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.goto(url)
    tab.get_by_role("heading", name="Corpus").wait_for()
    settle(tab)
    return tab


def text_of(locator) -> str:
    return locator.inner_text().replace(JOINER, "")


def go(tab, title: str, heading: str) -> None:
    tab.locator("[data-testid='stSidebarNav'] a", has_text=title).click()
    tab.get_by_role("heading", name=re.compile(heading)).first.wait_for()
    settle(tab)


def shown_ids(tab) -> list[int]:
    keys = tab.locator("[class*='st-key-find-positive-']").evaluate_all(
        "els => els.map(e => [...e.classList].find(c => c.startsWith('st-key-find-positive-')))"
    )
    return [int(k.split("-")[-1]) for k in keys]


def click(tab, key: str) -> None:
    tab.locator(f".st-key-{key} button").first.click()
    settle(tab)


def card_caption(tab, image_id: int) -> str:
    return " ".join(text_of(tab.locator(f".st-key-card-find-{image_id} [data-testid='stCaptionContainer']").first).split())


def undo_notice(tab) -> str:
    """Press Undo on Review and return the notice it shows."""
    click(tab, "review-undo")
    toast = tab.locator("[data-testid='stToast']").last
    try:
        toast.wait_for()
    except playwright.Error:
        shot(tab, "failed-undo")
        raise
    return text_of(toast)


def shot(tab, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"team-{name}.png"), full_page=True)


def test_two_reviewers_see_each_others_labels_and_undo_only_their_own(browser, team_server):
    url, project = team_server
    store = Store(project / "bgminer.sqlite")
    alice = signed_in_tab(browser, url, ALICE)
    bob = signed_in_tab(browser, url, BOB)
    sidebar = "[data-testid='stSidebar']"
    assert f"Signed in as {ALICE} (admin)" in text_of(alice.locator(sidebar))
    assert f"Signed in as {BOB}" in text_of(bob.locator(sidebar)) and "(admin)" not in text_of(bob.locator(sidebar))
    assert alice.get_by_text("New project").count() == 1 and bob.get_by_text("New project").count() == 0

    # alice labels W and X on Find; bob sees them as hers, then labels Y himself.
    go(alice, "Find", "Find seed positives")
    w, x, y, z = shown_ids(alice)[:4]
    click(alice, f"find-positive-{w}")
    click(alice, f"find-positive-{x}")
    assert store.label_authors(DEMO_CATEGORY) == {w: ALICE, x: ALICE}
    assert " by " not in card_caption(alice, x)  # her own label needs no name
    shot(alice, "1-alice-find")
    go(bob, "Find", "Find seed positives")
    assert card_caption(bob, x).endswith(f"positive by {ALICE}")
    click(bob, f"find-negative-{y}")
    assert store.label_authors(DEMO_CATEGORY) == {w: ALICE, x: ALICE, y: BOB}
    shot(bob, "2-bob-find")

    # alice's undo takes back X (her latest), not Y (bob's, and newer).
    go(alice, "Review", "Review")
    assert undo_notice(alice) == f"Undid positive on #{x}."
    assert store.labels(DEMO_CATEGORY) == {w: "positive", y: "negative"}
    shot(alice, "3-alice-undo")

    # alice labels Z, bob overrules it; her undo then says bob changed it since and keeps his label.
    go(alice, "Find", "Find seed positives")
    click(alice, f"find-positive-{z}")
    bob.reload()  # a page shows what the store holds when it runs
    bob.get_by_role("heading", name="Find seed positives").wait_for()
    settle(bob)
    assert card_caption(bob, z).endswith(f"positive by {ALICE}")
    click(bob, f"find-negative-{z}")
    go(alice, "Review", "Review")
    notice = undo_notice(alice)
    assert BOB in notice, notice
    assert store.labels(DEMO_CATEGORY) == {w: "positive", y: "negative", z: "negative"}
    assert store.label_authors(DEMO_CATEGORY)[z] == BOB
    shot(alice, "4-alice-undo-conflict")
