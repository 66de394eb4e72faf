"""Specification of a training round: the training set, the two-headed loss, determinism, cancel, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgminer.backbone import Backbone, load_backbone
from bgminer.model import build_model
from bgminer.progress import Cancelled, CancelToken
from bgminer.scoring import score
from bgminer.train import TrainConfig, TrainingSet, build_training_set, train


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone()


@pytest.fixture(scope="module")
def corpus(backbone) -> dict:
    """1200 images' cached features and ImageNet logits (row 0 unused); rows 1..60 hold a rare class.

    Background features are non-negative noise; the rare class adds a fixed pattern on 40 dimensions.
    """
    rng = np.random.default_rng(0)
    cap = 1201
    features = rng.gamma(1.0, 0.4, size=(cap, 1280)).astype(np.float32)
    pattern = np.zeros(1280, dtype=np.float32)
    pattern[rng.choice(1280, 40, replace=False)] = 1.0
    positives = np.arange(1, 61)
    features[positives] += pattern
    with torch.no_grad():
        logits = backbone.classifier(torch.from_numpy(features)).numpy().astype(np.float16)
    return {"features": features, "logits": logits, "ids": np.arange(1, cap), "positives": positives}


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP of a ranking by descending score; ties keep the given order."""
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order].astype(np.float64)
    precision_at_hit = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at_hit * hits).sum() / hits.sum())


def round_inputs(corpus: dict, config: TrainConfig, n_labeled: int = 12) -> TrainingSet:
    labels = {0: {int(i): "positive" for i in corpus["positives"][:n_labeled]}}
    return build_training_set(corpus["features"], labels, corpus["ids"], corpus["logits"], config)


def tiny_set(corpus: dict, main_labels: list[int]) -> TrainingSet:
    rows = np.arange(1, len(main_labels) + 1, dtype=np.int64)
    return TrainingSet(
        inputs=corpus["features"],
        row_ids=rows,
        main_labels=np.array(main_labels, dtype=np.int64),
        aux_targets=corpus["logits"][rows].astype(np.float32).argmax(1),
    )


def test_training_set_holds_positives_negatives_and_sampled_background(corpus):
    config = TrainConfig(background_ratio=10, min_background=50)
    labels = {0: {1: "positive", 2: "positive", 500: "negative"}, 1: {3: "positive", 501: "negative"}}
    ts = build_training_set(corpus["features"], labels, corpus["ids"], corpus["logits"], config)
    by_row = dict(zip(ts.row_ids.tolist(), ts.main_labels.tolist(), strict=True))
    assert (by_row[1], by_row[2], by_row[3], by_row[500], by_row[501]) == (1, 1, 2, 0, 0)
    background = set(ts.row_ids.tolist()) - {1, 2, 3, 500, 501}
    assert len(background) == 50  # max(min_background, 10 x 3 positives)
    assert all(by_row[r] == 0 for r in background)
    assert len(ts) == len(set(ts.row_ids.tolist()))
    expected_aux = corpus["logits"][ts.row_ids].astype(np.float32).argmax(1)
    assert np.array_equal(ts.aux_targets, expected_aux)


def test_background_sample_scales_with_positives_and_is_seeded(corpus):
    labels = {0: {int(i): 1 for i in range(1, 31)}}
    config = TrainConfig(background_ratio=10, min_background=50, seed=3)
    a = build_training_set(corpus["features"], labels, corpus["ids"], corpus["logits"], config)
    b = build_training_set(corpus["features"], labels, corpus["ids"], corpus["logits"], config)
    c = build_training_set(
        corpus["features"], labels, corpus["ids"], corpus["logits"], TrainConfig(background_ratio=10, min_background=50, seed=4)
    )
    assert len(a) == 30 + 300
    assert np.array_equal(a.row_ids, b.row_ids)
    assert not np.array_equal(a.row_ids, c.row_ids)


def test_a_small_corpus_uses_every_unlabeled_image_as_background(corpus):
    labels = {0: {1: "positive", 2: "negative"}}
    ts = build_training_set(corpus["features"], labels, np.arange(1, 21), corpus["logits"], TrainConfig(min_background=200))
    assert sorted(ts.row_ids.tolist()) == list(range(1, 21))


def test_an_image_positive_for_two_categories_appears_once_per_category(corpus):
    labels = {0: {7: "positive"}, 1: {7: "positive"}}
    ts = build_training_set(corpus["features"], labels, corpus["ids"], corpus["logits"], TrainConfig(min_background=10))
    assert sorted(ts.main_labels[ts.row_ids == 7].tolist()) == [1, 2]


