"""The built-in demo: a small corpus shipped in ``assets/demo`` (images and their labels CSV),
ingested and embedded into a ready-to-use project by ``bgminer demo`` and the app's demo button."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .progress import ProgressFn

if TYPE_CHECKING:
    from .project import Project

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_CATEGORY = "animals"


def build_demo_project(root: str | Path, progress: ProgressFn | None = None, device: str = "auto") -> Project:
    """Create (or finish) the demo project at ``root``: ingest and embed ``assets/demo/images`` (on ``device``)."""
    from .project import Project

    project = Project.create(root)
    project.ingest(
        [DEMO_DIR / "images"], progress=progress, data_roots=()
    )  # shipped with bgminer, not user data: any roots allow it
    project.embed(device=device, progress=progress)
    project.add_category(DEMO_CATEGORY)
    return project
