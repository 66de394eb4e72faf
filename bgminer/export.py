"""Take a project's results elsewhere: a self-contained classifier file, ``predict`` without a
project, label CSV export/import, score tables and an ImageNet-style folder tree.

An exported model is one TorchScript file that maps uint8 RGB images of any size to per-category
probabilities: the backbone's own preprocessing, the frozen backbone part the training mode needs,
the trained trunk and the main head. The auxiliary ImageNet head only regularised training and is
left out. The network is traced on a fixed ``[1, 3, crop, crop]`` input (timm modules do not all
script); only the small wrapper that preprocesses and batches is scripted. A JSON metadata
document is embedded in the archive (the format marker ``load_exported`` checks) and written
beside it, together with the plain ``state_dict``.

Scores match the app's because decoding goes through the same ``load_rgb(draft_size=resize)`` and
the same :class:`~bgminer.backbone.Preprocess`; last-stage models round the stage maps to float16
exactly as the feature cache that they were trained and scored on does.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

import numpy as np
import torch
from torch import nn

from . import __version__
from .backbone import Backbone, Preprocess
from .corpus import ACCEPTED_SUFFIXES
from .fsutil import atomic_path
from .imageio import ImageRejected, load_rgb, to_tensor_uint8
from .model import BackgroundSplittingModel
from .progress import ProgressFn, report
from .settings import local_user
from .store import StoreError

if TYPE_CHECKING:
    from .project import Project

EXPORT_FORMAT = "bgminer-export"
EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "model.ts"
METADATA_FILE = "metadata.json"
STATE_DICT_FILE = "state_dict.pt"
EMBEDDED_METADATA = "bgminer_metadata.json"  # stored as <archive>/extra/bgminer_metadata.json
LABEL_COLUMNS = ("path", "category", "label", "source", "author", "updated_at", "score", "sha256")
NEGATIVE_SUFFIX = "_negative"  # export_folders: reviewed negatives of C go to OUT/C_negative/
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting so as a formula (OWASP)


# -- the exported network ----------------------------------------------------------------------


class _Network(nn.Module):
    """Preprocessed pixels ``[B, 3, crop, crop]`` -> (probabilities ``[B, K]``, trunk embedding ``[B, D]``).

    Holds the frozen backbone part that produced the trained model's inputs (pooled features,
    stage maps, or nothing for full mode) and the model without its auxiliary head.
    """

    def __init__(self, model: BackgroundSplittingModel, backbone: Backbone):
        super().__init__()
        classifier = copy.deepcopy(model)
        classifier.aux_head = None  # the ImageNet head only regularised training
        if model.mode == "adapter":
            self.features: nn.Module = nn.Sequential(copy.deepcopy(backbone.trunk.stem), copy.deepcopy(backbone.trunk.head))
        elif model.mode == "last-stage":
            self.features = copy.deepcopy(backbone.trunk.stem)
        else:
            self.features = nn.Identity()
        self.classifier = classifier
        self.maps_in_float16 = model.mode == "last-stage"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.features(x)
        if self.maps_in_float16:  # the app trains and scores last-stage models on float16-cached maps
            inputs = inputs.half().float()
        h = self.classifier.embed(inputs)
        return self.classifier.probabilities(h), h


class ExportedClassifier(nn.Module):
    """The scripted top of an export: uint8 RGB images ``[3, H, W]`` (any sizes) -> probabilities ``[B, K]``.

    ``forward(images)`` gives probabilities, ``embed(images)`` the trunk embeddings, ``pixels(images)``
    the preprocessed batch. Inputs are moved to the module's device, so ``.to("cuda")`` is enough.
    """

    def __init__(self, preprocess: Preprocess, network: torch.jit.ScriptModule, categories: list[str]):
        super().__init__()
        self.preprocess = preprocess
        self.network = network
        self.categories = categories

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.network(self.pixels(images))[0]

    @torch.jit.export
    def embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.network(self.pixels(images))[1]

    @torch.jit.export
    def pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        device = self.preprocess.mean.device
        batch = torch.stack([self.preprocess(image.to(device)) for image in images])
        return batch.contiguous(memory_format=torch.channels_last)


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript calls warn that TorchScript is deprecated (and tracing about constants); keep user output clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def script_classifier(model: BackgroundSplittingModel, backbone: Backbone) -> tuple[torch.jit.ScriptModule, dict[str, torch.Tensor]]:
    """The scripted :class:`ExportedClassifier` for ``model`` and its network's plain state dict (CPU)."""
    network = _Network(model, backbone).eval().to(memory_format=torch.channels_last)
    crop = backbone.preprocess.crop
    example = torch.zeros(1, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False, _store_inputs=False)
        scripted = torch.jit.script(ExportedClassifier(Preprocess(backbone.preprocess), traced, list(model.categories)))
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    return scripted.eval(), state


