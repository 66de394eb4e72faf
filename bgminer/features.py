"""Cached backbone outputs per image, and the batched pipeline that fills them.

Per image id (row = id) the cache holds the pooled feature (float32), the 1000 ImageNet
logits (float16; their argmax is the auxiliary pseudo-label) and, optionally, the input
maps of the last stage (float16) for last-stage training. Arrays are memory-mapped
``.npy`` files that grow on demand, so the corpus never has to fit in RAM.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbone import Backbone, Preprocess
from .imageio import ImageRejected, load_rgb, to_tensor_uint8
from .progress import CancelToken, ProgressFn, RateMeter, check, report
from .store import Store


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


class FeatureCache:
    """Growable memory-mapped arrays indexed by image id."""

    def __init__(self, root: Path, feature_dim: int, num_classes: int, map_shape: tuple[int, ...] | None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.specs = {
            "pooled": ArraySpec("pooled", (feature_dim,), "float32"),
            "logits": ArraySpec("logits", (num_classes,), "float16"),
        }
        if map_shape is not None:
            self.specs["maps"] = ArraySpec("maps", tuple(map_shape), "float16")
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.root / f"{name}.npy"

    @property
    def has_maps(self) -> bool:
        return "maps" in self.specs

    @property
    def capacity(self) -> int:
        p = self.path("pooled")
        if not p.exists():
            return 0
        return int(np.load(p, mmap_mode="r").shape[0])

    def ensure_capacity(self, rows: int) -> None:
        """Grow every array to hold ``rows`` rows (doubling, copied in chunks, swapped atomically)."""
        with self._lock:
            for spec in self.specs.values():
                path = self.path(spec.name)
                old = np.load(path, mmap_mode="r") if path.exists() else None
                old_rows = 0 if old is None else old.shape[0]
                if old_rows >= rows:
                    continue
                new_rows = max(rows, 2 * old_rows, 1024)
                tmp = path.with_suffix(".tmp.npy")
                new = np.lib.format.open_memmap(tmp, mode="w+", dtype=spec.dtype, shape=(new_rows, *spec.shape))
                for start in range(0, old_rows, 4096):
                    end = min(start + 4096, old_rows)
                    new[start:end] = old[start:end]
                new.flush()
                del new, old
                os.replace(tmp, path)

    def open(self, name: str, writable: bool = False) -> np.memmap:
        return np.load(self.path(name), mmap_mode="r+" if writable else "r")

    def read(self, name: str, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows for ``ids`` as an in-memory array (fancy indexing on the memmap)."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.asarray(self.open(name)[ids])

    def pseudo_labels(self, ids: Sequence[int] | np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Hard ImageNet pseudo-labels (argmax of the cached logits) for ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        logits = self.open("logits")
        return np.concatenate([np.asarray(logits[ids[i : i + chunk]]).argmax(1) for i in range(0, len(ids), chunk)] or [np.zeros(0, np.int64)]).astype(np.int64)


@dataclass
class EmbedReport:
    embedded: int
    failed: int
    seconds: float
    images_per_second: float
    device: str


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(device)


def _decode(path: str, preprocess: Preprocess, draft_size: int) -> torch.Tensor:
    return preprocess(to_tensor_uint8(load_rgb(path, draft_size=draft_size)))


def _batches(
    items: list[tuple[int, str]], batch_size: int, preprocess: Preprocess, draft_size: int, threads: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, ImageRejected]]]]:
    """Decode batches on a thread pool, one batch ahead of the consumer."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def load(chunk: list[tuple[int, str]]):
        ok_ids, tensors, failed = [], [], []
        futures = [(i, pool.submit(_decode, p, preprocess, draft_size)) for i, p in chunk]
        for image_id, fut in futures:
            try:
                tensors.append(fut.result())
                ok_ids.append(image_id)
            except ImageRejected as exc:
                failed.append((image_id, exc))
            except OSError as exc:
                failed.append((image_id, ImageRejected("unreadable", str(exc))))
        return ok_ids, (torch.stack(tensors) if tensors else None), failed

    with ThreadPoolExecutor(max_workers=threads) as pool, ThreadPoolExecutor(max_workers=1) as prefetcher:
        ahead: queue.Queue = queue.Queue()
        for chunk in chunks[:2]:
            ahead.put(prefetcher.submit(load, chunk))
        for index in range(len(chunks)):
            result = ahead.get().result()
            if index + 2 < len(chunks):
                ahead.put(prefetcher.submit(load, chunks[index + 2]))
            yield result


