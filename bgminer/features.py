"""Cached backbone outputs per image, and the batched pipeline that fills them.

Per image id (row = id) the cache holds the pooled feature (float32), the 1000 ImageNet
logits (float16; their argmax is the auxiliary pseudo-label) and, optionally, the input
maps of the last stage (float16) for last-stage training. Arrays are memory-mapped
``.npy`` files that grow on demand, so the corpus never has to fit in RAM.

Writers in any process take the folder's lock (``.lock``) for each batch and each growth, and
mark rows embedded only once their bytes are flushed into the file readers map; rows marked
embedded but all zeros are un-marked (:func:`unmark_zero_rows`) so they are embedded again.
"""

from __future__ import annotations

import copy
import fcntl
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbone import Backbone, Preprocess
from .fsutil import atomic_path, ensure_free
from .imageio import ImageRejected, load_rgb, to_tensor_uint8
from .progress import CancelToken, ProgressFn, RateMeter, check, report
from .store import Store


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


LOCK_NAME = ".lock"  # in the feature folder: held by every writer of the arrays, in any process
CLEAN_META = "features_clean:{}"  # store meta key: stamp of the pooled file after its last clean scan
SCAN_ROWS = 8192  # rows per chunk of the zero-row scan


class CacheBusy(TimeoutError):
    """Another writer holds the feature folder's lock."""


class FolderLock:
    """An exclusive advisory lock on ``<folder>/.lock``, shared by every process that opens the
    folder (closing its file releases it, so a killed holder never leaves it taken); re-entrant
    within a thread."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._thread_lock = threading.RLock()
        self._depth = 0  # nesting of hold() in the thread that has _thread_lock

    @contextmanager
    def hold(self, cancel: CancelToken | None = None, timeout: float | None = None) -> Iterator[None]:
        """Wait (cancellable by ``cancel``) for the holder; with ``timeout``, :class:`CacheBusy` after that many seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._thread_lock.acquire(timeout=0.05):
            _wait(cancel, deadline, self.folder)
        try:
            if self._depth:  # this thread holds it already
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / LOCK_NAME, "a") as f:
                while True:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        _wait(cancel, deadline, self.folder)
                        time.sleep(0.05)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
        finally:
            self._thread_lock.release()


