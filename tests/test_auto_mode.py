"""Specification of mode="auto": on CUDA a round retrains the last stage once its categories have
enough positives, else the adapter; on a CPU it stays the adapter. The device is passed explicitly
(the test machine has no CUDA), so every branch runs here."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from bgminer.backbone import load_backbone
from bgminer.model import build_model
from bgminer.modes import AUTO_LAST_STAGE_MIN_POSITIVES, AUTO_MODE, MODES, resolve_mode
from bgminer.train import TrainConfig, TrainingSet, train

N = AUTO_LAST_STAGE_MIN_POSITIVES


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_auto_on_cuda_retrains_the_last_stage_from_the_threshold_on(device):
    assert resolve_mode(AUTO_MODE, device, 0) == "adapter"
    assert resolve_mode(AUTO_MODE, device, N - 1) == "adapter"
    assert resolve_mode(AUTO_MODE, device, N) == "last-stage"
    assert resolve_mode(AUTO_MODE, device, 10 * N) == "last-stage"


def test_auto_on_cpu_stays_the_adapter_however_many_positives():
    for positives in (0, 1, N - 1, N, 100 * N):
        assert resolve_mode(AUTO_MODE, "cpu", positives) == "adapter"


def test_auto_device_asks_the_machine():
    import torch

    expected = "last-stage" if torch.cuda.is_available() else "adapter"
    assert resolve_mode(AUTO_MODE, "auto", N) == expected
    assert resolve_mode(AUTO_MODE, "auto", N - 1) == "adapter"


def test_a_registered_mode_is_kept_whatever_the_device_and_an_unknown_one_refused():
    for name in MODES:
        for device in ("cpu", "cuda", "auto"):
            assert resolve_mode(name, device, 0) == name
            assert resolve_mode(name, device, 10 * N) == name
    with pytest.raises(ValueError, match="unknown training mode 'lora'"):
        resolve_mode("lora", "cuda", N)
    assert N > 0


def test_an_auto_config_takes_the_picked_modes_defaults_and_keeps_what_it_was_given():
    config = TrainConfig(mode=AUTO_MODE, device="cuda", epochs=7, seed=3)
    assert config.batch_size is None and config.lr is None  # nothing decided before the mode is
    last = config.resolved(N)
    assert last.mode == "last-stage" and last.epochs == 7 and last.seed == 3 and last.device == "cuda"
    defaults = asdict(MODES["last-stage"].defaults)
    assert {k: getattr(last, k) for k in defaults if k != "epochs"} == {k: v for k, v in defaults.items() if k != "epochs"}
    adapter = config.resolved(N - 1)
    assert adapter.mode == "adapter" and adapter.lr == MODES["adapter"].defaults.lr and adapter.epochs == 7
    on_cpu = TrainConfig(mode=AUTO_MODE, device="cpu").resolved(10 * N)
    assert on_cpu.mode == "adapter" and asdict(on_cpu) == asdict(TrainConfig(mode="adapter", device="cpu"))
    fixed = TrainConfig(mode="full", device="cuda")
    assert fixed.resolved(10 * N) is fixed


def test_train_resolves_an_auto_config_from_its_training_set():
    """On CPU an auto config trains an adapter model; a last-stage model is refused with a clear mismatch."""
    bb = load_backbone()
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(40, bb.feature_dim)).astype(np.float32)
    ts = TrainingSet(
        inputs=inputs,
        row_ids=np.arange(40),
        main_labels=np.array([1] * 5 + [0] * 35),
        aux_targets=rng.integers(0, 1000, 40),
    )
    config = TrainConfig(mode=AUTO_MODE, device="cpu", max_steps=2, batch_size=8)
    result = train(build_model("adapter", bb, ["thing"]), ts, config)
    assert result.steps == 2
    with pytest.raises(ValueError, match="config mode 'adapter' does not match model mode 'last-stage'"):
        train(build_model("last-stage", bb, ["thing"]), ts, config)
