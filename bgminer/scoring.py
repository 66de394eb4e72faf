"""Scoring the corpus with a trained model, and the per-version folders the scores live in.

:func:`score` runs a model over its inputs (:data:`bgminer.features.Inputs`) in bounded chunks.
:func:`rescore_version` streams a whole corpus into a version folder, in process
(``engine="local"``) or on a Ray actor pool (``engine="ray"``, :mod:`bgminer.ray_engine`, imported
only then).

Each version folder holds which images were scored, their per-category scores and their trunk
embeddings (the vectors the search index is built from). Layout of ``scores/``::

    v0007.g3/{ids,scores,embeddings}.npy    version 7, generation 3: its current scores
    .v0007.<pid>-<thread>-<nonce>.tmp/      a writer's folder until it commits
    v0007/                                  a version written before generations existed (generation 0)

Embeddings are float16; readers memory-map them. A writer fills a folder under a name unique to
it (with file writes, flushed in the background as it goes), fsyncs it and renames it to the next
generation in one step; older generations are deleted only after that. Readers take the highest
generation, so a rescore never leaves a moment in which the version has no scores: they see the old
generation or the whole new one.
"""

from __future__ import annotations

import copy
import errno
import operator
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .device import autocast, resolve_device, to_device
from .features import Inputs, inputs_ahead
from .fsutil import ensure_free, fsync_dir, temp_name
from .model import BackgroundSplittingModel
from .modes import get_mode
from .progress import CancelToken, ProgressFn, check, report

if TYPE_CHECKING:
    from .ray_engine import RayConfig

ENGINES = ("local", "ray")


