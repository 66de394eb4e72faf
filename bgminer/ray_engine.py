"""Embedding and re-scoring on a Ray cluster (Ray Data), for corpora past one machine.

Embedding (:func:`embed_on_ray`)::

    store: ids + paths not yet embedded
      -> ray.data blocks of ``shard_rows`` images
      -> decode + preprocess            (CPU tasks, as many in parallel as the cluster has CPUs)
      -> backbone in an actor pool      (map_batches; one GPU per actor when the cluster has GPUs)
         each actor call embeds one block and writes it as one shard file (bgminer.shards)
      -> the driver merges each finished shard into the FeatureCache, marks it embedded, deletes it

The driver holds the feature cache's lock for the whole run (other embeddings of the project,
local or on Ray, wait for it). A run first merges shards that an earlier, interrupted run
finished and deletes half-written ones, so a rerun redoes only unfinished blocks. Ray restarts
crashed workers and actors and retries their blocks; a decode task that raises is retried
``max_retries`` times; an image that cannot be decoded is marked rejected, as in the in-process pipeline. A run that fails anyway
keeps every finished shard for the next one. Decoding runs in its own tasks, not fused into the
model actors (the actors reserve memory, which keeps Ray Data from fusing the two stages), so it
overlaps the forward pass. Workers read images and write shards by path: on a cluster, the
project folder and the images must be on a filesystem every node mounts at the same path. With
no address, Ray starts locally on this machine, so the same code runs (and is tested) on a laptop.

Re-scoring (:func:`score_chunks_on_ray`) runs a trained model over cached inputs (pooled features
in adapter mode, stage maps in last-stage mode) chunk by chunk in an actor pool; it is the Ray
engine of :func:`bgminer.scoring.rescore_version`, which streams the chunks into a memory-mapped
version folder, so memory stays bounded by a chunk. The dependency runs one way: scoring imports
this module (only for ``engine="ray"``) and hands it the scoring function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import Backbone, Preprocess, PreprocessConfig, load_backbone
from .device import resolve_device
from .feature_cache import FeatureCache
from .features import EmbedReport, forward_backbone, load_pixels, net_on
from .fsutil import atomic_path
from .imageio import ImageRejected
from .progress import CancelToken, ProgressFn, RateMeter, check, report
from .shards import finished_shards, merge_shard, remove_partials, shard_dir, write_shard
from .store import Store

# (model, inputs, row ids, device=...) -> (embeddings, scores): bgminer.scoring.score, handed in by its caller
ScoreFn = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclass
class RayConfig:
    """Where and how wide to run on Ray; None means "derive from the cluster"."""

    address: str | None = None  # None starts (or reuses) a local Ray; "auto" or "ray://host:10001" joins a cluster
    workers: int | None = None  # model actors; default one per GPU, else one
    gpus_per_worker: float | None = None  # default 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0  # CPUs reserved per model actor (decode tasks get the rest)
    memory_per_worker: int | None = 2 << 30  # heap bytes reserved per model actor (None: no reservation)
    torch_threads: int | None = None  # intra-op threads per actor; default: all cores of its node when it has no GPU
    shard_rows: int = 256  # images per block = per actor call = per shard file
    decode_rows: int = 16  # images per decode task call
    batch_size: int = 32  # images per forward pass inside an actor call
    max_retries: int = 3  # retries of a decode task that raised (crashed workers and actors are always retried)
    device: str = "auto"  # device of the model actors: "auto" takes CUDA when the actor has a GPU


@dataclass
class ShardedEmbedReport(EmbedReport):
    """An :class:`EmbedReport` plus how the work split into shards."""

    shards_written: int = 0  # shards computed and merged by this run
    shards_reused: int = 0  # shards an earlier run finished, merged by this run without recomputing
    partials_removed: int = 0  # half-written shard files deleted (their images were redone)
    workers: int = 0


@contextmanager
def ray_session(address: str | None = None, **init_kwargs: Any) -> Iterator[Any]:
    """Use the running Ray session, or start one (local when ``address`` is None) and stop it on exit."""
    try:
        import ray
    except ImportError as exc:
        raise ValueError("the Ray engine needs Ray: pip install 'bgminer[ray]' (or -r requirements-ray.txt)") from exc
    if ray.is_initialized():
        yield ray
        return
    import bgminer

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    if address is not None:  # a remote cluster gets this very package (its nodes need the requirements installed)
        kwargs.setdefault("runtime_env", {"py_modules": [str(Path(bgminer.__file__).parent)]})
    ray.init(address=address, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _data_context(config: RayConfig) -> Iterator[None]:
    """Ray Data settings for one run, restored after: no progress bars (progress goes through
    ``progress``), failed decode tasks retried ``max_retries`` times. Crashed actors are restarted
    and their calls retried by Ray Data itself."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries
    ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries = False, True, config.max_retries
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.retried_map_errors, ctx.max_map_retries = saved


