"""How fast the Review page shows the next candidate, server-side, on the demo project.

Runs the real app (app.py + app_pages/review.py) in Streamlit's AppTest against a private copy of the
demo project with a trained model, and times each keyboard-equivalent decision: the button's
callback writes the label to the store, then the whole script reruns and renders the next
candidate (large preview, next-up strip, counters, charts, sidebar). The first render (cold
caches) is reported apart from the steady state.

AppTest compiles app.py and the page afresh on every run; a server compiles each script once and
reuses the bytecode. The benchmark shares one script cache across runs, like the server, and
reports the per-run compile cost AppTest would add separately (``compile_ms``).

    python bench/review_latency.py [--project projects/demo] [--decisions 30] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import streamlit.testing.v1.app_test as app_test_module
from streamlit.runtime.scriptrunner.script_cache import ScriptCache
from streamlit.testing.v1 import AppTest

from bgminer.demo import DEMO_CATEGORY, DEMO_DIR, build_demo_project
from bgminer.project import Project

TARGET_MS = 300.0


def demo_animals() -> list[Path]:
    """Ground truth: the demo images of the rare category."""
    with open(DEMO_DIR / "labels.csv") as fp:
        return [(DEMO_DIR / r["path"]).resolve() for r in csv.DictReader(fp) if r["category"] == DEMO_CATEGORY]


def prepared_project(source: Path | None, workdir: Path, seeds: int) -> Project:
    """A private copy of the demo project with ``seeds`` true positives labeled and one model trained."""
    target = workdir / "project"
    if source is not None:
        shutil.copytree(source, target)
        project = Project(target)
    else:
        project = build_demo_project(target)
    project.add_category(DEMO_CATEGORY)
    project.label_paths(DEMO_CATEGORY, demo_animals()[:seeds], "positive", source="user")
    project.train(DEMO_CATEGORY)
    return project


def compile_ms() -> float:
    """What compiling app.py and the review page costs once (AppTest pays it on every run)."""
    start = time.perf_counter()
    for script in ("app.py", "app_pages/review.py"):
        ScriptCache().get_bytecode(str(REPO / script))
    return (time.perf_counter() - start) * 1000


def measure(project: Project, decisions: int) -> dict:
    shared = ScriptCache()
    app_test_module.ScriptCache = lambda: shared  # compile once per script, as the server does
    truth = {p.name for p in demo_animals()}
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state["project_root"] = str(project.root)
    at.run()
    at.switch_page("app_pages/review.py")
    start = time.perf_counter()
    at.run()
    first_ms = (time.perf_counter() - start) * 1000
    if at.exception:
        raise RuntimeError(at.exception[0].value)
    times = []
    found = 0
    for _ in range(decisions):
        queue = at.session_state["review_queue"].items
        if not queue:
            break
        head = queue[0]
        positive = Path(head.path).name in truth
        found += positive
        button = at.button(key="review-positive" if positive else "review-negative")
        start = time.perf_counter()
        button.click().run()
        times.append((time.perf_counter() - start) * 1000)
        if at.exception:
            raise RuntimeError(at.exception[0].value)
    ordered = sorted(times)
    return {
        "images": project.store.image_count("ok"),
        "decisions": len(times),
        "positives_found": found,
        "first_render_ms": round(first_ms, 1),
        "median_ms": round(statistics.median(times), 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
        "max_ms": round(ordered[-1], 1),
        "compile_ms": round(compile_ms(), 1),
        "target_ms": TARGET_MS,
        "meets_target": statistics.median(times) <= TARGET_MS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project", type=Path, default=None, help="an existing demo project to copy (default: build one; ~1 min)"
    )
    parser.add_argument("--decisions", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5, help="true positives labeled before training")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        project = prepared_project(args.project, Path(tmp), args.seeds)
        result = measure(project, args.decisions)
    if args.json:
        print(json.dumps(result))
        return 0
    print("Review page: next candidate, server-side (AppTest; label write + full rerun)")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
