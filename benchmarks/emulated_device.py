"""A stand-in for the GPU of the fused frame path on a machine without one: a device that takes a fixed time per
frame and does nothing, so that the launch-ahead loop's host side runs at a GPU's pace on the CPU.

Issue 10's host-share target (CPU-side work per frame <= 25 % of GPU time) is about the host steps around a
2 ms frame graph: prepare, launch, collect, the output check, PointCloud2. On the CPU the fused path runs the
network inside ``launch``, so none of that can be seen there. With ``emulated(pipe, frame_ms)`` the pipeline's
frame graph is captured once per slot as usual (the body runs once and fills the slot's result buffers with a
real frame), but each replay only books ``frame_ms`` on the emulated device, in order behind the frames before
it, and the pipeline's events complete when the device reaches them (a blocking event sleeps until then, as
CUDA's does). The frame is staged by copying it into the slot's host buffer, as on CUDA, where the copy goes to
pinned memory. Everything else is the product's code.

What it leaves out, so its numbers are never GPU figures: the host time of the CUDA calls (graph launch, event
record and query, about 0.05-0.1 ms per frame on the H200's host), the driver's DMA into pinned memory (the host
then reads results that are not in its caches), and the GPU machine's CPU. Use it to compare host-side changes
side by side on one machine (``bench_frame_path.py --emulate-device-ms``).
"""
from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class EmulatedDevice:
    """One in-order queue that takes ``frame_ms`` per replayed frame graph (``clock``: seconds, ``sleep``: its
    wait; tests pass their own)."""

    def __init__(self, frame_ms: float, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not frame_ms > 0:
            raise ValueError(f"frame_ms must be positive, got {frame_ms}")
        self.frame_s = frame_ms / 1e3
        self.clock, self.sleep = clock, sleep
        self.free_at_s = 0.0  # clock time at which the work queued so far is done
        self.frames = 0
        self._lock = threading.Lock()

    def queued_until(self) -> float:
        """When the work queued so far is done (now, if the device is idle)."""
        with self._lock:
            return max(self.clock(), self.free_at_s)

    def run_frame(self) -> None:
        """Queue one frame's work behind what is queued."""
        with self._lock:
            self.free_at_s = max(self.clock(), self.free_at_s) + self.frame_s
            self.frames += 1


class EmulatedEvent:
    """The part of ``torch.cuda.Event`` the fused path uses: recorded, it completes when the device has done
    the work queued before it."""

    def __init__(self, device: EmulatedDevice, blocking: bool = False) -> None:
        self.device, self.blocking = device, blocking
        self.at_s = 0.0  # never recorded: complete

    def record(self, stream: Any = None) -> None:
        self.at_s = self.device.queued_until()

    def query(self) -> bool:
        return self.device.clock() >= self.at_s

    def synchronize(self) -> None:
        while (left := self.at_s - self.device.clock()) > 0:
            if self.blocking:
                self.device.sleep(left)  # a blocking CUDA event sleeps too; otherwise the wait spins, as CUDA's

    def elapsed_time(self, end: EmulatedEvent) -> float:
        return (end.at_s - self.at_s) * 1e3


class EmulatedGraph:
    """A frame graph whose capture runs the body once (the slot's results are a real frame) and whose replay
    books a frame on the device."""

    def __init__(self, body: Callable[[], Any], device: EmulatedDevice) -> None:
        body()
        self.device = device

    def replay(self) -> None:
        self.device.run_frame()


@contextlib.contextmanager
def emulated(pipe: Any, frame_ms: float, **clock: Any) -> Iterator[EmulatedDevice]:
    """Within the block, ``pipe`` (an ``OccupancyPipeline`` made with ``fuse=True`` on the CPU, no frame run
    yet) launches its frames on an ``EmulatedDevice`` of ``frame_ms`` per frame (``clock``: its ``clock`` and
    ``sleep``), which it yields. Its events and captured graphs stay the emulation's after the block: use the
    pipeline within it only."""
    if not pipe.fused or pipe.backend.torch_device.type != "cpu" or pipe._results:
        raise ValueError("emulated: needs a fused pipeline on the CPU (OccupancyPipeline(..., fuse=True)) that "
                         "has launched no frame yet")
    pipeline_mod = importlib.import_module("export.pipeline")
    preprocess_mod = importlib.import_module("models.preprocess")  # the module (``models.preprocess``: a function)
    device = EmulatedDevice(frame_ms, **clock)
    pre = pipe.preprocessor
    saved = (pipeline_mod._event, preprocess_mod.capture_graph, pre.frame_graphs, pre._stage)

    def stage_copied(slot: Any, image_rgb: np.ndarray, *rest: Any) -> None:
        view = image_rgb.view()
        view.flags.writeable = False  # the CPU's staging would view a writable frame; CUDA's copies it
        saved[3](slot, view, *rest)

    pipeline_mod._event = lambda dev, timing, blocking=False: EmulatedEvent(device, blocking)
    preprocess_mod.capture_graph = lambda body, dev, pool=None: EmulatedGraph(body, device)
    pre.frame_graphs, pre._stage = True, stage_copied
    try:
        yield device
    finally:
        pipeline_mod._event, preprocess_mod.capture_graph = saved[:2]
        pre.frame_graphs = saved[2]
        del pre._stage  # the method again
