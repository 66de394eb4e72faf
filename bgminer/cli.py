"""``python -m bgminer ...``: the command line over the same engine the web app uses."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .progress import CancelToken

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_CATEGORY = "animals"


def _print_progress(done: int, total: int, message: str = "") -> None:
    print(f"\r{message or f'{done}/{total}'}".ljust(70), end="" if done < total else "\n", file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, obj: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, default=str))
    else:
        print(text(obj))


def cmd_init(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project.create(args.project, backbone=args.backbone, backbone_weights=args.backbone_weights)
    print(f"project ready at {project.root}")
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
    _emit(args, summary, lambda s: "\n".join(f"{k:>14}: {v}" for k, v in s.items()))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .project import Project

    project = Project(args.project)
    result = project.embed(device=args.device, batch_size=args.batch_size, progress=_print_progress)
    summary = {"embedded": result.embedded, "failed": result.failed, "images_per_second": round(result.images_per_second, 1), "device": result.device}
    _emit(args, summary, lambda s: "\n".join(f"{k:>18}: {v}" for k, v in s.items()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .project import Project

    info = Project(args.project).info()

    def text(i: dict) -> str:
        lines = [f"project   {i['project']}", f"backbone  {i['backbone']}", f"images    {i['images']} ({i['embedded']} embedded)", f"rejected  {i['rejected']}"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(i["rejected_by_reason"].items())]
        lines.append("labels")
        lines += [f"  {c}: {n['positive']} positive, {n['negative']} negative" for c, n in i["labels"].items()]
        return "\n".join(lines)

    _emit(args, info, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .project import Project

    project = build_demo_project(args.project, progress=_print_progress)
    _emit(args, project.info(), lambda i: f"demo project ready at {i['project']}: {i['images']} images, {i['embedded']} embedded")
    return 0


def build_demo_project(root: str | Path, progress=None):
    """Create (or finish) the built-in demo project: ingest + embed ``assets/demo``."""
    from .project import Project

    project = Project.create(root)
    project.ingest([DEMO_DIR / "images"], progress=progress)
    project.embed(progress=progress)
    project.store.add_category(DEMO_CATEGORY)
    return project


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgminer", description="Find rare classes in large image collections.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a project folder")
    p.add_argument("project")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--backbone-weights", default=None, help="weights file for the backbone (e.g. a torchvision ResNet-50 checkpoint)")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("ingest", help="add images: folders, files, .zip archives, .csv lists")
    p.add_argument("project")
    p.add_argument("paths", nargs="+")
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("embed", help="compute backbone features for every new image")
    p.add_argument("project")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_embed)

    p = sub.add_parser("info", help="counts: images, rejected, embedded, labels")
    p.add_argument("project")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("demo", help="build the ready-to-use demo project")
    p.add_argument("project")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"bgminer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbgminer: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
        return 130
