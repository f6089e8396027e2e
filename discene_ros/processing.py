"""The node's logic without ROS: pipeline set-up, statistics, throttled warnings, frame processing.

The rclpy node (``node.py``) and the bag replay (``replay.py``) both drive these classes, so what
is tested here is what runs on the robot. A frame is processed in three stages
(``FrameProcessor.decode_frame``: decode and checks; ``prepare_decoded``: preprocess/upload;
``complete``: inference, post-processing, output checks), which ``FrameLoop`` runs on three threads so
that the next frame is prepared, and the one after it decoded, while the current one is inferred.
"""
from __future__ import annotations

import gc
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.backends import create_backend
from export.pipeline import PIPELINE_SLOTS, FrameRunner, OccupancyPipeline
from models.geometry import centers_finite_in_float32

from . import msg_decode, msg_encode
from .errors import DepthError, FrameError, MissingCameraInfoError, MissingTransformError, NonFiniteOutputError
from .params import DEFAULT_MODEL, PIPELINING_MODES, RECTIFIED_MODES, rectified_topic
from .undistort import DISTORTION_MODELS, Undistorter, needs_undistortion

CAMERA_CACHE_SIZE = 8  # calibrations and image sizes FrameProcessor keeps checked (one camera: one)
# A compressed depth image may claim at most this many times the colour image's pixels (4x its width and height:
# a RealSense D400's largest depth mode, 1280x720, over its smallest colour mode, 320x180; aligned depth has the
# colour size): a few corrupt RVL or PNG bytes claiming 64 Mpx are refused before decoding, not after hundreds of
# MB. The aspect check in FrameProcessor._depth refuses the rest.
DEPTH_PIXELS_PER_IMAGE_PIXEL = 16


def build_pipeline(model: str | Path | None = None, backend: str = "torch", device: str | None = "auto",
                   fp16: bool = False, compile: bool = False, cuda_graph: bool = False, tf32: bool = False,
                   closing: bool | None = None, score_threshold: float | None = None,
                   tf32_convolutions: bool = False, frame_graph: bool = True) -> OccupancyPipeline:
    """Backend + OccupancyPipeline for the node and the replay; the default model is the shipped one.

    ``device`` "auto" (or None) lets the backend choose; ``compile``/``cuda_graph``/``tf32``/``tf32_convolutions``
    apply to the torch backend (``cuda_graph`` on the CPU: static buffers, eager), ``frame_graph`` to its CUDA graphs
    (``OccupancyPipeline(frame_graphs=...)``). ``closing`` and ``score_threshold``
    (None: the model config's) are post-processing settings, see ``tune_postprocess``.
    """
    path = Path(model) if model else DEFAULT_MODEL
    if path.is_dir():
        raise FileNotFoundError(f"model path {path} is a directory: give the model file in it (a checkpoint .pt, "
                                ".onnx or .engine)")
    if not path.is_file():
        hint = ("the shipped model discene_ros/data/lite_distilled.pt is missing from this install; give a model "
                "path (a checkpoint .pt, .onnx or .engine)") if not model else "check the model path"
        raise FileNotFoundError(f"model file {path} not found: {hint}")
    if path.suffix.lower() == ".onnx":
        check_onnx_file(path)
    be = create_backend(backend, path, device=None if device in (None, "auto") else device, fp16=fp16,
                        compile=compile, cuda_graph=cuda_graph, tf32=tf32, tf32_convolutions=tf32_convolutions)
    return tune_postprocess(OccupancyPipeline(be, frame_graphs=frame_graph), closing, score_threshold)


def tune_postprocess(pipeline: Any, closing: bool | None = None, score_threshold: float | None = None) -> Any:
    """Set the post-processing settings a deployment may change without re-exporting; None keeps the model's."""
    if score_threshold is not None:
        pipeline.config.score_threshold = float(score_threshold)
    if closing is not None:
        pipeline.config.closing = bool(closing)
    return pipeline


def check_onnx_file(path: Path) -> None:
    """ValueError naming the file when it is not a readable ONNX model (before any sidecar is looked for)."""
    try:
        import onnx
    except ImportError:
        return  # the onnxruntime backend reports its own missing dependency
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, truncated files, ...
        raise ValueError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); export one with "
                         "discene-export onnx") from None


def latency_percentiles(values_ms: Any) -> dict[str, float]:
    """p50/p90/p99/mean of latencies in ms (zeros when empty)."""
    arr = np.asarray(list(values_ms), dtype=np.float64)
    if arr.size == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean())}


