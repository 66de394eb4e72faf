"""Files uploaded through the web page: checked against the upload limits, stored by content.

An image is decoded in full before it is kept, and stored as
``uploads/web/<sha256[:2]>/<sha256><suffix>``: the suffix follows the decoded format, and
the client's file name is never part of a path. The final name is created exclusively (a
link to a complete, fsynced temporary file), so nothing is ever overwritten: two uploads
with the same name and different content both survive, and the same content is stored once.
A .zip is unpacked with the archive limits (:func:`bgminer.corpus.extract_zip`).
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .corpus import IngestError, extract_zip
from .fsutil import DiskSpaceError, ensure_free, fsync_dir
from .imageio import FORMAT_SUFFIXES, ImageRejected, read_image
from .settings import Limits

WEB_FOLDER = "web"
ZIP_STEM = "upload"  # unpacked archives go to uploads/upload-<sha256[:16]>/
MiB = 2**20


class UploadRefused(ValueError):
    """One uploaded file that is not kept; the message says why."""


@dataclass
class UploadResult:
    """What one submit kept: image files and unpacked archive folders (ready to ingest), and
    the refused files as (client file name, why). Client names are data: escape them to show."""

    saved: list[Path] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def save_uploads(uploads_dir: Path, files: Sequence[tuple[str, bytes | BinaryIO]], limits: Limits) -> UploadResult:
    """Check and store one submit of uploaded files ``(client name, content)`` under ``uploads_dir``.

    The whole submit is refused when it has more files or bytes than the limits allow; a file
    is refused when it is too big, would take the project's uploads past their limit or the
    disk into its reserve, or is neither a decodable image nor a safe .zip. Nothing is kept
    of a refused file.
    """
    result = UploadResult()
    sizes = [_size(content) for _, content in files]
    whole = _submit_problem(len(files), sum(sizes), limits)
    if whole:
        result.refused = [(name, whole) for name, _ in files]
        return result
    used = tree_bytes(uploads_dir)
    for (name, content), size in zip(files, sizes, strict=True):
        try:
            saved = _save_one(uploads_dir, name, content, size, limits, used)
        except (UploadRefused, DiskSpaceError) as e:
            result.refused.append((name, str(e)))
            continue
        except OSError as e:
            result.refused.append((name, f"could not be stored: {e.strerror or e}"))
            continue
        result.saved.append(saved)
        used = tree_bytes(uploads_dir) if saved.is_dir() else used + size
    return result


def tree_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (0 when it does not exist); links are not followed."""
    total = 0
    stack = [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _submit_problem(n_files: int, n_bytes: int, limits: Limits) -> str | None:
    if n_files > limits.upload_submit_files:
        return f"{n_files} files in one submit, over the limit of {limits.upload_submit_files}; add them in smaller batches"
    if n_bytes > limits.upload_submit_bytes:
        return (
            f"{n_bytes / MiB:.0f} MiB in one submit, over the limit of "
            f"{limits.upload_submit_bytes / MiB:.0f} MiB; add them in smaller batches"
        )
    return None


def _save_one(uploads_dir: Path, name: str, content: bytes | BinaryIO, size: int, limits: Limits, used: int) -> Path:
    if size > limits.upload_file_bytes:
        raise UploadRefused(f"{size / MiB:.1f} MiB is over the {limits.upload_file_bytes / MiB:.0f} MiB limit per file")
    room = limits.project_upload_bytes - used
    if size > room:
        raise UploadRefused(f"the project's uploads would pass their limit of {limits.project_upload_bytes / 2**30:g} GiB")
    ensure_free(uploads_dir, size, limits.disk_reserve_bytes)
    web = uploads_dir / WEB_FOLDER
    if PurePosixPath(name.replace("\\", "/")).suffix.lower() == ".zip":
        tmp, _ = _write_temp(web, content, ".zip")
        try:
            return extract_zip(
                tmp,
                uploads_dir,
                replace(limits, archive_bytes=min(limits.archive_bytes, room)),
                stem=ZIP_STEM,
                label=PurePosixPath(name.replace("\\", "/")).name,
            )
        except IngestError as e:
            raise UploadRefused(str(e)) from e
        finally:
            tmp.unlink(missing_ok=True)
    fp = io.BytesIO(content) if isinstance(content, bytes) else content
    try:
        fp.seek(0)
        decoded = read_image(fp)
    except ImageRejected as e:
        raise UploadRefused(f"not a usable image ({e})") from e
    suffix = FORMAT_SUFFIXES[decoded.format][0]
    tmp, digest = _write_temp(web, fp, suffix)
    dest = web / digest[:2] / f"{digest}{suffix}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(tmp, dest)  # exclusive create of the complete file
        fsync_dir(dest.parent)
    except FileExistsError:
        pass  # the name is the content's hash: the same image is already stored
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _write_temp(folder: Path, content: bytes | BinaryIO, suffix: str) -> tuple[Path, str]:
    """Write ``content`` to a new hidden file in ``folder`` (exclusive create, fsynced); returns it and its sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".upload-{os.getpid()}-{uuid.uuid4().hex}{suffix}"
    digest = hashlib.sha256()
    src = io.BytesIO(content) if isinstance(content, bytes) else content
    src.seek(0)
    try:
        with open(tmp, "xb") as dst:
            while block := src.read(MiB):
                digest.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _size(content: bytes | BinaryIO) -> int:
    if isinstance(content, bytes):
        return len(content)
    content.seek(0, os.SEEK_END)
    size = content.tell()
    content.seek(0)
    return size
