"""benchmarks/reproduce_ablation.py at a tiny scale: every Table III row, seeds, JSON layout, publish only on request."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from training.device_run import split_file

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("reproduce_ablation", ROOT / "benchmarks" / "reproduce_ablation.py")
ablation = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ablation)

TINY = ["--set", "model_overrides.decoder.num_queries=32", "--set", "model_overrides.decoder.num_refines=[2,4]",
        "--set", "model_overrides.image_size=[96,128]", "--set", "data.frequency_frames=4",
        "--set", "optim.warmup_iters=1", "--quiet", "--threads", "0"]


def test_every_row_over_seeds_written_under_out_and_published_only_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "SHIPPED_RESULTS", tmp_path / "shipped_results")
    monkeypatch.setattr(ablation, "SHIPPED_CHECKPOINT", tmp_path / "shipped" / "lite_distilled.pt")
    (tmp_path / "shipped").mkdir()
    common = ["--data", str(tmp_path / "synth"), "--out", str(tmp_path / "runs"), "--steps", "1", "--teacher-steps", "1",
              "--train-frames", "4", "--val-frames", "2", "--frames-per-scene", "2", "--width", "128", "--height", "96",
              "--synth-seed", "7", "--batch", "2", *TINY]
    assert ablation.main([*common, "--seeds", "0", "1"]) == 0
    result = json.loads((tmp_path / "runs" / "results" / "ablation.json").read_text())
    assert result["score_threshold"] == 0.5
    assert result["val_split"] == {"split": "val", "root": str(tmp_path / "synth"), "generator": "discene-synth",
                                   "generator_seed": 7, "scenes": 1, "frames": 2, "size_wh": [128, 96]}
    assert result["train_split"]["frames"] == 4 and result["train_split"]["scenes"] == 2
    assert result["setup"]["batch"] == 2
    for name in ("student", "student_tgi", "distilled"):
        assert result[name]["seeds"] == [0, 1] and len(result[name]["per_seed"]) == 2
    for name in ("teacher", "student_query", "student_prior", "student_anchor"):
        assert result[name]["seeds"] == [0] and result[name]["per_seed"][0]["steps"] == 1
    for name in ablation.ORDER:
        row = result[name]
        assert 0.0 <= row["miou"] <= row["iou"] or row["iou"] == 0.0  # percent
        assert row["iou"] == pytest.approx(sum(r["iou"] for r in row["per_seed"]) / len(row["per_seed"]), abs=0.01)
    table = (tmp_path / "runs" / "results" / "ablation.md").read_text()
    assert "| Student + prior level (+ EFA) |  | x |  |  | x |" in table
    assert "| Student + TGI |  |  |  | x |  |" in table
    assert not (tmp_path / "shipped_results").exists() and not any((tmp_path / "shipped").iterdir())

    handed_back = tmp_path / "handed_back"  # the teacher as a device run hands it back: final.pt in parts
    split_file(tmp_path / "runs" / "teacher" / "final.pt", handed_back, 2**20)
    assert ablation.main([*common, "--seeds", "3", "--level-seeds", "--teacher", str(handed_back), "--publish"]) == 0
    shipped = json.loads((tmp_path / "shipped_results" / "ablation.json").read_text())
    assert set(shipped) >= {"teacher", "student", "student_tgi", "distilled"} and "student_query" not in shipped
    assert shipped["distilled"]["seeds"] == [3]
    assert shipped["teacher"]["iou"] == result["teacher"]["iou"]  # the same teacher, rejoined and re-evaluated
    assert (tmp_path / "shipped" / "lite_distilled.pt").read_bytes() == \
        (tmp_path / "runs" / "distilled_s3" / "final.pt").read_bytes()
