"""Network input from image files, decoded in worker processes.

Embedding, scoring from pixels and full-mode training read images batch by batch. A
:class:`Decoder` hands each batch of (image id, path) to one of its ``workers`` processes (a torch
``DataLoader``), which decodes it with :mod:`bgminer.imageio` (JPEG draft scaling, the same
checks as ingest: decompression bombs, corrupt and truncated files become
:class:`~bgminer.imageio.ImageRejected`) and crops it to the network's input size. The crops travel
back as uint8 through shared memory (pinned when the consumer runs on CUDA; 4x less than float) and
are normalised by the consumer on its device, to exactly the values of
:class:`~bgminer.backbone.Preprocess`. ``workers=0`` decodes in the calling thread.

On CUDA, JPEG files can instead travel undecoded (their bytes, after the header checks) and be
decoded in batches by nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``), oriented, resized and
cropped on the GPU; files nvJPEG refuses fall back to the CPU decoder, in this process.

Workers only decode: progress, cancellation and the store stay with the consumer. They start with
``fork`` while the process runs a single Python thread (milliseconds), else from a ``forkserver``
(the app embeds and trains on job threads, where fork is unsafe).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from multiprocessing.context import BaseContext

import torch

from .backbone import Preprocess, PreprocessConfig
from .imageio import MAX_PIXELS_DEFAULT, ImageRejected, encoded_jpeg, read_image, to_tensor_uint8

MAX_DEFAULT_WORKERS = 4  # on CPU the forward pass, not decoding, is the bottleneck past this
PREFETCH = 2  # batches in flight per worker

Rejections = list[tuple[int, ImageRejected]]  # (image id, why)
# One batch asked of a worker: image ids, their paths, whether to augment (training views), and the
# seed of the batch's random crops (so a training run is the same whichever worker decodes what).
Request = tuple[list[int], list[str], bool, int]


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decode worker processes when the caller does not say: every core of this process on CUDA
    (the GPU waits for decoding), else up to :data:`MAX_DEFAULT_WORKERS`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores if torch.device(device).type == "cuda" else min(cores, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class DecodeSpec:
    """What a worker makes of a file: the network's input size, and whether JPEGs stay encoded."""

    preprocess: PreprocessConfig
    jpeg_bytes: bool = False  # hand plain JPEGs back as file bytes, for decode_jpeg in the consumer
    max_pixels: int = MAX_PIXELS_DEFAULT


@dataclass
class DecodedBatch:
    """One batch as a worker hands it back."""

    ids: list[int]  # the images that decoded (or are left to decode_jpeg), in the order asked
    pixels: torch.Tensor  # uint8 [len(ids), 3, crop, crop]; rows of ``encoded`` images are zeros
    encoded: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (row, file bytes, EXIF orientation)
    rejected: Rejections = field(default_factory=list)
    train: bool = False
    seed: int = 0

    def pin_memory(self) -> DecodedBatch:  # called by the DataLoader's pinning thread
        self.pixels = self.pixels.pin_memory()
        return self


