"""discene-eval's argument and output checks: made before the evaluation, one error line, rc 2, inputs kept."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from training import evaluate
from training.synth import generate

SHIPPED = Path(__file__).resolve().parents[1] / "discene_ros" / "data" / "lite_distilled.pt"


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    """Two one-frame scenes at 64x48: one val frame to evaluate."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, scenes=2, frames_per_scene=1, seed=3, width=64, height=48, progress=False)
    return root


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    shutil.copyfile(SHIPPED, path)
    return path


def _eval(checkpoint: Path, eval_root: Path, *extra: str) -> int:
    return evaluate.main(["--checkpoint", str(checkpoint), "--data", str(eval_root), "--split", "val", *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("discene-eval: error: ") and err.count("\n") == 1, err
    return err


def test_json_that_is_an_input_is_refused(checkpoint, eval_root, capsys):
    before = checkpoint.read_bytes()
    assert _eval(checkpoint, eval_root, "--json", str(checkpoint)) == 2
    assert "is the input --checkpoint" in _error_line(capsys)
    assert checkpoint.read_bytes() == before
    split_list = eval_root / "val_subscenes.txt"
    listed = split_list.read_bytes()
    assert _eval(checkpoint, eval_root, "--json", str(split_list)) == 2
    assert "is the input --split" in _error_line(capsys) and split_list.read_bytes() == listed


@pytest.mark.parametrize("where", ["folder", "under_a_file", "proc"])
def test_unwritable_json_is_refused_before_evaluating(checkpoint, eval_root, capsys, monkeypatch, where):
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before the check"))
    target = {"folder": checkpoint.parent, "under_a_file": checkpoint / "x.json", "proc": Path("/proc/x.json")}[where]
    assert _eval(checkpoint, eval_root, "--json", str(target)) == 2
    assert f"--json {target}" in _error_line(capsys)


def test_json_folder_is_created(checkpoint, eval_root, tmp_path):
    out = tmp_path / "new" / "metrics.json"
    assert _eval(checkpoint, eval_root, "--json", str(out)) == 0
    assert json.loads(out.read_text())["frames"] == 1


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_frames_below_one_is_an_error(checkpoint, eval_root, capsys, value):
    assert _eval(checkpoint, eval_root, "--max-frames", value) == 2
    assert "--max-frames must be at least 1" in _error_line(capsys)


def test_unavailable_cuda_device_is_an_error(checkpoint, eval_root, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _eval(checkpoint, eval_root, "--device", "cuda") == 2
    assert "--device" in _error_line(capsys)
