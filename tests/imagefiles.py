"""Small real image files for the imageio and corpus tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels; a different seed gives different file content."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_claiming_size(width: int, height: int) -> bytes:
    """A real tiny PNG whose IHDR (with a valid CRC) claims another size: a decompression bomb header."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
