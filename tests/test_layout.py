"""The shape of the repository that the code relies on: the app's pages live only in app_pages/
(navigated by app.py), and the engine in bgminer/ never depends on the UI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_MODULES = {"streamlit", "app", "app_pages"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, lazy (in-function) imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_there_is_no_pages_folder_beside_app_py():
    # Streamlit adds every script in a pages/ folder next to the entry file to the app, beside
    # st.navigation's pages: each would run without the sign-in and the checks in app.py.
    assert (ROOT / "app.py").is_file()
    assert not (ROOT / "pages").exists()


def test_every_navigated_page_is_a_file_in_app_pages():
    from app_pages.common import PAGES

    assert PAGES
    for page in PAGES.values():
        assert Path(page).parent == Path("app_pages") and (ROOT / page).is_file(), page


def test_the_engine_never_imports_the_ui():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & UI_MODULES)
        for path in sorted((ROOT / "bgminer").rglob("*.py"))
        if imported_modules(path) & UI_MODULES
    }
    assert offenders == {}


def store_reads(path: Path) -> list[int]:
    """Lines of ``path`` that reach into a project's store (``<anything>.store``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return sorted({node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "store"})


def test_the_ui_reaches_the_project_only_through_its_facade():
    ui = [ROOT / "app.py", *sorted((ROOT / "app_pages").glob("*.py"))]
    offenders = {str(path.relative_to(ROOT)): store_reads(path) for path in ui if store_reads(path)}
    assert offenders == {}


def test_the_facade_check_sees_a_store_read(tmp_path):
    page = tmp_path / "page.py"
    page.write_text("store = project.store\nn = project.corpus_counts().images\n")
    assert store_reads(page) == [1]


def test_the_scanner_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import streamlit.runtime as rt\n    from app_pages import common\n")
    assert imported_modules(module) >= {"streamlit", "app_pages"}


def test_opening_a_project_does_not_load_streamlit():
    code = "import sys, bgminer.project, bgminer.cli; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
