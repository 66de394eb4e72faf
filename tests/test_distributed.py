"""Distributed embedding and re-scoring on Ray, feature shards, streaming re-scoring, background index swaps."""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import replace

import faiss
import numpy as np
import pytest

from bgminer.distributed import RayConfig, embed_on_ray, rescore_version
from bgminer.fsutil import temp_name
from bgminer.index import IVF_MAX_FLOATS, ExactIndex, IndexBuilder, IVFPQConfig, VectorIndex, auto_kind, build_index, recall_at_k
from bgminer.model import build_model
from bgminer.project import Project
from bgminer.shards import finished_shards, merge_shard, read_shard, shard_dir, write_shard
from bgminer.train import score
from bgminer.versions import read_version

CONFIG = RayConfig(shard_rows=5, batch_size=5, decode_rows=3)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'bgminer[ray]' (or -r requirements-ray.txt)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder_module):
    """The same folder embedded by the in-process pipeline."""
    project = Project.create(tmp_path_factory.mktemp("reference") / "proj")
    project.ingest([image_folder_module])
    project.embed(batch_size=5)
    return project


def fresh_project(tmp_path, folder) -> Project:
    project = Project.create(tmp_path / "proj")
    project.ingest([folder])
    return project


def embed(project: Project, config: RayConfig = CONFIG):
    return embed_on_ray(project.store, project.features, project.backbone_name, project.backbone_weights, config)


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
    finished = write_shard(folder, ids[:5], {n: reference.features.read(n, ids[:5]) for n in ("pooled", "logits", "maps")}, [], sha)
    # ... and was killed while writing the next one: only the temporary file exists, cut short.
    whole = write_shard(folder, ids[5:10], {n: reference.features.read(n, ids[5:10]) for n in ("pooled", "logits", "maps")}, [], sha)
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
    path = write_shard(shard_dir(project.features), ids, {n: reference.features.read(n, ids) for n in ("pooled", "logits", "maps")}, [], "other")
    assert merge_shard(path, project.store, project.features, project.backbone.weights_sha256) is None
    assert not path.exists() and project.store.embedded_count() == 0


def adapter_model(reference: Project):
    import torch

    torch.manual_seed(0)
    model = build_model("adapter", reference.backbone, ["a", "b"])
    with torch.no_grad():
        for p in model.trunk.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a trained-looking adapter, not the identity
    return model


def test_streaming_rescore_matches_scoring_in_one_go(tmp_path, reference):
    model, ids = adapter_model(reference), np.array(reference.store.image_ids())
    pooled = reference.features.open("pooled")
    version = rescore_version(model, pooled, ids, tmp_path / "scores", 7, chunk_rows=5)
    embeddings, scores = score(model, pooled, ids)
    np.testing.assert_array_equal(version.ids, ids)
    np.testing.assert_allclose(version.scores, scores, atol=1e-6)
    np.testing.assert_allclose(version.embeddings().astype(np.float32), embeddings, atol=2e-3)  # stored as float16
    assert read_version(tmp_path / "scores", 7, ["a", "b"]).scores.shape == (12, 2)


def test_rescore_on_ray_matches_local(ray_local, tmp_path, reference):
    model, ids = adapter_model(reference), np.array(reference.store.image_ids())
    pooled = reference.features.open("pooled")
    local = rescore_version(model, pooled, ids, tmp_path / "local", 1, chunk_rows=5)
    remote = rescore_version(model, pooled, ids, tmp_path / "ray", 1, engine="ray", ray_config=CONFIG, chunk_rows=5)
    np.testing.assert_array_equal(remote.ids, local.ids)
    np.testing.assert_allclose(remote.scores, local.scores, atol=1e-6)
    np.testing.assert_array_equal(remote.embeddings(), local.embeddings())


def test_a_new_index_builds_in_the_background_while_the_old_one_serves():
    rng = np.random.default_rng(0)
    old_vectors, new_vectors = rng.standard_normal((200, 16)), rng.standard_normal((300, 16))
    builder = IndexBuilder(build_index(old_vectors, np.arange(200)), key="v1")
    release = threading.Event()

    def slow_chunks(done, total, message=""):
        release.wait(10)  # hold the build until the old index has answered

    builder.rebuild("v2", new_vectors, np.arange(1000, 1300), progress=slow_chunks)
    key, serving = builder.current()
    assert key == "v1" and len(serving) == 200 and builder.building == "v2"
    assert serving.search(old_vectors[:1], 1)[1][0, 0] == 0
    release.set()
    key, index = builder.wait()
    assert key == "v2" and builder.current()[1] is index and builder.building is None
    assert isinstance(index, ExactIndex) and index.search(new_vectors[:1], 1)[1][0, 0] == 1000


