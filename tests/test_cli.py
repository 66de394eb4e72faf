"""Specification of the command line's shape: light commands start without torch, and every
export sub-command answers --json with one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from exported import CATEGORY

from bgminer.cli import _print_progress
from bgminer.cli import main as cli
from bgminer.project import Project

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm", "faiss", "pandas", "pyarrow")


def test_info_imports_no_heavy_module(tmp_path):
    Project.create(tmp_path / "project")
    code = (
        "import json, sys\n"
        "from bgminer.cli import main\n"
        "rc = main(['info', sys.argv[1], '--json'])\n"
        "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "project")], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    info, report = (json.loads(line) for line in done.stdout.splitlines())
    assert report["rc"] == 0 and info["images"] == 0
    loaded = {name.split(".")[0] for name in report["modules"]}
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_every_export_command_answers_json_with_one_object(trained, tmp_path, capsys):
    root = str(trained.project.root)
    commands = [
        ["export", root, "--category", CATEGORY, "--out", str(tmp_path / "model")],
        ["predict", str(tmp_path / "model"), str(trained.positives[0])],
        ["export-labels", root, "--out", str(tmp_path / "labels.csv")],
        ["import-labels", root, str(tmp_path / "labels.csv")],
        ["export-scores", root, "--out", str(tmp_path / "scores.parquet")],
        ["export-folders", root, "--out", str(tmp_path / "tree")],
    ]
    answers = []
    for command in commands:
        assert cli([*command, "--json"]) == 0, command
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1, command
        answers.append(json.loads(lines[0]))
    exported, predicted, labels, imported, scores, tree = answers
    assert exported["categories"] == [CATEGORY] and Path(exported["model"]).is_file()
    assert [p["path"] for p in predicted["predictions"]] == [str(trained.positives[0])]
    assert labels["rows"] == 7 and (imported["imported"], imported["unchanged"]) == (0, 7)
    assert scores["rows"] == 40 and tree["counts"] == {CATEGORY: 4}


def test_the_progress_line_names_the_counts_once(capsys):
    _print_progress(3, 5, "scoring")
    _print_progress(5, 5, "5/5 images, 9.0 images/s, ETA 0 s")
    err = capsys.readouterr().err
    assert "scoring 3/5" in err and err.count("5/5") == 1 and err.endswith("\n")


def test_init_takes_a_registered_backbone_and_refuses_an_unknown_one(tmp_path, capsys):
    assert cli(["init", str(tmp_path / "lite2"), "--backbone", "efficientnet_lite2"]) == 0
    assert Project(tmp_path / "lite2").backbone_name == "efficientnet_lite2"
    assert cli(["init", str(tmp_path / "typo"), "--backbone", "efficientnet_lite9"]) == 2
    assert "unknown backbone 'efficientnet_lite9'" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
