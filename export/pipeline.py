"""One frame end to end: preprocess -> backend.infer -> points_to_occupancy, with per-stage timings.

Shared by the ROS node, bag replay and the benchmarks so that all of them measure and run the same
code path (docs/architecture.md, "Inference data flow").

With the torch backend the frame stays on the torch device: ``TensorPreprocessor`` uploads the uint8
image once and resizes/normalises there, the backend returns device tensors, post-processing runs on
the device and only the occupied voxels come back. Other backends (ONNX Runtime, TensorRT) take the same
preprocessing on the CPU, its tensors read as numpy arrays.
A frame is split into ``prepare`` (preprocess/upload) and ``complete`` (infer + post-process) so that
``FrameRunner`` can prepare the next frame (and decode the one after it) while the current one is
inferred. On CUDA with the torch backend's CUDA graph, post-processing is the fixed-shape
``dense_occupancy`` captured in the network's graph (``fused``), and ``complete`` splits again into
``launch`` (replay, one asynchronous copy of the (X,Y,Z) label and score grids into pinned memory)
and ``collect`` (wait, host arrays), so the runner can launch the next frame before it turns the
current one into messages. There ``prepare`` stays on the host (checks, ``grid2img``, the frame into a
pinned slot buffer: no CUDA call but one event query) and ``launch`` replays one CUDA graph per buffer
slot (``frame_graphs``) that holds the whole device work of a frame: the upload, resize and
normalisation into the network's static inputs, the network, the post-processing and the copies of the
grids into the slot's pinned result buffers; one replay and two event records per frame. Without it
(``frame_graphs=False``, or where its capture fails) ``launch`` replays the slot's preprocessing graph and
the network's graph, copies and records four events: 0.26 ms of host time alone, against 0.08 ms for the
one replay and an event record (lite on an H200, device call 14; in the frame loop 0.1 ms less CPU time).
"""
from __future__ import annotations

import copy
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models import native_postprocess
from models.config import POSTPROCESS_FIELDS, ModelConfig
from models.device_cloud import CloudBuffers, DeviceCloud, cloud_frame_from_dense, read_frame
from models.postprocess import dense_occupancy, points_to_occupancy
from models.preprocess import FrameTensors, TensorPreprocessor

from .backends.base import Backend
from .backends.torch_backend import TorchBackend
from .host_threads import intra_op_threads, release_openmp_team

STAGES = ("preprocess", "infer", "postprocess", "total")


@dataclass
class StageTimings:
    """Wall-clock milliseconds of each stage of one frame."""

    preprocess_ms: float = 0.0
    infer_ms: float = 0.0
    postprocess_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The fields by name: once per frame, so not ``dataclasses.asdict`` (which deep-copies each: 7 against
        0.3 us)."""
        return dict(vars(self))


@dataclass
class Prepared:
    """A frame after the prepare stage: network inputs (``FrameTensors``: device tensors, CPU ones for the
    backends that take host arrays), its preprocess time,
    and the CUDA event the inference stream waits for (None off CUDA)."""

    inputs: Any
    preprocess_ms: float
    ready: Any = None


@dataclass
class Launched:
    """A frame whose device work is queued (fused path): the pinned host grids it is copied into, the
    event that marks the copy done, and CUDA events around the graph replay."""

    prepared: Prepared
    labels: np.ndarray     # (X, Y, Z) uint8, a view of the pinned grid
    best: np.ndarray       # (X, Y, Z) float32, a view of the pinned grid
    copied: Any
    start: Any
    end: Any
    t_launch: float
    cloud: CloudBuffers | None = None  # ``device_cloud``: the slot's rows, read instead of the grids


@dataclass
class _ResultSet:
    """A buffer slot's pinned (labels, best) grids that its launched frame's results are copied into, and the
    CUDA events of its launch (timing, and copy done: timing too, as the frame graph's end), made once and
    re-recorded each time the slot is launched."""

    labels: torch.Tensor
    best: torch.Tensor
    start: Any
    end: Any
    copied: Any
    cloud: CloudBuffers | None = None  # ``device_cloud``: the slot's compacted rows and their pinned heads
    used: bool = False
    # the (X, Y, Z) grids as numpy views, made once: a tensor index and ``numpy()`` take 2.4 us a grid back to back
    grids: tuple[np.ndarray, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.grids = (self.labels[0].numpy(), self.best[0].numpy())

    def take(self, labels: torch.Tensor, best: torch.Tensor) -> None:
        """Queue the copies of a frame's device grids into these pinned ones (stream order, no wait)."""
        self.labels.copy_(labels, non_blocking=True)
        self.best.copy_(best, non_blocking=True)


PIPELINE_SLOTS = 3  # buffer sets: one being inferred, one waiting, one being prepared
LAUNCH_AHEAD_SLOTS = 4  # with launch-ahead one more: launched while the previous one is collected
LAUNCH_POLL_S = 0.0002  # launch-ahead: how often the finish stage looks whether a launched frame's results are in


# Settings a deployment may tune without re-exporting (e.g. from ROS parameters): the name and post-processing.
TUNABLE_FIELDS = ("name", *POSTPROCESS_FIELDS)


def _network_fields(config: ModelConfig) -> dict:
    d = config.to_dict()
    d["backbone"] = {k: v for k, v in d["backbone"].items() if k not in ("pretrained", "frozen_stages")}
    return {k: v for k, v in d.items() if k not in TUNABLE_FIELDS}


class _HostEvent:
    """The part of ``torch.cuda.Event`` the fused path uses, for the CPU (work is done when recorded)."""

    def __init__(self) -> None:
        self.recorded_s = 0.0

    def record(self, stream: Any = None) -> None:
        self.recorded_s = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.recorded_s - self.recorded_s) * 1e3


