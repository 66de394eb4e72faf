"""The one place that knows image files: their suffixes, the folder walk that finds them, and
their decoding (validation at ingest, thumbnails, pixels for embedding and ``predict``).

Untrusted files are checked from their header before any pixel is decoded (size, format),
then decoded in full so truncated or corrupt files fail here rather than in a training
job. Every failure is an :class:`ImageRejected` with a short reason code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported on first use so ingest worker processes never pay for it
    import torch

MAX_PIXELS_DEFAULT = 40_000_000
# The file suffixes of each accepted format; the first is the one a stored upload gets.
FORMAT_SUFFIXES = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
ACCEPTED_FORMATS = tuple(FORMAT_SUFFIXES)
IMAGE_SUFFIXES = frozenset(suffix for suffixes in FORMAT_SUFFIXES.values() for suffix in suffixes)
# Image types that cannot be decoded: folders are walked for them too, so that they are reported
# (unsupported_format) instead of silently skipped.
UNSUPPORTED_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".psd", ".svg", ".ppm", ".pgm", ".tga"})
WALKED_SUFFIXES = IMAGE_SUFFIXES | UNSUPPORTED_SUFFIXES
# JPEG's opener returns an "MPO" image for multi-picture camera files.
_FORMAT_ALIASES = {"MPO": "JPEG"}
REJECT_REASONS = (
    "empty_file",
    "not_an_image",
    "unsupported_format",
    "corrupt",
    "truncated",
    "too_large",
    "duplicate",
    "unreadable",
    "outside_data_roots",  # ingest: not read, the path lies outside BGMINER_DATA_ROOTS
    "archive_unreadable",  # ingest: an archive the OS would not let us unpack (disk full, I/O error)
)
WHITE = (255, 255, 255)
# EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# File signatures: an accepted format whose header PIL cannot parse is corrupt, and a few
# common formats PIL cannot open at all still get named in the rejection.
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (0, b"BM", "BMP"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"<svg", "SVG"),
    (0, b"%PDF", "PDF"),
)


class ImageRejected(ValueError):
    """A file that cannot enter the corpus; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(reason, detail)  # args stay (reason, detail) so the error pickles across processes
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image plus facts about the file it came from."""

    image: Image.Image  # RGB; smaller than the source when reduced for draft_size
    source_size: tuple[int, int]  # (width, height) of the full-resolution upright image
    format: str  # one of ACCEPTED_FORMATS


def read_image(
    source: str | Path | BinaryIO, max_pixels: int = MAX_PIXELS_DEFAULT, draft_size: int | None = None
) -> DecodedImage:
    """Validate and fully decode one image file (a path or a binary file object).

    With ``draft_size``, the image comes back scaled down by the largest integer factor that
    keeps its short side >= draft_size: JPEGs decode at a reduced DCT scale, other formats
    are box-reduced right after decoding, before any conversion (much faster thumbnails and
    embedding; the network input is resized further anyway). Raises :class:`ImageRejected`.
    """
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as fp:
                return read_image(fp, max_pixels, draft_size)
        except OSError as e:
            raise ImageRejected("unreadable", e.strerror or str(e)) from e
    img = _open_checked(source, max_pixels)
    header_size = img.size
    try:
        if draft_size is not None and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        rgb = _to_rgb(img, draft_size)
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib/struct errors, ...
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        raise ImageRejected(reason, f"{img.format} data cannot be decoded: {e}") from e
    orientation = _exif_orientation(img)
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(_UPRIGHT[orientation])
    width, height = header_size
    source_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return DecodedImage(rgb, source_size, _FORMAT_ALIASES.get(img.format, img.format))


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS_DEFAULT, draft_size: int | None = None) -> Image.Image:
    """The upright RGB pixels of an image file (see :func:`read_image`)."""
    return read_image(path, max_pixels, draft_size).image


@dataclass(frozen=True)
class EncodedJPEG:
    """A JPEG file left encoded, for a decoder elsewhere (nvJPEG on the GPU), after the header checks."""

    orientation: int  # EXIF orientation (1: upright); the decoder applies it


def encoded_jpeg(data: bytes, max_pixels: int = MAX_PIXELS_DEFAULT) -> EncodedJPEG | None:
    """Whether the file ``data`` is a plain JPEG (RGB or greyscale) that another decoder may take
    as it is: its header passes :func:`read_image`'s checks (format, size limit). None for any
    other accepted file (CMYK JPEGs, other formats: decode them with :func:`read_image`).
    Raises :class:`ImageRejected` as :func:`read_image` does for a bad header."""
    img = _open_checked(io.BytesIO(data), max_pixels)
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    return EncodedJPEG(_exif_orientation(img))


@dataclass
class Walk:
    """What :func:`walk_images` found under one folder."""

    files: list[str]  # image files, in walk order
    outside: list[str]  # image-named links that lead outside the allowed paths (neither followed nor stat'ed)
    ignored: int  # other entries skipped


def walk_images(root: str | Path, allowed: Callable[[str], bool] | None = None) -> Walk:
    """Image files (by :data:`WALKED_SUFFIXES`) under ``root``: depth-first, each folder's files
    in name order before its subfolders, hidden entries skipped, symlinked folders followed once
    each so link loops end. ``allowed(real_path)`` vets where a symlink leads (default: anywhere).
    A folder that cannot be listed holds nothing."""
    found = Walk([], [], 0)
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            image_name = os.path.splitext(entry.name)[1].lower() in WALKED_SUFFIXES
            path = entry.path
            if entry.is_symlink():
                path = os.path.realpath(entry.path)
                if allowed is not None and not allowed(path):
                    if image_name:
                        found.outside.append(entry.path)
                    else:
                        found.ignored += 1
                    continue
            if entry.is_dir():
                subfolders.append(path)
            elif entry.is_file() and image_name:
                found.files.append(path)
            else:
                found.ignored += 1
        stack.extend(reversed(subfolders))
    return found


def to_tensor_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]: a channels-last view of one writable buffer of the pixels."""
    import torch

    width, height = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3).permute(2, 0, 1)


