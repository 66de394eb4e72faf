"""``python -m bgminer ...``: the command line over the same engine the web app uses.

What each sub-command does, with the one output helper and the one progress printer; the
sub-commands' arguments are in :mod:`bgminer.cli_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cli_parser import build_parser
from .progress import CancelToken
from .settings import load_settings, local_user

# Heavy modules (torch, timm, faiss, pandas) are imported inside the commands that need them,
# so that light commands such as ``info`` start fast.


def _print_progress(done: int, total: int, message: str = "") -> None:
    """The one progress line of every command, on stderr, rewritten in place."""
    counts = f"{done}/{total}"
    line = message if counts in message else f"{message} {counts}".strip()
    print(f"\r{line}".ljust(70), end="" if done < total else "\n", file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, obj: Any, text: Callable[[Any], str]) -> None:
    """The one output of every command: ``obj`` as one JSON line with --json, else ``text(obj)``."""
    if getattr(args, "json", False):
        print(json.dumps(obj, default=str))
    else:
        print(text(obj))


def _fields(summary: dict[str, Any]) -> str:
    """A summary as aligned ``key: value`` lines (the text form of most commands)."""
    width = max(map(len, summary), default=0)
    return "\n".join(f"{k:>{width}}: {v}" for k, v in summary.items())


def cmd_init(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project.create(args.project, backbone=args.backbone, backbone_weights=args.backbone_weights)
    _emit(args, {"project": str(project.root)}, lambda o: f"project ready at {o['project']}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project.create(args.project)
    result = project.ingest(args.paths, progress=_print_progress, cancel=CancelToken(), max_pixels=args.max_pixels)
    summary = {
        "added": result.added,
        "duplicates": result.duplicates,
        "rejected": result.rejected,
        "skipped_known": result.skipped_known,
        "seconds": round(result.seconds, 2),
    }
    _emit(args, summary, _fields)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project(args.project)
    if args.engine == "ray":
        from .ray_engine import RayConfig, embed_on_ray

        config = RayConfig(address=args.address, batch_size=args.batch_size, device=args.device)
        result = embed_on_ray(project.store, project.features, project.backbone_name, project.backbone_weights, config,
                              progress=_print_progress, cancel=CancelToken())
    else:
        result = project.embed(device=args.device, batch_size=args.batch_size, progress=_print_progress)
    summary = {
        "embedded": result.embedded,
        "failed": result.failed,
        "images_per_second": round(result.images_per_second, 1),
        "device": result.device,
    }
    _emit(args, summary, _fields)
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project(args.project)
    ray_config = None
    if args.engine == "ray":
        from .ray_engine import RayConfig

        ray_config = RayConfig(address=args.address, device=args.device)
    start = time.perf_counter()
    record = project.rescore(
        engine=args.engine, ray_config=ray_config, device=args.device, progress=_print_progress, cancel=CancelToken()
    )
    project.wait_for_index()  # the background index build must not die with this process
    n = len(project.store.image_ids(embedded=True))
    seconds = time.perf_counter() - start
    summary = {"model_version": record.id, "mode": record.mode, "images": n, "seconds": round(seconds, 1), "engine": args.engine}
    _emit(args, summary, _fields)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .project import Project

    info = Project(args.project).info()

    def text(i: dict) -> str:
        lines = [
            f"project   {i['project']}",
            f"backbone  {i['backbone']}",
            f"images    {i['images']} ({i['embedded']} embedded)",
            f"rejected  {i['rejected']}",
        ]
        lines += [f"  {reason}: {n}" for reason, n in sorted(i["rejected_by_reason"].items())]
        lines.append("labels")
        lines += [f"  {c}: {n['positive']} positive, {n['negative']} negative" for c, n in i["labels"].items()]
        return "\n".join(lines)

    _emit(args, info, text)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from .project import Project

    result = Project(args.project).backup(
        args.dest, with_features=args.with_features, with_thumbnails=args.with_thumbnails, progress=_print_progress
    )
    summary = {
        "dest": str(result.dest),
        "files": result.files,
        "mib": round(result.bytes / 2**20, 1),
        "models": result.models,
        "active_versions": result.active_versions,
        "features": result.with_features,
        "thumbnails": result.with_thumbnails,
        "seconds": round(result.seconds, 1),
    }
    _emit(args, summary, _fields)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_project

    project = build_demo_project(args.project, progress=_print_progress)
    _emit(args, project.info(), lambda i: f"demo project ready at {i['project']}: {i['images']} images, {i['embedded']} embedded")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from .project import Project
    from .tables import import_labels_csv

    project = Project(args.project)
    missing: list[str] = []
    if args.csv:
        result = import_labels_csv(project, args.csv, author=args.author)
        missing += result.missing + result.invalid
    elif not args.category:
        raise ValueError("give --category C with --positive/--negative paths, or --csv FILE")
    if args.review and not args.category:
        raise ValueError("--review needs --category C (review decisions are per category)")
    retrain = None
    if args.category:
        from .loop import Miner

        project.add_category(args.category)
        miner = Miner(project, args.category, args.author or local_user()) if args.review else None
        for value, paths in (("positive", args.positive), ("negative", args.negative)):
            if paths and miner is not None:  # review decisions: they count toward the auto-retrain threshold
                ids, not_found = project.image_ids_for_paths(paths)
                miner.decide_many(ids, value)
                missing += not_found
            elif paths:
                missing += project.label_paths(args.category, paths, value, source="user", author=args.author or local_user())
        if miner is not None:
            retrain = _retrain_summary(miner.retrain_if_due())
    counts = project.store.label_counts()
    _emit(args, {"labels": counts, "not_labeled": missing, "retrain": retrain}, lambda o: "\n".join(
        [f"{c}: {n['positive']} positive, {n['negative']} negative" for c, n in o["labels"].items()]
        + [f"not labeled: {m}" for m in o["not_labeled"]] + ([o["retrain"]["text"]] if o["retrain"] else [])))
    return 0 if not missing else 1


def _retrain_summary(outcome) -> dict:
    """A :class:`bgminer.loop.Retrain` as a JSON-able dict with a one-line ``text``."""
    if not outcome.due:
        text = "auto-retrain: not due"
    elif outcome.refused:
        text = f"auto-retrain: due, not started: {outcome.refused}"
    else:
        text = f"auto-retrain: trained model v{outcome.model.id}"
    model_version = None if outcome.model is None else outcome.model.id
    return {"due": outcome.due, "model_version": model_version, "refused": outcome.refused, "text": text}


def cmd_skip(args: argparse.Namespace) -> int:
    from .loop import Miner
    from .project import Project

    project = Project(args.project)
    author = args.author or local_user()
    ids, missing = project.image_ids_for_paths([p for p in args.images if not p.isdigit()])
    miner = Miner(project, args.category, author)
    for image_id in [int(i) for i in args.images if i.isdigit()] + ids:
        miner.skip(image_id)
    out = {"category": args.category, "author": author, "skipped": len(miner.skipped()), "not_found": missing}
    _emit(args, out, lambda o: "\n".join([f"{o['author']} has skipped {o['skipped']} images in {o['category']}"]
                                          + [f"not an ingested image: {m}" for m in o["not_found"]]))
    return 0 if not missing else 1


def cmd_undo(args: argparse.Namespace) -> int:
    from .loop import Miner
    from .project import Project

    author = args.author or local_user()
    event = Miner(Project(args.project), args.category, author).undo()
    out = {"category": args.category, "author": author, "undone": None if event is None else {
        "event_id": event.id, "image_id": event.image_id, "value": event.value, "source": event.source}}
    _emit(args, out, lambda o: f"nothing of {author}'s to undo in {args.category}" if event is None
          else f"undid {author}'s {event.value} label of #{event.image_id} in {args.category}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .project import Project
    from .train import TrainConfig

    project = Project(args.project)
    config = TrainConfig(mode=args.mode, epochs=args.epochs, device=args.device, seed=args.seed,
                         **({"aux_weight": args.aux_weight} if args.aux_weight is not None else {}))
    record = project.train(args.category or None, config, progress=_print_progress, cancel=CancelToken())
    project.wait_for_index()  # the background index build must not die with this process
    summary = {"model_version": record.id, "categories": record.categories, "mode": record.mode,
               "train_seconds": round(record.train_seconds or 0, 2), "label_counts": record.label_counts,
               "final_loss": record.losses[-1] if record.losses else None, "metrics": record.metrics}
    _emit(args, summary, _fields)
    return 0


def _candidate_rows(candidates, key: str) -> list[dict]:
    """JSON rows {"image_id", "path", key}: one key per command, named for what the number is (README, CLI):
    "score" (rank; null before the first model), "similarity" (search --like), "class_probability" (search --text)."""
    for c in candidates:
        if c.kind not in (key, None):
            raise AssertionError(f"a {c.kind} where a {key} belongs")
    return [{"image_id": c.image_id, "path": c.path, key: c.value} for c in candidates]


def _candidate_table(rows: list[dict], key: str) -> str:
    if not rows:
        return "(nothing)"
    width = max(8, len(key))
    values = [r[key] if r[key] is None else round(r[key], 4) for r in rows]
    return "\n".join([f"{key:>{width}}  path"] + [f"{v!s:>{width}}  {r['path']}" for v, r in zip(values, rows, strict=True)])


def cmd_rank(args: argparse.Namespace) -> int:
    from .loop import Miner
    from .project import Project

    author = args.author or local_user()
    project = Project(args.project)
    miner = Miner(project, args.category, author, args.strategy, pool_neighbors=args.pool_neighbors)
    rows = _candidate_rows(miner.query(args.limit), "score")
    calibration = project.calibration(args.category)  # once a model exists, "probability": the calibrated score
    for row in rows if calibration.model_id is not None else ():  # (null until enough reviews to calibrate)
        row["probability"] = calibration.probability(row["score"]) if calibration.fitted and row["score"] is not None else None
    _emit(args, {"category": args.category, "strategy": args.strategy, "candidates": rows},
          lambda o: _candidate_table(o["candidates"], "score"))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project(args.project)
    if args.like:
        image_id = project.store.image_id_for_path(str(Path(args.like).resolve()))
        if image_id:
            found = project.search_like(image_id=image_id, n=args.limit)
        else:
            found = project.search_like(image_file=args.like, n=args.limit)
        key = "similarity"
        out = {"like": args.like, "results": _candidate_rows(found, key)}
    elif args.text:
        classes, found = project.search_text(args.text, n=args.limit)
        key = "class_probability"
        out = {"text": args.text, "matched_classes": classes, "results": _candidate_rows(found, key)}
    else:
        raise ValueError("give --like IMAGE or --text WORDS")
    _emit(args, out, lambda o: _candidate_table(o["results"], key))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .project import Project

    status = Project(args.project).status(args.category)
    _emit(args, status, _fields)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .packaging import export_model, read_export_metadata
    from .project import Project

    result = export_model(Project(args.project), args.category, args.out, model_id=args.model_version)
    meta = read_export_metadata(result.model)
    summary = {
        **{k: str(v) for k, v in asdict(result).items()},
        "categories": meta["categories"],
        "model_version": meta["model"]["version"],
    }
    _emit(args, summary, lambda s: f"exported model v{s['model_version']} ({', '.join(s['categories'])}) to {s['model']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .packaging import load_exported, predict

    skipped: list[dict[str, str]] = []

    def on_skip(path: str, reason: str) -> None:
        skipped.append({"path": path, "reason": reason})
        if not args.json:
            print(f"skipped {path}: {reason}", file=sys.stderr)

    exported = load_exported(args.model, device=args.device)
    results = predict(exported, args.paths, batch_size=args.batch_size, on_skip=on_skip, progress=_print_progress)
    out = {
        "model": str(exported.path),
        "model_version": exported.metadata["model"]["version"],
        "categories": exported.categories,
        "predictions": [{"path": p, "scores": s} for p, s in results],
        "skipped": skipped,
    }
    def text(o: dict) -> str:
        return "\n".join("\t".join([p["path"], *(f"{c}={v:.6f}" for c, v in p["scores"].items())]) for p in o["predictions"])

    _emit(args, out, text)
    return 0 if results or not skipped else 1


def cmd_export_labels(args: argparse.Namespace) -> int:
    from .project import Project
    from .tables import write_labels_csv

    n = write_labels_csv(Project(args.project), args.out, category=args.category)
    _emit(args, {"rows": n, "path": str(args.out)}, lambda o: f"wrote {o['rows']} labels to {o['path']}")
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    from .project import Project
    from .tables import import_labels_csv

    result = import_labels_csv(Project(args.project), args.csv, author=args.author)

    def text(r: dict) -> str:
        lines = [f"imported {r['imported']} labels ({r['unchanged']} already as in the file)"]
        if r["categories_created"]:
            lines.append(f"new categories: {', '.join(r['categories_created'])}")
        if r["missing"]:
            lines.append(f"{len(r['missing'])} paths are not images of this project (ingest them first):")
            lines += [f"  {p}" for p in r["missing"]]
        return "\n".join(lines + [f"  skipped {reason}" for reason in r["invalid"]])

    _emit(args, asdict(result), text)
    return 0


def cmd_export_scores(args: argparse.Namespace) -> int:
    from .project import Project
    from .tables import write_scores

    n = write_scores(Project(args.project), args.out, format=args.format)
    _emit(args, {"rows": n, "path": str(args.out)}, lambda o: f"wrote scores of {o['rows']} images to {o['path']}")
    return 0


def cmd_export_folders(args: argparse.Namespace) -> int:
    from .project import Project
    from .tables import export_folders

    result = export_folders(
        Project(args.project), args.out, link=not args.copy, include_negatives=args.negatives, categories=args.category
    )
    out = {"root": str(result.root), "linked": result.linked, "counts": result.counts}
    _emit(args, out, lambda o: "\n".join([f"{'linked' if o['linked'] else 'copied'} into {o['root']}:"]
                                         + [f"  {folder}/: {n} files" for folder, n in o["counts"].items()]))
    return 0


# Sub-command name -> the function that runs it (its arguments: bgminer.cli_parser).
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": cmd_init,
    "ingest": cmd_ingest,
    "embed": cmd_embed,
    "rescore": cmd_rescore,
    "info": cmd_info,
    "backup": cmd_backup,
    "demo": cmd_demo,
    "label": cmd_label,
    "skip": cmd_skip,
    "undo": cmd_undo,
    "train": cmd_train,
    "rank": cmd_rank,
    "search": cmd_search,
    "status": cmd_status,
    "export": cmd_export,
    "predict": cmd_predict,
    "export-labels": cmd_export_labels,
    "import-labels": cmd_import_labels,
    "export-scores": cmd_export_scores,
    "export-folders": cmd_export_folders,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "project", None) is not None:  # BGMINER_PROJECTS_DIR: projects live only there
            load_settings().check_project_folder(args.project)
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as exc:  # bad input, missing files, permissions, a full disk (DiskSpaceError)
        print(f"bgminer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbgminer: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
