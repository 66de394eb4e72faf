"""Feature shards: one file per block of embedded images, written by distributed workers and
merged into the project's :class:`~bgminer.feature_cache.FeatureCache`.

A shard is one uncompressed ``.npz`` holding the block's image ids, its cached arrays
(``pooled``, ``logits`` and, when the cache keeps them, ``maps``), the images that could not
be decoded (ids, reason, detail) and the backbone's weights hash. It is written under a
temporary name unique to its writer, fsynced and renamed, so a file with a shard's name is
always complete; a worker killed mid-write leaves only a hidden ``.*.tmp`` file, which the next
run deletes and redoes. Merging copies a shard's rows into the cache's memory-mapped arrays
(row = image id) under the cache's lock, flushes them, marks the images embedded (or rejected)
in the store and deletes the shard: the rest of the app only ever sees the one memory-mapped view.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .feature_cache import FeatureCache
from .fsutil import atomic_path, ensure_free
from .store import Store

SUFFIX = ".shard.npz"


@dataclass
class Shard:
    """One block of embedded images as read back from its file."""

    path: Path
    ids: np.ndarray  # int64 [n] image ids of the rows below
    arrays: dict[str, np.ndarray]  # cache array name -> [n, ...]
    rejected: list[tuple[int, str, str]]  # (image id, reason, detail) of images that failed to decode
    weights_sha256: str


def shard_dir(cache: FeatureCache) -> Path:
    """Where the shards of ``cache`` live (beside its arrays, so one backbone's shards stay apart)."""
    return cache.root / "shards"


def shard_name(ids: np.ndarray, rejected_ids: np.ndarray) -> str:
    """A name that depends only on the block's image ids, so a rerun of the same block overwrites it."""
    every = np.sort(np.concatenate([np.asarray(ids, np.int64), np.asarray(rejected_ids, np.int64)]))
    first, last = (int(every[0]), int(every[-1])) if every.size else (0, 0)
    return f"{first:012d}-{last:012d}-{every.size:06d}-{zlib.crc32(every.tobytes()):08x}{SUFFIX}"


def write_shard(
    folder: Path,
    ids: np.ndarray,
    arrays: dict[str, np.ndarray],
    rejected: list[tuple[int, str, str]],
    weights_sha256: str,
) -> Path:
    """Write one shard atomically (unique temporary file, fsync, rename, fsync of the folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.int64)
    for name, values in arrays.items():
        if len(values) != len(ids):
            raise ValueError(f"shard array {name!r} has {len(values)} rows for {len(ids)} ids")
    rejected_ids = np.array([r[0] for r in rejected], dtype=np.int64)
    final = folder / shard_name(ids, rejected_ids)
    ensure_free(folder, sum(np.asarray(v).nbytes for v in arrays.values()))
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            ids=ids,
            rejected_ids=rejected_ids,
            rejected_reason=np.array([r[1] for r in rejected], dtype=str),
            rejected_detail=np.array([r[2] for r in rejected], dtype=str),
            weights_sha256=np.array(weights_sha256),
            **{f"array_{name}": np.ascontiguousarray(values) for name, values in arrays.items()},
        )
    return final


def read_shard(path: Path) -> Shard | None:
    """The shard at ``path``, or None when the file is unreadable or incomplete (it must be redone)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = z["ids"]
            arrays = {key.removeprefix("array_"): z[key] for key in z.files if key.startswith("array_")}
            columns = (z["rejected_ids"].tolist(), z["rejected_reason"].tolist(), z["rejected_detail"].tolist())
            rejected = list(zip(*columns, strict=True))
            sha = str(z["weights_sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if any(len(v) != len(ids) for v in arrays.values()):
        return None
    return Shard(Path(path), ids, arrays, rejected, sha)


def finished_shards(folder: Path) -> list[Path]:
    """Complete shard files in ``folder``, in name (image id) order."""
    folder = Path(folder)
    return sorted(folder.glob(f"*{SUFFIX}")) if folder.exists() else []


def remove_partials(folder: Path) -> int:
    """Delete files left by writers killed mid-write; returns how many.

    Call only while holding the feature cache's lock for a whole run (as :func:`bgminer.ray_engine.embed_on_ray`
    does), so no live writer's file is among them.
    """
    folder = Path(folder)
    stale = list(folder.glob(f".*{SUFFIX}.*.tmp")) if folder.exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


@dataclass
class MergeResult:
    embedded: int
    rejected: int


def merge_shard(path: Path, store: Store, cache: FeatureCache, weights_sha256: str) -> MergeResult | None:
    """Copy a finished shard into ``cache``, mark its images in ``store`` and delete it.

    Returns None (after deleting the file) when the shard is unreadable or was computed with
    other backbone weights: its images stay un-embedded and the next pass redoes them.
    """
    shard = read_shard(path)
    if shard is None or shard.weights_sha256 != weights_sha256 or set(shard.arrays) != set(cache.specs):
        Path(path).unlink(missing_ok=True)
        return None
    cache.commit_rows(store, shard.ids, shard.arrays)
    for image_id, reason, detail in shard.rejected:
        store.reject_image(int(image_id), reason, f"at embedding: {detail}")
    Path(path).unlink()
    return MergeResult(len(shard.ids), len(shard.rejected))