# -- export and load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """Files written by :func:`export_model` (no ONNX file: torch's ONNX exporter needs the ``onnx`` package)."""

    directory: Path
    model: Path  # TorchScript: uint8 images -> probabilities
    metadata: Path  # the same JSON document that is embedded in ``model``
    state_dict: Path  # plain tensors, ``torch.load(weights_only=True)``


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


def export_metadata(project: Project, record: Any, model: BackgroundSplittingModel, backbone: Backbone) -> dict[str, Any]:
    """The metadata document of an export: everything needed to use, audit and reproduce it."""
    cfg = backbone.preprocess
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "bgminer_version": __version__,
        "torch_version": torch.__version__,
        "created_at": _iso(time.time()),
        "categories": list(model.categories),
        "output": "probability per category: softmax over [background, *categories], background column dropped",
        "input": {
            "tensor": "uint8 RGB [3, H, W], any size; forward() takes a list of them",
            "decode": "bgminer.imageio.load_rgb(path, draft_size=resize): EXIF orientation applied, transparency on white, "
            "JPEGs decoded at the smallest DCT scale whose short side stays >= resize",
            "resize": cfg.resize,
            "crop": cfg.crop,
            "interpolation": cfg.interpolation,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "value_range": 255,
        },
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256, "feature_dim": backbone.feature_dim},
        "model": {
            "version": record.id,
            "mode": model.mode,
            "config": record.config,
            "label_counts": record.label_counts,
            "metrics": record.metrics,
            "losses": record.losses,
            "train_seconds": record.train_seconds,
            "trained_at": _iso(record.created_at),
            "parent_version": record.parent_id,
            "embedding_dim": model.embedding_dim,
            "adapter_hidden": model.adapter_hidden,
            "fixed_background_logit": model.fixed_background_logit,
            "stage_maps_float16": model.mode == "last-stage",
            "auxiliary_head": "dropped",
        },
        "source_project": str(project.root),
        "files": {"model": MODEL_FILE, "state_dict": STATE_DICT_FILE},
    }


