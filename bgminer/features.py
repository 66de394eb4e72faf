"""The batched pipeline that fills the feature cache (:mod:`bgminer.feature_cache`) from pixels.

Also here, shared by everything that feeds the backbone or a model: the one backbone forward
(:func:`forward_backbone`, in process and on Ray), the one decode-ahead loop (:func:`decode_ahead`),
and a model's inputs by image id (:data:`Inputs`, :class:`PixelLoader`).
"""

from __future__ import annotations

import copy
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from .backbone import Backbone, Preprocess, PretrainedNet
from .device import resolve_device
from .feature_cache import FeatureCache
from .imageio import ImageRejected, load_rgb, to_tensor_uint8
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


def _batches(
    items: list[tuple[int, str]], batch_size: int, preprocess: Preprocess, draft_size: int, threads: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, ImageRejected]]]]:
    """(decoded ids, their stacked pixels, rejected images) per batch, decoded two batches ahead of the consumer."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    decoded = decode_ahead(chunks, lambda item: load_pixels(item[1], preprocess, draft_size), threads, ahead=2)
    for chunk, results in zip(chunks, decoded, strict=True):
        ok = [(image_id, x) for (image_id, _), x in zip(chunk, results, strict=True) if isinstance(x, torch.Tensor)]
        failed = [(image_id, x) for (image_id, _), x in zip(chunk, results, strict=True) if isinstance(x, ImageRejected)]
        yield [i for i, _ in ok], (torch.stack([x for _, x in ok]) if ok else None), failed


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

    net = net_on(backbone.net, dev)
    preprocess = Preprocess(backbone.preprocess)
    done = failed = 0
    threads = decode_threads or default_threads()
    for ok_ids, pixels, bad in _batches(items, batch_size, preprocess, backbone.preprocess.resize, threads):
        check(cancel)
        for image_id, exc in bad:
            store.reject_image(image_id, exc.reason, f"at embedding: {exc.detail}")
        failed += len(bad)
        if pixels is not None:
            cache.commit_rows(store, ok_ids, forward_backbone(net, pixels, dev, cache.has_maps), cancel)
            done += len(ok_ids)
        report(progress, done + failed, len(items), meter.message(done + failed))
    seconds = time.perf_counter() - start
    return EmbedReport(done, failed, seconds, done / seconds if seconds > 0 else 0.0, dev.type)


# What a model eats, by image id: an array indexable by an int64 id array (a memory-mapped cache
# array [cap, ...]), or a loader ``load(ids, train) -> Tensor`` such as :class:`PixelLoader`.
Inputs = np.ndarray | Callable[[np.ndarray, bool], torch.Tensor]


def read_inputs(inputs: Inputs, ids: np.ndarray, train: bool) -> torch.Tensor:
    """Model input for ``ids`` as float32, read in sorted id order (sequential on a memmap)."""
    if callable(inputs):
        return inputs(ids, train).float()
    order = np.argsort(ids, kind="stable")
    x = torch.from_numpy(np.asarray(inputs[ids[order]], dtype=np.float32))
    return x[torch.from_numpy(np.argsort(order, kind="stable"))]


def inputs_ahead(inputs: Inputs, id_batches: list[np.ndarray], train: bool, pin: bool) -> Iterator[torch.Tensor]:
    """Inputs batch by batch; a loader's next batch is loaded in a background thread while the caller computes.

    Cached arrays are read inline: slicing a memmap costs less than handing the work to a thread.
    """
    if not callable(inputs):
        yield from (read_inputs(inputs, ids, train) for ids in id_batches)
        return

    def load(ids: np.ndarray) -> torch.Tensor:
        x = read_inputs(inputs, ids, train)
        return x.pin_memory() if pin else x

    for (x,) in decode_ahead(([ids] for ids in id_batches), load, threads=1):
        yield x


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
        self.threads = threads or default_threads()

    def _one(self, image_id: int, train: bool) -> torch.Tensor:
        pixels = to_tensor_uint8(load_rgb(self.paths[int(image_id)], draft_size=self.draft_size))
        return self.train_transform(pixels) if train else self.eval_transform(pixels)

    def __call__(self, ids: np.ndarray, train: bool) -> torch.Tensor:
        (batch,) = decode_ahead([ids], partial(self._one, train=train), self.threads, ahead=0)
        return torch.stack(batch)