class FeatureCache:
    """Growable memory-mapped arrays indexed by image id.

    Every write (a batch of rows, a merged shard, a growth) happens under one :class:`FolderLock`
    on the folder, so writers in other processes (the app's jobs, the CLI, Ray drivers) take
    turns. A writer reopens an array whenever its file was replaced by a growth, and marks rows
    embedded only after they are flushed into the file that readers map. Keep one instance per
    open project (pass the project's ``lock``).
    """

    def __init__(self, root: Path, feature_dim: int, num_classes: int, map_shape: tuple[int, ...] | None, lock: FolderLock | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.specs = {
            "pooled": ArraySpec("pooled", (feature_dim,), "float32"),
            "logits": ArraySpec("logits", (num_classes,), "float16"),
        }
        if map_shape is not None:
            self.specs["maps"] = ArraySpec("maps", tuple(map_shape), "float16")
        self._folder_lock = lock or FolderLock(self.root)
        self._writable: dict[str, tuple[tuple[int, int, int], np.memmap]] = {}  # name -> (file identity, map)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.npy"

    @property
    def has_maps(self) -> bool:
        return "maps" in self.specs

    @property
    def capacity(self) -> int:
        return _rows(self.path("pooled"))

    def lock(self, cancel: CancelToken | None = None, timeout: float | None = None):
        """``with cache.lock():`` hold the folder against every other writer, in this process or another."""
        return self._folder_lock.hold(cancel, timeout)

    def ensure_capacity(self, rows: int, cancel: CancelToken | None = None) -> None:
        """Grow every array to hold ``rows`` rows (doubling, copied in chunks under a temporary name,
        swapped atomically), keeping the free-disk reserve."""
        with self.lock(cancel):
            for spec in self.specs.values():
                path = self.path(spec.name)
                old = np.load(path, mmap_mode="r") if path.exists() else None
                old_rows = 0 if old is None else old.shape[0]
                if old_rows >= rows:
                    continue
                _remove_stale_temps(self.root)
                new_rows = max(rows, 2 * old_rows, 1024)
                ensure_free(self.root, new_rows * int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize)
                with atomic_path(path) as tmp:
                    new = np.lib.format.open_memmap(tmp, mode="w+", dtype=spec.dtype, shape=(new_rows, *spec.shape))
                    for start in range(0, old_rows, 4096):
                        end = min(start + 4096, old_rows)
                        new[start:end] = old[start:end]
                    new.flush()
                    del new
                del old
                self._writable.pop(spec.name, None)

    def _writable_array(self, name: str) -> np.memmap:
        """A writable map of the file now at ``path(name)``, reopened when a growth replaced it. Under the lock."""
        st = os.stat(self.path(name))
        identity = (st.st_dev, st.st_ino, st.st_size)
        cached = self._writable.get(name)
        if cached is None or cached[0] != identity:
            cached = (identity, np.load(self.path(name), mmap_mode="r+"))
            self._writable[name] = cached
        return cached[1]

    def commit_rows(self, store: Store, ids: Sequence[int] | np.ndarray, values: dict[str, np.ndarray], cancel: CancelToken | None = None) -> None:
        """Write one block of rows (every array of the cache) and mark the images embedded, under the lock.

        The rows go into the files readers map now and are flushed before the store marks them,
        so no image is ever marked embedded without its bytes.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if set(values) != set(self.specs):
            raise ValueError(f"a block of rows needs the arrays {sorted(self.specs)}, got {sorted(values)}")
        if not len(ids):
            return
        with self.lock(cancel):
            clean = _is_clean(store, self.root)
            self.ensure_capacity(int(ids.max()) + 1)
            for name, rows in values.items():
                target = self._writable_array(name)
                target[ids] = rows.astype(self.specs[name].dtype, copy=False)
                target.flush()
            store.mark_embedded(ids.tolist())
            if clean:  # this block added only real rows: the file is still clean, no rescan needed
                _record_clean(store, self.root)

    def unmark_zero_rows(self, store: Store, cancel: CancelToken | None = None, timeout: float | None = None) -> list[int]:
        """See :func:`unmark_zero_rows`."""
        return unmark_zero_rows(store, self.root, self._folder_lock, cancel, timeout)

    def open(self, name: str, writable: bool = False) -> np.memmap:
        """The array's file as it is now (a later growth replaces the file; reopen to see rows added since)."""
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


def unmark_zero_rows(
    store: Store, folder: Path, lock: FolderLock | None = None, cancel: CancelToken | None = None, timeout: float | None = None
) -> list[int]:
    """Un-mark every image marked embedded whose pooled row in ``folder`` is all zeros or missing, so
    the next embedding redoes it; returns their ids.

    Such rows come from a cache lost or replaced behind the store's back (a backup restored
    without features, a crash of an older bgminer). The pooled file is read in chunks, and only
    when it changed since the last clean scan (its stamp is kept in the store's meta), so a
    project opens fast. Needs no backbone, so :class:`~bgminer.project.Project` runs it at open.
    """
    folder = Path(folder)
    with (lock or FolderLock(folder)).hold(cancel, timeout):
        if _is_clean(store, folder):
            return []
        _remove_stale_temps(folder)
        ids = np.asarray(store.image_ids(embedded=True), dtype=np.int64)
        capacity = _rows(folder / "pooled.npy")
        bad = [ids[ids >= capacity]]
        inside = ids[ids < capacity]
        if len(inside):
            pooled = np.load(folder / "pooled.npy", mmap_mode="r")
            for start in range(0, len(inside), SCAN_ROWS):
                check(cancel)
                chunk = inside[start : start + SCAN_ROWS]
                bad.append(chunk[~np.asarray(pooled[chunk]).any(axis=1)])
            del pooled
        zero = np.concatenate(bad).tolist()
        if zero:
            store.unmark_embedded(zero)
        _record_clean(store, folder)
        return zero


def _rows(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").shape[0]) if path.exists() else 0


def _remove_stale_temps(folder: Path) -> None:
    """Delete growth copies left by writers killed mid-growth (only under the lock, so none is live)."""
    for stale in folder.glob(".*.npy.*.tmp"):
        stale.unlink(missing_ok=True)


def _stamp(folder: Path) -> str | None:
    """(device, inode, size, mtime) of the pooled file: changes whenever the file is written or replaced."""
    try:
        st = os.stat(folder / "pooled.npy")
    except FileNotFoundError:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _is_clean(store: Store, folder: Path) -> bool:
    stamp = _stamp(folder)
    return stamp is not None and store.get_meta(CLEAN_META.format(folder.name)) == stamp


def _record_clean(store: Store, folder: Path) -> None:
    stamp = _stamp(folder)
    if stamp is not None:
        store.set_meta(CLEAN_META.format(folder.name), stamp)


def _wait(cancel: CancelToken | None, deadline: float | None, root: Path) -> None:
    """One step of waiting for the lock: honour a cancel, give up past the deadline."""
    check(cancel)
    if deadline is not None and time.monotonic() >= deadline:
        raise CacheBusy(f"another process is writing the feature cache in {root}; wait for it to finish")


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

    Each batch is written under the cache's lock and flushed before the store marks it embedded,
    so a run killed or cancelled at any point, even next to another embedding of the same
    project, resumes with exactly one real row per image. Rows marked embedded but all zeros
    are found first and redone. Files that became unreadable since ingest are marked rejected.
    """
    dev = resolve_device(device)
    cache.unmark_zero_rows(store, cancel)
    todo = list(store.image_ids(embedded=False) if ids is None else ids)
    paths = store.image_paths(todo)
    items = [(i, paths[i]) for i in todo if i in paths]
    start = time.perf_counter()
    meter = RateMeter(len(items))
    report(progress, 0, len(items), meter.message(0))
    if not items:
        return EmbedReport(0, 0, 0.0, 0.0, dev.type)

    # The backbone is shared (cached); work on a private copy when it has to move devices.
    trunk = backbone.trunk if dev.type == "cpu" else copy.deepcopy(backbone.trunk).to(dev)
    trunk = trunk.to(memory_format=torch.channels_last)
    preprocess = Preprocess(backbone.preprocess)
    threads = decode_threads or max(1, min(4, os.cpu_count() or 1))
    autocast = torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda")
    done = failed = 0
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
                values = {"pooled": pooled.float().cpu().numpy(), "logits": logits.float().cpu().numpy().astype(np.float16)}
                if cache.has_maps:
                    values["maps"] = maps.float().cpu().numpy().astype(np.float16)
                cache.commit_rows(store, ok_ids, values, cancel)
                done += len(ok_ids)
            report(progress, done + failed, len(items), meter.message(done + failed))
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
