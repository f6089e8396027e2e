"""The device-run probes that wait for a GPU call still run against this tree: on the CPU, with torch's CUDA calls
stood in for by eager ones, so that an internal name the probe reaches for cannot drift away unnoticed before
the call (a probe that fails there costs minutes of a 15-minute device budget)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from discene_ros.processing import FrameProcessor

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "docs" / "results" / "device_runs" / "issue10_whole_frame_graph_probe.py"


class _Graph:
    def replay(self) -> None:  # the eager "capture" already wrote the outputs
        pass


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


def _load_probe():
    spec = importlib.util.spec_from_file_location("whole_frame_graph_probe", PROBE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    return probe


def test_whole_frame_graph_probe_runs_its_capture_body_eagerly_and_gets_the_launch_grids(tmp_path, monkeypatch):
    """The probe's capture body (upload and preprocessing into the fused graph's inputs, network, post-processing,
    copies back) run eagerly gives the grids of ``launch`` + ``collect``: the same functions in the same order."""
    cuda = torch.cuda
    for name, value in {"is_available": lambda: True, "synchronize": lambda *a: None, "Stream": _Stream,
                        "current_stream": lambda *a: _Stream(), "stream": lambda s: contextlib.nullcontext(),
                        "graph": lambda g, **k: contextlib.nullcontext(), "CUDAGraph": _Graph, "Event": _Event,
                        "get_device_name": lambda *a: "CPU stand-in"}.items():
        monkeypatch.setattr(cuda, name, value)
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: zeros(*a, **k))
    decode = FrameProcessor.decode_frame

    def staged_as_on_cuda(self, frame):  # a read-only frame is copied into the slot's buffer, as CUDA stages it
        decoded = decode(self, frame)
        decoded.rgb = decoded.rgb.copy()
        decoded.rgb.flags.writeable = False
        return decoded

    monkeypatch.setattr(FrameProcessor, "decode_frame", staged_as_on_cuda)
    probe = _load_probe()
    make_backend = probe.bench.make_backend
    monkeypatch.setattr(probe.bench, "make_backend", lambda config, device, *a, **k: make_backend(config, "cpu", *a, **k))
    out = tmp_path / "probe.json"
    assert probe.main(["--configs", "lite", "--calls", "2", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert "whole_frame_error" not in row, row.get("whole_frame_traceback")
    assert row["whole_frame_same_grids"] and row["whole_frame_label_agreement"] == 1.0 and row["voxels"] > 0


def test_whole_frame_graph_probe_refuses_without_cuda(capsys):
    probe = _load_probe()
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the probe would run")
    assert probe.main(["--configs", "lite"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_steps_in_sequence_are_the_launch_ahead_frame_and_time_every_step(tmp_path):
    """bench_host_steps --fused (device stage host-steps-sequence): its steps, in a one-thread loop's order, collect
    the frame that FrameProcessor gives for the same message, and the run writes a time per step and condition."""
    steps_bench = _load_benchmark("bench_host_steps")
    from rosbags.typesys import Stores, get_typestore

    from export.pipeline import OccupancyPipeline

    factory = steps_bench.bench.TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
    backend, _ = steps_bench.bench.make_backend("lite", "cpu", False, False, True)
    pipe = OccupancyPipeline(backend, fuse=True)
    host_steps, wait, state = steps_bench.fused_steps(pipe, factory)
    assert list(host_steps) == ["postprocess", "output_check", "pointcloud2", "rclpy_data", "decode", "preprocess",
                                "launch"]
    image, info, pose = steps_bench.bench.camera_messages(factory, "bgr8")
    reference = FrameProcessor(OccupancyPipeline(backend, fuse=False)).process(
        steps_bench.FrameInput(image, info, cam_pose=pose)).occupancy
    assert len(reference.voxel_labels) > 50
    for step in host_steps.values():  # collects the frame fused_steps launched, launches the next
        step()
    assert (state["occupancy"].labels == reference.labels).all()
    data = steps_bench.rclpy_data(state["cloud"])  # what the node's rclpy message carries: the rows, copied
    assert data.typecode == "B" and data.tobytes() == state["cloud"].points.tobytes()
    wait()
    host_steps["postprocess"]()  # the frame the sequence launched
    assert (state["occupancy"].labels == reference.labels).all()

    out = tmp_path / "steps.json"
    assert steps_bench.main(["--fused", "--calls", "2", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert "launch-ahead" in run["path"] and run["precision"] == "fp32" and run["input"] == "bgr8"
    assert [r["step"] for r in run["rows"]] == list(host_steps)
    assert all(r["sequence_ms"] > 0 and r["hot_ms"] > 0 for r in run["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "--device cuda needs --fused"),
    (["--fused", "--fp16"], "--fp16 needs --device cuda"),
    (["--fused", "--gaps"], "--gaps times the CPU path's steps"),
])
def test_host_steps_refuses_options_that_do_not_go_together(capsys, argv, message):
    steps_bench = _load_benchmark("bench_host_steps")
    with pytest.raises(SystemExit):
        steps_bench.main(argv)
    assert message in capsys.readouterr().err
