"""A project's classifier taken elsewhere: one self-contained TorchScript file, and ``predict``
with it, without a project.

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

import copy
import json
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .backbone import Backbone, Preprocess
from .device import resolve_device
from .features import decode_ahead
from .fsutil import atomic_path
from .imageio import ImageRejected, load_rgb, to_tensor_uint8, walk_images
from .model import BackgroundSplittingModel
from .modes import get_mode
from .progress import ProgressFn, report
from .tables import iso_utc

if TYPE_CHECKING:
    from .project import Project

EXPORT_FORMAT = "bgminer-export"
EXPORT_FORMAT_VERSION = 1
MODEL_FILE = "model.ts"
METADATA_FILE = "metadata.json"
STATE_DICT_FILE = "state_dict.pt"
EMBEDDED_METADATA = "bgminer_metadata.json"  # stored as <archive>/extra/bgminer_metadata.json


# -- the exported network ----------------------------------------------------------------------


class _Network(nn.Module):
    """Preprocessed pixels ``[B, 3, crop, crop]`` -> (probabilities ``[B, K]``, trunk embedding ``[B, D]``).

    Holds a copy of the mode's frozen backbone prefix (:attr:`bgminer.modes.ModeSpec.frozen_prefix`),
    whose output is rounded as the feature cache stores it, and the model without its auxiliary head:
    the same path as :func:`bgminer.modes.embed_query`.
    """

    def __init__(self, model: BackgroundSplittingModel, backbone: Backbone):
        super().__init__()
        classifier = copy.deepcopy(model)
        classifier.aux_head = None  # the ImageNet head only regularised training
        self.spec = get_mode(model.mode)
        self.features = copy.deepcopy(self.spec.frozen_prefix(backbone))
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.classifier.embed(self.spec.as_cached(self.features(x)))
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


def script_classifier(
    model: BackgroundSplittingModel, backbone: Backbone
) -> tuple[torch.jit.ScriptModule, dict[str, torch.Tensor]]:
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


def export_metadata(project: Project, record: Any, model: BackgroundSplittingModel, backbone: Backbone) -> dict[str, Any]:
    """The metadata document of an export: everything needed to use, audit and reproduce it."""
    cfg = backbone.preprocess
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "bgminer_version": __version__,
        "torch_version": torch.__version__,
        "created_at": iso_utc(time.time()),
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
            "trained_at": iso_utc(record.created_at),
            "parent_version": record.parent_id,
            "embedding_dim": model.embedding_dim,
            "adapter_hidden": model.adapter_hidden,
            "fixed_background_logit": model.fixed_background_logit,
            "stage_maps_float16": get_mode(model.mode).float16_input,
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
            raise ValueError(
                f"{path} is not a bgminer model export (no embedded bgminer metadata; export one with `bgminer export`)"
            )
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
            module = torch.jit.load(str(path), map_location=resolve_device(device))
    except RuntimeError as exc:
        made_with = metadata.get("torch_version", "an unknown version")
        raise ValueError(
            f"{path} is a bgminer export, but this PyTorch ({torch.__version__}) cannot load its TorchScript "
            f"(it was made with PyTorch {made_with}; use that version or newer): {exc}"
        ) from exc
    return ExportedModel(module.eval(), metadata, path)


# -- predict -----------------------------------------------------------------------------------


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image files under folders as ingest finds them (:func:`~bgminer.imageio.walk_images`)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            files += map(Path, walk_images(p).files)
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
    for chunk, decoded in zip(chunks, decode_ahead(chunks, decode), strict=True):
        yield list(zip(chunk, decoded, strict=True))


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
            results += [
                (str(p), {c: float(v) for c, v in zip(categories, row, strict=True)})
                for (p, _), row in zip(good, probs, strict=True)
            ]
        done += len(batch)
        report(progress, done, len(files), "scoring")
    return results
