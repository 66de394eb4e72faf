from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def write_images(folder):
    """Twelve small, distinct, real PNGs (different colours and shapes) into ``folder``."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        arr = (rng.random((48 + i, 64, 3)) * 255).astype(np.uint8)
        arr[:, : 8 + i] = (i * 20) % 255
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture
def image_folder(tmp_path):
    """A folder of small, distinct, real images, fresh for each test."""
    return write_images(tmp_path / "images")


@pytest.fixture(scope="module")
def image_folder_module(tmp_path_factory):
    """The same images, shared by the tests of one module (for slow per-module set-ups)."""
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A project with a trained red-disc model and its export (tests/exported.py), built once."""
    from exported import train_and_export

    return train_and_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder_module):
    """A project of the module's images, embedded by the in-process pipeline (the scoring and Ray engine tests)."""
    from bgminer.project import Project

    project = Project.create(tmp_path_factory.mktemp("reference") / "proj")
    project.ingest([image_folder_module])
    project.embed(batch_size=5)
    return project
