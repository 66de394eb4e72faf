from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def image_folder(tmp_path):
    """A folder of small, distinct, real images (different colours and shapes)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        arr = (rng.random((48 + i, 64, 3)) * 255).astype(np.uint8)
        arr[:, : 8 + i] = (i * 20) % 255
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder
