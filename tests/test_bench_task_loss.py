"""benchmarks/bench_task_loss.py: each search timed on the same case, and the choice the GPU's first call trains with."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from models.config import lite

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_task_loss", ROOT / "benchmarks" / "bench_task_loss.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_each_search_gives_the_same_loss_and_the_choice_is_the_fastest_of_them(tmp_path):
    """On lite with a quarter of its queries (60 x 83 points a scene): the same searches and compile as lite's
    19,920, a quarter of the distances (lite's took 11 s of the suite)."""
    cfg = lite()
    cfg.decoder.num_queries = 60
    (tmp_path / "quarter_lite.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "device" / "task_loss.json"  # the folder does not exist yet
    assert bench.main(["--config", str(tmp_path / "quarter_lite.yaml"), "--batch", "1", "--backends", "cdist,fused",
                       "--modes", "batched", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["points_per_scene"] == 60 * (1 + 2 + 16 + 64) and len(result["gt_per_scene"]) == 1
    assert result["fused_compiled"] and result["fused_loss"] == pytest.approx(result["cdist_loss"], rel=1e-4)
    assert result["choice"] == min(("cdist", "fused"), key=lambda b: result[f"{b}_batched_s"])


def test_the_choice_needs_the_same_loss_and_a_fused_search_that_stayed_compiled():
    result = {"cdist_batched_s": 2.0, "cdist_loss": 10.0, "fused_batched_s": 1.0, "fused_loss": 10.0,
              "fused_compiled": True}
    assert bench.choose(result, ["cdist", "fused"]) == "fused"
    assert bench.choose({**result, "fused_compiled": False}, ["cdist", "fused"]) == "cdist"  # the GEMM stood in
    assert bench.choose({**result, "fused_loss": 10.01}, ["cdist", "fused"]) == "cdist"
    assert bench.choose({**result, "fused_batched_s": 3.0}, ["cdist", "fused"]) == "cdist"
    assert bench.choose({}, ["cdist"]) is None