def _decode_block(batch: dict[str, np.ndarray], preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    """Ray Data task: file paths -> preprocessed float pixels, with a reason for each image that failed."""
    transform = Preprocess(preprocess)
    ids, paths = batch["id"], batch["path"]
    pixels = np.zeros((len(ids), 3, preprocess.crop, preprocess.crop), np.float32)
    reason, detail = np.full(len(ids), "", dtype=object), np.full(len(ids), "", dtype=object)
    for row, path in enumerate(paths):
        x = load_pixels(str(path), transform, preprocess.resize)
        if isinstance(x, ImageRejected):
            reason[row], detail[row] = x.reason, x.detail
        else:
            pixels[row] = x.numpy()
    return {"id": ids, "pixels": pixels, "reason": reason.astype(str), "detail": detail.astype(str)}


class _EmbedActor:
    """Ray Data actor: holds the backbone; each call embeds one block and writes it as one shard."""

    def __init__(
        self, backbone: str, weights: str | None, folder: str, with_maps: bool, batch_size: int, device: str, threads: int | None
    ):
        dev = resolve_device(device)
        if dev.type == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        bb = load_backbone(backbone, weights)
        self.net = net_on(bb.net, dev)
        self.device, self.folder, self.with_maps, self.batch_size = dev, Path(folder), with_maps, batch_size
        self.weights_sha256 = bb.weights_sha256

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["reason"] == ""
        ids = batch["id"][ok].astype(np.int64)
        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
        parts = [
            forward_backbone(self.net, pixels[s : s + self.batch_size], self.device, self.with_maps)
            for s in range(0, len(ids), self.batch_size)
        ]
        names = ["pooled", "logits", *(["maps"] if self.with_maps else [])]
        arrays = {n: np.concatenate([p[n] for p in parts]) if parts else np.zeros((0,)) for n in names}
        failed = zip(batch["id"][~ok], batch["reason"][~ok], batch["detail"][~ok], strict=True)
        rejected = [(int(i), str(r), str(d)) for i, r, d in failed]
        path = write_shard(self.folder, ids, arrays, rejected, self.weights_sha256)
        return {"shard": np.array([path.name]), "images": np.array([len(ids) + len(rejected)])}


def _cluster_plan(ray: Any, config: RayConfig) -> tuple[int, float, str]:
    """(actors, GPUs per actor, device) for this cluster and config."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_worker = config.gpus_per_worker if config.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    workers = config.workers or (max(1, int(gpus // per_worker)) if per_worker else 1)
    device = config.device if config.device != "auto" else ("cuda" if per_worker else "cpu")
    return workers, per_worker, device


def embed_on_ray(
    store: Store,
    cache: FeatureCache,
    backbone: str,
    backbone_weights: str | None = None,
    config: RayConfig | None = None,
    ids: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ShardedEmbedReport:
    """Embed every not-yet-embedded image (or ``ids``) on Ray and merge the shards into ``cache``.

    Produces the same cache rows and store state as :func:`bgminer.features.embed_images`.
    """
    config = config or RayConfig()
    folder = shard_dir(cache)
    bb = load_backbone(backbone, backbone_weights)
    start = time.perf_counter()
    with cache.lock(cancel), ray_session(config.address) as ray, _data_context(config):
        cache.unmark_zero_rows(store, cancel)
        partials = remove_partials(folder)
        reused = [merge_shard(p, store, cache, bb.weights_sha256) for p in finished_shards(folder)]
        reused_count = sum(r is not None for r in reused)
        embedded = sum(r.embedded for r in reused if r is not None)
        failed = sum(r.rejected for r in reused if r is not None)

        todo = [int(i) for i in (store.image_ids(embedded=False) if ids is None else ids)]
        paths = store.image_paths(todo)
        items = [(i, paths[i]) for i in todo if i in paths]
        workers, gpus, device = _cluster_plan(ray, config)
        meter = RateMeter(len(items))
        report(progress, 0, len(items), meter.message(0))
        written = done = 0
        if items:
            ds = _embed_dataset(ray, items, bb, backbone, backbone_weights, folder, cache.has_maps, config, workers, gpus, device)
            for row in ds.iter_rows():
                check(cancel)
                result = merge_shard(folder / str(row["shard"]), store, cache, bb.weights_sha256)
                if result is None:
                    raise RuntimeError(f"shard {row['shard']} written by a worker could not be read back")
                written += 1
                embedded += result.embedded
                failed += result.rejected
                done += int(row["images"])
                report(progress, done, len(items), meter.message(done))
    seconds = time.perf_counter() - start
    computed = max(0, embedded - sum(r.embedded for r in reused if r is not None))
    return ShardedEmbedReport(
        embedded=embedded,
        failed=failed,
        seconds=seconds,
        images_per_second=computed / seconds if seconds > 0 else 0.0,
        device=device if items else "none",
        shards_written=written,
        shards_reused=reused_count,
        partials_removed=partials,
        workers=workers if items else 0,
    )


def _embed_dataset(
    ray: Any,
    items: list[tuple[int, str]],
    bb: Backbone,
    backbone: str,
    weights: str | None,
    folder: Path,
    with_maps: bool,
    config: RayConfig,
    workers: int,
    gpus: float,
    device: str,
) -> Any:
    """The Ray Data pipeline of :func:`embed_on_ray` (lazy; runs while the driver iterates it)."""
    import pyarrow as pa
    from ray.data import ActorPoolStrategy

    table = pa.table({"id": np.array([i for i, _ in items], np.int64), "path": [p for _, p in items]})
    blocks = [table.slice(s, config.shard_rows) for s in range(0, len(items), config.shard_rows)]
    return (
        ray.data.from_arrow(blocks)
        .map_batches(
            _decode_block,
            batch_size=config.decode_rows,
            batch_format="numpy",
            fn_kwargs={"preprocess": bb.preprocess},
            num_cpus=1,
        )
        .map_batches(
            _EmbedActor,
            batch_size=config.shard_rows,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={
                "backbone": backbone,
                "weights": weights,
                "folder": str(folder),
                "with_maps": with_maps,
                "batch_size": config.batch_size,
                "device": device,
                "threads": config.torch_threads,
            },
            num_cpus=config.cpus_per_worker,
            num_gpus=gpus,
            memory=config.memory_per_worker,
        )
    )


class _RescoreActor:
    """Ray Data actor: holds a trained model; each call scores one chunk of rows of a cached-input file
    and writes the result beside the version being written (results stay out of the object store)."""

    def __init__(self, score: ScoreFn, model: Any, inputs_path: str, out_dir: str, device: str, threads: int | None):
        dev = resolve_device(device)
        if dev.type == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.score, self.model, self.device, self.out_dir = score, model, device, Path(out_dir)
        self.inputs = np.load(inputs_path, mmap_mode="r")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = int(batch["start"][0])
        embeddings, scores = self.score(self.model, self.inputs, batch["rows"][0], device=self.device)
        final = self.out_dir / f"chunk-{start:012d}.npz"
        with atomic_path(final, fsync=False) as tmp, open(tmp, "wb") as f:  # scratch, read once by the driver: no fsync
            np.savez(f, embeddings=embeddings.astype(np.float16), scores=scores)
        return {"start": batch["start"], "file": np.array([final.name])}


def score_chunks_on_ray(
    score: ScoreFn,
    model: Any,
    inputs: np.ndarray,
    ids: np.ndarray,
    chunk_rows: int,
    out_dir: Path,
    config: RayConfig | None = None,
    cancel: CancelToken | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, embeddings, scores) per chunk of ``ids``, computed by ``score`` in a Ray actor pool, in completion order.

    ``inputs`` must be a memory-mapped ``.npy`` array (workers reopen it by path); each chunk's result
    passes through a scratch file in ``out_dir``, deleted once read.
    """
    from ray.data import ActorPoolStrategy

    config = config or RayConfig()
    if not isinstance(inputs, np.memmap) or inputs.filename is None:
        raise ValueError("re-scoring on Ray reads cached inputs from their .npy file: pass the memory-mapped array")
    with ray_session(config.address) as ray, _data_context(config):
        workers, gpus, device = _cluster_plan(ray, config)
        items = [{"start": s, "rows": ids[s : s + chunk_rows]} for s in range(0, len(ids), chunk_rows)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _RescoreActor,
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={
                "score": score,
                "model": model,
                "inputs_path": str(inputs.filename),
                "out_dir": str(out_dir),
                "device": device,
                "threads": config.torch_threads,
            },
            num_cpus=config.cpus_per_worker,
            num_gpus=gpus,
        )
        for row in ds.iter_rows():
            check(cancel)
            path = out_dir / str(row["file"])
            with np.load(path) as z:
                yield int(row["start"]), z["embeddings"], z["scores"]
            path.unlink()