def embed_images(
    store: Store,
    cache: FeatureCache,
    backbone: Backbone,
    ids: Sequence[int] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    decode_threads: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> EmbedReport:
    """Embed every not-yet-embedded image (or ``ids``) and mark each batch done in the store.

    Rows are flushed to disk before the store marks them embedded, so a run killed at any
    point resumes with exactly one row per image. Files that became unreadable since ingest
    are marked rejected.
    """
    dev = resolve_device(device)
    todo = list(store.image_ids(embedded=False) if ids is None else ids)
    paths = store.image_paths(todo)
    items = [(i, paths[i]) for i in todo if i in paths]
    cache.ensure_capacity(store.max_image_id() + 1)
    start = time.perf_counter()
    meter = RateMeter(len(items))
    report(progress, 0, len(items), meter.message(0))
    if not items:
        return EmbedReport(0, 0, 0.0, 0.0, dev.type)

    # The backbone is shared (cached); work on a private copy when it has to move devices.
    trunk = backbone.trunk if dev.type == "cpu" else copy.deepcopy(backbone.trunk).to(dev)
    trunk = trunk.to(memory_format=torch.channels_last)
    preprocess = Preprocess(backbone.preprocess)
    arrays = {name: cache.open(name, writable=True) for name in cache.specs}
    threads = decode_threads or max(1, min(4, os.cpu_count() or 1))
    autocast = torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda")
    done = failed = 0
    try:
        with torch.inference_mode():
            for ok_ids, pixels, bad in _batches(items, batch_size, preprocess, backbone.preprocess.resize, threads):
                check(cancel)
                for image_id, exc in bad:
                    store.reject_image(image_id, exc.reason, f"at embedding: {exc.detail}")
                failed += len(bad)
                if pixels is not None:
                    x = pixels.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    with autocast:
                        maps = trunk.stem(x)
                        pooled = trunk.head(maps)
                        logits = trunk.classifier(pooled)
                    rows = np.asarray(ok_ids, dtype=np.int64)
                    arrays["pooled"][rows] = pooled.float().cpu().numpy()
                    arrays["logits"][rows] = logits.float().cpu().numpy().astype(np.float16)
                    if "maps" in arrays:
                        arrays["maps"][rows] = maps.float().cpu().numpy().astype(np.float16)
                    for arr in arrays.values():
                        arr.flush()
                    store.mark_embedded(ok_ids)
                    done += len(ok_ids)
                report(progress, done + failed, len(items), meter.message(done + failed))
    finally:
        del arrays
    seconds = time.perf_counter() - start
    return EmbedReport(done, failed, seconds, done / seconds if seconds > 0 else 0.0, dev.type)


class PixelLoader:
    """Preprocessed pixels by image id, for full-mode training (augmented) and scoring.

    Training views use random-resized-crop + horizontal flip on the decoded image; eval views
    use the backbone's own :class:`Preprocess`, exactly as when embedding.
    """

    def __init__(self, store: Store, backbone: Backbone, threads: int | None = None):
        from torchvision.transforms import v2

        self.paths = store.image_paths(store.image_ids())
        self.eval_transform = Preprocess(backbone.preprocess)
        cfg = backbone.preprocess
        self.train_transform = v2.Compose(
            [
                v2.RandomResizedCrop(cfg.crop, scale=(0.35, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(cfg.mean), list(cfg.std)),
            ]
        )
        self.draft_size = cfg.resize
        self.pool = ThreadPoolExecutor(max_workers=threads or max(1, min(4, os.cpu_count() or 1)))

    def _one(self, image_id: int, train: bool) -> torch.Tensor:
        pixels = to_tensor_uint8(load_rgb(self.paths[int(image_id)], draft_size=self.draft_size))
        return self.train_transform(pixels) if train else self.eval_transform(pixels)

    def __call__(self, ids: np.ndarray, train: bool) -> torch.Tensor:
        return torch.stack(list(self.pool.map(lambda i: self._one(i, train), ids)))
