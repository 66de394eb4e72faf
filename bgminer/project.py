"""A project is one folder: the SQLite store, cached features, thumbnails, uploads,
model checkpoints, scores and indexes. Images are referenced in place, never copied.

:class:`Project` is the single entry point that the CLI, the web app and Python users
share; it composes the engine modules and holds no ML logic of its own.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import category_status
from .category_status import ReviewStats
from .feature_cache import CacheBusy, FeatureCache, FolderLock, unmark_zero_rows
from .jobs import JobRunner
from .progress import CancelToken, ProgressFn
from .records import JobRecord, LabelEvent, ModelRecord
from .search import Candidate, Finder
from .settings import local_user
from .store import Store

if TYPE_CHECKING:  # torch-backed modules load on first use: opening a project (and `bgminer info`) stays light
    from .backbone import Backbone
    from .features import EmbedReport
    from .scoring import VersionScores
    from .train import TrainConfig

DB_NAME = "bgminer.sqlite"
AUTO_RETRAIN_META = "ui.auto_retrain_after"  # store meta key of Project.auto_retrain_after (name kept for existing projects)


class ProjectError(ValueError):
    """The folder is not a usable bgminer project."""


class Project:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        _refuse_inside_uploads(self.root)
        if not (self.root / DB_NAME).exists():
            raise ProjectError(f"{self.root} is not a bgminer project (no {DB_NAME}); create it with `bgminer init {root}`")
        self.store = Store(self.root / DB_NAME)
        self.store.fail_orphaned_models()  # a round whose process was killed stays 'training' otherwise
        self.backbone_name = self.store.get_meta("backbone", "efficientnet_lite0")
        self.backbone_weights = self.store.get_meta("backbone_weights") or None
        self.finder = Finder(self)
        self._features: FeatureCache | None = None
        self._features_lock = threading.Lock()
        self._feature_folder_lock = FolderLock(self.root / "features" / self.backbone_name)
        try:  # rows marked embedded but missing from the cache (e.g. a backup restored without features) are redone
            unmark_zero_rows(self.store, self._feature_folder_lock.folder, self._feature_folder_lock, timeout=0.5)
        except CacheBusy:
            pass  # another process is embedding; it runs the same check, and so does every later embedding

    @classmethod
    def create(cls, root: str | Path, backbone: str = "efficientnet_lite0", backbone_weights: str | None = None) -> Project:
        """Create a project folder (or open it if it already is one)."""
        from bgminer.backbone import available_backbones

        if backbone not in available_backbones():
            raise ProjectError(f"unknown backbone {backbone!r}; available: {', '.join(available_backbones())}")
        root = Path(root).expanduser().resolve()
        _refuse_inside_uploads(root)
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
        from .backbone import load_backbone

        return load_backbone(self.backbone_name, self.backbone_weights)

    @property
    def features(self) -> FeatureCache:
        """The project's one feature cache (one lock for every writer of it, in any process)."""
        with self._features_lock:
            if self._features is None:
                bb = self.backbone
                lock = self._feature_folder_lock
                self._features = FeatureCache(lock.folder, bb.feature_dim, len(bb.class_names), bb.map_shape, lock=lock)
            return self._features

    # -- corpus --------------------------------------------------------------------------
    def ingest(
        self,
        sources: Sequence[str | Path],
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
        data_roots: Sequence[str | Path] | None = None,
        **kw: Any,
    ):
        """Ingest ``sources`` (see :func:`bgminer.corpus.ingest`); ``data_roots`` None: the settings' roots."""
        from .corpus import ingest

        return ingest(
            self.store, sources, self.thumbs_dir, self.uploads_dir, progress=progress, cancel=cancel, data_roots=data_roots, **kw
        )

    def embed(
        self,
        device: str = "auto",
        batch_size: int = 32,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> EmbedReport:
        from .features import embed_images

        return embed_images(
            self.store, self.features, self.backbone, batch_size=batch_size, device=device, progress=progress, cancel=cancel
        )

    def thumbnail(self, image_id: int) -> Path:
        from .corpus import thumbnail_path

        return thumbnail_path(self.thumbs_dir, self.store.image(image_id)["sha256"])

    def image_path(self, image_id: int) -> str:
        """The file of an image, where it was ingested from (StoreError for an unknown id)."""
        return self.store.image(image_id)["path"]

    def corpus_counts(self) -> CorpusCounts:
        """How many images are usable, embedded and rejected."""
        return CorpusCounts(self.store.image_count("ok"), self.store.embedded_count(), self.store.image_count("rejected"))

    def image_page(self, n: int, offset: int = 0) -> list[sqlite3.Row]:
        """``n`` usable images in ingest order from ``offset`` (rows with ``id``, ``path``, ``width``, ``height``)."""
        return self.store.images("ok", limit=n, offset=offset)

    def rejected_files(self, n: int = 1000) -> list[sqlite3.Row]:
        """The first ``n`` files refused at ingest (rows with ``path``, ``reason``, ``detail``)."""
        return self.store.images("rejected", limit=n)

    # -- labels --------------------------------------------------------------------------
    def categories(self) -> list[str]:
        """Category names in creation order."""
        return self.store.categories()

    def add_category(self, name: str) -> None:
        self.store.add_category(name)

    def rename_category(self, old: str, new: str) -> None:
        """Rename a category; its labels, models and validation sample follow (they refer to it by id)."""
        self.store.rename_category(old, new)

    def labels(self, category: str) -> dict[int, str]:
        """The current decision ('positive' / 'negative') per image id in ``category``."""
        return self.store.labels(category)

    def label_authors(self, category: str) -> dict[int, str]:
        """Who made the current decision, per image id, in ``category``."""
        return self.store.label_authors(category)

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Current positives and negatives per category (every category, zeros included)."""
        return self.store.label_counts()

    def label(
        self, category: str, image_ids: Sequence[int], value: str, source: str = "user", author: str | None = None
    ) -> list[int]:
        """Record ``author``'s (default: the OS user's) decision for each image; durable (committed) when this returns.

        Returns the ids of the label events written.
        """
        return self.store.add_labels(category, [(int(i), value) for i in image_ids], source=source, author=author or local_user())

    def undo(self, category: str, author: str | None = None) -> LabelEvent | None:
        """Undo ``author``'s (default: the OS user's) latest decision in ``category``; see :meth:`Store.undo`."""
        return self.store.undo(category, author or local_user())

    def image_ids_for_paths(self, paths: Sequence[str | Path]) -> tuple[list[int], list[str]]:
        """(ids of the ingested images among ``paths``, the paths that are not ingested images)."""
        ids, missing = [], []
        for p in paths:
            image_id = self.store.image_id_for_path(str(Path(p).expanduser().resolve()))
            (missing.append(str(p)) if image_id is None else ids.append(image_id))
        return ids, missing

    def label_paths(
        self, category: str, paths: Sequence[str | Path], value: str, source: str = "import", author: str | None = None
    ) -> list[str]:
        """Label images given by path; returns the paths that are not ingested images."""
        ids, missing = self.image_ids_for_paths(paths)
        if ids:
            self.label(category, ids, value, source=source, author=author)
        return missing

    # -- training ------------------------------------------------------------------------
    def train(
        self,
        categories: str | Sequence[str] | None = None,
        config: TrainConfig | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> ModelRecord:
        """One round (see :func:`bgminer.rounds.train_round`): train, re-score the corpus, activate the
        new version and start building its index in the background (:meth:`wait_for_index`); every
        category with a positive label unless ``categories`` narrows it. A failed or cancelled round
        leaves the previous version active."""
        from .rounds import train_round

        return train_round(self, categories, config=config, progress=progress, cancel=cancel)

    def rescore(
        self,
        engine: str = "local",
        ray_config: Any = None,
        device: str = "auto",
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> ModelRecord:
        """Re-score every embedded image with the active model and rebuild its index in the background (see
        :func:`bgminer.rounds.rescore_active`); ``engine="ray"`` runs it on Ray."""
        from .rounds import rescore_active

        return rescore_active(self, engine=engine, ray_config=ray_config, device=device, progress=progress, cancel=cancel)

    def active_model(self, category: str | None = None) -> ModelRecord | None:
        """The version that serves ``category`` (any category when None): the newest ready one."""
        return self.store.active_model(category)

    def models(self) -> list[ModelRecord]:
        """Every model version, newest first, whatever its state."""
        return self.store.models()

    def load_model(self, model_id: int | None = None, category: str | None = None):
        """The trained model of a version (default: the active one for ``category``).

        Its ``categories`` are the version's current names: a checkpoint holds the names at
        training time, and categories may have been renamed since.
        """
        from .model import load_checkpoint

        record = self.store.model(model_id) if model_id is not None else self.store.active_model(category)
        if record is None or record.checkpoint is None:
            raise ValueError("no trained model yet: label a few positives and train first")
        model = load_checkpoint(self.checkpoint_path(record), self.backbone)
        if len(model.categories) != len(record.categories):
            raise ProjectError(
                f"checkpoint of model v{record.id} scores {len(model.categories)} categories, its record {len(record.categories)}"
            )
        model.categories = list(record.categories)
        return model

    def checkpoint_path(self, record: ModelRecord) -> Path:
        """The checkpoint file of a model version; ProjectError unless it lies inside ``models/``."""
        if not record.checkpoint:
            raise ProjectError(f"model v{record.id} has no checkpoint")
        path = (self.root / record.checkpoint).resolve()
        if self.models_dir.resolve() not in path.parents:
            raise ProjectError(
                f"model v{record.id}'s checkpoint {record.checkpoint!r} is outside the project's models/ folder;"
                " refusing to read it"
            )
        return path

    # -- scores and index ----------------------------------------------------------------
    def version_scores(self, category: str) -> tuple[ModelRecord, VersionScores] | None:
        from .scoring import read_version

        record = self.store.active_model(category)
        if record is None:
            return None
        version = read_version(self.scores_dir, record.id, record.categories)
        return None if version is None else (record, version)

    def scores(self, category: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(image ids, probability of ``category``) from the active model, or None before training."""
        found = self.version_scores(category)
        if found is None:
            return None
        _, version = found
        return version.ids, version.column(category)

    def index(self):
        """The FAISS index that serves search: the active model's trunk embeddings once built (the
        previous version's or the pretrained features' until then), loaded once per process; see
        :meth:`bgminer.search.Finder.served`."""
        return self.finder.index()

    def index_status(self):
        """Which model version's index serves search and whether a newer one is being built
        (:class:`bgminer.search.IndexStatus`)."""
        return self.finder.status()

    def wait_for_index(self, timeout: float | None = None) -> None:
        """Wait for background index builds (after :meth:`train` or :meth:`rescore`); raise if one failed."""
        self.finder.wait(timeout)

    def embed_query(self, image_file: str | Path | bytes) -> np.ndarray:
        """Embed an image that is not in the corpus into the active index's space (see :func:`bgminer.modes.embed_query`)."""
        return self.finder.embed_query(image_file)

    # -- finding seeds -------------------------------------------------------------------
    def search_like(
        self, image_id: int | None = None, image_file: str | Path | bytes | None = None, n: int = 48
    ) -> list[Candidate]:
        """Nearest neighbours of a corpus image or of an uploaded image file ("more like this")."""
        return self.finder.like(image_id=image_id, image_file=image_file, n=n)

    def search_text(self, query: str, n: int = 48) -> tuple[list[str], list[Candidate]]:
        """Offline text search over ImageNet class names; returns (matched classes, images)."""
        return self.finder.text(query, n=n)

    def browse(self, n: int = 48, seed: int = 0, offset: int = 0) -> list[Candidate]:
        """Corpus images in a random order that is stable for ``seed`` (for paging)."""
        return self.finder.browse(n=n, seed=seed, offset=offset)

    # -- review --------------------------------------------------------------------------
    def ranking_inputs(self, category: str) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """What review strategies rank for ``category``: (image ids, the active model's scores or
        None before training, the embeddings: the vector index when it is that model's, else the
        version's own embeddings, aligned with the ids, until its index is built). Ranking never
        waits for an index nor mixes spaces. :class:`bgminer.loop.Miner` runs the loop."""
        found = self.version_scores(category)
        if found is None:
            ids = np.asarray(self.store.image_ids(embedded=True), dtype=np.int64)
            return ids, None, self.index() if len(ids) else None
        record, version = found
        if not len(version.ids):
            return version.ids, version.column(category), None
        served, index = self.finder.served()
        return version.ids, version.column(category), index if served == record.id else version.embeddings()

    def review_stats(self, category: str) -> ReviewStats:
        """Decisions made in review for ``category`` (undone ones removed), in order."""
        return category_status.review_stats(self, category)

    def validation_sample(self, category: str, n: int = 30, redraw: bool = False) -> dict[str, Any]:
        """The importance sample of unreviewed images used to estimate remaining positives, drawn once
        from the active model's scores and kept until ``redraw`` (see :mod:`bgminer.category_status`)."""
        return category_status.validation_sample(self, category, n=n, redraw=redraw)

    def status(self, category: str) -> dict[str, Any]:
        """How far along the user is: labels, reviews, positives found, estimated positives left."""
        return category_status.status(self, category)

    # -- background jobs and project settings -------------------------------------------
    def jobs(self, n: int = 20, active_only: bool = False) -> list[JobRecord]:
        """The newest ``n`` background jobs of this project (any process), newest first."""
        return self.store.jobs(limit=n, active_only=active_only)

    def job_runner(self, max_jobs: int | None = None) -> JobRunner:
        """A runner for this project's background jobs (see :class:`bgminer.jobs.JobRunner`).

        Call :meth:`fail_orphaned_jobs` first when it is the process's only runner."""
        return JobRunner(self.store, max_jobs=max_jobs)

    def fail_orphaned_jobs(self) -> int:
        """Mark failed the jobs left running by a process of this machine that no longer exists."""
        return self.store.fail_orphaned_jobs()

    @property
    def auto_retrain_after(self) -> int:
        """Retrain in the background after this many new labels of a category (0: never); one setting per project."""
        return int(self.store.get_meta(AUTO_RETRAIN_META, "0") or 0)

    @auto_retrain_after.setter
    def auto_retrain_after(self, labels: int) -> None:
        if labels < 0:
            raise ValueError("auto-retrain threshold must be 0 (off) or a positive number of labels")
        self.store.set_meta(AUTO_RETRAIN_META, str(int(labels)))

    def backup(
        self, dest: str | Path, with_features: bool = False, with_thumbnails: bool = False, progress: ProgressFn | None = None
    ):
        """A consistent copy of the project in the new folder ``dest``, taken while others may write;
        see :mod:`bgminer.backup`. Returns a :class:`bgminer.backup.BackupReport`."""
        from .backup import backup_project

        return backup_project(self, dest, with_features=with_features, with_thumbnails=with_thumbnails, progress=progress)

    def info(self) -> dict[str, Any]:
        s = self.store
        active = s.active_model()
        counts = self.corpus_counts()
        return {
            "project": str(self.root),
            "backbone": self.backbone_name,
            "images": counts.images,
            "rejected": counts.rejected,
            "rejected_by_reason": s.rejected_counts(),
            "embedded": counts.embedded,
            "categories": s.categories(),
            "labels": s.label_counts(),
            "models": len(s.models()),
            "active_model": None if active is None else {"id": active.id, "categories": active.categories, "mode": active.mode},
        }

    def calibration(self, category: str):
        """The active model's score-to-probability map for ``category`` (Platt scaling on the reviews made
        since it was trained; raw scores, flagged, until there are enough): :mod:`bgminer.calibration`."""
        from .calibration import calibration

        return calibration(self, category)

    def grow_validation_sample(self, category: str, n: int) -> dict[str, Any]:
        """The validation sample grown to expected size ``n`` (``status`` says how many more labels would
        make its interval useful); see :func:`bgminer.category_status.grow_validation_sample`."""
        return category_status.grow_validation_sample(self, category, n)


@dataclass(frozen=True)
class CorpusCounts:
    images: int  # usable (status ok)
    embedded: int  # usable and in the feature cache
    rejected: int  # refused at ingest, kept to tell the user why


def _refuse_inside_uploads(root: Path) -> None:
    """A project folder must not lie in (or be) another project's ``uploads/`` tree, which visitors fill."""
    for folder in (root, *root.parents):
        if folder.name == "uploads" and (folder.parent / DB_NAME).exists():
            raise ProjectError(
                f"{root} is inside the uploads folder of the project at {folder.parent}; choose a folder outside it"
            )