def make_thumbnail(img: Image.Image, size: int = 256, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB image scaled down so its long side is at most ``size``."""
    width, height = img.size
    scale = size / max(width, height)
    if scale < 1:
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(
            new_size, Image.Resampling.BILINEAR, reducing_gap=2.0
        )  # antialiased; bicubic costs 2x for no visible gain at this size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _open_checked(fp: BinaryIO, max_pixels: int) -> Image.Image:
    """Parse the header only, and refuse unsupported formats and oversized images before decoding."""
    try:
        img = Image.open(fp, formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own outer cap: 2 x Image.MAX_IMAGE_PIXELS
        raise ImageRejected("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise _unidentified(fp) from e
    except Exception as e:
        raise ImageRejected("corrupt", f"header cannot be parsed: {e}") from e
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            "too_large", f"{width}x{height} is {width * height / 1e6:.1f} MP, over the {max_pixels / 1e6:g} MP limit"
        )
    return img


def _unidentified(fp: BinaryIO) -> ImageRejected:
    """Name what a file is when no accepted format's parser recognised it."""
    fp.seek(0)
    head = fp.read(32)
    if not head:
        return ImageRejected("empty_file", "the file is empty (0 bytes)")
    known = next((fmt for offset, magic, fmt in _SIGNATURES if head[offset : offset + len(magic)] == magic), None)
    if known in ACCEPTED_FORMATS:
        return ImageRejected("corrupt", f"starts like a {known} file but its header cannot be parsed")
    if known is None:
        fp.seek(0)
        try:
            with Image.open(fp) as other:  # header only: learn the format's name
                known = other.format
        except Exception:  # noqa: BLE001 - no parser at all accepts it
            return ImageRejected("not_an_image", "not a recognised image format")
    return ImageRejected("unsupported_format", f"{known} images are not supported (accepted: {', '.join(ACCEPTED_FORMATS)})")


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF must not reject an image that decodes
        return 1


def _to_rgb(img: Image.Image, draft_size: int | None) -> Image.Image:
    """Any decoded mode -> RGB, reduced for ``draft_size``; transparency is composited onto
    white, deep modes are scaled to 8 bits."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    elif img.mode in ("I", "F"):  # no defined display range: stretch the values found to 0..255
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        img = Image.fromarray(((values - low) * (255.0 / (high - low or 1.0))).round().astype(np.uint8))
    if "A" in img.getbands() or "transparency" in img.info:
        img = img if img.mode == "RGBA" else img.convert("RGBA")
    elif img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if draft_size is not None:
        factor = min(img.width // draft_size, img.height // draft_size)
        if factor >= 2:
            img = img.reduce(factor)  # premultiplies alpha, so transparent edges do not bleed
    if img.mode == "RGBA":
        rgb = Image.new("RGB", img.size, WHITE)
        rgb.paste(img, mask=img)
        return rgb
    return img if img.mode == "RGB" else img.convert("RGB")
