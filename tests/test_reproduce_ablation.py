"""benchmarks/reproduce_ablation.py at a tiny scale: every Table III row, seeds, JSON layout, publish only on request."""
from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_model, save_model
from training.device_run import split_file

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("reproduce_ablation", ROOT / "benchmarks" / "reproduce_ablation.py")
ablation = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ablation)

TINY = ["--set", "model_overrides.decoder.num_queries=32", "--set", "model_overrides.decoder.num_refines=[2,4]",
        "--set", "model_overrides.image_size=[96,128]", "--set", "data.frequency_frames=4",
        "--set", "optim.warmup_iters=1", "--quiet", "--threads", "1"]
# One torch thread per run, here and in the child processes: two children of two threads each on a 2-core machine
# took 10x as long per step, and equal weights in and out of process need the same thread count.


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """``main`` sets torch's thread count for the process (``--threads``): the tests after these keep theirs."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _threads_restored() -> Iterator[None]:
    with _torch_threads_kept():
        yield


def test_every_row_over_seeds_written_under_out_and_published_only_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "SHIPPED_RESULTS", tmp_path / "shipped_results")
    monkeypatch.setattr(ablation, "SHIPPED_CHECKPOINT", tmp_path / "shipped" / "lite_distilled.pt")
    monkeypatch.setattr(ablation, "SHIPPED_DEPTH_CHECKPOINT", tmp_path / "shipped" / "lite_distilled_depth.pt")
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
    assert not any(name in result for name in ablation.DEPTH_ROWS)  # only with --depth-rows
    for name in ablation.ORDER[:-len(ablation.DEPTH_ROWS)]:
        row = result[name]
        assert 0.0 <= row["miou"] <= row["iou"] or row["iou"] == 0.0  # percent
        assert row["iou"] == pytest.approx(sum(r["iou"] for r in row["per_seed"]) / len(row["per_seed"]), abs=0.01)
    table = (tmp_path / "runs" / "results" / "ablation.md").read_text()
    assert "| Student + prior level (+ EFA) |  | x |  |  | x |" in table
    assert "| Student + TGI |  |  |  | x |  |" in table
    assert not (tmp_path / "shipped_results").exists() and not any((tmp_path / "shipped").iterdir())

    handed_back = tmp_path / "handed_back"  # the teacher as a device run hands it back: final.pt in parts
    split_file(tmp_path / "runs" / "teacher" / "final.pt", handed_back, 2**20)
    assert ablation.main([*common, "--seeds", "3", "--level-seeds", "--teacher", str(handed_back), "--publish",
                          "--depth-rows"]) == 0
    shipped = json.loads((tmp_path / "shipped_results" / "ablation.json").read_text())
    assert set(shipped) >= {"teacher", "student", "student_tgi", "distilled"} and "student_query" not in shipped
    assert shipped["distilled"]["seeds"] == [3]
    assert shipped["teacher"]["iou"] == result["teacher"]["iou"]  # the same teacher, rejoined and re-evaluated
    assert (tmp_path / "shipped" / "lite_distilled.pt").read_bytes() == \
        (tmp_path / "runs" / "distilled_s3" / "final.pt").read_bytes()
    for name in ("student_depth", "distilled_depth"):  # the depth branch fed by the synthetic depth, seed 3
        assert shipped[name]["seeds"] == [3]
        assert load_model(str(tmp_path / "runs" / f"{name}_s3" / "final.pt"))[1].use_depth
    assert (tmp_path / "shipped" / "lite_distilled_depth.pt").read_bytes() == \
        (tmp_path / "runs" / "distilled_depth_s3" / "final.pt").read_bytes()
    assert "| DiScene + depth sensor in the student (DiScene-dagger; RGB teacher) | x | x | x | x | x |" in \
        (tmp_path / "shipped_results" / "ablation.md").read_text()


def _small(root: Path) -> list[str]:
    return ["--data", str(root / "synth"), "--steps", "2", "--teacher-steps", "1", "--train-frames", "4",
            "--val-frames", "2", "--frames-per-scene", "2", "--width", "128", "--height", "96", "--synth-seed", "7",
            "--batch", "2", "--seeds", "0", "--level-seeds", *TINY]


@pytest.fixture(scope="module")
def in_process_rows(tmp_path_factory) -> Path:
    """Teacher, student, TGI and full rows of seed 0, each trained in this process (--jobs 1)."""
    root = tmp_path_factory.mktemp("ablation")
    with _torch_threads_kept():
        assert ablation.main([*_small(root), "--out", str(root / "jobs1")]) == 0
    return root


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_rows_in_child_processes_train_the_weights_of_the_in_process_rows_within_a_calibrated_budget(in_process_rows):
    root = in_process_rows
    teacher = root / "jobs1" / "teacher" / "final.pt"
    assert ablation.main([*_small(root), "--out", str(root / "jobs2"), "--teacher", str(teacher), "--jobs", "2",
                          "--fit-s", "900", "--calibrate-steps", "2"]) == 0
    result = json.loads((root / "jobs2" / "results" / "ablation.json").read_text())
    calibration = result["setup"]["calibration"]
    assert result["setup"]["jobs"] == 2 and calibration["waves"] == 2  # three rows, two at a time
    assert set(calibration["rows"]) == {"distilled_s0", "student_tgi_s0"}  # the first wave: the slowest rows
    assert calibration["chosen_steps"] == 2 and result["setup"]["steps"] == 2  # --steps caps a generous budget
    # the given teacher is reported with the steps it was trained for (1), not this run's default 4 x --steps
    assert result["setup"]["teacher_steps"] == 1 and result["teacher"]["per_seed"][0]["steps"] == 1
    assert result["setup"]["teacher_checkpoint"] == str(teacher)
    assert f"teacher 1 steps (given: {teacher}, trained before this run)" in \
        (root / "jobs2" / "results" / "ablation.md").read_text()
    assert calibration["aggregate_samples_per_s"] == pytest.approx(
        sum(2 / r["step_seconds_median"] for r in calibration["rows"].values()), abs=0.1)
    for name in ("student", "student_tgi", "distilled"):
        run = result[name]["per_seed"][0]
        assert run["steps"] == 2 and run["finished"]
        assert (root / "jobs2" / "logs" / f"{name}_s0.log").is_file()
        ours, theirs = _weights(root / "jobs2" / f"{name}_s0" / "final.pt"), _weights(root / "jobs1" / f"{name}_s0" / "final.pt")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert "failed" not in result


def test_a_failing_row_is_listed_the_others_kept_and_nothing_published(in_process_rows, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablation, "SHIPPED_RESULTS", tmp_path / "shipped_results")
    monkeypatch.setattr(ablation, "SHIPPED_CHECKPOINT", tmp_path / "lite_distilled.pt")
    root = in_process_rows
    out = tmp_path / "runs"
    code = ablation.main([*_small(root), "--out", str(out), "--teacher", str(root / "jobs1" / "teacher" / "final.pt"),
                          "--jobs", "3", "--distill-set", "distill.no_such_key=1", "--publish"])  # one wave
    assert code == 1
    result = json.loads((out / "results" / "ablation.json").read_text())
    assert [(f["row"], f["seed"]) for f in result["failed"]] == [("distilled", 0)]
    assert result["failed"][0]["exit_code"] != 0 and "no_such_key" in Path(result["failed"][0]["log"]).read_text()
    assert result["student"]["per_seed"][0]["steps"] == 2 and result["student_tgi"]["per_seed"][0]["steps"] == 2
    assert "distilled" not in result and "distilled seed 0: failed" in (out / "results" / "ablation.md").read_text()
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "shipped_results").exists() and not (tmp_path / "lite_distilled.pt").exists()


def test_a_budget_too_short_for_one_step_runs_no_row(in_process_rows, tmp_path):
    root = in_process_rows
    out = tmp_path / "runs"
    assert ablation.main([*_small(root), "--out", str(out), "--teacher", str(root / "jobs1" / "teacher" / "final.pt"),
                          "--fit-s", "1", "--calibrate-steps", "2"]) == 1
    result = json.loads((out / "results" / "ablation.json").read_text())
    assert result["setup"]["calibration"]["chosen_steps"] == 0 and result["setup"]["calibration"]["seconds_left"] < 0
    assert set(result["setup"]["calibration"]["rows"]) == {"distilled_s0"}  # --jobs 1: a wave of one, in process
    assert not any(name in result for name in ("student", "student_tgi", "distilled"))


def test_a_given_teacher_is_read_once_and_keeps_its_own_steps(tmp_path, monkeypatch, lite_config, lite_model):
    """--teacher: the checkpoint is read once for the model and its step count, the row records the steps it
    was trained for (warm starts included) and no training time of this run."""
    path = tmp_path / "teacher.pt"
    save_model(path, lite_model, lite_config, step=30, steps_before=200)
    reads = []
    real = ablation.load_checkpoint
    monkeypatch.setattr(ablation, "load_checkpoint", lambda p, *a, **k: reads.append(p) or real(p, *a, **k))
    seen = {}

    def evaluate(model, model_cfg, args, device):
        seen.update(threshold=model_cfg.score_threshold, same=all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), lite_model.state_dict().values(), strict=True)))
        return {"iou": 10.0, "miou": 5.0, "val_frames": 2}

    monkeypatch.setattr(ablation, "evaluate", evaluate)
    args = ablation.build_parser().parse_args(["--score-threshold", "0.3"])
    record = ablation.given_teacher_record(path, args)
    assert reads == [path]
    assert seen == {"threshold": 0.3, "same": True}
    assert record == {"iou": 10.0, "miou": 5.0, "val_frames": 2, "checkpoint": str(path), "steps": 230,
                      "seconds_per_step": 0.0, "train_seconds": 0.0}