def _event(device: torch.device, timing: bool, blocking: bool = False) -> Any:
    """A CUDA event, or on the CPU a ``_HostEvent``. ``blocking``: its ``synchronize`` sleeps until the device
    is done instead of spinning a core. The copy-done event of the results is one (and the unfused path's
    network-done event, whose effect no GPU run has measured yet): with a spinning wait the
    frame loop took 13.7 ms of process CPU time per 13.3 ms paper_student frame on H200 (a core spent
    waiting), 2.6 ms with the sleeping one; lite 2.1-2.4 against 1.2-1.4 ms (docs/results/frame_path.md,
    session 23)."""
    if device.type != "cuda":
        return _HostEvent()
    return torch.cuda.Event(enable_timing=timing, blocking=blocking)


class OccupancyPipeline:
    """Wires preprocess, a ``Backend`` and post-processing; keeps the last ``window`` frames' timings.

    ``config`` may differ from the backend's in post-processing settings only (score threshold,
    centre distance, closing); anything that changes the network's inputs or outputs is refused.
    ``fuse`` (default: on CUDA with the torch backend's CUDA graph) runs post-processing inside the
    captured graph with launch/collect; on the CPU it is for tests (the sparse path is faster there).
    ``host_threads``: torch intra-op threads for the CPU-side torch work of preprocessing and
    post-processing, set for the calling thread only (``host_threads.intra_op_threads``); 1 by default,
    which keeps those many small ops off the cores the inference uses. None keeps torch's setting.
    ``post_threads``: threads of the CPU post-processing kernel (``native_postprocess``); ``post_threads_for``
    chooses them for a frame loop. With more than one, or a ``network_done`` callback (the next frame's host
    work starts beside the post-processing), a torch CPU inference releases its OpenMP workers when it ends,
    which would otherwise spin on the core the kernel's helper or that work needs (post-processing took 3.3
    instead of 2.2 ms with them spinning; on one thread beside the next frame's host work 3.4-4.8 instead of
    2.9-3.0 ms).
    ``frame_graphs`` (fused path on CUDA; default on): one CUDA graph per buffer slot for the frame's whole
    device work (module docstring). It captures the network once more per slot, in the memory pool of the
    network's own graph: they all run one after the other on one stream, and nothing they leave on the
    device is read after their replay (the grids go to pinned memory). Off, ``launch`` replays the
    preprocessing's and the network's graphs separately.
    ``device_cloud`` (fused path; default off until a GPU run has measured it): the device compacts the occupied
    voxels into PointCloud2 rows after the post-processing (``models.device_cloud``, in the frame graph where
    there is one; without it as separate launches), and ``collect`` reads those rows instead of scanning the
    grids, so the frame's cloud needs no pass on the host. The frames equal those of the grids.
    """

    def __init__(self, backend: Backend, config: ModelConfig | None = None, window: int = 100,
                 fuse: bool | None = None, host_threads: int | None = 1, post_threads: int = 1,
                 frame_graphs: bool = True, device_cloud: bool = False):
        self.backend = backend
        self.host_threads = host_threads
        self.post_threads = post_threads
        self.config = config or backend.config
        mine, theirs = _network_fields(self.config), _network_fields(backend.config)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"pipeline config '{self.config.name}' differs from the backend's model config "
                             f"'{backend.config.name}' in {diff}: inputs or outputs would not match the network")
        self.last_timings = StageTimings()
        self.history: deque[StageTimings] = deque(maxlen=window)
        self.tensor_path = isinstance(backend, TorchBackend)
        cuda = self.tensor_path and backend.torch_device.type == "cuda"
        self.fused = bool(self.tensor_path and backend.can_fuse and (cuda if fuse is None else fuse))
        slots = LAUNCH_AHEAD_SLOTS if self.fused else PIPELINE_SLOTS
        self.slots = slots
        # the ONNX Runtime and TensorRT backends take host arrays: their frames go through the same preprocessing
        # as the torch backend's on the CPU, whose tensors they read as numpy without a copy (numpy and PIL,
        # ``preprocess``, took 5-8 ms for a 640x480 frame against 0.5-1.2 ms: benchmarks/bench_resize.py)
        self.preprocessor = TensorPreprocessor(self.config, backend.torch_device if self.tensor_path else "cpu",
                                               slots=slots)
        self.preprocessor.frame_graphs = self.preprocessor.frame_graphs and self.fused and bool(frame_graphs)
        self.device_cloud = DeviceCloud(self.config, backend.torch_device) if self.fused and device_cloud else None
        # unfused CUDA: the prepare stage uploads on its own stream, overlapping the previous inference (fused:
        # the prepare stage only stages the frame on the host, and ``launch`` uploads it before the network)
        self.upload_stream = torch.cuda.Stream(backend.torch_device) if cuda and not self.fused else None
        self._posts: dict[tuple, Any] = {}  # post-processing settings -> dense_occupancy bound to a copy of them
        self._targets: dict[Any, FrameTensors] = {}  # fused: post function -> its graph's static inputs
        self._results: list[_ResultSet] = []  # one per buffer slot
        # per buffer slot, re-recorded each frame: the work queued before its upload, and its upload, are done
        self._queued = [torch.cuda.Event() for _ in range(slots)] if self.upload_stream is not None else []
        self._ready = [torch.cuda.Event() for _ in range(slots)] if self.upload_stream is not None else []
        # unfused CUDA: the finish stage waits for the network on this sleeping event, not with a spinning
        # torch.cuda.synchronize (which also waited for the next frame's upload on the other stream)
        self._inferred = _event(backend.torch_device, False, blocking=True) if self.upload_stream is not None else None

    def describe(self) -> str:
        """What runs each stage (logged by the node and the benchmarks at start-up)."""
        native_resize = (self.preprocessor.uint8_resize and self.preprocessor.native_resize
                         and self.preprocessor.device.type == "cpu" and native_postprocess.available())
        resize = (f"{'uint8' if self.preprocessor.uint8_resize else 'float'} antialiased resize"
                  f"{' in the native kernel' if native_resize else ''}")
        pre = (f"device preprocessing on {self.backend.torch_device} (uint8 upload, {resize}"
               f"{', queued at launch into the network inputs' if self.fused else ''})"
               if self.tensor_path else f"host preprocessing on the CPU ({resize})")
        where = ("in one CUDA graph per buffer slot with the upload and preprocessing" if self.preprocessor.frame_graphs
                 else "in its CUDA graph" if self.fused and self.backend.torch_device.type == "cuda"
                 else "(static buffers)")
        on_cpu = not self.tensor_path or self.backend.torch_device.type == "cpu"
        native = (f"native kernel, {self.post_threads} thread{'s' if self.post_threads > 1 else ''}"
                  if native_postprocess.available() else
                  f"torch ops; native kernel {native_postprocess.unavailable_reason()}")
        post = (f"fused with the network {where}, launch-ahead"
                f"{', occupied voxels compacted into cloud rows on the device' if self.device_cloud else ''}"
                if self.fused else
                f"on the CPU ({native})" if on_cpu else "on the device")
        return f"{self.backend.describe()}; {pre}; post-processing {post}"

    @property
    def launch_ahead(self) -> bool:
        """True when ``launch``/``collect`` let the next frame's device work start before this one's host work."""
        return self.fused

    def prepare(self, image_rgb: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
                depth: np.ndarray | None = None, voxel_origin: np.ndarray | None = None, floor_z: float = 0.0,
                slot: int = 0) -> Prepared:
        """Prepare stage: checks, grid placement, preprocessing (and upload) into buffer ``slot``."""
        t0 = time.perf_counter()
        event = None
        if self.fused:  # host half only: ``launch`` queues the device work, into the network's static inputs
            inputs = self.preprocessor.stage(image_rgb, intrinsic, cam_pose, depth=depth, voxel_origin=voxel_origin,
                                             slot=slot, floor_z=floor_z)
        elif self.upload_stream is not None:  # CUDA: no CPU torch ops here, so no intra-op threads to set
            queued, event = self._queued[slot % len(self._queued)], self._ready[slot % len(self._ready)]
            queued.record(torch.cuda.current_stream(self.backend.torch_device))  # wait_stream, minus a new event
            self.upload_stream.wait_event(queued)
            with torch.cuda.stream(self.upload_stream):
                inputs = self.preprocessor(image_rgb, intrinsic, cam_pose, depth=depth, voxel_origin=voxel_origin,
                                           slot=slot, floor_z=floor_z)
                event.record()  # the slot's previous frame is done with both events: reusable
        else:
            with intra_op_threads(self.host_threads):
                inputs = self.preprocessor(image_rgb, intrinsic, cam_pose, depth=depth, voxel_origin=voxel_origin,
                                           slot=slot, floor_z=floor_z)
        return Prepared(inputs, (time.perf_counter() - t0) * 1e3, event)

    def launch(self, prepared: Prepared) -> Launched:
        """Fused path, finish stage (a): queue the frame's device work (upload, preprocessing, network,
        post-processing) and the copy of its grids into its slot's pinned buffers; returns without waiting.
        The grids stay there until the slot is launched again."""
        if not self.fused:
            raise RuntimeError("launch/collect need the fused CUDA-graph path (see OccupancyPipeline.fused)")
        t0 = time.perf_counter()
        dev = self.backend.torch_device
        stream = torch.cuda.current_stream(dev) if dev.type == "cuda" else None
        slot = prepared.inputs.slot
        out = self._result_sets()[slot]
        if out.used and not out.copied.query():
            out.copied.synchronize()  # the slot's last copy is done (its frame was collected long ago)
        out.used = True
        post = self._post_fn()
        with torch.inference_mode():
            targets = self._fused_targets(post)
            graph = None
            if self.preprocessor.frame_graphs:  # captured on the slot's first frame (the tail is made for that)
                graph = self.preprocessor.frame_graph(prepared.inputs, targets, post,
                                                      functools.partial(self._frame_tail, post, out),
                                                      functools.partial(self.backend.fused_pool, post))
            if graph is not None:  # the whole frame: one replay between the two events
                out.start.record(stream)
                graph.replay()
                out.copied.record(stream)
                self.preprocessor.staging_done(slot, out.copied)
                return Launched(prepared, *out.grids, out.copied, out.start, out.copied, t0, out.cloud)
            # the frame's upload, resize and normalisation, straight into the network's static inputs: in
            # stream order before the network, so no copy and no second stream (one replay on CUDA; on the
            # CPU torch ops on the host threads, the network below on torch's own)
            with intra_op_threads(self.host_threads if stream is None else None):
                inputs = self.preprocessor.run(prepared.inputs, targets, stream)
            out.start.record(stream)
            labels, best = self.backend.run_fused(inputs, post)
            out.end.record(stream)
            self._results_back(out, labels, best)
        out.copied.record(stream)
        return Launched(prepared, *out.grids, out.copied, out.start, out.end, t0, out.cloud)

    def _results_back(self, out: _ResultSet, labels: torch.Tensor, best: torch.Tensor) -> None:
        """Queue the copies of a frame's results into ``out``'s pinned buffers: the grids, or with ``device_cloud``
        the compacted rows."""
        if out.cloud is None:
            out.take(labels, best)
        else:
            self.device_cloud(labels, best, out.cloud)

    def _frame_tail(self, post: Any, out: _ResultSet) -> Callable[[], None]:
        """The frame graph's work after the preprocessing: network + ``post`` on the fused graph's static
        inputs, then the results' copies into ``out`` (made when the slot's graph is captured)."""
        step = self.backend.fused_step(post)
        return lambda: self._results_back(out, *step())

    def _result_sets(self) -> list[_ResultSet]:
        """Per buffer slot, the pinned (labels, best) grids with their events, allocated on first use."""
        if not self._results:
            dev = self.backend.torch_device
            shape = (1, *(int(n) for n in self.config.grid_shape))
            pin = dev.type == "cuda"
            self._results = [_ResultSet(torch.empty(shape, dtype=torch.uint8, pin_memory=pin),
                                        torch.empty(shape, dtype=torch.float32, pin_memory=pin),
                                        _event(dev, True), _event(dev, True), _event(dev, True, blocking=True),
                                        self.device_cloud.buffers() if self.device_cloud is not None else None)
                             for _ in range(self.slots)]
        return self._results

    def _fused_targets(self, post: Any) -> FrameTensors:
        """The network's static inputs for ``post``'s fused graph, as the preprocessor's output tensors."""
        targets = self._targets.get(post)
        if targets is None:
            static = self.backend.fused_inputs(post)
            origin = self.device_cloud.origin if self.device_cloud is not None else None
            targets = self._targets[post] = FrameTensors(static["image"], static["grid2img"], static.get("depth"),
                                                         np.zeros(3), device_origin=origin)
        return targets

    def _post_fn(self) -> Any:
        """``dense_occupancy`` for the current post-processing settings: the graph bakes them in, so a
        change (e.g. ``tune_postprocess``) gets its own function, hence its own captured graph."""
        key = tuple(repr(getattr(self.config, f)) for f in POSTPROCESS_FIELDS)
        post = self._posts.get(key)
        if post is None:
            post = self._posts[key] = functools.partial(dense_occupancy, config=copy.deepcopy(self.config))
        return post

    @staticmethod
    def launched_done(launched: Launched) -> bool:
        """True when the launched frame's grids are on the host (``collect`` will not wait)."""
        return bool(launched.copied.query())

    def collect(self, launched: Launched):
        """Fused path, finish stage (b): wait for the copy, then the host ``OccupancyFrame``. ``infer_ms``
        is GPU time (CUDA events): with the frame graph, of the frame's whole device work (upload,
        preprocessing, network, post-processing, copies back); without it, of the network's graph (network +
        post-processing). ``postprocess_ms`` is the host time from the copied grids (or rows) to the frame."""
        launched.copied.synchronize()
        t2 = time.perf_counter()
        prepared = launched.prepared
        if launched.cloud is not None:
            frame = read_frame(launched.cloud, prepared.inputs.voxel_origin, self.config)
        else:
            frame = cloud_frame_from_dense(launched.labels, launched.best, prepared.inputs.voxel_origin, self.config)
        t3 = time.perf_counter()
        pre = prepared.preprocess_ms
        self.last_timings = StageTimings(pre, launched.start.elapsed_time(launched.end), (t3 - t2) * 1e3,
                                         pre + (t3 - launched.t_launch) * 1e3)
        self.history.append(self.last_timings)
        return frame

    def complete(self, prepared: Prepared, network_done: Callable[[], None] | None = None):
        """Finish stage: inference and post-processing of a prepared frame -> ``OccupancyFrame``;
        ``network_done()`` is called between the two (``FrameRunner.network_done``)."""
        if self.fused:
            return self.collect(self.launch(prepared))
        t1 = time.perf_counter()
        if self.tensor_path:
            if prepared.ready is not None:
                torch.cuda.current_stream(self.backend.torch_device).wait_event(prepared.ready)
            points, scores = self.backend.run(prepared.inputs)
            if self._inferred is not None:  # honest infer timing: wait for the network before t2
                self._inferred.record(torch.cuda.current_stream(self.backend.torch_device))
                self._inferred.synchronize()
            elif (self.post_threads > 1 or network_done is not None) and self.backend.torch_device.type == "cpu":
                release_openmp_team()  # its spinning workers would hold the core the host work needs
        else:
            raw = self.backend.infer(prepared.inputs)
            points, scores = raw["points"], raw["scores"]
        t2 = time.perf_counter()
        if network_done is not None:
            network_done()
        with torch.inference_mode(), intra_op_threads(self.host_threads):
            frame = points_to_occupancy(points, scores, prepared.inputs.voxel_origin, self.config,
                                        threads=self.post_threads)
        t3 = time.perf_counter()
        pre = prepared.preprocess_ms
        self.last_timings = StageTimings(pre, (t2 - t1) * 1e3, (t3 - t2) * 1e3, pre + (t3 - t1) * 1e3)
        self.history.append(self.last_timings)
        return frame

    def process(self, image_rgb: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
                depth: np.ndarray | None = None, voxel_origin: np.ndarray | None = None, floor_z: float = 0.0):
        """RGB uint8 HxWx3 + 3x3 K + 4x4 camera->world (+ depth in metres) -> ``OccupancyFrame``.

        Without ``voxel_origin`` the grid is placed by ``geometry.place_grid(cam_pose, floor_z)``.
        """
        return self.complete(self.prepare(image_rgb, intrinsic, cam_pose, depth, voxel_origin, floor_z))

    def timing_summary(self) -> dict[str, dict[str, float]]:
        """Median, p95 and mean ms per stage over the recent window (empty before the first frame)."""
        if not self.history:
            return {}
        out = {}
        for stage in STAGES:
            values = np.array([getattr(t, f"{stage}_ms") for t in self.history])
            out[stage] = {"median_ms": float(np.median(values)), "p95_ms": float(np.percentile(values, 95)),
                          "mean_ms": float(values.mean())}
        return out

    def close(self) -> None:
        for slot in self.preprocessor.slots:
            slot.graphs.clear()
        self._results, self._posts, self._targets = [], {}, {}
        self.backend.close()