# -- indexes for tens of millions of vectors ---------------------------------------------------
def clustered(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Gaussian clusters in an 8-d subspace plus noise, shaped like CNN features."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((8, dim))
    centers = rng.standard_normal((20, 8)) * 3
    z = centers[rng.integers(0, 20, n)] + rng.standard_normal((n, 8))
    return (z @ basis + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def ids_for(n: int) -> np.ndarray:
    return np.arange(1000, 1000 + n, dtype=np.int64)


PQ = IVFPQConfig(nlist=30, reduce_dim=64, pq_bytes=16, rerank_codec="SQfp16")


def test_auto_kind_moves_to_ivfpq_when_a_float16_copy_would_pass_4_gb():
    assert auto_kind(10_000, 1280) == "exact"
    assert auto_kind(1_000_000, 1280) == "ivf"
    assert auto_kind(IVF_MAX_FLOATS // 1280 + 1, 1280) == "ivfpq"


def test_ivfpq_at_full_nprobe_returns_the_exact_top_results(tmp_path):
    data = clustered(3020)
    x, queries = data[:3000], data[3000:]
    exact = build_index(x, ids_for(3000), kind="exact")
    index = build_index(x, ids_for(3000), kind="ivfpq", config=replace(PQ, nprobe=30, scratch_dir=str(tmp_path)))
    exact_scores, exact_ids = exact.search(queries, 10)
    scores, ids = index.search(queries, 10)
    np.testing.assert_allclose(scores, exact_scores, atol=2e-3)  # re-scored from float16 codes
    assert recall_at_k(ids, exact_ids) >= 0.98


def test_adding_vectors_to_ivfpq_finds_them_without_retraining(tmp_path):
    index = build_index(clustered(2000), ids_for(2000), kind="ivfpq", config=replace(PQ, scratch_dir=str(tmp_path)))
    nlist, nprobe = index.nlist, index.nprobe
    centroids = faiss.extract_index_ivf(index._probe).quantizer.reconstruct_n(0, nlist)
    new = clustered(30, seed=5) + 5.0
    new_ids = np.arange(50_000, 50_030, dtype=np.int64)
    index.add(new, new_ids)
    assert len(index) == 2030 and (index.nlist, index.nprobe) == (nlist, nprobe)
    np.testing.assert_array_equal(faiss.extract_index_ivf(index._probe).quantizer.reconstruct_n(0, nlist), centroids)
    assert index.search(new, 1)[1][:, 0].tolist() == new_ids.tolist()


def test_ivfpq_excludes_and_removes_by_the_callers_ids(tmp_path):
    x = clustered(1000)
    index = build_index(x, ids_for(1000), kind="ivfpq", config=replace(PQ, scratch_dir=str(tmp_path)))
    _, first = index.search(x[:5], 10)
    assert not np.isin(index.search(x[:5], 10, exclude_ids=first[:, :3])[1], first[:, :3]).any()
    assert index.remove(np.r_[first[:, 0], [-5]]) == len(np.unique(first[:, 0]))
    assert not np.isin(index.search(x[:5], 10)[1], first[:, 0]).any()
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], ids_for(1000)[-1:])


def test_ivfpq_saves_its_codes_beside_the_file_and_keeps_adding_after_load(tmp_path):
    x = clustered(1500)
    index = build_index(x, ids_for(1500), kind="ivfpq", config=replace(PQ, scratch_dir=str(tmp_path / "scratch")))
    path = tmp_path / "index" / "v0001.faiss"
    path.parent.mkdir()
    index.save(path)
    assert list((tmp_path / "scratch").iterdir()) == []  # the codes moved next to the index
    loaded = VectorIndex.load(path)
    np.testing.assert_array_equal(loaded.search(x[:10], 8)[1], index.search(x[:10], 8)[1])
    loaded.add(clustered(3, seed=9) + 5.0, [1, 2, 3])
    loaded.save(path)
    again = VectorIndex.load(path)
    assert len(again) == 1503 and again.search(clustered(3, seed=9) + 5.0, 1)[1].ravel().tolist() == [1, 2, 3]
    assert len(list(path.parent.glob("v0001.faiss.*.codes"))) == 1
    np.testing.assert_allclose(again.vectors([1003]), index.vectors([1003]))


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