def test_positives_on_images_without_inputs_do_not_count(corpus):
    labels = {0: {5000: "positive", 1: "negative"}}
    with pytest.raises(ValueError, match="at least one positive"):
        build_training_set(corpus["features"], labels, corpus["ids"], corpus["logits"], TrainConfig())


def test_soft_aux_keeps_the_pretrained_logits_as_targets(corpus):
    ts = round_inputs(corpus, TrainConfig(soft_aux=True))
    assert np.allclose(ts.aux_soft, corpus["logits"][ts.row_ids].astype(np.float32))


def test_soft_aux_distills_the_pretrained_probabilities(backbone, corpus):
    config = TrainConfig(soft_aux=True, max_steps=3)
    result = train(build_model("adapter", backbone, ["rare"]), round_inputs(corpus, config), config)
    hard = train(build_model("adapter", backbone, ["rare"]), round_inputs(corpus, config), TrainConfig(max_steps=3))
    assert result.epochs[0].aux > hard.epochs[0].aux  # soft targets keep the pretrained entropy in the loss


def test_soft_aux_without_pretrained_logits_is_an_error(backbone, corpus):
    with pytest.raises(ValueError, match="soft_aux"):
        train(build_model("adapter", backbone, ["rare"]), tiny_set(corpus, [1, 0]), TrainConfig(soft_aux=True))


def test_training_raises_average_precision_on_unlabeled_images(backbone, corpus):
    config = TrainConfig(seed=0)
    ts = round_inputs(corpus, config)
    model = build_model("adapter", backbone, ["rare"])
    held_out = np.random.default_rng(0).permutation(np.setdiff1d(corpus["ids"], corpus["positives"][:12]))
    relevant = np.isin(held_out, corpus["positives"])

    _, before = score(model, corpus["features"], held_out)
    result = train(model, ts, config)
    _, after = score(result.model, corpus["features"], held_out)

    ap_before = average_precision(before[:, 0], relevant)
    ap_after = average_precision(after[:, 0], relevant)
    assert ap_after > 0.9 > ap_before