class Cropper:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, crop, crop]``: the eval view is :class:`Preprocess` without its
    normalisation (whole pixel values, exactly), the training view a random resized crop + flip."""

    def __init__(self, cfg: PreprocessConfig):
        from torchvision.transforms import v2

        # mean 0, std 1/255: Preprocess returns the resized, cropped pixel values (whole numbers) themselves
        self.eval_view = Preprocess(replace(cfg, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3))
        crop = v2.RandomResizedCrop(cfg.crop, scale=(0.35, 1.0), antialias=True)
        self.train_view = v2.Compose([crop, v2.RandomHorizontalFlip()])

    def to(self, device: torch.device) -> Cropper:
        self.eval_view = self.eval_view.to(device)
        return self

    def __call__(self, image: torch.Tensor, train: bool) -> torch.Tensor:
        if train:
            return self.train_view(image)
        return self.eval_view(image).round_().clamp_(0, 255).to(torch.uint8)


def normalize(pixels: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 crops ``[B, 3, crop, crop]`` -> the network's float input, with :class:`Preprocess`'s own operations."""
    mean = torch.tensor(cfg.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(cfg.std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def decode_batch(spec: DecodeSpec, cropper: Cropper, request: Request) -> DecodedBatch:
    """What a worker does with one :data:`Request` (also run in process when there are no workers)."""
    ids, paths, train, seed = request
    size = spec.preprocess.crop
    out = DecodedBatch([], torch.empty(0), train=train, seed=seed)
    crops: list[torch.Tensor | None] = []
    with _seeded(seed) if train else nullcontext():
        for image_id, path in zip(ids, paths, strict=True):
            try:
                with open(path, "rb") as fp:
                    data = fp.read()
                encoded = encoded_jpeg(data, spec.max_pixels) if spec.jpeg_bytes else None
                if encoded is not None:
                    out.encoded.append((len(crops), torch.frombuffer(bytearray(data), dtype=torch.uint8), encoded.orientation))
                    crops.append(None)
                else:
                    image = read_image(io.BytesIO(data), spec.max_pixels, draft_size=spec.preprocess.resize).image
                    crops.append(cropper(to_tensor_uint8(image), train))
                out.ids.append(image_id)
            except ImageRejected as exc:
                out.rejected.append((image_id, exc))
            except OSError as exc:
                out.rejected.append((image_id, ImageRejected("unreadable", exc.strerror or str(exc))))
    out.pixels = torch.zeros((len(crops), 3, size, size), dtype=torch.uint8)
    for row, crop in enumerate(crops):
        if crop is not None:
            out.pixels[row] = crop
    return out


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The batch's own random stream, leaving the caller's untouched (workers=0 runs in the caller)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _WorkerDataset(torch.utils.data.Dataset):
    """The worker's side: a "dataset" whose items are whole :data:`Request` batches."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self._cropper: Cropper | None = None

    def __getitem__(self, request: Request) -> DecodedBatch:  # type: ignore[override]
        if self._cropper is None:
            self._cropper = Cropper(self.spec.preprocess)
        return decode_batch(self.spec, self._cropper, request)


def _as_is(batch: DecodedBatch) -> DecodedBatch:
    return batch


class _Requests:
    """The sampler of a :class:`Decoder`'s DataLoader: whatever the current pass asks for."""

    def __init__(self) -> None:
        self.source: Iterable[Request] = ()

    def __iter__(self) -> Iterator[Request]:
        return iter(self.source)


class Decoder:
    """Decodes batches of image files into the network's input on ``device``: in ``workers``
    processes (0: in the calling thread), JPEGs on ``jpeg_device`` (``decode_jpeg``) when given.

    Call it once per pass; with ``persistent`` the workers stay up between passes (a training
    run's epochs, a rescore's chunks) until :meth:`close`. Yields ``(ids, pixels or None,
    rejected)`` per batch, ``pixels`` float ``[len(ids), 3, crop, crop]``, in the order asked.
    """

    def __init__(
        self,
        preprocess: PreprocessConfig,
        workers: int,
        device: torch.device | str = "cpu",
        jpeg_device: torch.device | str | None = None,
        persistent: bool = False,
        max_pixels: int = MAX_PIXELS_DEFAULT,
    ):
        if workers < 0:
            raise ValueError(f"workers must be 0 (in process) or more, not {workers}")
        self.preprocess, self.workers, self.device = preprocess, workers, torch.device(device)
        self.jpeg_device = None if jpeg_device is None else torch.device(jpeg_device)
        self.spec = DecodeSpec(preprocess, jpeg_bytes=self.jpeg_device is not None, max_pixels=max_pixels)
        self._cropper = Cropper(preprocess)
        self._device_cropper: Cropper | None = None
        self._requests = _Requests()
        self._loader: torch.utils.data.DataLoader | None = None
        if workers:
            self._loader = torch.utils.data.DataLoader(
                _WorkerDataset(self.spec),
                batch_size=None,
                sampler=self._requests,
                num_workers=workers,
                collate_fn=_as_is,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=PREFETCH,
                persistent_workers=persistent,
                multiprocessing_context=worker_context(),
            )

    def __call__(self, requests: Iterable[Request]) -> Iterator[tuple[list[int], torch.Tensor | None, Rejections]]:
        if self._loader is None:
            batches: Iterator[DecodedBatch] = (decode_batch(self.spec, self._cropper, r) for r in requests)
        else:
            self._requests.source = requests
            batches = iter(self._loader)
        try:
            for batch in batches:
                yield self._finish(batch)
        finally:  # a pass that ends early (cancel, error) stops its workers now, not at garbage collection
            if self._loader is not None and not self._loader.persistent_workers:
                getattr(batches, "_shutdown_workers", lambda: None)()

    def close(self) -> None:
        """Stop the workers (a persistent decoder's stay up until then, or until it is garbage)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None

    def _finish(self, batch: DecodedBatch) -> tuple[list[int], torch.Tensor | None, Rejections]:
        """Normalised pixels on the device; JPEGs left encoded are decoded and cropped there first."""
        ids, rejected = list(batch.ids), list(batch.rejected)
        pixels = batch.pixels.to(self.device, non_blocking=True)
        if batch.encoded:
            with _seeded(batch.seed) if batch.train else nullcontext():
                crops = self._decode_jpegs(batch.encoded, batch.train)
            keep = torch.ones(len(ids), dtype=torch.bool)
            for (row, _, _), crop in zip(batch.encoded, crops, strict=True):
                if isinstance(crop, ImageRejected):
                    keep[row] = False
                    rejected.append((ids[row], crop))
                else:
                    pixels[row] = crop.to(self.device)
            if not bool(keep.all()):
                ids = [i for i, k in zip(ids, keep.tolist(), strict=True) if k]
                pixels = pixels[keep.to(pixels.device)]
        if not ids:
            return ids, None, rejected
        return ids, normalize(pixels, self.preprocess), rejected

    def _decode_jpegs(self, encoded: list[tuple[int, torch.Tensor, int]], train: bool) -> list[torch.Tensor | ImageRejected]:
        """Crops of JPEG files decoded by ``decode_jpeg`` on the JPEG device, all at once where it can
        (one batched call), else one by one; a file it refuses goes through the CPU decoder instead."""
        from torchvision.io import ImageReadMode, decode_jpeg

        assert self.jpeg_device is not None
        if self._device_cropper is None:
            self._device_cropper = Cropper(self.preprocess).to(self.jpeg_device)
        data = [d for _, d, _ in encoded]
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            try:
                images: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.jpeg_device))
            except RuntimeError:  # one bad file fails the whole call: find it
                images = []
                for d in data:
                    try:
                        images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.jpeg_device))
                    except RuntimeError:
                        images.append(None)
        out: list[torch.Tensor | ImageRejected] = []
        for (_, d, orientation), image in zip(encoded, images, strict=True):
            if image is None:
                out.append(self._cpu_fallback(d, train))
                continue
            image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
            out.append(self._device_cropper(orient(image, orientation), train))
        return out

    def _cpu_fallback(self, data: torch.Tensor, train: bool) -> torch.Tensor | ImageRejected:
        try:
            decoded = read_image(io.BytesIO(data.numpy().tobytes()), self.spec.max_pixels, draft_size=self.preprocess.resize)
        except ImageRejected as exc:
            return exc
        return self._cropper(to_tensor_uint8(decoded.image), train)


# EXIF orientation -> the tensor ops that make ``[C, H, W]`` pixels upright (PIL's transposes in imageio._UPRIGHT).
_UPRIGHT_OPS = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip((-2, -1)),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.transpose(-2, -1).flip(-1),
    7: lambda x: x.transpose(-2, -1).flip((-2, -1)),
    8: lambda x: x.transpose(-2, -1).flip(-2),
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, H, W]`` pixels made upright for an EXIF orientation, as :func:`bgminer.imageio.read_image` does."""
    op = _UPRIGHT_OPS.get(orientation)
    return op(image) if op is not None else image


def worker_context() -> BaseContext:
    """How decode workers start: fork while this process runs one Python thread (fast; torch's own
    threads are handled by the DataLoader), else a forkserver with this module (and torch) preloaded."""
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # no effect when this process's forkserver already runs
        return context
    return multiprocessing.get_context("spawn")
