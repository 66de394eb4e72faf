"""Specification of the training-mode registry: each mode's spec is the one source of its defaults,
inputs and input path, and a query image, the exported network and the corpus scores agree in every mode."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from bgminer.backbone import Preprocess
from bgminer.feature_cache import FeatureCache
from bgminer.imageio import load_rgb, to_tensor_uint8
from bgminer.modes import MODES, get_mode
from bgminer.packaging import export_model, load_exported
from bgminer.project import Project
from bgminer.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
CATEGORY = "thing"


@pytest.fixture(scope="module", params=list(MODES))
def trained(request, tmp_path_factory, image_folder_module) -> Project:
    """A project of 12 small images with a model trained for a few steps in the mode under test."""
    project = Project.create(tmp_path_factory.mktemp(request.param) / "proj")
    project.ingest([image_folder_module])
    project.embed(batch_size=5, device="cpu")
    project.add_category(CATEGORY)
    images = sorted(image_folder_module.glob("*.png"))
    project.label_paths(CATEGORY, images[:3], "positive")
    project.label_paths(CATEGORY, images[3:5], "negative")
    config = TrainConfig(mode=request.param, batch_size=8, max_steps=2, lr=1e-2, device="cpu")
    record = project.train(CATEGORY, config)
    assert record.state == "ready" and record.mode == request.param
    return project


def decoded(project: Project, path: str) -> torch.Tensor:
    """An image decoded as the app and ``predict`` decode it: uint8 ``[3, H, W]``."""
    return to_tensor_uint8(load_rgb(path, draft_size=project.backbone.preprocess.resize))


def test_every_mode_is_one_complete_entry():
    assert list(MODES) == ["adapter", "last-stage", "full"]
    for name, spec in MODES.items():
        assert spec.name == name and spec.help and spec.score_batch > 0
        assert spec.input in ("pooled", "maps", "pixels")
    with pytest.raises(ValueError, match="choose one of adapter, last-stage, full"):
        get_mode("lora")


def test_float16_inputs_are_exactly_the_ones_the_feature_cache_stores_as_float16(tmp_path):
    cache = FeatureCache(tmp_path, feature_dim=8, num_classes=10, map_shape=(4, 2, 2))
    for spec in MODES.values():
        stored = cache.specs[spec.input].dtype if spec.input in cache.specs else "float32"  # pixels are never stored
        assert spec.float16_input == (stored == "float16"), spec.name


def test_train_config_takes_the_mode_defaults_it_is_not_given():
    for name, spec in MODES.items():
        config = TrainConfig(mode=name)
        assert {k: getattr(config, k) for k in asdict(spec.defaults)} == asdict(spec.defaults)
    assert TrainConfig(mode="full", epochs=3).epochs == 3


def test_the_cli_offers_exactly_the_registered_modes():
    done = subprocess.run(
        [sys.executable, "-m", "bgminer", "train", "--help"], capture_output=True, text=True, check=True, cwd=REPO, timeout=120
    )
    assert "{adapter,last-stage,full,auto}" in done.stdout


def test_query_embedding_of_a_corpus_image_matches_its_stored_version_embedding(trained):
    trained.wait_for_index()  # queries embed into the served index's space: the active version's once built
    record = trained.active_model(CATEGORY)
    version = trained.version_scores(CATEGORY)[1]
    paths = trained.store.image_paths(version.ids.tolist())
    stored = np.asarray(version.embeddings(), dtype=np.float32)  # float16 on disk
    for row, image_id in enumerate(version.ids[:4]):
        query = trained.embed_query(paths[int(image_id)])[0]
        scale = np.abs(stored[row]).max()
        assert np.abs(query - stored[row]).max() <= 2e-3 * scale + 1e-3, (record.mode, int(image_id))


def test_exported_model_embeds_and_scores_like_the_project(trained, tmp_path):
    record = trained.active_model(CATEGORY)
    exported = load_exported(export_model(trained, CATEGORY, tmp_path / "export").model)
    assert exported.metadata["model"]["stage_maps_float16"] == get_mode(record.mode).float16_input
    ids, scores = trained.scores(CATEGORY)
    paths = trained.store.image_paths(ids.tolist())
    images = [decoded(trained, paths[int(i)]) for i in ids]
    # The same float32 computation on both sides (maps rounded to float16 in last-stage mode on both): agreement to float32 noise.
    with torch.inference_mode():
        from_export = exported.module.embed(images[:4]).numpy()
    from_query = np.concatenate([trained.embed_query(paths[int(i)]) for i in ids[:4]])
    assert np.abs(from_export - from_query).max() < 1e-4, record.mode
    # Scores of the exported file on the corpus images are the app's scores.
    assert np.abs(exported.scores(images)[:, 0] - scores).max() < 1e-4, record.mode
    assert np.ptp(scores) > 0  # a trained model, not a constant


@pytest.mark.parametrize("trained", ["last-stage"], indirect=True)
def test_last_stage_query_embedding_rounds_stage_maps_like_the_cache(trained):
    spec, backbone = get_mode("last-stage"), trained.backbone
    model = trained.load_model()
    path = trained.store.image_paths(trained.store.image_ids()[:1])
    pixels = Preprocess(backbone.preprocess)(decoded(trained, next(iter(path.values()))))[None]
    with torch.inference_mode():
        maps = backbone.net.stem(pixels)
        rounded, unrounded = model.embed(maps.half().float()).numpy(), model.embed(maps).numpy()
    query = trained.embed_query(next(iter(path.values())))
    assert np.abs(rounded - unrounded).max() > 1e-4  # the rounding is visible at this tolerance ...
    np.testing.assert_allclose(query, rounded, atol=1e-6)  # ... and the query embedding has it
    assert spec.float16_input


def test_the_trunk_learns_at_the_modes_fraction_of_the_heads_rate():
    from bgminer.backbone import load_backbone
    from bgminer.model import build_model
    from bgminer.train import _param_groups

    backbone = load_backbone()
    for name in MODES:
        config = TrainConfig(mode=name, lr=1e-3)
        model = build_model(name, backbone, ["a"])
        groups = _param_groups(model, config)
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
        trunk = {id(p) for p in model.trunk.parameters()}
        for group in groups:
            in_trunk = {id(p) in trunk for p in group["params"]}
            expected = 1e-3 * get_mode(name).trunk_lr_scale if in_trunk == {True} else 1e-3
            assert group["lr"] == pytest.approx(expected), name
    assert get_mode("full").trunk_lr_scale == 0.1 and get_mode("adapter").trunk_lr_scale == 1.0


def test_a_first_full_mode_round_starts_from_the_latest_last_stage_model(tmp_path, image_folder):
    from bgminer.model import build_model
    from bgminer.modes import _full_from_last_stage

    project = Project.create(tmp_path / "proj")
    project.ingest([image_folder])
    project.embed(batch_size=5, device="cpu")
    for name in (CATEGORY, "other"):
        project.add_category(name)
    images = sorted(image_folder.glob("*.png"))
    project.label_paths(CATEGORY, images[:3], "positive")
    project.label_paths("other", images[3:5], "positive")
    stage = project.train(CATEGORY, TrainConfig(mode="last-stage", batch_size=8, max_steps=1, device="cpu"))
    source = project.load_model(stage.id)
    warm = _full_from_last_stage(build_model("full", project.backbone, [CATEGORY]), source)
    for got, want in ((warm.trunk[1], source.trunk), (warm.main_head, source.main_head), (warm.aux_head, source.aux_head)):
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
    assert all(torch.equal(warm.trunk[0].state_dict()[k], v) for k, v in project.backbone.net.stem.state_dict().items())
    with pytest.raises(ValueError, match="only from a last-stage model"):
        _full_from_last_stage(warm, warm)

    # Through a round: two categories, the source knew one; the other starts at zero like a fresh head.
    full = project.train([CATEGORY, "other"], TrainConfig(mode="full", batch_size=4, max_steps=1, device="cpu"))
    assert full.state == "ready" and full.mode == "full" and full.parent_id == stage.id
    again = project.train([CATEGORY, "other"], TrainConfig(mode="full", batch_size=4, max_steps=1, device="cpu"))
    assert again.parent_id == full.id  # later full rounds continue from full mode's own latest version
    cold = project.train(CATEGORY, TrainConfig(mode="full", batch_size=4, max_steps=1, device="cpu", warm_start=False))
    assert cold.parent_id is None
