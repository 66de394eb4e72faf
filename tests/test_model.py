"""Specification of the background-splitting model: heads, step-0 behaviour per mode, checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bgminer.backbone import Backbone, load_backbone
from bgminer.model import build_model, checkpoint_metadata, grow_categories, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone()


def random_features(n: int, seed: int = 0) -> torch.Tensor:
    """Non-negative features shaped like pooled ReLU6 activations."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1280, generator=g) * 2.0


def random_maps(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 192, 7, 7, generator=g)


def test_aux_head_starts_as_a_trainable_copy_of_the_imagenet_classifier(backbone):
    model = build_model("adapter", backbone, ["cat"])
    assert torch.equal(model.aux_head.weight, backbone.classifier.weight)
    assert torch.equal(model.aux_head.bias, backbone.classifier.bias)
    assert model.aux_head.weight.data_ptr() != backbone.classifier.weight.data_ptr()
    assert all(p.requires_grad for p in model.parameters())


def test_main_head_has_background_plus_one_output_per_category(backbone):
    model = build_model("adapter", backbone, ["cat", "dog", "boat"])
    main, aux = model(random_features(4))
    assert main.shape == (4, 4)
    assert aux.shape == (4, 1000)
    assert model.categories == ["cat", "dog", "boat"]
    assert model.mode == "adapter"


def test_a_fresh_adapter_model_is_the_same_whatever_ran_before(backbone):
    """A round's starting weights must not depend on torch's global random state (benchmarks and
    rounds are reproducible from their seed alone)."""
    first = build_model("adapter", backbone, ["cat"])
    torch.rand(1000)  # anything else drawing from the global generator in between
    second = build_model("adapter", backbone, ["cat"])
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    bound = 1.0 / 1280**0.5  # nn.Linear's own initial range
    assert 0.9 * bound < first.trunk.fc1.weight.abs().max() <= bound


def test_adapter_reproduces_pretrained_logits_and_features_at_step_0(backbone):
    model = build_model("adapter", backbone, ["cat"])
    x = random_features(16)
    with torch.no_grad():
        assert torch.equal(model.embed(x), x)
        assert torch.allclose(model(x)[1], backbone.classifier(x), atol=1e-5)


def test_last_stage_reproduces_pretrained_logits_at_step_0(backbone):
    model = build_model("last-stage", backbone, ["cat"])
    maps = random_maps(4)
    with torch.no_grad():
        expected = backbone.net.classifier(backbone.net.last_stage(maps))
        assert torch.allclose(model(maps)[1], expected, atol=1e-4)


def test_full_mode_reproduces_pretrained_logits_at_step_0(backbone):
    model = build_model("full", backbone, ["cat"])
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(pixels)[1], backbone.net(pixels), atol=1e-4)


def test_batchnorm_statistics_stay_frozen_in_train_mode(backbone):
    model = build_model("last-stage", backbone, ["cat"]).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    maps = random_maps(4)
    with torch.no_grad():
        out = model(maps)[1]
        expected = backbone.net.classifier(backbone.net.last_stage(maps))
    assert model.training and not bn.training
    assert torch.equal(bn.running_mean, before)
    assert torch.allclose(out, expected, atol=1e-4)


def test_scores_are_category_probabilities_with_background_dropped(backbone):
    model = build_model("adapter", backbone, ["cat", "dog"])
    with torch.no_grad():
        model.main_head.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
        s = model.scores(random_features(3))
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), dim=0)[1:]
    assert s.shape == (3, 2)
    assert torch.allclose(s, expected.expand(3, 2), atol=1e-6)


def test_fixed_background_logit_replaces_the_learned_background_output(backbone):
    model = build_model("adapter", backbone, ["cat"], fixed_background_logit=2.5)
    with torch.no_grad():
        model.main_head.bias.fill_(7.0)
    x = random_features(5)
    main, _ = model(x)
    assert torch.equal(main[:, 0], torch.full((5,), 2.5))
    main[:, 0].sum().backward()
    assert model.main_head.weight.grad is None or not model.main_head.weight.grad.any()


def test_unknown_mode_is_rejected(backbone):
    with pytest.raises(ValueError, match="unknown training mode"):
        build_model("lora", backbone, ["cat"])


def test_grow_categories_keeps_known_rows_and_starts_new_ones_at_zero(backbone):
    model = build_model("adapter", backbone, ["cat", "dog"])
    with torch.no_grad():
        model.main_head.weight.copy_(torch.arange(3).float().view(3, 1).expand(3, 1280))
        model.main_head.bias.copy_(torch.tensor([10.0, 11.0, 12.0]))
    grown = grow_categories(model, ["dog", "cat", "boat"])
    assert grown.categories == ["dog", "cat", "boat"]
    assert grown.main_head.bias.tolist() == [10.0, 12.0, 11.0, 0.0]
    assert grown.main_head.weight[:, 0].tolist() == [0.0, 2.0, 1.0, 0.0]
    assert model.categories == ["cat", "dog"] and model.main_head.out_features == 3
    assert torch.equal(grown.aux_head.weight, model.aux_head.weight)


def test_checkpoint_round_trip_restores_weights_and_metadata(backbone, tmp_path):
    model = build_model("adapter", backbone, ["cat", "dog"], fixed_background_logit=1.0, adapter_hidden=64)
    with torch.no_grad():
        model.trunk.fc2.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.main_head.bias.copy_(torch.tensor([0.5, -0.5, 0.25]))
    path = save_checkpoint(model, tmp_path / "models" / "v1.pt", {"round": 3, "metrics": {"ap": 0.5}})

    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["state_dict"], dict)
    loaded = load_checkpoint(path, backbone)
    assert (loaded.mode, loaded.categories, loaded.fixed_background_logit, loaded.adapter_hidden) == (
        "adapter",
        ["cat", "dog"],
        1.0,
        64,
    )
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = random_features(4)
    with torch.no_grad():
        assert torch.equal(loaded.scores(x), model.scores(x))
    meta = checkpoint_metadata(path)
    assert meta["extra"] == {"round": 3, "metrics": {"ap": 0.5}}
    assert meta["backbone"] == backbone.name and meta["embedding_dim"] == 1280


def test_saving_leaves_no_temporary_files_and_replaces_an_existing_checkpoint(backbone, tmp_path):
    path = tmp_path / "v1.pt"
    save_checkpoint(build_model("adapter", backbone, ["cat"]), path, {})
    save_checkpoint(build_model("adapter", backbone, ["cat", "dog"]), path, {})
    assert [p.name for p in tmp_path.iterdir()] == ["v1.pt"]
    assert load_checkpoint(path, backbone).categories == ["cat", "dog"]


def test_a_file_that_is_not_a_bgminer_checkpoint_is_rejected(backbone, tmp_path):
    state_dict = tmp_path / "plain.pt"
    torch.save(backbone.classifier.state_dict(), state_dict)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    for path in (state_dict, text):
        with pytest.raises(ValueError, match="not a bgminer checkpoint"):
            load_checkpoint(path, backbone)


def test_a_checkpoint_only_loads_on_the_backbone_it_was_trained_on(backbone, tmp_path):
    path = save_checkpoint(build_model("adapter", backbone, ["cat"]), tmp_path / "v1.pt", {})
    other = dataclasses.replace(backbone, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="trained on backbone"):
        load_checkpoint(path, other)