class FrameStats:
    """Thread-safe counters (received, processed, dropped, skipped by reason), FPS and latency window."""

    def __init__(self, window: int = 200, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.received = 0
        self.processed = 0
        self.dropped = 0
        self.skipped: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=window)
        self._done_times: deque[float] = deque(maxlen=window)
        self._window_processed = 0
        self._window_skipped = 0

    def on_received(self, dropped_previous: bool = False) -> None:
        with self._lock:
            self.received += 1
            self.dropped += int(dropped_previous)

    def on_dropped(self) -> None:
        """A received frame replaced by a newer one before it was processed, or abandoned at shutdown."""
        with self._lock:
            self.dropped += 1

    def on_skipped(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1
            self._window_skipped += 1

    def on_processed(self, latency_ms: float) -> None:
        with self._lock:
            self.processed += 1
            self._window_processed += 1
            self.latencies_ms.append(float(latency_ms))
            self._done_times.append(self._clock())

    def fps(self) -> float:
        """Processed frames per second over the recent window of completions."""
        with self._lock:
            times = list(self._done_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def snapshot(self, reset_window: bool = True) -> dict[str, Any]:
        """Summary dict (what diagnostics publish); ``window_*`` count since the previous snapshot."""
        fps = self.fps()
        with self._lock:
            out = {
                "fps": fps, "latency_ms": latency_percentiles(self.latencies_ms), "received": self.received,
                "processed": self.processed, "dropped": self.dropped, "skipped": dict(self.skipped),
                "window_processed": self._window_processed, "window_skipped": self._window_skipped,
            }
            if reset_window:
                self._window_processed = self._window_skipped = 0
        return out


class WarnThrottle:
    """Allows one message per key every ``period_s`` seconds, and counts what it suppressed. Thread-safe: the
    frame loop's stages report skips from their own threads."""

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = float(period_s)
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self.suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> bool:
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self.suppressed[key] += 1
                return False
            self._last[key] = now
            return True


def fallback_camera_pose(height: float, pitch_deg: float, floor_z: float = 0.0) -> np.ndarray:
    """Camera->world pose used without TF: camera ``height`` m above the floor, looking along world +x,
    pitched down by ``pitch_deg`` degrees, no roll (optical frame: x right, y down, z forward)."""
    p = math.radians(pitch_deg)
    forward = np.array([math.cos(p), 0.0, -math.sin(p)])
    right = np.array([0.0, -1.0, 0.0])
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = right, down, forward
    pose[:3, 3] = [0.0, 0.0, floor_z + height]
    return pose


@dataclass
class ProcessorSettings:
    """Frame-processing parameters (mirrors the node parameters of the same names; ``depth_max_offset_s``
    is the node's ``sync_tolerance_s``, which ``pairing.FramePartners`` already applies when it pairs)."""

    use_depth: bool = False
    depth_max_offset_s: float = 0.05     # a depth image further than this from the colour stamp is stale
    use_fallback_pose: bool = True       # use the fixed height/pitch pose when TF has no camera pose
    fallback_camera_height: float = 1.0
    fallback_camera_pitch_deg: float = 15.0
    floor_z: float = 0.0
    reduced_jpeg_decode: bool = True     # decode JPEGs at 1/2..1/8 scale when still >= 1.25x the network input
    check_depth_frame: bool = True       # refuse depth whose header frame differs from the colour image's
    rectified: bool = False              # images are rectified: never undistorted, intrinsics from P (images_rectified)


@dataclass
class FrameInput:
    """One colour frame and what goes with it, as received (messages are decoded by the processor)."""

    image: Any                            # sensor_msgs/Image or CompressedImage
    camera_info: Any = None
    depth: Any = None                     # aligned depth Image, or None
    cam_pose: np.ndarray | None = None    # 4x4 camera->world from TF, None when TF had none
    voxel_origin: np.ndarray | None = None  # given grid origin (replay with ground truth), else place_grid
    pose_error: FrameError | None = None  # TF or stamp pairing failed for this frame: it is skipped with it
    fallback_pose: np.ndarray | None = None  # without cam_pose: the fallback pose when the frame was read
    received_s: float = field(default_factory=time.monotonic)

    @property
    def stamp_ns(self) -> int:
        return msg_decode.stamp_to_ns(self.image.header.stamp)


@dataclass
class DecodedFrame:
    """A frame after the decode stage: the image, its K, depth and camera pose, checked."""

    rgb: np.ndarray             # HxWx3 uint8, undistorted
    k: np.ndarray               # 3x3 of ``rgb``
    depth: np.ndarray | None    # metres, or None
    cam_pose: np.ndarray        # 4x4 camera->world
    used_fallback_pose: bool
    voxel_origin: np.ndarray | None
    decode_ms: float


@dataclass
class PreparedFrame:
    """A frame after the prepare stage: decoded, checked, and preprocessed (uploaded) for the network."""

    prepared: Any               # export.pipeline.Prepared
    cam_pose: np.ndarray
    used_fallback_pose: bool
    rgb: np.ndarray
    decode_ms: float
    launched: Any = None        # export.pipeline.Launched once its device work is queued (launch-ahead)


@dataclass
class ProcessedFrame:
    occupancy: Any              # models.postprocess.OccupancyFrame
    cam_pose: np.ndarray
    used_fallback_pose: bool
    rgb: np.ndarray
    timings_ms: dict[str, float]
    cloud: msg_encode.CloudRows | None = None  # the occupancy's PointCloud2 rows, made by the output check


class FrameProcessor:
    """Decode + check a FrameInput, then run the shared OccupancyPipeline. Bad input raises FrameError."""

    def __init__(self, pipeline: Any, settings: ProcessorSettings | None = None) -> None:
        self.pipeline = pipeline
        self.settings = settings or ProcessorSettings()
        self.model_uses_depth = bool(pipeline.config.use_depth)
        if self.model_uses_depth and not self.settings.use_depth:
            raise ValueError(f"model '{pipeline.config.name}' has a depth branch (use_depth=True): enable use_depth "
                             "and give a depth topic, or use an RGB-only model")
        self.fallback_pose = fallback_camera_pose(self.settings.fallback_camera_height,
                                                  self.settings.fallback_camera_pitch_deg, self.settings.floor_z)
        self.undistort = Undistorter()  # raw images with distortion coefficients -> pinhole (cached maps), not rectified
        self._cameras: dict[tuple, tuple[np.ndarray, bool]] = {}  # see _camera
        self.decode_min_hw = (msg_decode.reduced_decode_size(pipeline.config.image_size)
                              if self.settings.reduced_jpeg_decode else None)

    def decode(self, frame: FrameInput) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, bool]:
        """-> (rgb HxWx3 uint8, K 3x3 for that image, depth metres or None, cam_pose 4x4, used_fallback)."""
        if frame.pose_error is not None:
            raise frame.pose_error
        rgb = msg_decode.any_image_to_rgb(frame.image, self.decode_min_hw)  # K below is scaled to its size
        if frame.camera_info is None:
            raise MissingCameraInfoError("no CameraInfo received yet for the image topic")
        k, distorted = self._camera(frame.camera_info, rgb.shape[:2])
        depth = self._depth(frame, rgb.shape[:2]) if self.model_uses_depth else None
        if distorted:
            rgb, depth = self.undistort(frame.camera_info, rgb, k, depth)
        pose, fallback = frame.cam_pose, False
        if pose is not None:
            pose = msg_decode.check_pose(pose)
        else:
            if not self.settings.use_fallback_pose:
                raise MissingTransformError("no camera pose in the world frame from TF and the fallback pose is disabled")
            pose, fallback = (self.fallback_pose if frame.fallback_pose is None else frame.fallback_pose), True
        return rgb, k, depth, pose, fallback

    def _camera(self, info: Any, image_hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
        """(K for an image of ``image_hw``, read-only; whether the image needs undistorting), checked once per
        calibration and image size: each frame brings the same CameraInfo, and checking it took 0.14 ms
        right after an inference (docs/results/frame_path.md, session 10). A rectified image (``settings.rectified``)
        is never undistorted again and takes P's intrinsics; a raw one K's."""
        key = (msg_decode.camera_info_key(info), tuple(image_hw))
        found = self._cameras.get(key)
        if found is None:  # a bad calibration raises here on every frame: it is never stored
            rectified = self.settings.rectified
            k = msg_decode.camera_info_to_k(info, image_hw, rectified=rectified)
            k.flags.writeable = False  # shared by every frame of this calibration
            if len(self._cameras) >= CAMERA_CACHE_SIZE:  # a changing calibration must not grow it without bound
                self._cameras.clear()
            found = self._cameras[key] = (k, not rectified and needs_undistortion(info))
        return found

    def _depth(self, frame: FrameInput, image_hw: tuple[int, int]) -> np.ndarray:
        if frame.depth is None:
            raise DepthError("the model needs depth but no depth image was received")
        offset = abs(msg_decode.stamp_to_ns(frame.depth.header.stamp) - frame.stamp_ns) * 1e-9
        if offset > self.settings.depth_max_offset_s:
            raise DepthError(f"the depth image is {offset * 1e3:.0f} ms away from the colour image "
                             f"(limit {self.settings.depth_max_offset_s * 1e3:.0f} ms)")
        if self.settings.check_depth_frame:
            check_depth_frame(frame.image.header, frame.depth.header)
        limit = min(msg_decode.MAX_IMAGE_PIXELS, DEPTH_PIXELS_PER_IMAGE_PIXEL * image_hw[0] * image_hw[1])
        depth = msg_decode.depth_to_metres(frame.depth, max_pixels=limit)
        dh, dw = depth.shape
        if abs((dw / dh) / (image_hw[1] / image_hw[0]) - 1.0) > 0.01:
            raise DepthError(f"depth {dw}x{dh} is not aligned with the colour image {image_hw[1]}x{image_hw[0]}")
        return depth

    def decode_frame(self, frame: FrameInput) -> DecodedFrame:
        """Decode stage: ``decode`` with its wall time."""
        t0 = time.perf_counter()
        rgb, k, depth, pose, fallback = self.decode(frame)
        return DecodedFrame(rgb, k, depth, pose, fallback, frame.voxel_origin, (time.perf_counter() - t0) * 1e3)

    def prepare_decoded(self, decoded: DecodedFrame, slot: int = 0) -> PreparedFrame:
        """Prepare stage: preprocess/upload a decoded frame into the pipeline's buffer ``slot``."""
        with frame_errors():
            prepared = self.pipeline.prepare(decoded.rgb, decoded.k, decoded.cam_pose, depth=decoded.depth,
                                             voxel_origin=decoded.voxel_origin, floor_z=self.settings.floor_z,
                                             slot=slot)
        return PreparedFrame(prepared, decoded.cam_pose, decoded.used_fallback_pose, decoded.rgb, decoded.decode_ms)

    def prepare(self, frame: FrameInput, slot: int = 0) -> PreparedFrame:
        """Decode and prepare stages on the calling thread."""
        return self.prepare_decoded(self.decode_frame(frame), slot)

    def launch(self, frame: PreparedFrame) -> PreparedFrame:
        """Finish stage, first half (launch-ahead pipelines): queue the frame's device work; ``complete``
        collects it."""
        with frame_errors():
            frame.launched = self.pipeline.launch(frame.prepared)
        return frame

    def launched_done(self, frame: PreparedFrame) -> bool:
        """True when ``complete`` of a launched frame will not wait for the device."""
        return self.pipeline.launched_done(frame.launched)

    def complete(self, frame: PreparedFrame, network_done: Callable[[], None] | None = None) -> ProcessedFrame:
        """Finish stage: inference, post-processing and the output checks of a prepared frame (launched or not);
        ``network_done()`` between the inference and the post-processing (unlaunched frames)."""
        with frame_errors():
            occ = (self.pipeline.collect(frame.launched) if frame.launched is not None
                   else self.pipeline.complete(frame.prepared, network_done))
        t0 = time.perf_counter()
        cloud = checked_cloud(occ)
        check_ms = (time.perf_counter() - t0) * 1e3
        timings = {"decode_ms": frame.decode_ms, **self.pipeline.last_timings.as_dict()}
        total_ms = timings.pop("total_ms")  # the frame's own processing, the output check included
        timings.update(output_check_ms=check_ms, total_ms=total_ms + check_ms)
        return ProcessedFrame(occ, frame.cam_pose, frame.used_fallback_pose, frame.rgb, timings, cloud)

    def process(self, frame: FrameInput) -> ProcessedFrame:
        """Full frame on the calling thread: ``complete(prepare(frame))``."""
        return self.complete(self.prepare(frame))


def check_depth_frame(image_header: Any, depth_header: Any) -> None:
    """DepthError when the depth image names another frame than the colour image (a leading "/" aside; an empty
    frame id on either side is not checked): depth in its own sensor's frame is not registered to the colour
    pixels, and its aspect ratio alone may pass (RealSense colour 1280x720 beside depth 848x480)."""
    image_frame = str(image_header.frame_id).lstrip("/")
    depth_frame = str(depth_header.frame_id).lstrip("/")
    if image_frame and depth_frame and image_frame != depth_frame:
        raise DepthError(f"the depth image is in frame '{depth_frame}', the colour image in '{image_frame}': the depth "
                         "must be registered to the colour camera (e.g. RealSense align_depth.enable:=true and its "
                         "aligned_depth_to_color topic). The node parameter check_depth_frame:=false (replay: "
                         "--no-check-depth-frame) turns this check off")


@contextmanager
def frame_errors() -> Iterator[None]:
    """Turn the ValueError a pipeline stage rejects malformed inputs with into a FrameError (skipped, counted)."""
    try:
        yield
    except FrameError:
        raise
    except ValueError as exc:
        raise FrameError(f"pipeline rejected the frame: {exc}") from exc


def images_rectified(rectified: str, image_topic: str) -> tuple[bool, str]:
    """(rectified, what that means for the images) for the ``rectified`` parameter (auto, true, false) and the image
    topic: auto = rectified where the topic's base name starts with image_rect (``params.rectified_topic``). A
    rectified image (image_proc's image_rect, published beside the raw image's CameraInfo, whose D still holds the
    lens's coefficients) is not undistorted again, and its intrinsics are P's (sensor_msgs/CameraInfo)."""
    if rectified not in RECTIFIED_MODES:
        raise ValueError(f"rectified must be auto, true or false, got {rectified!r}")
    if rectified == "auto":
        is_rectified = rectified_topic(image_topic)
        why = f"rectified auto: {image_topic} is {'' if is_rectified else 'not '}an image_rect topic"
    else:
        is_rectified, why = rectified == "true", f"rectified {rectified}"
    if is_rectified:
        return True, f"rectified images ({why}): not undistorted, intrinsics from CameraInfo P"
    return False, (f"raw images ({why}): undistorted here with K where their CameraInfo has non-zero "
                   f"{'/'.join(DISTORTION_MODELS)} coefficients; other distortion models need rectified images "
                   "(image_proc)")


def frame_loop_mode(pipelining: str, pipeline: Any) -> tuple[bool, str]:
    """(pipelined, why) for the ``pipelining`` parameter (auto, on, off): auto overlaps frames where the
    network runs on a GPU; on the CPU, whose cores its inference already uses, the network runs alone
    (docs/results/frame_path.md, sessions 8 and 27), and only the host work of two frames overlaps."""
    if pipelining not in PIPELINING_MODES:
        raise ValueError(f"pipelining must be auto, on or off, got {pipelining!r}")
    if pipelining != "auto":
        return pipelining == "on", f"pipelining {pipelining}"
    device = str(getattr(getattr(pipeline, "backend", None), "device", "cpu"))
    if device.lower().startswith("cpu"):
        return False, ("the network alone, the next frame decoded and prepared beside this one's post-processing "
                       "(pipelining auto: the network runs on the CPU, whose cores it uses)")
    return True, f"pipelined (pipelining auto: the network runs on {device})"


def uses_prepare_thread(pipelined: bool, pipeline: Any) -> bool:
    """Whether the frame loop prepares frames on a ``frame_prepare`` thread of its own: everywhere but in a
    pipelined loop of a launch-ahead ``pipeline`` (the fused CUDA path). There preparing is a short host step (checks,
    ``grid2img``, the frame into pinned memory), and the finish stage does it right before launching the
    frame: on an H200 ``launch`` then took half its host time, and lite's host work per frame up to 0.3 ms
    less (docs/results/frame_path.md, session 31)."""
    return not (pipelined and getattr(pipeline, "launch_ahead", False))


def uses_decode_thread(compressed: bool, pipelined: bool, prepare_thread: bool = True, locates: bool = False) -> bool:
    """Whether the frame loop decodes on a ``frame_decode`` thread of its own, in a pipelined loop only:
    for compressed images, and where there is no prepare thread and locating a frame may wait (``locates``:
    the node's stamp pairing and TF lookup, up to ``sync_wait_s`` + ``tf_timeout_s``), for every image, so
    that such a wait never holds up the finish stage. A JPEG takes milliseconds to decode, which a thread
    overlaps with the other stages (H200, lite: 369–412 against 275–314 FPS); a raw Image takes 0.2 ms,
    less than a third thread costs (0.3–0.5 ms more host time per frame). Where the network runs alone (the
    CPU) the prepare stage already decodes the next frame beside the previous one's post-processing, and a
    decode thread would only add a hand-off (docs/results/frame_path.md, sessions 9, 12 and 27)."""
    return bool(pipelined and (compressed or (locates and not prepare_thread)))


def decodes_on_decode_thread(compressed: bool, prepare_thread: bool) -> bool:
    """Whether a ``frame_decode`` thread also decodes, or only locates the frame, its decode then running with
    the prepare step: it decodes compressed images (milliseconds, which the thread overlaps), and raw ones where
    a prepare thread takes the frames from it. Where it is there only because locating may wait (raw images, no
    prepare thread), it only locates: the raw image's decode (about 0.06 ms of Python) beside the finish stage's
    preparing held each other up on the GIL. Lite bgr8 against an emulated device, the node's loop: 0.01-0.36 ms
    less host work per frame in twelve of twelve interleaved pairs (docs/results/frame_path.md, session 35)."""
    return bool(compressed or prepare_thread)


def post_threads_for(pipelined: bool, compressed: bool = False) -> int:
    """Threads of the CPU post-processing kernel: 1 in a pipelined loop, whose other stages use the cores
    meanwhile. Where the network runs alone, the next frame's decode and preprocessing run beside the
    post-processing: 2 threads for raw images, whose preprocessing (about 1 ms) leaves the helper a core,
    1 for compressed ones, whose decode takes that core for longer. Lite on the 2-core build machine,
    host time between two networks: bgr8 2.9-3.0 ms with 2 threads against 3.4-3.5 with 1; JPEG 3.7-3.8
    ms with 1 against 4.0-4.2 with 2 (docs/results/frame_path.md, session 27)."""
    return 2 if not pipelined and not compressed and (os.cpu_count() or 1) >= 2 else 1


class FrameLoop:
    """A FrameProcessor on ``export.pipeline.FrameRunner``: the node's and the replay's frame loop.

    Decode stage (thread ``frame_decode``): ``locate(frame)`` (stamp pairing and TF, which may block a
    while), then ``FrameProcessor.decode_frame``; prepare stage (``frame_prepare``):
    ``FrameProcessor.prepare_decoded``; finish stage (``frame_infer``): ``FrameProcessor.complete``, then
    ``deliver(frame, result)`` (publish, or write the bag). The newest frame wins at every hand-off;
    ``lossless`` (the full-speed replay): ``submit`` and the stages wait instead, nothing is dropped, and
    a frame's latency runs from the decode stage taking it rather than from its ``received_s``.
    Every submitted frame ends in ``stats`` as exactly one of processed, skipped (FrameError reason
    from any stage, ``internal_error`` for anything else) or dropped (replaced by a newer frame, or
    abandoned at shutdown), so ``received == processed + skipped + dropped`` whenever none is in flight.
    After ``close`` starts, ``deliver`` is never called again. ``pipelined=False``: the same stages and
    threads, the network alone (``FrameRunner(serial=True)``; see ``frame_loop_mode``): the next frame is
    decoded and prepared while this one is post-processed and delivered, never while it is inferred.
    ``decode_thread=False``: no ``frame_decode`` thread; the prepare stage locates and decodes the frame
    first. ``decode_on_thread=False`` (with a decode thread): that thread only locates the frame, and the
    prepare stage decodes it. ``prepare_thread=False`` (launch-ahead pipelines): no ``frame_prepare`` thread;
    the finish stage prepares each frame right before launching it. The node and the replay choose with
    ``uses_prepare_thread``, ``uses_decode_thread`` and ``decodes_on_decode_thread``.
    """

    def __init__(self, processor: FrameProcessor, stats: FrameStats, deliver: Callable[[FrameInput, ProcessedFrame], None],
                 locate: Callable[[FrameInput], None] | None = None,
                 on_skip: Callable[[FrameInput, str, str], None] | None = None,
                 stopping: Callable[[], bool] = lambda: False, lossless: bool = False,
                 pipelined: bool = True, decode_thread: bool = True, prepare_thread: bool = True,
                 decode_on_thread: bool = True) -> None:
        self.processor, self.stats = processor, stats
        self.deliver, self.locate, self.on_skip, self.stopping = deliver, locate, on_skip, stopping
        self.deliver_lock = threading.Lock()  # close() takes it: no delivery starts after close()
        self.closed, self.lossless = False, lossless
        self.abandoned = 0  # frames an interrupt stopped on their way in (counted dropped; see submit)
        self.warm = False  # a frame has been processed (and what its compilation made frozen)
        ahead = bool(getattr(processor.pipeline, "launch_ahead", False))
        self.network_done: Callable[[], None] | None = None  # serial: the next frame's host work may start
        decoded_before = decode_thread and decode_on_thread  # the decode stage hands on decoded frames
        self.decode_thread = decode_thread  # it locates (and perhaps decodes) each frame first
        self.runner = FrameRunner(
            processor.prepare_decoded if decoded_before else self.decode_and_prepare, self.finish_stage,
            on_error=self.error_callback, on_drop=lambda frame: self.stats.on_dropped(),
            slots=getattr(processor.pipeline, "slots", PIPELINE_SLOTS),
            launch=(lambda frame, prepared: processor.launch(prepared)) if ahead else None,
            launched_done=processor.launched_done,
            decode=(self.decode_stage if decode_on_thread else self.locate_stage) if decode_thread else None,
            lossless=lossless, serial=not pipelined, prepare_thread=prepare_thread)
        if not pipelined:
            self.network_done = self.runner.network_done

    def submit(self, frame: FrameInput) -> None:
        """Count ``frame`` as received and hand it to the decode stage (ignored once closed); lossless:
        waits until that stage took the previous frame. A frame that an interrupt (Ctrl-C) stops in that wait
        never entered the loop: it is counted dropped, and in ``abandoned``, so that every received frame
        ends in one count."""
        if self.closed:
            return
        self.stats.on_received()
        entered = self.runner.submitted  # only this thread submits
        try:
            self.runner.submit(frame)
        except RuntimeError:  # closed meanwhile (shutdown)
            self.stats.on_dropped()
        except BaseException:
            if self.runner.submitted == entered:
                self.stats.on_dropped()
                self.abandoned += 1
            raise

    def locate_stage(self, frame: FrameInput) -> FrameInput:
        """Where the loop takes a frame: its latency starts (lossless), and ``locate`` pairs it and finds its pose."""
        if self.lossless:
            frame.received_s = time.monotonic()  # taken now: the wait to get in is the feeder's
        if self.locate is not None:
            self.locate(frame)
        return frame

    def decode_stage(self, frame: FrameInput) -> DecodedFrame:
        return self.processor.decode_frame(self.locate_stage(frame))

    def decode_and_prepare(self, frame: FrameInput, slot: int) -> PreparedFrame:
        """The prepare stage where no decode thread decoded the frame: it is decoded (and, without a decode thread,
        located) on the calling thread."""
        located = frame if self.decode_thread else self.locate_stage(frame)
        return self.processor.prepare_decoded(self.processor.decode_frame(located), slot)

    def finish_stage(self, frame: FrameInput, prepared: PreparedFrame) -> None:
        result = self.processor.complete(prepared, self.network_done)
        with self.deliver_lock:
            if self.closed or self.stopping():  # shutting down: the frame is abandoned, not published
                self.stats.on_dropped()
                return
            self.deliver(frame, result)
        self.stats.on_processed((time.monotonic() - frame.received_s) * 1e3)
        if not self.warm:  # the first frame compiled and captured the network: freeze what that made too
            self.warm = True
            freeze_startup_objects()

    def error_callback(self, frame: FrameInput, exc: BaseException) -> None:
        if self.closed or self.stopping():  # shutting down (e.g. publishing after Ctrl-C shut rclpy down,
            self.stats.on_dropped()         # pairing woken by close): abandoned, not a verdict on the frame
            return
        if isinstance(exc, FrameError):
            reason, text = exc.reason, str(exc)
        else:
            reason, text = "internal_error", f"{type(exc).__name__}: {exc}"
        self.stats.on_skipped(reason)
        if self.on_skip is not None:
            self.on_skip(frame, reason, text)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted frame is processed, skipped or dropped."""
        return self.runner.wait_idle(timeout)

    def close(self, discard: bool = False, timeout: float = 10.0, wake: Callable[[], None] | None = None) -> bool:
        """Stop the stage threads (True when all ended within ``timeout``, one deadline for all). ``discard`` (shutdown): nothing more is
        delivered, waiting frames are dropped, then ``wake`` unblocks a stage waiting on input (the
        node's pairing wait); without it every submitted frame is finished first."""
        if discard:
            with self.deliver_lock:
                self.closed = True
        if wake is not None:
            wake()
        ended = self.runner.close(timeout, discard=discard)
        self.closed = True
        return ended

    def alive(self) -> bool:
        """True while a stage thread runs."""
        return self.runner.alive()

    def running_threads(self) -> list[str]:
        """Names of the stage threads still running."""
        return self.runner.running_threads()


def freeze_startup_objects() -> int:
    """Collect, then move every object alive now (modules, the model, caches built at start-up) out of the
    cyclic garbage collector's reach, so that a full collection scans only what the frame loop adds:
    with lite loaded, a full collection took 91–95 ms before and under 0.1 ms after (build machine, 209k
    tracked objects), a pause of several frames a running node would otherwise take now and then; after
    torch.compile's first frame (344k more objects) it took 236 ms. Called by the node and the replay
    after start-up and by ``FrameLoop`` after its first frame; returns the number of frozen objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def checked_cloud(occ: Any) -> msg_encode.CloudRows:
    """The frame's PointCloud2 rows, after ``check_outputs`` has passed them: the native kernel sees on the
    way whether every centre and score is finite, so the check does not pass over the frame again (check
    and PointCloud2 0.25 against 0.35 ms right after an inference here, docs/results/frame_path.md, session 11)."""
    cloud = msg_encode.occupancy_cloud(occ)
    check_outputs(occ, cloud)
    return cloud


def check_outputs(occ: Any, cloud: msg_encode.CloudRows | None = None) -> None:
    """Raise NonFiniteOutputError unless the voxel centres (as float32, what PointCloud2 carries), scores
    and grid origin of an OccupancyFrame are all finite: a cloud of NaN/inf points is never published.
    ``cloud``: the frame's ``msg_encode.occupancy_cloud``; where its writer saw every centre and score
    finite, only the origin is left to check."""
    origin = np.asarray(occ.voxel_origin, dtype=np.float64).reshape(-1).tolist()
    if cloud is not None and cloud.xyz_finite and cloud.scores_finite and all(map(math.isfinite, origin)):
        return
    scores = np.asarray(occ.voxel_scores, dtype=np.float32)
    # one reduction: a float64 sum of float32 values cannot overflow, so it is finite exactly when they all are
    bad = {"voxel centres": nonfinite_centers(occ),
           "scores": 0 if math.isfinite(scores.sum(dtype=np.float64)) else int(np.sum(~np.isfinite(scores))),
           "grid origin": sum(not math.isfinite(v) for v in origin)}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise NonFiniteOutputError("non-finite output, nothing published: "
                                   + ", ".join(f"{n} {k}" for k, n in bad.items()))


def nonfinite_centers(occ: Any) -> int:
    """How many of the frame's voxel centres are not finite in float32.

    A centre ``origin + (index + 0.5) * size`` is monotonic in the index along each axis, and so is the
    rounding to float32, so when the centres at the lowest and the highest index of all axes are finite
    on every axis, all of them are: six numbers instead of 3M (0.02 against 0.4 ms for 12k voxels).
    Otherwise every centre is counted.
    """
    indices = np.asarray(occ.voxel_indices).reshape(-1, 3)
    if not len(indices):
        return 0
    lowest, highest = float(indices.min()), float(indices.max())  # over all three axes
    if centers_finite_in_float32(occ.voxel_origin, float(occ.voxel_size), (lowest,) * 3, (highest,) * 3):
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        centers = np.asarray(occ.centers_world(), dtype=np.float64).astype(np.float32)
    return int(np.sum(~np.isfinite(centers).all(axis=-1)))


def build_outputs(factory: Any, processed: ProcessedFrame, world_frame: str, stamp_ns: int,
                  markers: bool = True) -> dict[str, Any]:
    """Messages published for one frame: ``cloud`` (PointCloud2), ``grid_pose``, and ``markers`` if asked."""
    occ = processed.occupancy
    out = {
        "cloud": msg_encode.occupancy_to_pointcloud2(factory, occ, world_frame, stamp_ns, processed.cloud),
        "grid_pose": msg_encode.grid_pose_msg(factory, occ.voxel_origin, world_frame, stamp_ns),
    }
    if markers:
        out["markers"] = msg_encode.occupancy_to_marker_array(factory, occ, world_frame, stamp_ns)
    return out
