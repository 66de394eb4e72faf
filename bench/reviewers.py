"""Several reviewers labeling the same category of one project at once, each in its own process.

Every simulated reviewer opens the shared project through :class:`bgminer.project.Project` and,
until the time is up, picks an image it has not labeled yet in this pass (a new pass starts when
it has labeled them all) and records a decision with ``Project.label`` (committed and durable when
it returns). After each decision the worker appends the returned event id to its own log file and
fsyncs it. Afterwards the logs are compared with the ``label_events`` table: every logged event
must be in the store exactly once, and (without a kill) the store must hold no event nobody logged.

``--kill-one`` sends SIGKILL to one reviewer half-way; then every event it logged must still be in
the store, at most one event of it may be unlogged (committed, then killed before its log write),
nothing may be duplicated, and the project must open again with an intact database.

The project (2,000 generated PNGs, ingested once, not embedded: labeling needs no features) is
built in ``--workdir`` and reused by later runs there; each run labels a fresh category.

    python bench/reviewers.py [--seconds 120] [--reviewers 5] [--kill-one] [--json] [--out docs/results/reviewers.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bgminer.project import DB_NAME, Project


def build_project(workdir: Path, n_images: int) -> Project:
    """The shared project: ``n_images`` distinct small PNGs, ingested (reused when already there)."""
    from PIL import Image

    root = workdir / "project"
    if (root / DB_NAME).exists():
        project = Project(root)
        if project.store.image_count() >= n_images:
            return project
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        path = images / f"img_{i:05d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    project = Project.create(root)
    project.ingest([images])
    return project


def reviewer(
    root: str, category: str, author: str, log_path: str, stats_path: str, seed: int, seconds: float, ready, go, start_at
) -> None:
    """One reviewer process: from ``start_at`` (set with ``go``) decide for ``seconds``; log each committed event id (fsynced)."""
    project = Project(root)
    ids = np.asarray(project.store.image_ids(), dtype=np.int64)
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    passes = 1
    order = rng.permutation(ids)
    position = 0
    ready.set()
    go.wait()
    time.sleep(max(0.0, start_at.value - time.time()))
    stop_at = start_at.value + seconds
    with open(log_path, "a", encoding="ascii") as log:
        while time.time() < stop_at:
            if position == len(order):  # labeled every image in this pass: start another
                order, position, passes = rng.permutation(ids), 0, passes + 1
            image_id = int(order[position])
            position += 1
            value = "positive" if rng.random() < 0.1 else "negative"
            started = time.perf_counter()
            event_ids = project.label(category, [image_id], value, source="review", author=author)
            latencies.append(time.perf_counter() - started)
            log.write("".join(f"{e}\n" for e in event_ids))
            log.flush()
            os.fsync(log.fileno())
    Path(stats_path).write_text(json.dumps({"latencies": latencies, "passes": passes}))


def _percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bgminer-reviewers-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    project = build_project(workdir, args.images)
    setup_seconds = time.perf_counter() - t0
    mode = "kill-one" if args.kill_one else "normal"
    category = f"reviewers {mode} {time.strftime('%Y%m%d-%H%M%S')}"
    project.add_category(category)
    logs = workdir / f"logs-{category.replace(' ', '-')}"
    logs.mkdir()
    authors = [f"reviewer{k}@example.org" for k in range(args.reviewers)]

    ctx = mp.get_context("spawn")
    ready, go, shared_start = [ctx.Event() for _ in authors], ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=reviewer,
            args=(
                str(project.root),
                category,
                a,
                str(logs / f"{k}.log"),
                str(logs / f"{k}.json"),
                k,
                args.seconds,
                ready[k],
                go,
                shared_start,
            ),
        )
        for k, a in enumerate(authors)
    ]
    for p in procs:
        p.start()
    for e in ready:  # every reviewer has imported bgminer and opened the project
        if not e.wait(300):
            raise RuntimeError("a reviewer process did not open the project within 300 s")
    load_before = os.getloadavg()
    start_at = time.time() + 0.5
    shared_start.value = start_at
    go.set()
    killed = None
    if args.kill_one:
        time.sleep(max(0.0, start_at + args.seconds / 2 - time.time()))
        killed = 0
        os.kill(procs[killed].pid, signal.SIGKILL)
        kill_time = time.time() - start_at
    for p in procs:
        p.join(args.seconds + 120)
    load_after = os.getloadavg()
    exit_codes = [p.exitcode for p in procs]

    # -- compare the logs with the store ------------------------------------------------------
    logged: dict[int, list[int]] = {}
    for k in range(len(authors)):
        text = (logs / f"{k}.log").read_text(encoding="ascii") if (logs / f"{k}.log").exists() else ""
        logged[k] = [int(line) for line in text.split()]
    all_logged = [e for ids in logged.values() for e in ids]
    reopened = Project(project.root)
    db = sqlite3.connect(reopened.root / DB_NAME)
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    cid = reopened.store.category_id(category)
    rows = db.execute("SELECT id, author FROM label_events WHERE category_id = ?", (cid,)).fetchall()
    db.close()
    in_store = {r[0]: r[1] for r in rows}
    lost = sorted(set(all_logged) - set(in_store))
    duplicated_in_logs = len(all_logged) - len(set(all_logged))
    wrong_author = sum(in_store.get(e) not in (None, authors[k]) for k, ids in logged.items() for e in ids)
    unlogged = sorted(set(in_store) - set(all_logged))
    unlogged_ok = not unlogged if killed is None else all(in_store[e] == authors[killed] for e in unlogged) and len(unlogged) <= 1

    per_reviewer, all_latencies = [], []
    for k, author in enumerate(authors):
        stats_file = logs / f"{k}.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"latencies": [], "passes": None}
        all_latencies += stats["latencies"]
        active = kill_time if killed == k else args.seconds
        per_reviewer.append(
            {
                "author": author,
                "decisions": len(logged[k]),
                "decisions_per_second": round(len(logged[k]) / active, 1),
                "p50_ms": _percentile_ms(stats["latencies"], 50),
                "p95_ms": _percentile_ms(stats["latencies"], 95),
                "passes": stats["passes"],
                "killed": killed == k,
                "exit_code": exit_codes[k],
            }
        )
    total = len(all_logged)
    return {
        "mode": mode,
        "reviewers": len(authors),
        "seconds": args.seconds,
        "images": reopened.store.image_count(),
        "decisions": total,
        "decisions_per_second": round(total / args.seconds, 1),
        "p50_ms": _percentile_ms(all_latencies, 50),
        "p95_ms": _percentile_ms(all_latencies, 95),
        "latency_note": "one Project.label call (a committed, fsynced SQLite WAL transaction); p50/p95 over "
        "the surviving reviewers",
        "per_reviewer": per_reviewer,
        "killed_at_second": None if killed is None else round(kill_time, 1),
        "events_in_store": len(in_store),
        "lost": len(lost),
        "duplicated": duplicated_in_logs,
        "wrong_author": wrong_author,
        "unlogged": len(unlogged),
        "unlogged_ok": unlogged_ok,
        "integrity_check": integrity,
        "project_reopens": True,
        "ok": not lost and not duplicated_in_logs and not wrong_author and unlogged_ok and integrity == "ok",
        "setup_seconds": round(setup_seconds, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "workdir": str(workdir),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(result: dict) -> str:
    lines = [
        (
            f"{result['reviewers']} reviewers, {result['seconds']} s, mode {result['mode']}, {result['images']} images "
            f"(load average before {result['load_average_before'][0]}, after {result['load_average_after'][0]}, "
            f"{result['cpu_count']} CPUs)"
        ),
        f"{'reviewer':<26}{'decisions':>10}{'per s':>8}{'p50 ms':>9}{'p95 ms':>9}",
    ]
    for r in result["per_reviewer"]:
        note = "  (killed)" if r["killed"] else ""
        lines.append(
            f"{r['author']:<26}{r['decisions']:>10}{r['decisions_per_second']:>8}{r['p50_ms']!s:>9}{r['p95_ms']!s:>9}{note}"
        )
    lines.append(
        f"{'all':<26}{result['decisions']:>10}{result['decisions_per_second']:>8}{result['p50_ms']!s:>9}{result['p95_ms']!s:>9}"
    )
    lines.append(
        f"lost {result['lost']}, duplicated {result['duplicated']}, wrong author {result['wrong_author']}, "
        f"committed but unlogged {result['unlogged']}, integrity {result['integrity_check']}: "
        f"{'OK' if result['ok'] else 'FAILED'}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--reviewers", type=int, default=5)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--kill-one", action="store_true", help="SIGKILL one reviewer half-way, then check again")
    parser.add_argument(
        "--workdir", default=None, help="where the shared project lives (reused by later runs; default: a new temporary folder)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="merge this run into a results file (keyed by mode)")
    args = parser.parse_args()
    result = run(args)
    if args.out:
        out = Path(args.out)
        saved = json.loads(out.read_text()) if out.exists() else {}
        saved[result["mode"]] = result
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved, indent=2) + "\n")
    print(json.dumps(result) if args.json else table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