def test_same_seed_gives_identical_weights(backbone, corpus):
    config = TrainConfig(seed=7, pos_fraction=0.3, max_steps=8)
    ts = round_inputs(corpus, config)
    model = build_model("adapter", backbone, ["rare"])
    a = train(model, ts, config).model.state_dict()
    b = train(model, ts, config).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_leaves_the_given_model_untouched(backbone, corpus):
    model = build_model("adapter", backbone, ["rare"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, tiny_set(corpus, [1, 0, 0, 0]), TrainConfig(max_steps=2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(result.model.main_head.weight, model.main_head.weight)


def test_without_aux_weight_the_aux_head_gets_no_gradient(backbone, corpus):
    model = build_model("adapter", backbone, ["rare"])
    config = TrainConfig(aux_weight=0.0, weight_decay=0.0, max_steps=3)
    trained = train(model, tiny_set(corpus, [1, 0, 0, 0, 1, 0]), config).model
    assert torch.equal(trained.aux_head.weight, model.aux_head.weight)
    assert not torch.equal(trained.main_head.weight, model.main_head.weight)


def test_rows_without_a_main_label_only_train_the_aux_head(backbone, corpus):
    model = build_model("adapter", backbone, ["rare"])
    config = TrainConfig(weight_decay=0.0, max_steps=3)
    result = train(model, tiny_set(corpus, [-1, -1, -1, -1]), config)
    assert torch.equal(result.model.main_head.weight, model.main_head.weight)
    assert not torch.equal(result.model.aux_head.weight, model.aux_head.weight)
    assert result.epochs[0].main == 0.0 and result.epochs[0].aux > 0.0


def test_uniform_sampling_visits_every_row_once_per_epoch(backbone, corpus):
    seen: list[int] = []

    def load(ids: np.ndarray, train: bool) -> torch.Tensor:
        seen.extend(ids.tolist())
        return torch.from_numpy(corpus["features"][ids])

    ts = tiny_set(corpus, [1] * 5 + [0] * 45)
    ts.inputs = load
    train(build_model("adapter", backbone, ["rare"]), ts, TrainConfig(epochs=2, batch_size=16, min_steps=0))
    assert sorted(seen) == sorted(ts.row_ids.tolist() * 2)


def test_pos_fraction_oversamples_positives_in_batches(backbone, corpus):
    seen: list[int] = []

    def load(ids: np.ndarray, train: bool) -> torch.Tensor:
        seen.extend(ids.tolist())
        return torch.from_numpy(corpus["features"][ids])

    ts = tiny_set(corpus, [1] * 5 + [0] * 95)
    ts.inputs = load
    train(build_model("adapter", backbone, ["rare"]), ts, TrainConfig(epochs=4, batch_size=50, pos_fraction=0.5, min_steps=0))
    share = np.isin(seen, np.arange(1, 6)).mean()
    assert 0.4 < share < 0.6


def test_progress_reaches_the_last_step(backbone, corpus):
    calls: list[tuple[int, int]] = []
    result = train(
        build_model("adapter", backbone, ["rare"]),
        tiny_set(corpus, [1, 0] * 20),
        TrainConfig(epochs=3, batch_size=8, min_steps=0),
        progress=lambda done, total, message="": calls.append((done, total)),
    )
    assert result.steps == 15 and len(result.epochs) == 3
    assert calls[-1] == (15, 15)


def test_cancel_raises_and_leaves_the_given_model_usable(backbone, corpus):
    model = build_model("adapter", backbone, ["rare"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    token = CancelToken()
    with pytest.raises(Cancelled):
        train(model, tiny_set(corpus, [1, 0] * 20), TrainConfig(batch_size=4), progress=lambda *a: token.cancel(), cancel=token)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, scores = score(model, corpus["features"], corpus["ids"][:10])
    assert np.isfinite(scores).all()


def test_last_stage_training_runs_with_frozen_batchnorm_statistics(backbone):
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((9, 192, 7, 7)).astype(np.float16)
    model = build_model("last-stage", backbone, ["rare"])
    ts = TrainingSet(maps, np.arange(1, 9), np.array([1, 0] * 4), rng.integers(0, 1000, 8))
    result = train(model, ts, TrainConfig(mode="last-stage", batch_size=4, max_steps=2))
    bn_key = next(k for k in model.state_dict() if k.endswith("running_mean"))
    assert torch.equal(result.model.state_dict()[bn_key], model.state_dict()[bn_key])
    assert not torch.equal(result.model.main_head.weight, model.main_head.weight)
    embeddings, scores = score(result.model, maps, np.arange(1, 9), batch_size=3)
    assert embeddings.shape == (8, 1280) and scores.shape == (8, 1)


def test_full_mode_trains_end_to_end_on_augmented_pixels(backbone):
    calls: list[bool] = []

    def load(ids: np.ndarray, train: bool) -> torch.Tensor:
        calls.append(train)
        g = torch.Generator().manual_seed(int(ids.sum()))
        return torch.rand(len(ids), 3, 32, 32, generator=g) * 2 - 1

    model = build_model("full", backbone, ["rare"])
    ts = TrainingSet(load, np.arange(1, 5), np.array([1, 0, 0, 0]), np.array([5, 6, 7, 8]))
    result = train(model, ts, TrainConfig(mode="full", batch_size=4, max_steps=1))
    first_conv = next(model.trunk.parameters())
    assert not torch.equal(next(result.model.trunk.parameters()), first_conv)
    score(result.model, load, np.arange(1, 5))
    assert calls == [True, False]


def test_scoring_streams_in_chunks_with_the_same_result(backbone, corpus):
    model = build_model("adapter", backbone, ["rare", "other"])
    ids = corpus["ids"][::7]
    emb_small, scores_small = score(model, corpus["features"], ids, batch_size=13)
    emb_big, scores_big = score(model, corpus["features"], ids, batch_size=4096)
    assert emb_small.dtype == np.float32 and scores_small.shape == (len(ids), 2)
    assert np.allclose(emb_small, emb_big) and np.allclose(scores_small, scores_big)
    assert np.array_equal(emb_big, corpus["features"][ids])  # the untrained adapter is the identity


def test_config_fills_mode_defaults_and_mismatched_modes_are_refused(backbone, corpus):
    config = TrainConfig(mode="full")
    assert (config.epochs, config.batch_size, config.lr, config.min_background) == (10, 64, 1e-3, 2000)
    with pytest.raises(ValueError, match="does not match"):
        train(build_model("adapter", backbone, ["rare"]), tiny_set(corpus, [1, 0]), config)
