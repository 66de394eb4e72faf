import pytest
import torch
from skimage import data

from bgminer.backbone import Preprocess, create_backbone, load_backbone


def _top(backbone, image, k=3):
    x = Preprocess(backbone.preprocess)(torch.from_numpy(image).permute(2, 0, 1))
    with torch.inference_mode():
        probs = backbone.net(x[None]).softmax(-1)[0]
    return [backbone.class_names[i] for i in probs.topk(k).indices]


def test_pretrained_weights_recognise_a_cat():
    top3 = _top(load_backbone(), data.chelsea())
    assert any("cat" in name for name in top3), top3


def test_pretrained_weights_recognise_espresso():
    assert _top(load_backbone(), data.coffee(), k=1) == ["espresso"]


def test_split_trunk_matches_whole_network():
    bb = load_backbone()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        maps = bb.net.stem(x)
        assert tuple(maps.shape[1:]) == bb.map_shape
        pooled = bb.net.last_stage(maps)
        assert pooled.shape == (2, bb.feature_dim)
        torch.testing.assert_close(bb.net.classifier(pooled), bb.net(x))


def test_preprocess_shapes_any_image_to_crop():
    pp = Preprocess(load_backbone().preprocess)
    for h, w in [(30, 500), (600, 224), (224, 224)]:
        out = pp(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
        assert out.shape == (3, 224, 224)
        assert -1.0 <= out.min() and out.max() <= 1.0


def test_unknown_backbone_and_foreign_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg99")
    bad = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="does not match"):
        create_backbone("efficientnet_lite0", bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        create_backbone("efficientnet_lite0", garbage)


def test_resnet50_plugs_in_from_a_local_checkpoint(tmp_path):
    import torchvision

    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    bb = create_backbone("resnet50", path)
    with torch.inference_mode():
        pooled = bb.net.forward_features(torch.randn(1, 3, 224, 224))
    assert pooled.shape == (1, 2048) and len(bb.class_names) == 1000