class FrameRunner:
    """A frame loop on a thread per stage: ``decode`` (optional), ``prepare`` (preprocess/upload into a
    buffer slot) and ``finish`` (infer, post-process, publish). While the finish stage works on frame i,
    the prepare stage works on frame i+1 and the decode stage on frame i+2.

    Frames pass three hand-offs: submitted -> decode, decoded -> prepare, prepared -> finish (without
    ``decode`` the first two are one). What happens when a frame reaches a hand-off that still holds the
    previous one depends on ``lossless``:
    - off (live camera, the node): the newest frame wins. The waiting frame is replaced, counted in
      ``dropped`` and passed to ``on_drop``.
    - on (bag replay, benchmarks): ``submit`` waits until the first stage took the previous frame, and a
      stage takes its next frame only while no frame waits at a hand-off after it, so no frame is
      dropped and every stage still works on its own frame at once. Where the finish stage is the
      slowest, a decoded and a prepared frame wait for it, so a frame spends about three of its frame
      times in the loop (two without a decode stage): the price of decoding frame i+2 while frame i+1
      is prepared, which a decode-bound loop needs.
    Every submitted frame ends as exactly one of processed, failed or dropped (``wait_idle``/``close``
    finish what is in flight; ``close(discard=True)`` drops what waits instead). ``decode(item)`` returns
    what ``prepare(decoded, slot)`` takes (``prepare(item, slot)`` without ``decode``); ``finish``,
    ``on_error`` and ``on_drop`` always get the submitted item. ``slot`` is in ``range(slots)`` and no
    frame in the finish stage or waiting for it uses it.

    With ``launch`` (launch-ahead), the finish stage calls ``launch(item, prepared)`` (queue the device
    work) and later ``finish(item, launched)``; when the next prepared frame is already waiting, it is
    launched before the current one is finished, so the device works on frame i+1 while the host turns
    frame i into messages. While a launched frame's device work runs (``launched_done(handle)`` False,
    polled every ``LAUNCH_POLL_S``), a frame that becomes ready is launched behind it; once the work is
    done the frame is finished at once, so no frame waits for a newer one. Frames finish in order.
    That needs a fourth slot.
    ``prepare_thread=False`` (launch-ahead only): no ``frame_prepare`` thread; the finish stage prepares each
    frame it takes, right before launching it. Where ``prepare`` is a short host step (the fused CUDA path:
    checks, ``grid2img``, a copy into pinned memory), a thread of its own costs more than it saves: without it
    ``launch`` took half the host time on an H200, and the frame's host work up to 0.3 ms less (lite)
    (docs/results/frame_path.md, session 31).

    ``serial``: the network runs alone. A stage takes a frame only while no frame waits after it and no
    stage after it works, the finish stage counting as working until its frame has left the network:
    ``finish`` may call ``network_done()`` then, and the stages before it take the next frame while it
    post-processes and delivers this one (without the call, one frame is in the loop at a time). The
    stages still run on their threads (the node's callbacks never block). For a CPU whose inference
    already uses every core: there, host work beside the network only slows it down, while the host
    work of two frames shares the cores the network has just left.
    """

    def __init__(self, prepare: Callable[[Any, int], Any], finish: Callable[[Any, Any], None],
                 on_error: Callable[[Any, BaseException], None] | None = None, slots: int = PIPELINE_SLOTS,
                 on_drop: Callable[[Any], None] | None = None,
                 launch: Callable[[Any, Any], Any] | None = None,
                 launched_done: Callable[[Any], bool] = lambda handle: True,
                 decode: Callable[[Any], Any] | None = None, lossless: bool = False, serial: bool = False,
                 prepare_thread: bool = True) -> None:
        need = LAUNCH_AHEAD_SLOTS if launch is not None else PIPELINE_SLOTS
        if slots < need:
            raise ValueError(f"FrameRunner needs {need} buffer slots (in use, waiting, being prepared"
                             f"{', launched ahead' if launch is not None else ''}), got {slots}")
        if not prepare_thread and (launch is None or serial):
            raise ValueError("prepare_thread=False needs a launch-ahead runner (launch given, serial off)")
        self._prepare, self._finish, self._on_error, self._on_drop = prepare, finish, on_error, on_drop
        self._launch, self._launched_done, self._decode = launch, launched_done, decode
        self.lossless, self.serial, self.prepare_thread = bool(lossless), bool(serial), bool(prepare_thread)
        self._cond = threading.Condition()
        self._incoming: Any = None     # submitted, not yet taken by the first stage
        self._decoded: Any = None      # (item, decoded, None) not yet taken by the prepare stage
        self._ready: Any = None        # (item, prepared, slot) not yet taken by the finish stage
        self._busy = [False, False, False]  # the decode / prepare / finish stage works on a frame
        self._network = False  # the finish stage's frame is in the network (until ``network_done``)
        self._free = list(range(slots))
        self._closed = self._discard = False
        self.submitted = self.processed = self.failed = self.dropped = 0
        finish_stage = self._finish_stage if launch is None else self._finish_stage_launch_ahead
        release_openmp_team()  # the stages' threads do the torch work now (export/host_threads.py)
        stages = [(self._relay_stage, (1,), "frame_prepare")] if prepare_thread else []
        stages.append((finish_stage, (), "frame_infer"))
        if decode is not None:
            stages.insert(0, (self._relay_stage, (0,), "frame_decode"))
        self._threads = [threading.Thread(target=target, args=args, name=name, daemon=True)
                         for target, args, name in stages]
        for t in self._threads:
            t.start()

    def submit(self, item: Any) -> bool:
        """Queue ``item``; True when it replaced a frame the first stage had not taken (dropped). Lossless:
        waits until the first stage took the previous frame instead (RuntimeError if closed meanwhile)."""
        with self._cond:
            if self.lossless:
                self._cond.wait_for(lambda: self._incoming is None or self._closed)
            if self._closed:
                raise RuntimeError("FrameRunner is closed")
            self.submitted += 1
            replaced, self._incoming = self._incoming, item
            self.dropped += int(replaced is not None)
            self._cond.notify_all()
        if replaced is not None:
            self._dropped(replaced)
        return replaced is not None

    def _upstream_idle(self, stage: int) -> bool:
        """No frame waits at a hand-off up to ``stage``'s own (stages: 0 decode, 1 prepare, 2 finish) and
        no stage before it works on one."""
        waiting = (self._incoming, self._decoded, self._ready)[:stage + 1]
        return all(w is None for w in waiting) and not any(self._busy[:stage])

    def _relay_stage(self, stage: int) -> None:
        """The decode (0) or prepare (1) stage: take the frame waiting before it, work on it (a failure is
        counted and reported), hand the result on to the next stage."""
        source = "_incoming" if stage == 0 or self._decode is None else "_decoded"
        place = "_decoded" if stage == 0 else "_ready"
        while True:
            with self._cond:
                while (not self._can_take(stage, getattr(self, source))
                       and not (self._closed and self._upstream_idle(stage))):
                    self._cond.wait()
                taken = getattr(self, source)
                if taken is None:
                    return
                setattr(self, source, None)
                item, payload = self._item_payload(source, taken)
                slot = self._free.pop() if stage == 1 else None
                self._busy[stage] = True
                self._cond.notify_all()  # the hand-off is free: the stage or submit before it may go on
            try:
                result = self._decode(payload) if stage == 0 else self._prepare(payload, slot)
            except BaseException as exc:  # bad input: counted, reported, never kills the thread
                self._stage_failed(stage, item, slot, exc)
                continue
            self._hand_over(stage, place, (item, result, slot))

    @staticmethod
    def _item_payload(source: str, taken: Any) -> tuple[Any, Any]:
        """(item, payload) of what was taken from hand-off ``source``: a submitted item is its own payload."""
        return (taken, taken) if source == "_incoming" else taken[:2]

    def _can_take(self, stage: int, source: Any) -> bool:
        """Stage ``stage`` (0 decode, 1 prepare) may take ``source`` (its hand-off's frame, None when empty):
        lossless, only while the hand-offs after it are free, so that what it makes never replaces a frame
        there; serial, only while moreover no stage after it works."""
        if source is None:
            return False
        after = (self._decoded, self._ready)[stage:]
        if self.serial:
            working = [*self._busy[stage + 1:2], self._busy[2] and self._network]
            return all(a is None for a in after) and not any(working)
        return not self.lossless or all(a is None for a in after)

    def _hand_over(self, stage: int, place: str, entry: tuple[Any, Any, int | None]) -> None:
        """Put ``entry`` (item, payload, slot) at hand-off ``place`` as stage ``stage`` ends it; the newest
        frame wins: one still waiting there is dropped (never when lossless, see ``_can_take``)."""
        with self._cond:
            replaced = getattr(self, place)
            drops = [] if replaced is None else [replaced]
            discarded = self._discard  # closed meanwhile: this frame is not finished either
            if discarded:
                drops.append(entry)
            else:
                setattr(self, place, entry)
            for _, _, slot in drops:
                if slot is not None:
                    self._free.append(slot)
            self.dropped += len(drops)
            self._busy[stage] = False
            self._cond.notify_all()
        for dropped in drops:
            self._dropped(dropped[0])

    def _stage_failed(self, stage: int, item: Any, slot: int | None, exc: BaseException) -> None:
        """Count a frame that failed in the decode or prepare stage, free its slot, report it."""
        with self._cond:
            self.failed += 1
            if slot is not None:
                self._free.append(slot)
            self._busy[stage] = False
            self._cond.notify_all()
        self._report(item, exc)

    def _finish_stage(self) -> None:
        while True:
            with self._cond:
                while self._ready is None and not (self._closed and self._upstream_idle(2)):
                    self._cond.wait()
                if self._ready is None:
                    return
                (item, prepared, slot), self._ready = self._ready, None
                self._busy[2] = self._network = True
                self._cond.notify_all()  # the hand-off is free: the prepare stage may go on
            self._finish_counted(item, prepared, slot, idle=True)

    def _finish_stage_launch_ahead(self) -> None:
        pending = None  # (item, launched, slot): launched, not finished yet
        # the hand-off this stage takes from: the prepare stage's, or without its thread the one before it
        source = "_ready" if self.prepare_thread else "_decoded" if self._decode is not None else "_incoming"
        while True:
            with self._cond:
                # with a frame on the device, wait for the next frame or for that frame's results,
                # whichever comes first: its results are not delayed, and a next frame gets queued behind it
                while not (getattr(self, source) is not None
                           or (pending is not None and self._launched_done(pending[1]))
                           or (pending is None and self._closed and self._upstream_idle(2))):
                    self._cond.wait(LAUNCH_POLL_S if pending is not None else None)
                taken = getattr(self, source)
                if pending is None and taken is None:
                    return
                setattr(self, source, None)
                self._busy[2] = self._network = True  # no ``network_done`` here: the device works ahead
                if taken is not None:
                    if not self.prepare_thread:  # (item, payload, slot), as the prepare stage hands them over
                        taken = (*self._item_payload(source, taken), self._free.pop())
                    self._cond.notify_all()  # the hand-off is free: the stage before it may go on
            launched = None if taken is None else self._launch_taken(*taken)
            if pending is not None and (launched is not None or taken is None or self._launched_done(pending[1])):
                self._finish_counted(*pending)
                pending = None
            if launched is not None:
                pending = launched
            if pending is None:
                with self._cond:
                    self._busy[2] = False
                    self._cond.notify_all()

    def _launch_taken(self, item: Any, payload: Any, slot: int) -> tuple[Any, Any, int] | None:
        """Launch a frame the launch-ahead finish stage took (preparing it first where no prepare thread did):
        (item, launched, slot), or None when either step failed (counted and reported)."""
        try:
            prepared = payload if self.prepare_thread else self._prepare(payload, slot)
        except BaseException as exc:  # bad input: the prepare stage's failure (its busy flag: never set here)
            self._stage_failed(1, item, slot, exc)
            return None
        try:
            return item, self._launch(item, prepared), slot
        except BaseException as exc:
            self._finish_done(item, slot, exc)
            return None

    def network_done(self) -> None:
        """Called from ``finish`` once its frame has left the network (``serial``: the stages before it may
        take the next frame now; otherwise nothing changes)."""
        with self._cond:
            self._network = False
            self._cond.notify_all()

    def _finish_counted(self, item: Any, handle: Any, slot: int, idle: bool = False) -> None:
        """``finish`` a frame (a failure is reported, never raised), then ``_finish_done``."""
        try:
            self._finish(item, handle)
        except BaseException as exc:  # bad input or a failed publish: counted, never kills the thread
            self._finish_done(item, slot, exc, idle)
        else:
            self._finish_done(item, slot, None, idle)

    def _finish_done(self, item: Any, slot: int, exc: BaseException | None, idle: bool = False) -> None:
        """Count a frame the finish stage ended (processed, or failed with ``exc``) and free its slot;
        ``idle``: the stage holds no other frame now."""
        if exc is not None:
            self._report(item, exc)
        with self._cond:
            self.processed += int(exc is None)
            self.failed += int(exc is not None)
            self._free.append(slot)
            if idle:
                self._busy[2] = False
            self._cond.notify_all()

    def _report(self, item: Any, exc: BaseException) -> None:
        if self._on_error is not None:
            self._on_error(item, exc)

    def _dropped(self, item: Any) -> None:
        if self._on_drop is not None:
            self._on_drop(item)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted frame is processed, failed or dropped; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._upstream_idle(2) and not self._busy[2], timeout)

    def close(self, timeout: float = 10.0, discard: bool = False) -> bool:
        """Finish the frames already submitted, then stop the threads; True when all ended within ``timeout``
        (one deadline for all of them; ``running_threads`` names those that did not).

        ``discard``: shutting down, finish only the frame in the finish stage; the frames waiting at the
        hand-offs and those being decoded or prepared are dropped.
        """
        waiting: list[Any] = []
        with self._cond:
            self._closed = True
            if discard:
                self._discard = True
                if self._incoming is not None:
                    waiting.append(self._incoming)
                    self._incoming = None
                for place in ("_decoded", "_ready"):
                    entry = getattr(self, place)
                    if entry is not None:
                        waiting.append(entry[0])
                        if entry[2] is not None:
                            self._free.append(entry[2])
                        setattr(self, place, None)
                self.dropped += len(waiting)
            self._cond.notify_all()
        for item in waiting:
            self._dropped(item)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        return not self.alive()

    def alive(self) -> bool:
        """True while a stage thread runs (False after ``close`` returned True)."""
        return any(t.is_alive() for t in self._threads)

    def running_threads(self) -> list[str]:
        """Names of the stage threads still running (``frame_decode``, ``frame_prepare``, ``frame_infer``)."""
        return [t.name for t in self._threads if t.is_alive()]

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"submitted": self.submitted, "processed": self.processed, "failed": self.failed,
                    "dropped": self.dropped}
