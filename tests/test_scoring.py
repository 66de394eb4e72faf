"""Specification of scoring: streamed re-scoring into a version folder gives what scoring in one go gives,
and only ``engine="ray"`` brings in the Ray engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from adapters import adapter_model

from bgminer.scoring import read_version, rescore_version, score

REPO = Path(__file__).resolve().parent.parent


def test_streaming_rescore_matches_scoring_in_one_go(tmp_path, reference):
    model, ids = adapter_model(reference), np.array(reference.store.image_ids())
    pooled = reference.features.open("pooled")
    version = rescore_version(model, pooled, ids, tmp_path / "scores", 7, chunk_rows=5)
    embeddings, scores = score(model, pooled, ids)
    np.testing.assert_array_equal(version.ids, ids)
    np.testing.assert_allclose(version.scores, scores, atol=1e-6)
    np.testing.assert_allclose(version.embeddings().astype(np.float32), embeddings, atol=2e-3)  # stored as float16
    assert read_version(tmp_path / "scores", 7, ["a", "b"]).scores.shape == (12, 2)


def test_an_unknown_engine_is_refused_before_anything_is_written(tmp_path, reference):
    ids = np.array(reference.store.image_ids())
    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        rescore_version(adapter_model(reference), reference.features.open("pooled"), ids, tmp_path / "scores", 1, engine="spark")
    assert not (tmp_path / "scores").exists()


def test_local_scoring_never_imports_the_ray_engine(tmp_path, reference):
    code = (
        "import sys, numpy as np\n"
        "from bgminer.project import Project\n"
        "from bgminer.model import build_model\n"
        "from bgminer.scoring import rescore_version\n"
        f"p = Project({str(reference.root)!r})\n"
        "m = build_model('adapter', p.backbone, ['a'])\n"
        f"rescore_version(m, p.features.open('pooled'), np.array(p.store.image_ids()), {str(tmp_path / 'scores')!r}, 1)\n"
        "assert 'bgminer.ray_engine' not in sys.modules and 'ray' not in sys.modules, 'ray imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
