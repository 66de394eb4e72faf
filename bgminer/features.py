"""The batched pipeline that fills the feature cache (:mod:`bgminer.feature_cache`) from pixels.

Also here, shared by everything that feeds the backbone or a model: the one backbone forward
(:func:`forward_backbone`, in process and on Ray), a model's inputs by image id (:data:`Inputs`,
:class:`PixelLoader`, read batch by batch with :func:`inputs_ahead`), and a thread decode-ahead
loop for small jobs (:func:`decode_ahead`). Pixels for embedding, pixel scoring and full-mode
training are decoded in worker processes (:mod:`bgminer.pixels`).
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .backbone import Backbone, Preprocess, PretrainedNet
from .device import resolve_device
from .feature_cache import FeatureCache, read_rows
from .imageio import ImageRejected, load_rgb, to_tensor_uint8
from .pixels import Decoder, Request, default_workers
from .progress import CancelToken, ProgressFn, RateMeter, check, report
from .store import Store

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class EmbedReport:
    embedded: int
    failed: int
    seconds: float
    images_per_second: float
    device: str
    workers: int = 0  # decode worker processes (0: decoded in the embedding thread)


def decode_ahead(
    chunks: Iterable[Sequence[T]], decode: Callable[[T], R], threads: int | None = None, ahead: int = 1
) -> Iterator[list[R]]:
    """``[decode(item) for item in chunk]`` for each chunk, in order, decoded on a pool of ``threads``
    threads (default: up to 4) while the caller works on earlier chunks: ``ahead`` chunks beyond the
    one handed out are in flight. An exception of ``decode`` is raised when its chunk is reached.

    The one decode-ahead loop of bgminer: embedding, pixel loading and ``predict`` all use it.
    """
    pool = ThreadPoolExecutor(max_workers=threads or default_threads())
    pending: deque[list[Future[R]]] = deque()
    try:
        for chunk in chunks:
            pending.append([pool.submit(decode, item) for item in chunk])
            if len(pending) > ahead:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_threads() -> int:
    """Decode threads when the caller does not say: up to 4 (decoding stays ahead of a CPU forward pass)."""
    return max(1, min(4, os.cpu_count() or 1))


def load_pixels(path: str, preprocess: Preprocess, draft_size: int) -> torch.Tensor | ImageRejected:
    """Preprocessed pixels of one image file for the backbone, or why it cannot be read (in process and on Ray)."""
    try:
        return preprocess(to_tensor_uint8(load_rgb(path, draft_size=draft_size)))
    except ImageRejected as exc:
        return exc
    except OSError as exc:
        return ImageRejected("unreadable", str(exc))


def net_on(net: PretrainedNet, device: torch.device) -> PretrainedNet:
    """``net`` ready for :func:`forward_backbone` on ``device`` (channels-last; a private copy off the CPU,
    since loaded backbones are shared)."""
    net = net if device.type == "cpu" else copy.deepcopy(net).to(device)
    return net.to(memory_format=torch.channels_last).eval()


def forward_backbone(net: PretrainedNet, pixels: torch.Tensor, device: torch.device, with_maps: bool) -> dict[str, np.ndarray]:
    """The cache rows of a batch of preprocessed pixels: pooled (float32), logits and stage maps (float16).

    The one backbone forward of bgminer, in process (:func:`embed_images`) and on Ray workers.
    """
    x = pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        maps = net.stem(x)
        pooled = net.last_stage(maps)
        logits = net.classifier(pooled)
    out = {"pooled": pooled.float().cpu().numpy(), "logits": logits.float().cpu().numpy().astype(np.float16)}
    if with_maps:
        out["maps"] = maps.float().cpu().numpy().astype(np.float16)
    return out


def embed_images(
    store: Store,
    cache: FeatureCache,
    backbone: Backbone,
    ids: Sequence[int] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    workers: int | None = None,
    jpeg_device: str | None = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> EmbedReport:
    """Embed every not-yet-embedded image (or ``ids``) and mark each batch done in the store.

    Images are decoded in ``workers`` processes (default :func:`bgminer.pixels.default_workers`;
    0 decodes in this thread), ahead of the forward pass; with ``jpeg_device`` ("auto": the GPU
    when the model runs on one, None: never) JPEGs are decoded there by nvJPEG instead.
    Each batch is written under the cache's lock and flushed before the store marks it embedded,
    so a run killed or cancelled at any point, even next to another embedding of the same
    project, resumes with exactly one real row per image. Rows marked embedded but all zeros
    are found first and redone. Files that became unreadable since ingest are marked rejected.
    Memory stays flat whatever the corpus size: paths are read from the store a chunk at a
    time and rows go to the cache's files without being mapped into this process.
    """
    dev = resolve_device(device)
    cache.unmark_zero_rows(store, cancel)
    todo = np.asarray(store.image_ids(embedded=False) if ids is None else ids, dtype=np.int64)
    start = time.perf_counter()
    total = len(todo)
    meter = RateMeter(total)
    report(progress, 0, total, meter.message(0))
    workers = default_workers(dev) if workers is None else workers
    if not total:
        return EmbedReport(0, 0, 0.0, 0.0, dev.type, workers)

    net = net_on(backbone.net, dev)
    jpeg = (dev if dev.type == "cuda" else None) if jpeg_device == "auto" else jpeg_device
    decoder = Decoder(backbone.preprocess, workers, dev, jpeg)
    missing = [0]  # ids the store does not know (an explicit ``ids``): not counted
    done = failed = 0
    batches = decoder(_requests(store, todo, batch_size, missing))
    try:
        for ok_ids, pixels, bad in batches:
            check(cancel)
            for image_id, exc in bad:
                store.reject_image(image_id, exc.reason, f"at embedding: {exc.detail}")
            failed += len(bad)
            if pixels is not None:
                cache.commit_rows(store, ok_ids, forward_backbone(net, pixels, dev, cache.has_maps), cancel)
                done += len(ok_ids)
            report(progress, done + failed, total - missing[0], meter.message(done + failed))
    finally:
        batches.close()  # stops the workers at once on a cancel or an error
        decoder.close()
    seconds = time.perf_counter() - start
    return EmbedReport(done, failed, seconds, done / seconds if seconds > 0 else 0.0, dev.type, workers)


PATH_CHUNK = 4096  # image paths read from the store at a time while embedding


def _requests(store: Store, ids: np.ndarray, batch_size: int, missing: list[int]) -> Iterator[Request]:
    """Decode requests for ``ids`` in batches, their paths read from the store a chunk at a time (so
    a million-image run never holds every path); ids without a path are counted in ``missing[0]``."""
    for begin in range(0, len(ids), PATH_CHUNK):
        chunk = ids[begin : begin + PATH_CHUNK].tolist()
        paths = store.image_paths(chunk)
        known = [i for i in chunk if i in paths]
        missing[0] += len(chunk) - len(known)
        for b in range(0, len(known), batch_size):
            batch = known[b : b + batch_size]
            yield batch, [paths[i] for i in batch], False, 0


# What a model eats, by image id: an array indexable by an int64 id array (a memory-mapped cache
# array [cap, ...]), or a loader ``load(ids, train) -> Tensor`` such as :class:`PixelLoader`.
Inputs = np.ndarray | Callable[[np.ndarray, bool], torch.Tensor]


def read_inputs(inputs: Inputs, ids: np.ndarray, train: bool) -> torch.Tensor:
    """Model input for ``ids`` as float32; a cache file is read in sorted id order, by file reads rather
    than through the map (:func:`bgminer.feature_cache.read_rows`), so a pass over a million rows leaves
    nothing of the file resident in this process."""
    if callable(inputs):
        return inputs(ids, train).float()
    return torch.from_numpy(np.asarray(read_rows(inputs, ids), dtype=np.float32))


def inputs_ahead(inputs: Inputs, id_batches: list[np.ndarray], train: bool, device: torch.device) -> Iterator[torch.Tensor]:
    """Inputs batch by batch for a model on ``device``: a :class:`PixelLoader` decodes in its worker
    processes (batches may arrive on ``device`` already), another loader's next batch is loaded in a
    background thread while the caller computes, and cache arrays are read inline (cheaper than a hand-off).
    """
    if isinstance(inputs, PixelLoader):
        yield from inputs.batches(id_batches, train, device)
        return
    if not callable(inputs):
        yield from (read_inputs(inputs, ids, train) for ids in id_batches)
        return

    def load(ids: np.ndarray) -> torch.Tensor:
        x = read_inputs(inputs, ids, train)
        return x.pin_memory() if device.type == "cuda" else x

    for (x,) in decode_ahead(([ids] for ids in id_batches), load, threads=1):
        yield x


class PixelLoader:
    """Preprocessed pixels by image id, for full-mode training (augmented) and scoring.

    Training views are a random resized crop + horizontal flip of the decoded image; eval views
    are the backbone's own :class:`Preprocess`, exactly as when embedding. Batches are decoded in
    ``workers`` processes (:mod:`bgminer.pixels`) that stay up between passes (epochs, scoring
    chunks) until :meth:`close` or until the loader is dropped; on CUDA, JPEGs are decoded on the
    GPU unless ``jpeg_device`` is None. Each training batch's random crops come from its own seed,
    drawn from ``seed``, so a run does not depend on which worker decoded what.
    """

    def __init__(
        self, store: Store, backbone: Backbone, workers: int | None = None, jpeg_device: str | None = "auto", seed: int = 0
    ):
        self.store = store
        self.preprocess = backbone.preprocess
        self.workers = workers
        self.jpeg_device = jpeg_device
        self._rng = np.random.default_rng(seed)
        self._decoder: Decoder | None = None

    def _decoder_for(self, device: torch.device) -> Decoder:
        if self._decoder is None or self._decoder.device != device:
            self.close()
            workers = default_workers(device) if self.workers is None else self.workers
            jpeg = (device if device.type == "cuda" else None) if self.jpeg_device == "auto" else self.jpeg_device
            self._decoder = Decoder(self.preprocess, workers, device, jpeg, persistent=True)
        return self._decoder

    def batches(self, id_batches: Iterable[np.ndarray], train: bool, device: torch.device) -> Iterator[torch.Tensor]:
        """The pixels of each batch of ids, in order (on ``device`` when decoded there); ImageRejected
        for a file that cannot be read."""
        decoder = self._decoder_for(torch.device(device))
        for ids, pixels, rejected in decoder(self._requests(id_batches, train)):
            if rejected:
                image_id, exc = rejected[0]
                raise ImageRejected(exc.reason, f"image {image_id}: {exc.detail}")
            assert pixels is not None and len(ids) == len(pixels)
            yield pixels

    def _requests(self, id_batches: Iterable[np.ndarray], train: bool) -> Iterator[Request]:
        for ids in id_batches:
            wanted = [int(i) for i in ids]
            paths = self.store.image_paths(wanted)
            unknown = [i for i in wanted if i not in paths]
            if unknown:
                raise KeyError(f"no images with the ids {unknown[:5]}")
            yield wanted, [paths[i] for i in wanted], train, int(self._rng.integers(2**62))

    def __call__(self, ids: np.ndarray, train: bool) -> torch.Tensor:
        """One batch, decoded on the CPU."""
        (x,) = self.batches([ids], train, torch.device("cpu"))
        return x

    def close(self) -> None:
        """Stop the decode workers (they start again on the next batch)."""
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def __del__(self) -> None:
        with suppress(Exception):  # at interpreter exit torch may be half torn down; its workers end with it
            self.close()
