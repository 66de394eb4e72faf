"""A project is one folder: the SQLite store, cached features, thumbnails, uploads,
model checkpoints, scores and indexes. Images are referenced in place, never copied.

:class:`Project` is the single entry point that the CLI, the web app and Python users
share; it composes the engine modules and holds no ML logic of its own.
"""

from __future__ import annotations

import json
import operator
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .feature_cache import CacheBusy, FeatureCache, FolderLock, unmark_zero_rows
from .jobs import JobRunner
from .modes import get_mode
from .progress import Cancelled, CancelToken, ProgressFn
from .settings import local_user
from .store import JobRecord, LabelEvent, ModelRecord, Store

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
        self._indexes: dict[int | None, Any] = {}
        self._index_lock = threading.Lock()
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
                self._features = FeatureCache(self._feature_folder_lock.folder, bb.feature_dim, len(bb.class_names), bb.map_shape, lock=self._feature_folder_lock)
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

        return ingest(self.store, sources, self.thumbs_dir, self.uploads_dir, progress=progress, cancel=cancel, data_roots=data_roots, **kw)

    def embed(
        self,
        device: str = "auto",
        batch_size: int = 32,
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> EmbedReport:
        from .features import embed_images

        return embed_images(self.store, self.features, self.backbone, batch_size=batch_size, device=device, progress=progress, cancel=cancel)

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

    def label(self, category: str, image_ids: Sequence[int], value: str, source: str = "user", author: str | None = None) -> list[int]:
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

    def label_paths(self, category: str, paths: Sequence[str | Path], value: str, source: str = "import", author: str | None = None) -> list[str]:
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
        """One round: train (warm-started in the modes that do), re-score the corpus, rebuild the index.

        Trains every category with a positive label unless ``categories`` narrows it. The new
        version becomes active only once all of it is on disk; a failed or cancelled round
        leaves the previous version active.
        """
        from .model import build_model, grow_categories, save_checkpoint
        from .scoring import rescore_version
        from .train import TrainConfig, build_training_set, train

        config = config or TrainConfig()
        counts = self.store.label_counts()
        if categories is None:
            cats = [c for c, n in counts.items() if n["positive"] > 0]
        else:
            cats = [categories] if isinstance(categories, str) else list(categories)
            for c in cats:
                self.store.category_id(c)  # unknown category -> clear error
        if not cats or not any(counts[c]["positive"] for c in cats):
            raise ValueError("label at least one positive image before training")
        ids = np.asarray(self.store.image_ids(embedded=True), dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("no embedded images yet: ingest and embed a corpus first")

        parent = None
        if config.warm_start:
            cat_ids = {self.store.category_id(c) for c in cats}
            parent = next((m for m in self.store.models() if m.state == "ready" and m.mode == config.mode and set(m.category_ids) <= cat_ids), None)
        if parent is not None:
            model = self.load_model(parent.id)
            cats = list(model.categories) + [c for c in cats if c not in model.categories]
            if cats != list(model.categories):
                model = grow_categories(model, cats)
        else:
            model = build_model(config.mode, self.backbone, cats, fixed_background_logit=config.fixed_background_logit)
        model_id = self.store.add_model(cats, config.mode, asdict(config), parent.id if parent else None)
        started = time.perf_counter()
        try:
            inputs = get_mode(config.mode).inputs(self)
            labels = {k: self.store.labels(c) for k, c in enumerate(cats)}
            training_set = build_training_set(inputs, labels, ids, self.features.open("logits"), config)
            def record_losses(epochs) -> None:  # live loss curve for the Train page
                self.store.update_model(model_id, losses=[asdict(e) for e in epochs])

            result = train(model, training_set, config, progress=progress, cancel=cancel, on_epoch=record_losses)
            checkpoint = save_checkpoint(result.model, self.models_dir / f"v{model_id:04d}.pt", extra={"model_id": model_id})
            version = rescore_version(result.model, inputs, ids, self.scores_dir, model_id, device=config.device, cancel=cancel)
            self._build_index(model_id, version.embeddings(), ids)
            metrics = _training_metrics(labels, ids, version.scores, cats, result)
        except Cancelled:
            self.store.update_model(model_id, state="cancelled", train_seconds=time.perf_counter() - started)
            raise
        except Exception as exc:
            self.store.update_model(model_id, state="failed", error=f"{type(exc).__name__}: {exc}", train_seconds=time.perf_counter() - started)
            raise
        self.store.update_model(
            model_id,
            state="ready",
            checkpoint=str(checkpoint.relative_to(self.root)),
            losses=[asdict(e) for e in result.epochs],
            label_counts={c: counts[c] for c in cats if c in counts},
            metrics=metrics,
            train_seconds=time.perf_counter() - started,
        )
        return self.store.model(model_id)

    def rescore(
        self,
        engine: str = "local",
        ray_config: Any = None,
        device: str = "auto",
        progress: ProgressFn | None = None,
        cancel: CancelToken | None = None,
    ) -> ModelRecord:
        """Re-score every embedded image with the active model and rebuild its index (after embedding more images).

        Streams chunk by chunk into the version's memory-mapped folder, in process or on Ray
        (``engine="ray"``, ``ray_config`` a :class:`bgminer.ray_engine.RayConfig`); the version's
        old scores and index keep serving until the new ones are complete.
        """
        from .scoring import rescore_version

        record = self.store.active_model()
        if record is None:
            raise ValueError("no trained model yet: label a few positives and train first")
        model = self.load_model(record.id)
        ids = np.asarray(self.store.image_ids(embedded=True), dtype=np.int64)
        version = rescore_version(
            model, get_mode(model.mode).inputs(self), ids, self.scores_dir, record.id,
            engine=engine, ray_config=ray_config, device=device, progress=progress, cancel=cancel,
        )
        self._build_index(record.id, version.embeddings(), ids)
        return record

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
            raise ProjectError(f"checkpoint of model v{record.id} scores {len(model.categories)} categories, its record {len(record.categories)}")
        model.categories = list(record.categories)
        return model

    def checkpoint_path(self, record: ModelRecord) -> Path:
        """The checkpoint file of a model version; ProjectError unless it lies inside ``models/``."""
        if not record.checkpoint:
            raise ProjectError(f"model v{record.id} has no checkpoint")
        path = (self.root / record.checkpoint).resolve()
        if self.models_dir.resolve() not in path.parents:
            raise ProjectError(f"model v{record.id}'s checkpoint {record.checkpoint!r} is outside the project's models/ folder; refusing to read it")
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

    def _index_path(self, model_id: int | None) -> Path:
        return self.index_dir / ("pretrained.faiss" if model_id is None else f"v{operator.index(model_id):04d}.faiss")

    def _build_index(self, model_id: int | None, vectors: np.ndarray, ids: np.ndarray):
        from .index import build_index

        index = build_index(np.asarray(vectors, dtype=np.float32), ids)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        index.save(self._index_path(model_id))
        with self._index_lock:
            self._indexes[model_id] = index
        return index

    def index(self):
        """The FAISS index over the active model's trunk embeddings (pretrained features before training).

        Loaded from disk once per process; images embedded since it was built are added incrementally.
        """
        from .index import VectorIndex
        from .scoring import read_version

        active = self.store.active_model()
        model_id = None if active is None else active.id
        with self._index_lock:
            index = self._indexes.get(model_id)
        if index is None:
            path = self._index_path(model_id)
            if path.exists():
                index = VectorIndex.load(path)
            elif model_id is None:
                ids = np.asarray(self.store.image_ids(embedded=True), dtype=np.int64)
                if len(ids) == 0:
                    raise ValueError("no embedded images yet: ingest and embed a corpus first")
                return self._build_index(None, self.features.read("pooled", ids), ids)
            else:
                version = read_version(self.scores_dir, model_id, active.categories)
                return self._build_index(model_id, version.embeddings(), version.ids)
            with self._index_lock:
                self._indexes[model_id] = index
        if model_id is None:  # keep the pretrained index in step with newly embedded images
            have = index.ids()
            new = np.setdiff1d(np.asarray(self.store.image_ids(embedded=True), dtype=np.int64), have)
            if len(new):
                with self._index_lock:
                    index.add(self.features.read("pooled", new), new)
                    index.save(self._index_path(None))
        return index

    def embed_query(self, image_file: str | Path | bytes) -> np.ndarray:
        """Embed an image that is not in the corpus into the active index's space (see :func:`bgminer.modes.embed_query`)."""
        import io

        import torch

        from .backbone import Preprocess
        from .imageio import load_rgb, to_tensor_uint8
        from .modes import embed_query

        source = io.BytesIO(image_file) if isinstance(image_file, bytes) else image_file
        pixels = Preprocess(self.backbone.preprocess)(to_tensor_uint8(load_rgb(source, draft_size=self.backbone.preprocess.resize)))
        active = self.store.active_model()
        model = None if active is None else self.load_model(active.id)
        with torch.inference_mode():
            return embed_query(self.backbone, model, pixels[None]).numpy()

    def _candidates(self, ids: Sequence[int], scores: Sequence[float | None]) -> list[Candidate]:
        paths = self.store.image_paths(ids)
        return [Candidate(int(i), paths[int(i)], None if s is None else float(s)) for i, s in zip(ids, scores) if int(i) in paths]

    # -- finding seeds -------------------------------------------------------------------
    def search_like(self, image_id: int | None = None, image_file: str | Path | bytes | None = None, n: int = 48) -> list[Candidate]:
        """Nearest neighbours of a corpus image or of an uploaded image file ("more like this")."""
        index = self.index()
        if image_id is not None:
            query = index.vectors([image_id])
            exclude = [image_id]
        elif image_file is not None:
            query, exclude = self.embed_query(image_file), None
        else:
            raise ValueError("search_like needs an image id or an image file")
        sims, ids = index.search(np.asarray(query, dtype=np.float32), n, exclude_ids=exclude)
        keep = ids[0] >= 0
        return self._candidates(ids[0][keep], sims[0][keep])

    def search_text(self, query: str, n: int = 48) -> tuple[list[str], list[Candidate]]:
        """Offline text search over ImageNet class names; returns (matched classes, images)."""
        from .textsearch import class_probability, match_classes

        matches = match_classes(query)
        if not matches:
            return [], []
        ids = np.asarray(self.store.image_ids(embedded=True), dtype=np.int64)
        prob = np.concatenate([class_probability(self.features.read("logits", ids[i : i + 8192]), matches) for i in range(0, len(ids), 8192)] or [np.zeros(0)])
        top = np.argsort(-prob, kind="stable")[:n]
        return [m.name for m in matches], self._candidates(ids[top], prob[top])

    def browse(self, n: int = 48, seed: int = 0, offset: int = 0) -> list[Candidate]:
        """Corpus images in a random order that is stable for ``seed`` (for paging)."""
        ids = np.asarray(self.store.image_ids(), dtype=np.int64)
        order = np.random.default_rng(seed).permutation(len(ids))[offset : offset + n]
        return self._candidates(ids[order], [None] * len(order))

    # -- review --------------------------------------------------------------------------
    def ranking_inputs(self, category: str) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """What review strategies rank for ``category``: (image ids, the active model's scores or
        None before training, the vector index). :class:`bgminer.loop.Miner` runs the loop."""
        found = self.version_scores(category)
        if found is None:
            ids, scores = np.asarray(self.store.image_ids(embedded=True), dtype=np.int64), None
        else:
            _, version = found
            ids, scores = version.ids, version.column(category)
        return ids, scores, self.index() if len(ids) else None

    def review_stats(self, category: str) -> ReviewStats:
        """Decisions made in review for ``category`` (undone ones removed), in order."""
        from .evaluate import discovery_curve

        events = self.store.label_history(category, limit=1_000_000)[::-1]
        undone = {e.undoes for e in events if e.undoes is not None}
        decisions = [e.value == "positive" for e in events if e.source == "review" and e.undoes is None and e.id not in undone]
        curve = discovery_curve(decisions).tolist()
        last = decisions[-20:]
        return ReviewStats(
            reviewed=len(decisions),
            found=curve[-1] if curve else 0,
            precision_last20=(sum(last) / len(last)) if last else None,
            curve=curve,
        )

    def validation_sample(self, category: str, n: int = 30, redraw: bool = False) -> dict[str, Any]:
        """The importance sample of unreviewed images used to estimate remaining positives.

        Drawn once from the active model's scores (tilted towards high scores, see
        :mod:`bgminer.evaluate`) and kept until ``redraw``, so it stays fixed while it is labeled.
        """
        from .evaluate import draw_validation_sample

        key = f"validation:{self.store.category_id(category)}"  # by id: a rename keeps the sample
        stored = self.store.get_meta(key)
        if stored and not redraw:
            return json.loads(stored)
        found = self.version_scores(category)
        if found is None:
            raise ValueError("train a model first: the validation sample is drawn from its scores")
        record, version = found
        labels = self.store.labels(category)
        unlabeled = ~np.isin(version.ids, np.fromiter(labels, dtype=np.int64, count=len(labels)))
        pool_ids, pool_scores = version.ids[unlabeled], version.column(category)[unlabeled]
        rng = np.random.default_rng(record.id)
        positions, pi = draw_validation_sample(pool_scores, n, rng)
        sample = {
            "model_id": record.id,
            "ids": pool_ids[positions].tolist(),
            "pi": pi.tolist(),
            "unreviewed": len(pool_ids),
            "found": sum(v == "positive" for v in labels.values()),
            "drawn_at": time.time(),
        }
        self.store.set_meta(key, json.dumps(sample))
        return sample

    def status(self, category: str) -> dict[str, Any]:
        """How far along the user is: labels, reviews, positives found, estimated positives left."""
        from .evaluate import estimate_remaining

        labels = self.store.labels(category)
        positives = sum(v == "positive" for v in labels.values())
        review = self.review_stats(category)
        record = self.store.active_model(category)
        out: dict[str, Any] = {
            "category": category,
            "positives": positives,
            "negatives": len(labels) - positives,
            "reviewed": review.reviewed,
            "found_in_review": review.found,
            "model_version": None if record is None else record.id,
            "estimate": None,
        }
        if record is None:
            out["estimate_note"] = "train a model to estimate how many positives remain"
            return out
        sample = self.validation_sample(category)
        labeled = [labels.get(i) for i in sample["ids"]]
        done = sum(v is not None for v in labeled)
        out["validation_labeled"] = f"{done}/{len(labeled)}"
        if done < len(labeled):
            out["estimate_note"] = f"label the {len(labeled) - done} remaining validation images (review strategy 'validate') to estimate what is left"
            return out
        est = estimate_remaining(sample["ids"], [v == "positive" for v in labeled], sample["pi"], sample["unreviewed"], found=sample["found"])
        # The sample estimates the positives that were hidden when it was drawn; positives found since are no longer hidden.
        total, low_total, high_total = (sample["found"] + x for x in (est.remaining, est.low, est.high))
        out["estimate"] = {
            "remaining": max(0.0, total - positives),
            "remaining_low": max(0.0, low_total - positives),
            "remaining_high": max(0.0, high_total - positives),
            "recall": positives / total if total else None,
            "recall_low": positives / high_total if high_total else None,
            "recall_high": min(1.0, positives / low_total) if low_total else None,
            "confidence": est.confidence,
            "sample_size": est.sample_size,
            "sample_positives": est.sample_positives,
        }
        return out

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

    def backup(self, dest: str | Path, with_features: bool = False, with_thumbnails: bool = False, progress: ProgressFn | None = None):
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


@dataclass(frozen=True)
class CorpusCounts:
    images: int  # usable (status ok)
    embedded: int  # usable and in the feature cache
    rejected: int  # refused at ingest, kept to tell the user why


@dataclass(frozen=True)
class Candidate:
    """An image offered to the user, with the score that put it there."""

    image_id: int
    path: str
    score: float | None = None


@dataclass
class ReviewStats:
    reviewed: int
    found: int
    precision_last20: float | None
    curve: list[int] = field(default_factory=list)  # positives found after each review decision


def _refuse_inside_uploads(root: Path) -> None:
    """A project folder must not lie in (or be) another project's ``uploads/`` tree, which visitors fill."""
    for folder in (root, *root.parents):
        if folder.name == "uploads" and (folder.parent / DB_NAME).exists():
            raise ProjectError(f"{root} is inside the uploads folder of the project at {folder.parent}; choose a folder outside it")


def _training_metrics(labels: dict[int, dict[int, str]], ids: np.ndarray, scores: np.ndarray, cats: list[str], result) -> dict[str, Any]:
    """In-sample AP on the labeled images (optimistic; a sanity signal, not a test score)."""
    from .evaluate import average_precision

    position = {int(i): k for k, i in enumerate(ids)}
    metrics: dict[str, Any] = {"steps": result.steps, "device": result.device}
    for k, c in enumerate(cats):
        rows = [(position[i], v == "positive") for i, v in labels[k].items() if i in position]
        if rows and any(y for _, y in rows) and not all(y for _, y in rows):
            metrics[f"train_ap/{c}"] = float(average_precision(np.array([y for _, y in rows]), scores[[r for r, _ in rows], k]))
    return metrics
