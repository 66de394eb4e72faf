import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bgminer.progress import Cancelled, CancelToken
from bgminer.project import Project


@pytest.fixture
def project(tmp_path, image_folder):
    p = Project.create(tmp_path / "proj")
    p.ingest([image_folder])
    return p


def test_embedding_writes_features_logits_and_maps_for_every_image(project):
    report = project.embed(batch_size=5)
    ids = project.store.image_ids()
    assert report.embedded == len(ids) == 12
    assert project.store.image_ids(embedded=False) == []
    pooled = project.features.read("pooled", ids)
    logits = project.features.read("logits", ids)
    assert pooled.shape == (12, 1280) and np.isfinite(pooled).all() and (np.abs(pooled).sum(1) > 0).all()
    assert logits.dtype == np.float16 and logits.shape == (12, 1000)
    assert project.features.read("maps", ids[:2]).shape == (2, 192, 7, 7)
    np.testing.assert_array_equal(project.features.pseudo_labels(ids), logits.astype(np.float32).argmax(1))


def test_features_match_the_backbone_on_the_same_pixels(project):
    import torch

    from bgminer.backbone import Preprocess
    from bgminer.imageio import load_rgb, to_tensor_uint8

    project.embed()
    image_id = project.store.image_ids()[3]
    bb = project.backbone
    x = Preprocess(bb.preprocess)(to_tensor_uint8(load_rgb(project.store.image(image_id)["path"], draft_size=256)))
    with torch.inference_mode():
        expected = bb.net.forward_features(x[None])[0].numpy()
    np.testing.assert_allclose(project.features.read("pooled", [image_id])[0], expected, atol=1e-4)


def test_cancel_keeps_finished_batches_and_rerun_completes(project):
    token = CancelToken()

    def cancel_after_first_batch(done, total, message=""):
        if done >= 4:
            token.cancel()

    with pytest.raises(Cancelled):
        project.embed(batch_size=4, progress=cancel_after_first_batch, cancel=token)
    assert 4 <= project.store.embedded_count() < 12
    project.embed(batch_size=4)
    assert project.store.embedded_count() == 12


def test_sigkill_mid_run_resumes_with_exactly_one_row_per_image(project):
    script = textwrap.dedent(
        f"""
        import os, signal
        from bgminer.project import Project
        def die(done, total, message=""):
            if done >= 4:
                os.kill(os.getpid(), signal.SIGKILL)
        Project({str(project.root)!r}).embed(batch_size=4, progress=die)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    partial = project.store.embedded_count()
    assert 4 <= partial < 12
    report = project.embed(batch_size=4)
    assert report.embedded == 12 - partial
    ids = project.store.image_ids()
    assert project.store.embedded_count() == len(ids) == 12
    rows = project.features.read("pooled", ids)
    assert len({r.tobytes() for r in rows}) == 12  # every image has its own, complete row


def test_file_vanishing_after_ingest_is_rejected_not_fatal(project):
    victim = project.store.image(project.store.image_ids()[0])["path"]
    os.remove(victim)
    report = project.embed()
    assert report.failed == 1 and report.embedded == 11
    assert project.store.rejected_counts() == {"unreadable": 1}


def test_feature_cache_grows_without_losing_rows(project):
    project.embed()
    cache = project.features
    ids = project.store.image_ids()
    before = cache.read("pooled", ids)
    cache.ensure_capacity(cache.capacity * 3)
    np.testing.assert_array_equal(cache.read("pooled", ids), before)