def score(
    model: BackgroundSplittingModel,
    inputs: Inputs,
    row_ids: np.ndarray,
    batch_size: int | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``float32 [N, D]`` and category probabilities ``float32 [N, K]`` for ``row_ids``, in chunks.

    ``batch_size`` None takes the mode's chunk size (:attr:`bgminer.modes.ModeSpec.score_batch`).
    ``out``: arrays of at least ``N`` rows to fill instead (the embeddings' array may be float16:
    converted batch by batch, never held in float32 whole); their first ``N`` rows are returned.
    """
    dev = resolve_device(device)
    spec = get_mode(model.mode)
    batch_size = batch_size or spec.score_batch
    row_ids = np.asarray(row_ids, dtype=np.int64)
    net = model
    if next(model.parameters()).device != dev:
        net = copy.deepcopy(model).to(dev)
    if dev.type == "cuda" and spec.spatial_input:
        net = net.to(memory_format=torch.channels_last)
    was_training = net.training
    net.eval()
    if out is None:
        out = (
            np.empty((len(row_ids), model.embedding_dim), dtype=np.float32),
            np.empty((len(row_ids), len(model.categories)), dtype=np.float32),
        )
    embeddings, scores = out[0][: len(row_ids)], out[1][: len(row_ids)]
    try:
        with torch.inference_mode():
            id_batches = [row_ids[begin : begin + batch_size] for begin in range(0, len(row_ids), batch_size)]
            begin = 0
            for x in inputs_ahead(inputs, id_batches, False, dev):
                check(cancel)
                x = to_device(x, dev)
                n = len(x)
                with autocast(dev):
                    h = net.embed(x)
                h = h.float()
                embeddings[begin : begin + n] = h.cpu().numpy()  # numpy's cast to the array's dtype, as every engine does
                scores[begin : begin + n] = net.probabilities(h).cpu().numpy()
                begin += n
                report(progress, begin, len(row_ids), "scoring")
    finally:
        net.train(was_training)
    return embeddings, scores


def _chunks_local(
    model: BackgroundSplittingModel, inputs: Inputs, ids: np.ndarray, chunk_rows: int, device: str, cancel: CancelToken | None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, embeddings, scores) per chunk of ``ids``, scored in this process. Embeddings come in
    float16, as stored, and every chunk reuses the same two arrays (the consumer copies each away)."""
    rows = min(chunk_rows, len(ids))
    buffers = (np.empty((rows, model.embedding_dim), np.float16), np.empty((rows, len(model.categories)), np.float32))
    for start in range(0, len(ids), chunk_rows):
        check(cancel)
        embeddings, scores = score(model, inputs, ids[start : start + chunk_rows], device=device, cancel=cancel, out=buffers)
        yield start, embeddings, scores


def rescore_version(
    model: BackgroundSplittingModel,
    inputs: Inputs,
    ids: np.ndarray,
    scores_dir: Path,
    model_id: int,
    engine: str = "local",
    ray_config: RayConfig | None = None,
    chunk_rows: int = 65_536,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> VersionScores:
    """Score ``ids`` with a trained ``model`` and write version ``model_id``'s scores and embeddings.

    ``inputs`` is what the model eats, indexed by image id (the cache's pooled features in adapter
    mode, stage maps in last-stage mode; for ``engine="ray"`` the memory-mapped array itself, which
    workers reopen by path). Chunks of ``chunk_rows`` rows are scored in process (``engine="local"``)
    or by a Ray actor pool and streamed into a memory-mapped version folder (:class:`VersionWriter`),
    which becomes the version's current generation only when complete: readers see the old scores
    until then, never none.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use 'local' or 'ray'")
    writer = VersionWriter(scores_dir, model_id, ids, model.embedding_dim, len(model.categories))
    ids = writer.ids
    if engine == "ray":
        from .ray_engine import score_chunks_on_ray

        chunks = score_chunks_on_ray(score, model, inputs, ids, chunk_rows, writer.folder, ray_config, cancel)
    else:
        chunks = _chunks_local(model, inputs, ids, chunk_rows, device, cancel)
    done = 0
    try:
        for start, chunk_embeddings, chunk_scores in chunks:
            writer.write(start, chunk_embeddings, chunk_scores)
            done += len(chunk_scores)
            report(progress, done, len(ids), "scoring")
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return read_version(scores_dir, model_id, list(model.categories))


# -- version folders -----------------------------------------------------------------------------

FILES = ("ids.npy", "scores.npy", "embeddings.npy")


@dataclass
class VersionScores:
    ids: np.ndarray  # int64 [N] image ids, ascending
    scores: np.ndarray  # float32 [N, K]
    categories: list[str]
    embeddings_path: Path
    # Opened with the rest, so a newer generation cannot pull it away.
    embeddings_map: np.ndarray | None = field(default=None, repr=False)

    def embeddings(self) -> np.ndarray:
        return self.embeddings_map if self.embeddings_map is not None else np.load(self.embeddings_path, mmap_mode="r")

    def column(self, category: str) -> np.ndarray:
        return self.scores[:, self.categories.index(category)]


def _name(model_id: int) -> str:
    if isinstance(model_id, bool) or operator.index(model_id) < 0:
        raise ValueError(f"a model version is a non-negative integer, not {model_id!r}")
    return f"v{operator.index(model_id):04d}"


def generations(scores_dir: Path, model_id: int) -> list[tuple[int, Path]]:
    """(generation, folder) of every committed generation of version ``model_id``, oldest first."""
    name = _name(model_id)
    pattern = re.compile(rf"{name}(?:\.g(\d+))?")
    try:
        names = os.listdir(scores_dir)
    except FileNotFoundError:
        return []
    # By name alone: a stat here could miss a generation deleted a moment after the listing, while its
    # successor came too late to be listed.
    return sorted((int(m.group(1) or 0), Path(scores_dir) / n) for n in names if (m := pattern.fullmatch(n)))


def version_dir(scores_dir: Path, model_id: int) -> Path | None:
    """The folder holding version ``model_id``'s current scores, or None before there are any."""
    found = generations(scores_dir, model_id)
    return found[-1][1] if found else None


class VersionWriter:
    """Writes one version's scores chunk by chunk into ``.npy`` files in a temporary folder of its
    own, which :meth:`commit` publishes as the version's next generation.

    Rows are written with file writes, not through a map (a million embeddings would otherwise sit
    in this process's resident memory as mapped file pages), and flushed to disk by a background
    thread while the next chunks are computed, so :meth:`commit`'s fsync finds little left to do.
    ``folder`` (the temporary one) may also hold a producer's scratch files until the commit.
    """

    def __init__(self, scores_dir: Path, model_id: int, ids: np.ndarray, embedding_dim: int, n_categories: int):
        self.scores_dir, self.model_id = Path(scores_dir), model_id
        name = _name(model_id)
        self.scores_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers(self.scores_dir, name)
        self.ids = np.asarray(ids, dtype=np.int64)
        ensure_free(self.scores_dir, len(self.ids) * (8 + 2 * embedding_dim + 4 * n_categories))
        self.folder = temp_name(self.scores_dir / name)
        self.folder.mkdir()
        np.save(self.folder / "ids.npy", self.ids)
        self._files = {
            "embeddings": _RowFile(self.folder / "embeddings.npy", np.float16, (len(self.ids), embedding_dim)),
            "scores": _RowFile(self.folder / "scores.npy", np.float32, (len(self.ids), n_categories)),
        }
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="bgminer-flush")
        self._flushing: Future | None = None

    def write(self, start: int, embeddings: np.ndarray, scores: np.ndarray) -> None:
        """Rows ``start : start + len(scores)`` (positions in ``ids``)."""
        self._files["embeddings"].write(start, embeddings)
        self._files["scores"].write(start, scores)
        if self._flushing is None or self._flushing.done():  # at most one flush in flight; the next covers the rest
            if self._flushing is not None:
                self._flushing.result()  # an I/O error surfaces here
            self._flushing = self._flusher.submit(self._flush)

    def _flush(self) -> None:
        for f in self._files.values():
            os.fdatasync(f.fd)

    def commit(self) -> Path:
        """Make the written folder the version's current generation (durably), then drop older ones."""
        if self._flushing is not None:
            self._flushing.result()
        self._flush()
        self._close()
        for entry in self.folder.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name not in FILES:  # scratch files of the producer
                entry.unlink()
        for name in FILES:
            with open(self.folder / name, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(self.folder)
        while True:
            found = generations(self.scores_dir, self.model_id)
            final = self.scores_dir / f"{_name(self.model_id)}.g{found[-1][0] + 1 if found else 1}"
            try:
                os.rename(self.folder, final)
                break
            except OSError as exc:  # another writer of this version took that generation first
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        fsync_dir(self.scores_dir)
        for _, older in found:
            shutil.rmtree(older, ignore_errors=True)
        return final

    def abort(self) -> None:
        """Drop the uncommitted folder (a failed or cancelled run); nothing to do after a commit."""
        if self._flushing is not None:
            self._flushing.exception()  # wait; its error no longer matters
        self._close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _close(self) -> None:
        self._flusher.shutdown(wait=True)
        for f in self._files.values():
            f.close()


class _RowFile:
    """A ``.npy`` file of a fixed shape, written row block by row block with ``pwrite``."""

    def __init__(self, path: Path, dtype: type, shape: tuple[int, int]):
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)  # writes the header, sizes the file
        self.offset, self.dtype, self.shape = header.offset, np.dtype(dtype), shape
        del header
        self.fd = os.open(path, os.O_RDWR)

    def write(self, start: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if start < 0 or start + len(rows) > self.shape[0] or rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows {start}..{start + len(rows)} of shape {rows.shape[1:]} do not fit {self.shape}")
        data = memoryview(rows).cast("B")
        position = self.offset + start * self.shape[1] * self.dtype.itemsize
        while data:
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _remove_dead_writers(scores_dir: Path, name: str) -> None:
    """Delete temporary folders of ``name`` whose writer process no longer runs (killed mid-write)."""
    for entry in scores_dir.glob(f".{name}.*.tmp"):
        pid = entry.name[len(name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_version(scores_dir: Path, model_id: int, categories: list[str]) -> VersionScores | None:
    """The current scores of version ``model_id`` (an integer id, never a name from elsewhere), or None before they exist."""
    failed: Path | None = None
    while True:
        folder = version_dir(scores_dir, model_id)
        if folder is None or folder == failed:
            return None  # none yet, or the current generation is incomplete (not written by this module)
        try:
            ids = np.load(folder / "ids.npy")
            scores = np.load(folder / "scores.npy")
            embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")
        except FileNotFoundError:  # a newer generation replaced this one while we read: read that one
            failed = folder
            continue
        return VersionScores(ids, scores, list(categories), folder / "embeddings.npy", embeddings)
