"""benchmarks/emulated_device.py: the fused path's host side against a stand-in device on the CPU. Its queue and
events on a test clock; the pipeline's real frames through it; bench_frame_path's ``--emulate-device-ms``."""
from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch
from benchmark_modules import load
from test_fused_postprocess import _sized_frame

from export.backends.torch_backend import TorchBackend
from export.pipeline import LAUNCH_AHEAD_SLOTS, OccupancyPipeline
from models import build_model

emu = load("emulated_device")


class Clock:
    """Seconds that move only when a wait sleeps, or by ``step`` per reading (a spinning wait)."""

    def __init__(self, start: float = 100.0, step: float = 0.0) -> None:
        self.now, self.step, self.slept = start, step, []

    def __call__(self) -> float:
        self.now += self.step
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_frames_queue_in_order_and_events_complete_when_the_device_reaches_them():
    clock = Clock()
    dev = emu.EmulatedDevice(2.0, clock=clock, sleep=clock.sleep)
    start = emu.EmulatedEvent(dev)
    assert start.query()  # never recorded: complete, as a CUDA event
    start.record()
    dev.run_frame()
    dev.run_frame()  # behind the first
    done = emu.EmulatedEvent(dev, blocking=True)
    done.record()
    assert start.query() and not done.query() and start.elapsed_time(done) == pytest.approx(4.0)
    clock.now += 0.003
    assert not done.query()
    done.synchronize()  # sleeps the 1 ms left, once
    assert done.query() and clock.slept == [pytest.approx(0.001)] and clock.now == pytest.approx(100.004)
    clock.now += 1.0  # idle a while: the next frame starts now, not where the queue ended
    dev.run_frame()
    assert dev.free_at_s == pytest.approx(101.006) and dev.frames == 3
    spinning = Clock(step=0.0005)
    dev = emu.EmulatedDevice(1.0, clock=spinning, sleep=spinning.sleep)
    dev.run_frame()
    event = emu.EmulatedEvent(dev)
    event.record()
    event.synchronize()  # a non-blocking event spins on the clock
    assert event.query() and spinning.slept == []
    with pytest.raises(ValueError, match="positive"):
        emu.EmulatedDevice(0.0)


def _pipeline(config, **kw) -> OccupancyPipeline:
    torch.manual_seed(0)
    backend = TorchBackend(build_model(config).eval(), config, device="cpu", cuda_graph=True)
    return OccupancyPipeline(backend, config, fuse=True, **kw)


@pytest.mark.parametrize("device_cloud", [False, True])
def test_emulated_pipeline_gives_the_real_frame_and_books_each_launch(lite_config, device_cloud):
    """Each slot's capture runs the frame's device work once; every launch then books one frame on the device,
    two launched ahead queue behind each other, and ``infer_ms`` is the device's time per frame. The frames are
    the plain fused path's for the frame the slots were captured with; the frame is copied into the slot's
    staging (CUDA's copy into pinned memory). Leaving the block restores what it replaced."""
    pipeline_mod, preprocess_mod = importlib.import_module("export.pipeline"), importlib.import_module("models.preprocess")
    before = (pipeline_mod._event, preprocess_mod.capture_graph)
    lite_config = dataclasses.replace(lite_config, score_threshold=0.0)  # random weights: keep every point
    image, k, pose = _sized_frame(lite_config, 60, 480, 640)
    plain = _pipeline(lite_config)
    ref = plain.complete(plain.prepare(image, k, pose))
    pipe = _pipeline(lite_config, device_cloud=device_cloud)
    clock = Clock()
    with emu.emulated(pipe, 3.0, clock=clock, sleep=clock.sleep) as dev:
        for i in range(2 * LAUNCH_AHEAD_SLOTS):
            first = pipe.launch(pipe.prepare(image, k, pose, slot=(2 * i) % LAUNCH_AHEAD_SLOTS))
            second = pipe.launch(pipe.prepare(image, k, pose, slot=(2 * i + 1) % LAUNCH_AHEAD_SLOTS))
            assert not pipe.launched_done(second)
            frames = [pipe.collect(first), pipe.collect(second)]
            assert pipe.last_timings.infer_ms == pytest.approx(3.0)
            for got in frames:
                assert got.labels.tobytes() == ref.labels.tobytes()
                assert got.voxel_scores.tobytes() == ref.voxel_scores.tobytes()
        assert dev.frames == 4 * LAUNCH_AHEAD_SLOTS
        assert all(slot.frame_rgb is None and slot.host_rgb is not None for slot in pipe.preprocessor.slots)
        assert "compacted" in pipe.describe() if device_cloud else "compacted" not in pipe.describe()
    assert (pipeline_mod._event, preprocess_mod.capture_graph) == before
    assert "_stage" not in vars(pipe.preprocessor) and not pipe.preprocessor.frame_graphs
    assert len(ref.voxel_labels) > 50


def test_emulation_refuses_an_unfused_or_used_pipeline(lite_config):
    with pytest.raises(ValueError, match="fused pipeline on the CPU"):
        with emu.emulated(OccupancyPipeline(_pipeline(lite_config).backend, lite_config, fuse=False), 2.0):
            pass
    used = _pipeline(lite_config)
    image, k, pose = _sized_frame(lite_config, 61, 480, 640)
    used.complete(used.prepare(image, k, pose))
    with pytest.raises(ValueError, match="launched no frame yet"):
        with emu.emulated(used, 2.0):
            pass


def test_bench_frame_path_rows_on_the_emulated_device(tmp_path):
    """``--emulate-device-ms``: the fused launch-ahead rows of the CUDA rule (pipelined, no prepare thread, the
    node's decode thread), marked as emulated in the row and the file's device; refused off the CPU."""
    pytest.importorskip("rosbags")
    bench = load("bench_frame_path")
    path = tmp_path / "rows.json"
    args = ["--device", "cpu", "--configs", "lite", "--frames", "6", "--warmup", "2", "--inputs", "bgr8",
            "--threads", "1", "--marker-period", "1000", "--device-cloud", "on", "--json", str(path)]
    assert bench.main([*args, "--emulate-device-ms", "2.5"]) == 0
    out = json.loads(path.read_text())
    (row,) = out["rows"]
    assert out["device"].endswith("with an emulated device (no GPU)") and row["emulated_device_ms"] == 2.5
    assert row["fused_postprocess"] and row["frame_graph"] and row["device_cloud"] and row["dropped"] == 0
    assert not row["prepare_thread"] and row["decode_stage"] and not row["serial"]
    assert row["decode_on_thread"] is False  # the node's rule for raw images: that thread only takes the frame
    assert row["stages_ms"]["launch"] > 0 and row["infer_ms"] >= 2.5 - 1e-6  # never under the device time
    key = bench.append_key(row)
    assert key != bench.append_key({**row, "emulated_device_ms": None})
    for bad in (["--device", "cuda"], ["--frame-graph", "off"], ["--no-cuda-graph"]):
        assert bench.main([*args, "--emulate-device-ms", "2.5", *bad]) == 2
    assert bench.main([*args, "--emulate-device-ms", "0"]) == 2
    assert np.isfinite(row["overhead_ms"])
