"""A project is one folder: the SQLite store, cached features, thumbnails, uploads,
model checkpoints, scores and indexes. Images are referenced in place, never copied.

:class:`Project` is the single entry point that the CLI, the web app and Python users
share; it composes the engine modules and holds no ML logic of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from .backbone import Backbone, load_backbone
from .features import EmbedReport, FeatureCache, embed_images
from .progress import CancelToken, ProgressFn
from .store import Store

DB_NAME = "bgminer.sqlite"


class ProjectError(ValueError):
    """The folder is not a usable bgminer project."""


class Project:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not (self.root / DB_NAME).exists():
            raise ProjectError(f"{self.root} is not a bgminer project (no {DB_NAME}); create it with `bgminer init {root}`")
        self.store = Store(self.root / DB_NAME)
        self.backbone_name = self.store.get_meta("backbone", "efficientnet_lite0")
        self.backbone_weights = self.store.get_meta("backbone_weights") or None

    @classmethod
    def create(cls, root: str | Path, backbone: str = "efficientnet_lite0", backbone_weights: str | None = None) -> "Project":
        """Create a project folder (or open it if it already is one)."""
        root = Path(root).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise ProjectError(f"{root} exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        fresh = not (root / DB_NAME).exists()
        store = Store(root / DB_NAME)
        if fresh:
            store.set_meta("backbone", backbone)
            if backbone_weights:
                store.set_meta("backbone_weights", str(Path(backbone_weights).resolve()))
        store.close()
        return cls(root)

    # -- layout --------------------------------------------------------------------------
    @property
    def thumbs_dir(self) -> Path:
        return self.root / "thumbs"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def backbone(self) -> Backbone:
        return load_backbone(self.backbone_name, self.backbone_weights)

    @property
    def features(self) -> FeatureCache:
        bb = self.backbone
        return FeatureCache(self.root / "features" / bb.name, bb.feature_dim, len(bb.class_names), bb.map_shape)

    # -- corpus --------------------------------------------------------------------------
    def ingest(self, sources: Sequence[str | Path], progress: ProgressFn | None = None, cancel: CancelToken | None = None, **kw: Any):
        from .corpus import ingest

        return ingest(self.store, sources, self.thumbs_dir, self.uploads_dir, progress=progress, cancel=cancel, **kw)

    def embed(
        self,
        device: str = "auto",
        batch_size: int = 32,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> EmbedReport:
        return embed_images(self.store, self.features, self.backbone, batch_size=batch_size, device=device, progress=progress, cancel=cancel)

    def thumbnail(self, image_id: int) -> Path:
        from .corpus import thumbnail_path

        return thumbnail_path(self.thumbs_dir, self.store.image(image_id)["sha256"])

    def info(self) -> dict[str, Any]:
        s = self.store
        active = s.active_model()
        return {
            "project": str(self.root),
            "backbone": self.backbone_name,
            "images": s.image_count("ok"),
            "rejected": s.image_count("rejected"),
            "rejected_by_reason": s.rejected_counts(),
            "embedded": s.embedded_count(),
            "categories": s.categories(),
            "labels": s.label_counts(),
            "models": len(s.models()),
            "active_model": None if active is None else {"id": active.id, "categories": active.categories, "mode": active.mode},
        }


def to_json(obj: Any) -> str:
    """One JSON object for ``--json`` outputs (dataclasses included)."""
    return json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj, default=str)
