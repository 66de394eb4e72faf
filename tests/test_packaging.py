"""Specification of a packaged model: the self-contained classifier file, its metadata, loading
it safely, and ``predict`` without a project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from exported import CATEGORY, app_scores
from PIL import Image

from bgminer.packaging import load_exported, predict

REPO = Path(__file__).resolve().parent.parent


def test_predict_in_a_fresh_process_agrees_with_the_app_scores(trained, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    inputs = [trained.images / "discs", *trained.negatives]  # a folder and single files
    command = [
        sys.executable,
        "-m",
        "bgminer",
        "predict",
        str(trained.export.model),
        *map(str, inputs),
        "--json",
        "--batch-size",
        "5",
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["categories"] == [CATEGORY]
    predicted = {str(Path(p["path"]).resolve()): p["scores"][CATEGORY] for p in out["predictions"]}
    expected = app_scores(trained.project)
    assert len(predicted) == 13 and predicted.keys() <= expected.keys()
    worst = max(abs(score - expected[p]) for p, score in predicted.items())
    assert worst < 1e-4
    assert np.ptp(list(predicted.values())) > 0.1  # a trained model, not a constant one


def test_metadata_describes_the_model_and_is_embedded_in_the_file(trained):
    meta = json.loads(trained.export.metadata.read_text())
    project = trained.project
    record = project.store.active_model(CATEGORY)
    bb = project.backbone
    assert meta["format"] == "bgminer-export" and meta["format_version"] == 1
    assert meta["categories"] == [CATEGORY]
    assert meta["input"]["resize"] == bb.preprocess.resize and meta["input"]["crop"] == bb.preprocess.crop
    assert meta["input"]["mean"] == list(bb.preprocess.mean) and meta["input"]["std"] == list(bb.preprocess.std)
    assert meta["backbone"] == {"name": bb.name, "weights_sha256": bb.weights_sha256, "feature_dim": bb.feature_dim}
    model = meta["model"]
    assert model["version"] == record.id and model["mode"] == "adapter" and model["config"]["epochs"] == 8
    assert model["label_counts"] == {CATEGORY: {"positive": 4, "negative": 3}}
    assert model["metrics"] == record.metrics and model["metrics"]
    assert meta["created_at"] and meta["bgminer_version"]
    assert load_exported(trained.export.model).metadata == meta


def test_exported_model_has_only_the_main_head(trained):
    exported = load_exported(trained.export.model)
    shapes = [tuple(p.shape) for p in exported.module.parameters()]
    state = torch.load(trained.export.state_dict, map_location="cpu", weights_only=True)
    assert not any(1000 in s for s in shapes)
    assert not any(1000 in v.shape for v in state.values())
    images = [torch.randint(0, 256, (3, 90, 300), dtype=torch.uint8), torch.randint(0, 256, (3, 400, 260), dtype=torch.uint8)]
    assert exported.scores(images).shape == (2, 1)


def test_plain_state_dict_matches_the_scripted_weights(trained):
    state = torch.load(trained.export.state_dict, map_location="cpu", weights_only=True)
    scripted = dict(load_exported(trained.export.model).module.network.named_parameters())
    assert set(scripted) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in scripted.items())


def _truncated(src: Path, dest: Path) -> None:
    dest.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _bit_flipped(src: Path, dest: Path) -> None:
    data = bytearray(src.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    dest.write_bytes(bytes(data))


def _plain_torch_file(src: Path, dest: Path) -> None:
    torch.save({"weight": torch.zeros(4, 4)}, dest)


def _other_torchscript(src: Path, dest: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated; still what other tools ship
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(dest))


def _text_file(src: Path, dest: Path) -> None:
    dest.write_text("not a model\n")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_truncated, "damaged model file"),
        (_bit_flipped, "damaged model file"),
        (_plain_torch_file, "not a bgminer model export"),
        (_other_torchscript, "not a bgminer model export"),
        (_text_file, "not a bgminer model export"),
    ],
)
def test_loading_a_file_that_is_not_an_intact_export_fails_clearly(trained, tmp_path, make, message):
    bad = tmp_path / "model.ts"
    make(trained.export.model, bad)
    with pytest.raises(ValueError, match=message):
        load_exported(bad)


def test_predict_reports_undecodable_files_and_scores_the_rest(trained, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(trained.positives[0], folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
    skipped: list[tuple[str, str]] = []
    results = predict(trained.export.model, [folder], on_skip=lambda p, reason: skipped.append((Path(p).name, reason)))
    assert [Path(p).name for p, _ in results] == ["good.png"]
    assert [name for name, _ in skipped] == ["broken.jpg"]


def test_predict_walks_folders_as_ingest_does(trained, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    shutil.copy(trained.positives[0], folder / "b.png")
    shutil.copy(trained.positives[1], folder / "sub" / "a.png")
    shutil.copy(trained.positives[2], folder / ".hidden" / "c.png")
    shutil.copy(trained.positives[3], folder / ".d.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    skipped: list[tuple[str, str]] = []
    results = predict(trained.export.model, [folder], on_skip=lambda p, reason: skipped.append((Path(p).name, reason)))
    assert [Path(p).relative_to(folder).as_posix() for p, _ in results] == ["b.png", "sub/a.png"]
    assert [(name, reason.split(":")[0]) for name, reason in skipped] == [("phone.heic", "unsupported_format")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exported_model_runs_on_cuda(trained):
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).contiguous() for p in trained.positives]
    on_cpu = load_exported(trained.export.model).scores(images)
    on_gpu = load_exported(trained.export.model, device="cuda")
    assert on_gpu.device.type == "cuda"
    assert np.abs(on_gpu.scores(images) - on_cpu).max() < 1e-3