def export_model(project: Project, category: str | None, out_dir: str | Path, model_id: int | None = None) -> ExportResult:
    """Export the active model for ``category`` (or the newest model; or version ``model_id``) to ``out_dir``.

    The exported model scores every category of that version. Files are written under temporary
    names and renamed, so ``out_dir`` never holds a half-written export.
    """
    if model_id is not None:
        record = project.store.model(model_id)
    else:
        if category is not None:
            project.store.category_id(category)  # unknown category -> clear error
        record = project.store.active_model(category)
    if record is None or record.state != "ready" or record.checkpoint is None:
        what = f"category {category!r}" if category else "this project"
        raise ValueError(f"no trained model for {what} yet: label a few positives and train first")
    backbone = project.backbone
    model = project.load_model(record.id)
    scripted, state = script_classifier(model, backbone)
    metadata = export_metadata(project, record, model, backbone)
    text = json.dumps(metadata, indent=2, default=str)

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp, _quiet_jit():
        torch.jit.save(scripted, str(tmp), _extra_files={EMBEDDED_METADATA: text})
    with atomic_path(out / STATE_DICT_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(out / METADATA_FILE) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return ExportResult(out, out / MODEL_FILE, out / METADATA_FILE, out / STATE_DICT_FILE)


@dataclass
class ExportedModel:
    """A loaded export: the TorchScript module plus its metadata."""

    module: torch.jit.ScriptModule = field(repr=False)
    metadata: dict[str, Any]
    path: Path

    @property
    def categories(self) -> list[str]:
        return list(self.metadata["categories"])

    @property
    def resize(self) -> int:
        """Short side JPEGs are draft-decoded to; must match what the app used when embedding."""
        return int(self.metadata["input"]["resize"])

    @property
    def device(self) -> torch.device:
        return self.module.preprocess.mean.device

    def scores(self, images: list[torch.Tensor]) -> np.ndarray:
        """Probabilities ``float32 [B, K]`` for uint8 RGB image tensors ``[3, H, W]``."""
        with torch.inference_mode():
            return self.module(images).float().cpu().numpy()


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata embedded in an exported model file; ValueError if it is not an intact bgminer export."""
    path = _model_file(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # starts like an archive but its directory is gone: cut short
                raise ValueError(f"{path} is a damaged model file (truncated archive: {exc}); export it again") from exc
        raise ValueError(f"{path} is not a bgminer model export (not a TorchScript archive: {exc})") from exc
    with archive:
        try:
            bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise ValueError(f"{path} is a damaged model file (cannot be read: {exc}); export it again") from exc
        if bad is not None:
            raise ValueError(f"{path} is a damaged model file ({bad} fails its checksum); export it again")
        names = [n for n in archive.namelist() if n.endswith(f"/extra/{EMBEDDED_METADATA}")]
        if not names:
            raise ValueError(f"{path} is not a bgminer model export (no embedded bgminer metadata; export one with `bgminer export`)")
        try:
            metadata = json.loads(archive.read(names[0]))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} has unreadable bgminer metadata: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a bgminer model export (wrong format marker)")
    if metadata.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(
            f"{path} is a bgminer export of format version {metadata.get('format_version')}; "
            f"this bgminer ({__version__}) reads version {EXPORT_FORMAT_VERSION}"
        )
    return metadata


def _model_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    return path


def load_exported(path: str | Path, device: str = "cpu") -> ExportedModel:
    """Load an exported model file (or the folder holding ``model.ts``) onto ``device``.

    Raises ValueError for files that are not bgminer exports, damaged or truncated files, and
    exports of a newer format.
    """
    path = _model_file(path)
    metadata = read_export_metadata(path)
    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location=_device(device))
    except RuntimeError as exc:
        made_with = metadata.get("torch_version", "an unknown version")
        raise ValueError(
            f"{path} is a bgminer export, but this PyTorch ({torch.__version__}) cannot load its TorchScript "
            f"(it was made with PyTorch {made_with}; use that version or newer): {exc}"
        ) from exc
    return ExportedModel(module.eval(), metadata, path)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA device is available")
    return torch.device(device)


# -- predict -----------------------------------------------------------------------------------


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and image files (by suffix) under folders, recursively, in sorted order; hidden entries skipped."""
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = (f for f in p.rglob("*") if f.suffix.lower() in ACCEPTED_SUFFIXES and f.is_file())
            files += sorted(f for f in found if not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def _decode(path: Path, resize: int) -> torch.Tensor:
    return to_tensor_uint8(load_rgb(path, draft_size=resize))


def _decoded_batches(files: list[Path], batch_size: int, resize: int) -> Iterator[list[tuple[Path, torch.Tensor | str]]]:
    """Per batch: (path, uint8 tensor) or (path, reason it could not be decoded).

    Decoding runs on threads, one batch ahead, so it overlaps with the model on the current batch.
    """

    def decode(path: Path) -> torch.Tensor | str:
        try:
            return _decode(path, resize)
        except ImageRejected as exc:
            return str(exc)

    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        ahead = [pool.submit(decode, f) for f in chunks[0]] if chunks else []
        for index, chunk in enumerate(chunks):
            current = ahead
            if index + 1 < len(chunks):
                ahead = [pool.submit(decode, f) for f in chunks[index + 1]]
            yield [(path, future.result()) for path, future in zip(chunk, current)]


def predict(
    model: str | Path | ExportedModel,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    device: str = "auto",
    on_skip: Callable[[str, str], None] | None = None,
    progress: ProgressFn | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """Scores of an exported model for image files and folders: ``[(path, {category: probability})]``.

    Needs no project. Files that cannot be decoded are left out and reported to ``on_skip(path, reason)``.
    """
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    exported = model if isinstance(model, ExportedModel) else load_exported(model, device=device)
    files = image_files(paths)
    categories = exported.categories
    results: list[tuple[str, dict[str, float]]] = []
    done = 0
    report(progress, 0, len(files), "scoring")
    for batch in _decoded_batches(files, batch_size, exported.resize):
        good = [(p, t) for p, t in batch if isinstance(t, torch.Tensor)]
        for p, reason in batch:
            if isinstance(reason, str) and on_skip is not None:
                on_skip(str(p), reason)
        if good:
            probs = exported.scores([t for _, t in good])
            results += [(str(p), {c: float(v) for c, v in zip(categories, row)}) for (p, _), row in zip(good, probs)]
        done += len(batch)
        report(progress, done, len(files), "scoring")
    return results


# -- labels ------------------------------------------------------------------------------------


def _score_lookup(project: Project, category: str) -> dict[int, float]:
    found = project.scores(category)
    if found is None:
        return {}
    ids, scores = found
    return dict(zip(ids.tolist(), scores.tolist()))


def label_rows(project: Project, category: str | None = None) -> list[dict[str, Any]]:
    """Current labels as rows with the columns of :data:`LABEL_COLUMNS` (score from the active model, or None)."""
    rows = project.store.label_table(category)
    scores = {c: _score_lookup(project, c) for c in {r["category"] for r in rows}}
    return [
        {
            "path": r["path"],
            "category": r["category"],
            "label": r["label"],
            "source": r["source"],
            "author": r["author"],
            "updated_at": _iso(r["updated_at"]),
            "score": scores[r["category"]].get(r["image_id"]),
            "sha256": project.store.image(r["image_id"])["sha256"],
        }
        for r in rows
    ]


def csv_text(value: str) -> str:
    """A text cell that no spreadsheet runs as a formula: a leading ``'`` before ``= + - @``, tab or CR.

    A leading ``'`` is doubled too, so :func:`csv_untext` restores every value exactly.
    """
    return "'" + value if value.startswith((*FORMULA_STARTS, "'")) else value


def csv_untext(cell: str) -> str:
    """The value :func:`csv_text` escaped (other cells unchanged)."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith((*FORMULA_STARTS, "'")) else cell


def write_labels_csv(project: Project, path_or_buffer: str | Path | TextIO, category: str | None = None) -> int:
    """Write the current labels (every category, or one) as CSV; returns the number of rows.

    Columns: path, category, label, source, author, updated_at (ISO 8601, UTC), score (the active
    model's probability for that category; empty before training), sha256 (lets an import find
    images that moved). Text cells are escaped with :func:`csv_text`.
    """
    rows = label_rows(project, category)

    def cell(value: Any) -> Any:
        return csv_text(value) if isinstance(value, str) else value

    def write(f: TextIO) -> None:
        writer = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({**{k: cell(v) for k, v in r.items()}, "score": "" if r["score"] is None else repr(r["score"])} for r in rows)

    if isinstance(path_or_buffer, (str, Path)):
        with open(path_or_buffer, "w", newline="", encoding="utf-8") as f:
            write(f)
    else:
        write(path_or_buffer)
    return len(rows)


@dataclass
class LabelImport:
    """What :func:`import_labels_csv` did."""

    imported: int = 0  # label events written
    unchanged: int = 0  # rows that already matched the project's current label
    categories_created: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # paths not ingested in this project (nor found by sha256)
    invalid: list[str] = field(default_factory=list)  # "line N: reason"


_IMPORTED_VALUES = ("positive", "negative", "cleared")


def import_labels_csv(project: Project, path: str | Path, author: str | None = None) -> LabelImport:
    """Apply a labels CSV (as written by :func:`write_labels_csv`) to ``project``.

    Needs ``path``, ``category`` and ``label`` columns; ``author`` overrides the file's author
    column, which is kept when present (else the OS user), and every event is recorded with source
    "import". Cells escaped against formulas (:func:`csv_text`) are unescaped. Relative paths are
    resolved against the CSV's folder; a path the project does not know is matched by the
    ``sha256`` column when there is one. Unknown categories are created. When a pair appears
    twice, the last row wins; rows equal to the current label are not re-recorded, so importing
    the same file twice changes nothing.
    """
    csv_path = Path(path).expanduser().resolve()
    result = LabelImport()
    store = project.store
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        if not {"path", "category", "label"} <= columns:
            raise ValueError(f"{csv_path} needs path, category and label columns (found: {', '.join(sorted(columns)) or 'none'})")
        raw = [{k: csv_untext(v) if isinstance(v, str) else v for k, v in row.items()} for row in reader]
    by_hash = store.known_hashes() if "sha256" in columns else {}
    known = set(store.categories())
    wanted: dict[tuple[str, int], tuple[str, str]] = {}  # (category, image id) -> (value, author); last row wins
    for line, row in enumerate(raw, start=2):
        category = (row.get("category") or "").strip()
        value = (row.get("label") or "").strip().lower()
        if not category or value not in _IMPORTED_VALUES or not row.get("path"):
            result.invalid.append(f"line {line}: needs a path, a category and a label of positive/negative/cleared")
            continue
        file = Path(row["path"]).expanduser()
        file = (file if file.is_absolute() else csv_path.parent / file).resolve()
        image_id = store.image_id_for_path(str(file))
        if image_id is None:
            image_id = by_hash.get((row.get("sha256") or "").strip())
        if image_id is None:
            result.missing.append(row["path"])
            continue
        if category not in known:
            try:
                project.add_category(category)
            except StoreError as exc:
                result.invalid.append(f"line {line}: {exc}")
                continue
            known.add(category)
            result.categories_created.append(category)
        wanted[(category, image_id)] = (value, author or (row.get("author") or "").strip() or local_user())

    groups: dict[tuple[str, str, str], list[int]] = {}
    current = {c: store.labels(c) for c in {c for c, _ in wanted}}
    for (category, image_id), (value, who) in wanted.items():
        if current[category].get(image_id, "cleared") == value:
            result.unchanged += 1
        else:
            groups.setdefault((category, value, who), []).append(image_id)
    for (category, value, who), ids in groups.items():
        project.label(category, ids, value, source="import", author=who)
        result.imported += len(ids)
    return result


# -- scores ------------------------------------------------------------------------------------


def scores_table(project: Project) -> tuple[Any, dict[str, int]]:
    """Every accepted image with one score column per category (from that category's active model).

    Returns (pandas DataFrame with ``path``, ``image_id`` and a float column per trained category,
    NaN where an image was not scored, e.g. ingested after training; {category: model version}).
    """
    import pandas as pd

    store = project.store
    ids = np.asarray(store.image_ids(), dtype=np.int64)
    paths = store.image_paths(ids.tolist())
    table = pd.DataFrame({"path": [paths[int(i)] for i in ids], "image_id": ids})
    versions: dict[str, int] = {}
    for category in store.categories():
        found = project.version_scores(category)
        if found is None:
            continue
        record, version = found
        if category in ("path", "image_id"):
            raise ValueError(f"category {category!r} clashes with a column name of the scores table; rename it first")
        column = np.full(len(ids), np.nan, dtype=np.float32)
        position = np.searchsorted(ids, version.ids)
        inside = (position < len(ids)) & (ids[np.minimum(position, len(ids) - 1)] == version.ids)
        column[position[inside]] = version.column(category)[inside]
        table[category] = column
        versions[category] = record.id
    if not versions:
        raise ValueError("no trained model yet: label a few positives and train first")
    return table, versions


def write_scores(project: Project, path_or_buffer: str | Path | BinaryIO, format: str | None = None) -> int:
    """Write the corpus scores table (see :func:`scores_table`) as CSV or Parquet; returns the row count.

    ``format`` defaults from a path's suffix (``.parquet`` -> Parquet, else CSV), and to CSV for a
    binary buffer. Parquet files carry each column's model version in their schema metadata (key ``bgminer``).
    """
    target = Path(path_or_buffer).expanduser() if isinstance(path_or_buffer, (str, Path)) else path_or_buffer
    if format is None:
        format = "parquet" if isinstance(target, Path) and target.suffix.lower() in (".parquet", ".pq") else "csv"
    if format not in ("csv", "parquet"):
        raise ValueError(f"scores format must be csv or parquet, not {format!r}")
    table, versions = scores_table(project)
    if format == "csv":
        from pandas.api.types import is_numeric_dtype

        for column in table.columns:  # numbers stay numbers; text (paths) is escaped
            if not is_numeric_dtype(table[column]):
                table[column] = table[column].map(lambda v: csv_text(v) if isinstance(v, str) else v)
        table.columns = [csv_text(str(c)) for c in table.columns]  # category names head columns
        table.to_csv(target, index=False, float_format="%.9g")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(table, preserve_index=False)
        note = json.dumps({"model_versions": versions, "exported_at": _iso(time.time())}).encode()
        pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"bgminer": note}), target)
    return len(table)


# -- folders -----------------------------------------------------------------------------------


@dataclass
class FolderExport:
    """What :func:`export_folders` wrote: files per folder name, and whether they are links."""

    root: Path
    counts: dict[str, int]
    linked: bool


def _folder_name(name: str) -> str:
    """A category name as a single safe path component."""
    cleaned = "".join("_" if ch in '/\\:*?"<>|' or ord(ch) < 32 else ch for ch in name).strip().strip(".")
    return cleaned or "_"


def export_folders(
    project: Project,
    out: str | Path,
    link: bool = True,
    include_negatives: bool = False,
    categories: Sequence[str] | None = None,
) -> FolderExport:
    """An ImageNet-style tree: ``OUT/<category>/<file>`` for every positive, optionally
    ``OUT/<category>_negative/<file>`` for reviewed negatives.

    ``link=True`` makes symbolic links to the original files (absolute targets); ``link=False`` copies
    them. A file name used twice within one folder gets ``-<image id>`` before its suffix. Category
    folders must not exist yet (or be empty), so nothing of the user's is overwritten.
    """
    store = project.store
    root = Path(out).expanduser().resolve()
    cats = list(categories) if categories is not None else store.categories()
    plan: dict[str, list[tuple[int, str]]] = {}
    for category in cats:
        labels = store.labels(category)
        wanted = [("positive", _folder_name(category))] + ([("negative", _folder_name(category) + NEGATIVE_SUFFIX)] if include_negatives else [])
        for value, folder in wanted:
            if folder in plan:
                raise ValueError(f"two categories map to the folder {folder!r}; rename one first")
            ids = sorted(i for i, v in labels.items() if v == value)
            plan[folder] = [(i, p) for i, p in sorted(store.image_paths(ids).items())]
    for folder in plan:
        target = root / folder
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(f"{target} already exists and is not empty; choose a new output folder")
    counts: dict[str, int] = {}
    for folder, items in plan.items():
        target = root / folder
        target.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for image_id, source in items:
            name = Path(source).name
            if name in used:
                name = f"{Path(name).stem}-{image_id}{Path(name).suffix}"
            used.add(name)
            if link:
                os.symlink(source, target / name)
            else:
                shutil.copy2(source, target / name)
        counts[folder] = len(items)
    return FolderExport(root, counts, link)


# -- command line ------------------------------------------------------------------------------


def _progress_to_stderr(done: int, total: int, message: str = "") -> None:
    print(f"\r{message} {done}/{total}".ljust(60), end="" if done < total else "\n", file=sys.stderr, flush=True)


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, default=str) if getattr(args, "json", False) else text)


def cmd_export(args: argparse.Namespace) -> int:
    from .project import Project

    result = export_model(Project(args.project), args.category, args.out, model_id=args.model_version)
    meta = read_export_metadata(result.model)
    summary = {**{k: str(v) for k, v in asdict(result).items()}, "categories": meta["categories"], "model_version": meta["model"]["version"]}
    _print(args, summary, f"exported model v{meta['model']['version']} ({', '.join(meta['categories'])}) to {result.model}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    skipped: list[dict[str, str]] = []

    def on_skip(path: str, reason: str) -> None:
        skipped.append({"path": path, "reason": reason})
        if not args.json:
            print(f"skipped {path}: {reason}", file=sys.stderr)

    exported = load_exported(args.model, device=args.device)
    results = predict(exported, args.paths, batch_size=args.batch_size, on_skip=on_skip, progress=_progress_to_stderr if sys.stderr.isatty() else None)
    if args.json:
        obj = {
            "model": str(exported.path),
            "model_version": exported.metadata["model"]["version"],
            "categories": exported.categories,
            "predictions": [{"path": p, "scores": s} for p, s in results],
            "skipped": skipped,
        }
        print(json.dumps(obj))
    else:
        for path, scores in results:
            print("\t".join([path, *(f"{c}={v:.6f}" for c, v in scores.items())]))
    return 0 if results or not skipped else 1


def cmd_export_labels(args: argparse.Namespace) -> int:
    from .project import Project

    n = write_labels_csv(Project(args.project), args.out, category=args.category)
    _print(args, {"rows": n, "path": str(args.out)}, f"wrote {n} labels to {args.out}")
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    from .project import Project

    result = import_labels_csv(Project(args.project), args.csv, author=args.author)
    lines = [f"imported {result.imported} labels ({result.unchanged} already as in the file)"]
    if result.categories_created:
        lines.append(f"new categories: {', '.join(result.categories_created)}")
    if result.missing:
        lines.append(f"{len(result.missing)} paths are not images of this project (ingest them first):")
        lines += [f"  {p}" for p in result.missing]
    lines += [f"  skipped {reason}" for reason in result.invalid]
    _print(args, asdict(result), "\n".join(lines))
    return 0


def cmd_export_scores(args: argparse.Namespace) -> int:
    from .project import Project

    n = write_scores(Project(args.project), args.out, format=args.format)
    _print(args, {"rows": n, "path": str(args.out)}, f"wrote scores of {n} images to {args.out}")
    return 0


def cmd_export_folders(args: argparse.Namespace) -> int:
    from .project import Project

    result = export_folders(Project(args.project), args.out, link=not args.copy, include_negatives=args.negatives, categories=args.category)
    verb = "linked" if result.linked else "copied"
    text = "\n".join([f"{verb} into {result.root}:"] + [f"  {folder}/: {n} files" for folder, n in result.counts.items()])
    _print(args, {"root": str(result.root), "linked": result.linked, "counts": result.counts}, text)
    return 0


def add_export_commands(subparsers: Any) -> None:
    """Add export, predict, export-labels, import-labels, export-scores and export-folders to the bgminer CLI."""
    p = subparsers.add_parser("export", help="export a trained classifier as one TorchScript file (+ metadata.json, state_dict.pt)")
    p.add_argument("project")
    p.add_argument("--category", default=None, help="export the active model of this category (default: the newest model)")
    p.add_argument("--model-version", type=int, default=None, help="export this model version instead")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = subparsers.add_parser("predict", help="score image files or folders with an exported model (no project needed)")
    p.add_argument("model", help="model.ts file or the export folder")
    p.add_argument("paths", nargs="+")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_predict)

    p = subparsers.add_parser("export-labels", help="write the current labels as CSV")
    p.add_argument("project")
    p.add_argument("--out", required=True)
    p.add_argument("--category", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_export_labels)

    p = subparsers.add_parser("import-labels", help="apply a labels CSV (path, category, label[, author, sha256])")
    p.add_argument("project")
    p.add_argument("csv")
    p.add_argument("--author", default=None, help="record every label under this author (default: the CSV's author column)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_import_labels)

    p = subparsers.add_parser("export-scores", help="write every image's score per category (CSV or Parquet)")
    p.add_argument("project")
    p.add_argument("--out", required=True, help=".csv or .parquet")
    p.add_argument("--format", default=None, choices=["csv", "parquet"], help="default: from the suffix of --out")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_export_scores)

    p = subparsers.add_parser("export-folders", help="ImageNet-style tree OUT/<category>/ of the labeled positives")
    p.add_argument("project")
    p.add_argument("--out", required=True)
    p.add_argument("--copy", action="store_true", help="copy the files (default: symbolic links)")
    p.add_argument("--negatives", action="store_true", help=f"also write reviewed negatives to OUT/<category>{NEGATIVE_SUFFIX}/")
    p.add_argument("--category", action="append", default=None, help="only this category (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_export_folders)
