"""Embedding and re-scoring on Ray (local mode here): the same cache rows and scores as in process,
shards that survive interrupted runs, and the CLI's ``--engine ray``."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from adapters import adapter_model

from bgminer.fsutil import temp_name
from bgminer.project import Project
from bgminer.ray_engine import RayConfig, embed_on_ray
from bgminer.scoring import read_version, rescore_version, score
from bgminer.shards import finished_shards, merge_shard, read_shard, shard_dir, write_shard

CONFIG = RayConfig(shard_rows=5, batch_size=5, decode_rows=3)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'bgminer[ray]' (or -r requirements-ray.txt)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def fresh_project(tmp_path, folder) -> Project:
    project = Project.create(tmp_path / "proj")
    project.ingest([folder])
    return project


def embed(project: Project, config: RayConfig = CONFIG):
    return embed_on_ray(project.store, project.features, project.backbone_name, project.backbone_weights, config)


def cached_rows(project: Project, ids: np.ndarray) -> dict[str, np.ndarray]:
    return {n: project.features.read(n, ids) for n in ("pooled", "logits", "maps")}


def assert_same_features(project: Project, reference: Project, ids: list[int]) -> None:
    for name in ("pooled", "logits", "maps"):
        ours, theirs = project.features.read(name, ids).astype(np.float32), reference.features.read(name, ids).astype(np.float32)
        assert np.abs(ours - theirs).max() <= (1e-5 if name == "pooled" else 1e-3), name


def test_ray_local_mode_embeds_a_folder_like_the_in_process_pipeline(ray_local, tmp_path, image_folder_module, reference):
    folder = tmp_path / "images"
    shutil.copytree(image_folder_module, folder)
    project = fresh_project(tmp_path, folder)
    ids = project.store.image_ids()
    assert ids == reference.store.image_ids()
    os.remove(project.store.image(ids[2])["path"])  # vanished between ingest and embedding: rejected, not fatal
    report = embed(project)
    assert (report.embedded, report.failed, report.shards_written) == (11, 1, 3)
    assert project.store.rejected_counts() == {"unreadable": 1} and project.store.image_ids(embedded=False) == []
    assert_same_features(project, reference, ids[:2] + ids[3:])
    assert finished_shards(shard_dir(project.features)) == []  # merged shards are deleted
    assert embed(project).embedded == 0  # nothing left to do


def test_a_shard_killed_mid_write_is_redone_and_finished_shards_are_kept(ray_local, tmp_path, image_folder_module, reference):
    project = fresh_project(tmp_path, image_folder_module)
    folder, ids = shard_dir(project.features), np.array(project.store.image_ids())
    sha = project.backbone.weights_sha256
    # An earlier run finished one shard (ids 0-4) but died before merging it ...
    finished = write_shard(folder, ids[:5], cached_rows(reference, ids[:5]), [], sha)
    # ... and was killed while writing the next one: only the temporary file exists, cut short.
    whole = write_shard(folder, ids[5:10], cached_rows(reference, ids[5:10]), [], sha)
    partial = temp_name(whole)
    partial.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    assert read_shard(partial) is None and read_shard(finished) is not None

    report = embed(project)
    assert (report.shards_reused, report.partials_removed) == (1, 1)
    assert report.embedded == 12 and report.shards_written == 2  # ids 5-11 embedded again, in blocks of 5
    assert list(folder.iterdir()) == []
    assert project.store.image_ids(embedded=False) == []
    assert_same_features(project, reference, ids.tolist())


def test_a_shard_from_other_weights_is_discarded(tmp_path, image_folder_module, reference):
    project = fresh_project(tmp_path, image_folder_module)
    ids = np.array(project.store.image_ids()[:3])
    path = write_shard(shard_dir(project.features), ids, cached_rows(reference, ids), [], "other")
    assert merge_shard(path, project.store, project.features, project.backbone.weights_sha256) is None
    assert not path.exists() and project.store.embedded_count() == 0


def test_rescore_on_ray_matches_local(ray_local, tmp_path, reference):
    model, ids = adapter_model(reference), np.array(reference.store.image_ids())
    pooled = reference.features.open("pooled")
    local = rescore_version(model, pooled, ids, tmp_path / "local", 1, chunk_rows=5)
    remote = rescore_version(model, pooled, ids, tmp_path / "ray", 1, engine="ray", ray_config=CONFIG, chunk_rows=5)
    np.testing.assert_array_equal(remote.ids, local.ids)
    np.testing.assert_allclose(remote.scores, local.scores, atol=1e-6)
    # float16 on disk: a float32 difference in the last bit (the actor's own thread count) may round to the
    # neighbouring half, so equal up to one float16 step
    np.testing.assert_allclose(np.asarray(remote.embeddings(), np.float32), np.asarray(local.embeddings(), np.float32),
                               rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_rescore_command_scores_images_embedded_after_training(engine, request, tmp_path, image_folder_module, capsys):
    import json

    from bgminer.cli import main as cli
    from bgminer.train import TrainConfig

    if engine == "ray":
        request.getfixturevalue("ray_local")
    files = sorted(image_folder_module.glob("*.png"))
    first, later = tmp_path / "first", tmp_path / "later"
    for folder, part in ((first, files[:8]), (later, files[8:])):
        folder.mkdir()
        for f in part:
            shutil.copy(f, folder / f.name)
    project = fresh_project(tmp_path, first)
    project.embed(batch_size=5)
    project.add_category("thing")
    project.label_paths("thing", [first / files[0].name, first / files[1].name], "positive")
    record = project.train(config=TrainConfig(epochs=1, min_steps=2))
    assert len(read_version(project.scores_dir, record.id, record.categories).ids) == 8

    project.ingest([later])
    project.embed(batch_size=5)
    assert cli(["rescore", str(project.root), "--engine", engine, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_version"] == record.id and summary["images"] == 12

    fresh = Project(project.root)  # what another process sees on disk
    version = read_version(fresh.scores_dir, record.id, record.categories)
    ids = np.asarray(fresh.store.image_ids(embedded=True), dtype=np.int64)
    assert np.array_equal(version.ids, ids)
    model = fresh.load_model(record.id)
    _, expected = score(model, fresh.features.open("pooled"), ids, device="cpu")
    assert np.abs(version.scores - expected).max() < 1e-5
    assert len(fresh.index()) == 12
