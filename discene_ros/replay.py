"""``discene-replay``: run a ROS 2 bag (mcap or sqlite3) through the node's pipeline and evaluate it.

Every colour image goes through the same ``FrameProcessor`` + ``OccupancyPipeline`` as the node,
at full speed or, with ``--realtime``, at the recorded rate with the node's newest-frame-wins
dropping. Predictions are written to an output bag; IoU/mIoU (SSCMetrics protocol) are computed
against the ground-truth topics when the bag has them (see ``bag_io``); ``report.md``, PNG renders
and an optional JSON summary are written. Without ``--bag`` the shipped sample bag is replayed
with the shipped model.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import json
import queue
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.checkpoint import atomic_write, check_output_file, check_output_folder
from models.classes import CLASS_NAMES, NUM_CLASSES, UNKNOWN_LABEL

from . import bag_io, msg_decode, msg_encode
from .camera_pose import orientation_problem, use_fallback
from .errors import CloudFormatError, FrameError
from .msg_factory import TypestoreFactory
from .pairing import FramePartners
from .params import (
    DATA_DIR,
    PIPELINING_MODES,
    RECTIFIED_MODES,
    TF_FRAME_PARAMETERS,
    camera_info_topic_for,
    check_range,
    tf_frame,
)
from .processing import (
    FrameInput,
    FrameLoop,
    FrameProcessor,
    FrameStats,
    ProcessedFrame,
    ProcessorSettings,
    build_outputs,
    build_pipeline,
    frame_loop_mode,
    freeze_startup_objects,
    images_rectified,
    latency_percentiles,
    post_threads_for,
    uses_decode_thread,
    uses_prepare_thread,
)
from .report import ground_truth_line, invalid_transforms_note

SAMPLE_BAG = DATA_DIR / "sample_bag"
SKIP_HINT = "pass --no-fallback-pose"  # the replay's way to skip frames without a TF pose
GT_STAMP_TOLERANCE_MAX_S = 1.0  # --gt-stamp-tolerance: matching, not interpolation; more is a mistake


@dataclass
class GroundTruthGrid:
    """A bag's ground truth for one frame: the label grid and where it lies (not training's point targets).

    Kept as the lossless PNG of the grid (a few kB; the grid takes 130 kB, the cloud message 300 kB), as the
    labels topic carries it, and decoded when the frame is scored: a drive's ground truth is read before
    the first frame and held to the end (19,764 frames on the Occ-ScanNet val split)."""

    png: bytes                  # msg_encode.label_grid_png of the (X, Y, Z) uint8 grid, 255 unknown
    grid_shape: tuple[int, int, int]
    voxel_origin: np.ndarray    # (3,)
    has_unknown: bool           # False when only the occupied-voxel cloud was available

    @classmethod
    def from_grid(cls, labels: np.ndarray, voxel_origin: np.ndarray, has_unknown: bool) -> GroundTruthGrid:
        """Ground truth of a dense label grid, kept as its PNG."""
        return cls(msg_encode.label_grid_png(labels), tuple(labels.shape), voxel_origin, has_unknown)

    def label_grid(self) -> np.ndarray:
        """The (X, Y, Z) uint8 label grid."""
        return msg_decode.png_bytes_to_label_grid(self.png, self.grid_shape)


@dataclass
class ReplaySettings:
    """How to replay a bag: model and backend, topics, pairing and pose, speed, outputs."""

    model: str | Path | None = None     # checkpoint/.onnx/.engine; None: the shipped lite_distilled.pt
    backend: str = "torch"              # torch, onnxruntime or tensorrt
    device: str | None = None           # torch device; None: CUDA when present (as the node's "auto")
    fp16: bool = False                  # torch backend options, as the node's parameters of these names
    cuda_graph: bool = True
    frame_graph: bool = True
    compile: bool = False
    tf32: bool = False
    tf32_convolutions: bool = False
    score_threshold: float | None = None  # None: the model config's
    image_topic: str | None = None      # None: auto-detect (also the two below)
    info_topic: str | None = None
    depth_topic: str | None = None
    use_depth: bool | None = None       # None: when the model has a depth branch
    check_depth_frame: bool = True      # the node's parameter: skip depth in another frame than the image
    rectified: str = "auto"             # the node's parameter: auto, true or false (processing.images_rectified)
    world_frame: str = bag_io.WORLD_FRAME
    base_frame: str = "base_link"       # camera mount frame, for the fallback pose
    use_fallback_pose: bool = True      # False: skip frames without a TF pose
    sync_tolerance_s: float = 0.02      # largest stamp difference of colour vs depth / camera info
    sync_wait_s: float = 0.5            # how long (bag time) an image waits for its partners and TF
    gt_stamp_tolerance_s: float = 0.0   # largest stamp difference of ground truth vs its image; 0: exactly equal
    realtime: bool = False              # the recorded rate, newest frame wins; else every frame, full speed
    pipelining: str = "auto"            # the node's parameter: auto, on or off (processing.frame_loop_mode)
    max_frames: int | None = None       # stop after this many colour images
    storage: str = "mcap"               # output bag storage
    output_bag: bool = True             # write the predicted clouds and grid poses into occupancy_bag/
    n_renders: int = 3                  # frames rendered into the report
    progress: bool = True               # progress bar
    report: bool = False                # write report.md and renders

    def __post_init__(self) -> None:
        """The node's rules where a setting is one of its parameters; ValueError for a value it would refuse."""
        for name in TF_FRAME_PARAMETERS:  # as the node's parameters: tf2's names, without a leading "/"
            setattr(self, name, tf_frame(name, getattr(self, name)))
        check_range("sync_tolerance_s", self.sync_tolerance_s)
        check_range("sync_wait_s", self.sync_wait_s)
        if not 0.0 <= self.gt_stamp_tolerance_s <= GT_STAMP_TOLERANCE_MAX_S:  # NaN too
            raise ValueError(f"gt_stamp_tolerance_s={self.gt_stamp_tolerance_s} is outside [0, "
                             f"{GT_STAMP_TOLERANCE_MAX_S}] s")
        if self.score_threshold is not None:  # None: the model's own (the node's negative values)
            check_range("score_threshold", self.score_threshold)
            if self.score_threshold < 0:
                raise ValueError(f"score_threshold={self.score_threshold}: give 0 to 0.99, or none for the model's own")
        if self.rectified not in RECTIFIED_MODES:
            raise ValueError(f"rectified={self.rectified!r} is not one of {', '.join(RECTIFIED_MODES)}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames={self.max_frames}: give at least 1, or none for every frame")
        if self.n_renders < 0:
            raise ValueError(f"n_renders={self.n_renders} must not be negative")


@dataclass
class ReplayResult:
    summary: dict[str, Any]
    renders: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None  # where report.md went (with report=True): see write_outputs


# ----------------------------------------------------------------------------- reading the bag
def check_labels(grid: np.ndarray, num_classes: int) -> np.ndarray:
    """``grid`` when every label is 0 (empty), a class 1..``num_classes`` or 255 (unknown); else CloudFormatError,
    so that the frame is not scored (SSCMetrics would refuse it only after the frame's outputs were made)."""
    bad = (grid > num_classes) & (grid != UNKNOWN_LABEL)
    if bad.any():
        raise CloudFormatError(f"ground-truth labels {np.unique(grid[bad])[:5].tolist()} in {int(bad.sum())} voxels "
                               f"are outside 0..{num_classes} and {UNKNOWN_LABEL}")
    return grid


def read_ground_truth(reader: Any, grid_shape: tuple[int, int, int], voxel_size: float,
                      errors: list[str], num_classes: int = NUM_CLASSES) -> dict[int, GroundTruthGrid]:
    """Ground truth per header stamp (ns) from the labels/cloud + grid pose topics; empty when absent.
    A stamp whose ground truth is unusable (undecodable, another size, labels beyond ``num_classes``) is
    left out and said in ``errors``: its frame is processed, not scored."""
    if not any(c.topic == bag_io.GT_POSE_TOPIC for c in reader.connections):
        return {}
    origins: dict[int, np.ndarray] = {}
    labels: dict[int, bytes | str] = {}  # the checked PNG, or why it is unusable
    for topic, msg in _ground_truth_messages(reader, (bag_io.GT_POSE_TOPIC, bag_io.GT_LABELS_TOPIC), errors):
        stamp = msg_decode.stamp_to_ns(msg.header.stamp)
        if topic == bag_io.GT_POSE_TOPIC:
            origins[stamp] = msg_decode.grid_origin_from_pose(msg)
            continue
        try:  # checked now, decoded again when scored: only the PNG's few kB are kept
            check_labels(msg_decode.png_to_label_grid(msg, grid_shape), num_classes)
            labels[stamp] = np.asarray(msg.data, dtype=np.uint8).tobytes()
        except FrameError as exc:
            labels[stamp] = str(exc)
    # the cloud only where a stamp has no label image: read apart, one message at a time (300 kB each)
    clouds: dict[int, GroundTruthGrid | str] = {}
    if any(stamp not in labels for stamp in origins):
        for _, msg in _ground_truth_messages(reader, (bag_io.GT_TOPIC,), errors):
            stamp = msg_decode.stamp_to_ns(msg.header.stamp)
            if stamp in origins and stamp not in labels:
                try:
                    grid = msg_decode.cloud_to_label_grid(msg, origins[stamp], voxel_size, grid_shape)
                    clouds[stamp] = GroundTruthGrid.from_grid(check_labels(grid, num_classes), origins[stamp], False)
                except FrameError as exc:
                    clouds[stamp] = str(exc)
    out = {}
    unusable: dict[str, list[int]] = {}  # why -> the stamps
    for stamp, origin in origins.items():
        found = labels.get(stamp, clouds.get(stamp))
        if isinstance(found, str):
            unusable.setdefault(found, []).append(stamp)
        elif isinstance(found, bytes):
            out[stamp] = GroundTruthGrid(found, grid_shape, origin, True)
        elif found is not None:
            out[stamp] = found
        else:
            unusable.setdefault(f"a grid pose ({bag_io.GT_POSE_TOPIC}) without labels ({bag_io.GT_LABELS_TOPIC}) "
                                f"or a cloud ({bag_io.GT_TOPIC}) at its stamp", []).append(stamp)
    for stamp in sorted(labels.keys() - origins.keys()):  # a grid's labels are placed by the pose of its stamp
        unusable.setdefault(f"labels ({bag_io.GT_LABELS_TOPIC}) without a grid pose ({bag_io.GT_POSE_TOPIC}) at "
                            "their stamp", []).append(stamp)
    errors += unusable_lines(unusable)
    return out


UNUSABLE_REASONS_SHOWN = 5  # distinct reasons of unusable ground truth named in the summary's error
UNUSABLE_STAMPS_SHOWN = 3   # stamps named for each


def unusable_lines(unusable: dict[str, list[int]]) -> list[str]:
    """The error entries for unusable ground truth (reason -> stamps): one per reason, with its count and first
    stamps, for the first few reasons, then one for the rest, so that a long drive's error stays short."""
    lines = []
    for reason, stamps in list(unusable.items())[:UNUSABLE_REASONS_SHOWN]:
        if len(stamps) == 1:
            lines.append(f"ground truth at {stamps[0]} ns unusable: {reason}")
            continue
        first = ", ".join(str(stamp) for stamp in stamps[:UNUSABLE_STAMPS_SHOWN])
        more = ", ..." if len(stamps) > UNUSABLE_STAMPS_SHOWN else ""
        lines.append(f"ground truth at {len(stamps)} stamps unusable ({first}{more} ns): {reason}")
    rest = list(unusable.values())[UNUSABLE_REASONS_SHOWN:]
    if rest:
        stamps = sum(map(len, rest))
        lines.append(f"ground truth at {stamps} more stamp{'s' if stamps > 1 else ''} unusable for {len(rest)} "
                     f"other reason{'s' if len(rest) > 1 else ''}")
    return lines


class GroundTruthMatcher:
    """Gives each image the bag's ground truth nearest its header stamp within ``tolerance_ns`` (0: the same
    stamp), each grid to one image at most, and keeps it by image stamp for scoring (``by_image``).

    A separate node or an offline tool may stamp the ground truth a little apart from its image; a tolerance
    under half the frame interval keeps the match unambiguous."""

    def __init__(self, grids: dict[int, GroundTruthGrid], tolerance_ns: int = 0) -> None:
        self.grids = grids
        self.stamps = sorted(grids)
        self.tolerance_ns = tolerance_ns
        self.used: set[int] = set()  # stamps of the grids given to an image
        self.by_image: dict[int, GroundTruthGrid] = {}  # image stamp -> its grid, taken by Replayer.record

    def match(self, stamp: int) -> GroundTruthGrid | None:
        """The unused grid nearest ``stamp`` within the tolerance (marked used, kept in ``by_image``), or None."""
        start = bisect.bisect_left(self.stamps, stamp - self.tolerance_ns)
        end = bisect.bisect_right(self.stamps, stamp + self.tolerance_ns)
        free = [s for s in self.stamps[start:end] if s not in self.used]
        if not free:
            return None
        nearest = min(free, key=lambda s: abs(s - stamp))
        self.used.add(nearest)
        self.by_image.setdefault(stamp, self.grids[nearest])  # an image stamp read twice keeps its first grid
        return self.grids[nearest]

    def unmatched(self) -> int:
        """Grids no image read was given: stamped apart from every image, or after the last image read."""
        return len(self.grids) - len(self.used)


def _ground_truth_messages(reader: Any, topics: tuple[str, ...], errors: list[str]) -> Iterator[tuple[str, Any]]:
    """(topic, message) of the bag's messages on ``topics``; a read error ends them and is said in ``errors``
    (a truncated or corrupt bag: what was read is kept)."""
    conns = [c for c in reader.connections if c.topic in topics]
    if not conns:
        return
    try:
        for conn, _, raw in reader.messages(connections=conns):
            yield conn.topic, reader.deserialize(raw, conn.msgtype)
    except Exception as exc:  # noqa: BLE001 - rosbags, sqlite and mcap errors alike
        errors.append(f"reading ground truth stopped: {type(exc).__name__}: {exc}")


class BagFrames:
    """Colour frames of a bag, each paired by header stamp with camera info, depth and the TF pose.

    Drivers write aligned depth and camera info after their colour image and TF later still, so an
    image waits (in bag time, at most ``wait_s``) until its partners within ``tolerance_s`` and a TF
    covering its stamp have been read, or a later message shows none will come (the node's rule,
    ``pairing.FramePartners``). Without ``world_frame`` in TF the mount ``base_frame`` -> camera sets
    the processor's fallback pose. An invalid transform is dropped and counted (``invalid_transforms``), as
    tf2 drops it: only a frame whose camera chain has a link with no valid transform is skipped. A read
    error ends the iteration and is kept in ``error``.
    """

    def __init__(self, reader: Any, image_topic: str, info_topic: str | None, depth_topic: str | None,
                 world_frame: str, ground_truth: GroundTruthMatcher, processor: FrameProcessor | None = None,
                 tolerance_s: float = 0.02, wait_s: float = 0.5, base_frame: str = "base_link") -> None:
        self.reader = reader
        self.image_topic, self.info_topic, self.depth_topic = image_topic, info_topic, depth_topic
        self.world_frame, self.base_frame = world_frame, base_frame
        self.ground_truth = ground_truth
        self.processor = processor
        self.partners = FramePartners(tolerance_s, wait_s, use_depth=depth_topic is not None, maxlen=200,
                                      info_topic=info_topic, depth_topic=depth_topic or "")
        self.wait_ns = int(wait_s * 1e9)
        self.tf = bag_io.TfTree()
        self.error: str | None = None
        self.fallback_note: str | None = None
        self.orientation_notes: dict[str, str | None] = {}  # camera frame -> orientation_problem of its first TF pose
        self.mount_found = False  # the fallback pose comes from the camera mount in TF
        # invalid transforms TfTree dropped, as tf2 drops them: "parent -> child" -> {"count", "first"}
        self.invalid_transforms: dict[str, dict[str, Any]] = {}
        self._settled_pose: tuple[Any, np.ndarray] | None = None  # (image, pose) found by the last _settled
        self.images = 0
        topics = {image_topic, info_topic, depth_topic, bag_io.TF_TOPIC, bag_io.TF_STATIC_TOPIC}
        self.connections = [c for c in reader.connections if c.topic in topics]

    def _pose(self, image: Any) -> tuple[np.ndarray | None, FrameError | None]:
        """(camera->world at the image stamp or None = no such transform, skip error)."""
        probed, self._settled_pose = self._settled_pose, None
        pose, error = (probed[1], None) if probed is not None and probed[0] is image else self._pose_probe(image)
        if error is not None:  # TF lags the image, a bad transform or no frame id: skip, never a made-up pose
            return None, error
        camera = msg_decode.camera_frame_id(image.header)  # valid: _pose_probe would have said otherwise
        if pose is not None and camera not in self.orientation_notes:  # once per camera frame, as the node does
            self.orientation_notes[camera] = orientation_problem(pose, camera)
        if pose is None and self.processor is not None and not self.mount_found:
            try:  # a mount that reaches TF after the first images replaces the fixed parameters from then on
                mount = self.tf.lookup(self.base_frame, camera)
                if mount is not None:  # tf2 keeps an infinite translation: a mount that is no rigid pose is no mount
                    msg_decode.check_pose(mount, "camera mount")
            except FrameError:
                mount = None
            if self.fallback_note is None or mount is not None:
                note = use_fallback(self.processor, mount, self.world_frame, camera, self.base_frame, SKIP_HINT)
                stamp_s = msg_decode.stamp_to_ns(image.header.stamp) / 1e9
                self.fallback_note = (note if self.fallback_note is None else
                                      f"{note} From the image stamped {stamp_s:.3f} s on; the images before it "
                                      "used the fixed parameters.")
                self.mount_found = mount is not None
        return pose, None

    def _settled(self, image: Any, bag_t: int, now_t: int) -> bool:
        self._settled_pose = None
        if now_t - bag_t > self.wait_ns:
            return True
        stamp = msg_decode.stamp_to_ns(image.header.stamp)
        tol = self.partners.tolerance_ns
        info_settled = self.partners.calibration_steady() or self.partners.info.settled(stamp, tol)  # as the node
        if self.info_topic is not None and not info_settled:
            return False
        if self.depth_topic is not None and not self.partners.depth.settled(stamp, tol):
            return False
        pose, error = self._pose_probe(image)
        if pose is None or error is not None:
            return False
        self._settled_pose = (image, pose)  # the frame is completed next: its TF lookup is not repeated
        return True

    def _pose_probe(self, image: Any) -> tuple[np.ndarray | None, FrameError | None]:
        """TF lookup at the image stamp: (pose or None when not connected, the error when not ready)."""
        try:
            camera = msg_decode.camera_frame_id(image.header)
            return self.tf.lookup(self.world_frame, camera, msg_decode.stamp_to_ns(image.header.stamp)), None
        except FrameError as exc:
            return None, exc

    def _complete(self, image: Any, bag_t: int) -> tuple[FrameInput, int]:
        stamp = msg_decode.stamp_to_ns(image.header.stamp)
        gt = self.ground_truth.match(stamp)
        error: FrameError | None = None
        info = depth = None
        try:
            info, depth = self.partners.match(stamp, wait=False)
        except FrameError as exc:
            error = exc
        pose, pose_error = self._pose(image)
        # the fallback pose as of this image: the frame loop decodes it later, when a mount read meanwhile
        # may have replaced the processor's
        fallback = self.processor.fallback_pose if pose is None and self.processor is not None else None
        frame = FrameInput(image=image, camera_info=info, depth=depth, cam_pose=pose,
                           voxel_origin=None if gt is None else gt.voxel_origin,
                           pose_error=error or pose_error, fallback_pose=fallback)
        return frame, bag_t

    def _note_invalid(self, dropped: list[tuple[tuple[str, str], str]], bag_t: int) -> None:
        """Count the invalid transforms of one TF message by link, keeping the first problem of each."""
        for (parent, child), problem in dropped:
            seen = self.invalid_transforms.setdefault(f"{parent} -> {child}", {"count": 0, "first": None})
            seen["count"] += 1
            seen["first"] = seen["first"] or f"in the TF message at bag time {bag_t / 1e9:.3f} s: {problem}"

    def __iter__(self) -> Iterator[tuple[FrameInput, int]]:
        pending: deque[tuple[Any, int]] = deque()
        messages = self.reader.messages(connections=self.connections)
        gaps = 0
        while True:
            try:
                item = next(messages, None)
                if item is None:
                    break
                conn, bag_t, raw = item
                msg = self.reader.deserialize(raw, conn.msgtype)
            except Exception as exc:  # truncated chunk, bad CDR, sqlite errors ...
                self.error = f"bag read failed after {self.images} images: {type(exc).__name__}: {exc}"
                break
            if getattr(self.reader, "gaps_crossed", 0) > gaps:  # past a damaged file of a split bag: no pose
                gaps = self.reader.gaps_crossed                 # is interpolated across what it lost
                self.tf.mark_gap()
            if conn.topic == self.image_topic:
                self.images += 1
                pending.append((msg, bag_t))
            elif conn.topic == self.info_topic:
                self.partners.add_info(msg)
            elif conn.topic == self.depth_topic:
                self.partners.depth.add(msg)
            else:  # an invalid transform is dropped, as tf2 does; a frame needing its link is skipped by lookup
                self._note_invalid(self.tf.add_message(msg, static=conn.topic == bag_io.TF_STATIC_TOPIC), bag_t)
            while pending and self._settled(*pending[0], bag_t):
                yield self._complete(*pending.popleft())
        while pending:
            yield self._complete(*pending.popleft())


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Accumulates SSCMetrics (training.metrics, imported lazily) over the frames with ground truth, those placed
    by the fallback camera pose apart: put where the camera was assumed to be, they score that guess, not the model."""

    def __init__(self, num_classes: int) -> None:
        from training.metrics import SSCMetrics

        self.metrics = SSCMetrics(num_classes + 1)           # the frames with a TF pose: the headline
        self.fallback_metrics = SSCMetrics(num_classes + 1)  # the frames on the fallback pose
        self.frames = 0           # every scored frame
        self.fallback_frames = 0  # of them, those on the fallback pose
        self.unknown_missing = False

    def add(self, pred_labels: np.ndarray, gt_labels: np.ndarray, gt: GroundTruthGrid,
            fallback_pose: bool = False) -> None:
        """Score one frame: ``gt_labels`` is ``gt``'s grid, decoded once by the caller."""
        metrics = self.fallback_metrics if fallback_pose else self.metrics
        metrics.add_batch(pred_labels, gt_labels)  # raises (another grid) before anything is counted
        self.frames += 1
        self.fallback_frames += int(fallback_pose)
        self.unknown_missing |= not gt.has_unknown

    def result(self) -> dict[str, Any]:
        """The summary's metrics: IoU/mIoU over the frames with a TF pose (None without one), ``evaluated_frames``
        their count, and ``all_frames`` over every scored frame where some were on the fallback pose (else None)."""
        out: dict[str, Any] = {"iou": None, "miou": None, "per_class_iou": None}
        if self.frames > self.fallback_frames:
            out = self._result(self.metrics)
        out["evaluated_frames"] = self.frames - self.fallback_frames
        out["all_frames"] = None
        if self.fallback_frames:
            every_frame = copy.deepcopy(self.metrics)
            every_frame.merge(self.fallback_metrics)
            every = self._result(every_frame)
            out["all_frames"] = {"frames": self.frames, "fallback_pose_frames": self.fallback_frames,
                                 "iou": every["iou"], "miou": every["miou"]}
        return out

    @staticmethod
    def _result(metrics: Any) -> dict[str, Any]:
        stats = metrics.compute()
        per_class = [float(v) for v in stats["per_class_iou"]]  # index 0 = empty
        return {"iou": stats["iou"], "miou": stats["miou"], "precision": stats["precision"], "recall": stats["recall"],
                "per_class_iou": {CLASS_NAMES[i]: per_class[i] for i in range(1, len(CLASS_NAMES))}}


# ----------------------------------------------------------------------------- the replay loop
class Replayer:
    """Runs the frames of one bag through a FrameProcessor and collects outputs, stats and metrics.

    Frames are processed on the frame loop's threads; their output messages are written to the bag by
    the thread that opened the writer (``flush``), since a sqlite3 bag may only be used from that thread.
    ``ground_truth`` holds each image's grid by image stamp, as ``GroundTruthMatcher.by_image``.
    """

    def __init__(self, processor: FrameProcessor, writer: Any, factory: TypestoreFactory, world_frame: str,
                 ground_truth: dict[int, GroundTruthGrid], evaluator: Evaluator | None, n_renders: int = 3) -> None:
        self.processor, self.writer, self.factory = processor, writer, factory  # writer None: no output bag
        self.write_error: str | None = None  # writing the output bag failed (disk full): the run goes on without it
        self.world_frame = world_frame
        self.ground_truth = ground_truth
        self.evaluator = evaluator
        self.n_renders = n_renders
        self.stats = FrameStats(window=100_000)
        self.renders: list[dict[str, Any]] = []
        self.fallback_pose_frames = 0
        self.stage_ms: dict[str, list[float]] = {}
        self.internal_errors: list[str] = []
        self.first_skips: dict[str, str] = {}  # skip reason -> the first such frame's error text
        self.first_done: float | None = None  # perf_counter when the first frame was done (warm-up excluded after it)
        self.outbox: queue.SimpleQueue[tuple[str, Any, int]] = queue.SimpleQueue()  # (topic, message, stamp) to write
        self.interrupted = False  # Ctrl-C (or SIGTERM, via main) ended the run early; what was done is kept
        self.first_unscored: int | None = None  # stamp (ns) of the first processed frame without ground truth
        self.unfinished = 0  # frames in flight when interrupted: FrameStats counts them dropped, replaced they were not

    def record(self, frame: FrameInput, result: ProcessedFrame) -> None:
        """Queue a processed frame's messages for the output bag (``flush`` writes them); metrics, stage
        timings and renders.

        What can fail (building the messages, scoring) comes first and changes nothing, so a frame that fails
        here (counted as skipped, internal_error) leaves no message in the output bag and nothing in the metrics."""
        msgs = build_outputs(self.factory, result, self.world_frame, frame.stamp_ns, markers=False)
        gt = self.ground_truth.pop(frame.stamp_ns, None)  # BagFrames's match: scored once
        gt_labels = None if gt is None else gt.label_grid()  # checked when read: decoded only now
        render = None
        if len(self.renders) < self.n_renders:
            render = {"stamp_ns": frame.stamp_ns, "rgb": np.array(result.rgb), "cam_pose": result.cam_pose,
                      "pred": result.occupancy.labels.copy(), "gt": gt_labels,
                      "voxel_origin": result.occupancy.voxel_origin}
        if gt is not None and self.evaluator is not None:
            self.evaluator.add(result.occupancy.labels, gt_labels, gt,  # its last step; raises before counting
                               fallback_pose=result.used_fallback_pose)
        # from here on nothing fails: the frame is processed
        self.first_done = time.perf_counter() if self.first_done is None else self.first_done
        self.fallback_pose_frames += int(result.used_fallback_pose)
        for key, value in result.timings_ms.items():
            self.stage_ms.setdefault(key, []).append(value)
        self.outbox.put((bag_io.PRED_TOPIC, msgs["cloud"], frame.stamp_ns))
        self.outbox.put((bag_io.PRED_POSE_TOPIC, msgs["grid_pose"], frame.stamp_ns))
        if render is not None:
            self.renders.append(render)
        if gt is None and self.first_unscored is None:
            self.first_unscored = frame.stamp_ns

    def flush(self) -> None:
        """Write the messages of the frames delivered so far (on the writer's thread). A write that fails
        (disk full, quota) ends the output bag, not the run: the frames' metrics still count."""
        while True:
            try:
                topic, msg, stamp_ns = self.outbox.get_nowait()
            except queue.Empty:
                return
            if self.writer is None or self.write_error is not None:
                continue
            try:
                self.writer.write(topic, msg, stamp_ns)
            except OSError as exc:
                self.write_error = (f"writing the output bag failed after {self.writer.count} messages "
                                    f"({type(exc).__name__}: {exc}); it holds the frames before that")

    def close_output_bag(self) -> None:
        """Close the output bag; a failure (disk full while writing its index) is the run's write error."""
        try:
            self.writer.close()
        except OSError as exc:
            self.write_error = self.write_error or f"closing the output bag failed ({type(exc).__name__}: {exc})"

    def note_skip(self, frame: FrameInput, reason: str, text: str) -> None:
        """A skipped frame: the first error text of each reason is kept for the summary, every internal one."""
        self.first_skips.setdefault(reason, f"frame at {frame.stamp_ns} ns: {text}")
        if reason == "internal_error":
            self.internal_errors.append(f"frame at {frame.stamp_ns} ns: {text}")

    def run(self, frames: Iterator[tuple[FrameInput, int]], max_frames: int | None, bar: Any, realtime: bool,
            pipelined: bool = True, decode_thread: bool = True, prepare_thread: bool = True) -> None:
        """Frames through the node's frame loop (``FrameLoop``). ``realtime``: at their recorded times,
        stale frames dropped as the node drops them; latency from a frame's arrival to its output. Else
        every frame as fast as the model goes: the loop is lossless (reading waits for room, nothing is
        dropped), so, ``pipelined``, reading, decoding and preparing the next frames overlap the inference
        of the previous one; latency from the loop taking a frame to its output."""
        loop = FrameLoop(self.processor, self.stats, deliver=self.record, on_skip=self.note_skip,
                         lossless=not realtime, pipelined=pipelined, decode_thread=decode_thread,
                         prepare_thread=prepare_thread)
        start_wall, start_bag = time.monotonic(), None
        try:
            for frame, bag_t in frames:
                if realtime:
                    start_bag = bag_t if start_bag is None else start_bag
                    delay = (bag_t - start_bag) * 1e-9 - (time.monotonic() - start_wall)
                    if delay > 0:
                        time.sleep(delay)
                frame.received_s = time.monotonic()
                loop.submit(frame)
                bar.update(1)
                self.flush()
                if max_frames is not None and self.stats.received >= max_frames:
                    break
        except KeyboardInterrupt:  # the user stops a long drive: keep what is done, abandon the frames in flight
            dropped = self.stats.dropped - loop.abandoned  # a frame stopped on its way in was in flight too
            loop.close(discard=True)
            self.unfinished = self.stats.dropped - dropped
            self.flush()
            self.interrupted = True
            return
        except BaseException:
            loop.close(discard=True)
            with contextlib.suppress(Exception):  # keep what was processed, unless writing is what failed
                self.flush()
            raise
        loop.close()
        self.flush()


OUTPUTS = ("occupancy_bag", "report.md", "renders")  # what a replay owns in its output directory


def has_outputs(out: Path) -> bool:
    """True when ``out`` holds a previous run's outputs (any name of :data:`OUTPUTS`)."""
    return any((out / name).exists() for name in OUTPUTS)


def failed_sibling(path: Path) -> Path:
    """Where a run that processed no frame writes a file whose previous version it keeps: ``x.failed.json``."""
    return path.with_name(f"{path.stem}.failed{path.suffix}")


FAILED_REPORT = failed_sibling(Path("report.md")).name  # a run that processed no frame, beside a previous run's outputs


def output_target(path: Path, processed: bool, keep: bool) -> Path:
    """Where a run writes ``path``: beside it (``failed_sibling``) when the run processed no frame and ``keep``
    says a previous run's output is there; else ``path`` itself, an older failed run's sibling removed."""
    if not processed and keep:
        return failed_sibling(path)
    failed_sibling(path).unlink(missing_ok=True)
    return path


def publish_outputs(stage: Path, out: Path) -> None:
    """Move a finished run's outputs from ``stage`` into ``out``, replacing all of the previous run's.

    Every name of :data:`OUTPUTS` present in ``out`` is moved aside first (also when this run did not
    make it, e.g. no renders), so report, renders and bag always come from the same run; so is an
    older failed run's :data:`FAILED_REPORT`. Each step is a rename within one directory.
    """
    old = Path(tempfile.mkdtemp(prefix=".discene_replay-old-", dir=out))
    try:
        for name in (*OUTPUTS, FAILED_REPORT):
            if (out / name).exists():
                (out / name).rename(old / name)
        for name in OUTPUTS:
            if (stage / name).exists():
                (stage / name).rename(out / name)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_outputs(out: str | Path, summary: dict[str, Any], renders: list[dict[str, Any]],
                  stage: Path | None = None) -> Path:
    """Write the report (into ``stage``, which may already hold the output bag) and publish it into ``out``;
    returns the report's path.

    A run that processed no frame replaces nothing (a failed run leaves the previous run's outputs as they
    were): only its report is written, as ``report.md`` where ``out`` holds no previous outputs, else as
    :data:`FAILED_REPORT` beside them.
    """
    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    own_stage = stage is None
    stage = Path(tempfile.mkdtemp(prefix=".discene_replay-", dir=out)) if stage is None else stage
    try:
        write_report(stage, summary, renders)
        if summary.get("frames"):
            publish_outputs(stage, out)
            return out / "report.md"
        report = output_target(out / "report.md", processed=False, keep=has_outputs(out))
        (stage / "report.md").replace(report)
        return report
    finally:
        if own_stage:
            shutil.rmtree(stage, ignore_errors=True)


def replay(bag: str | Path | None = None, out: str | Path = "discene_replay", settings: ReplaySettings | None = None,
           pipeline: Any = None) -> ReplayResult:
    """Replay a bag (default: the shipped sample bag) with ``settings`` (default: ``ReplaySettings()``), on
    ``pipeline`` if given (else one built from the settings' model); returns the summary (``frames``,
    ``fps``, ``latency_ms``, ``iou``, ``miou``, ...).

    Raises BagError when the bag cannot be opened; a bag that fails part-way ends the replay early
    with ``summary["error"]`` set (the report covers what was processed); so does Ctrl-C (KeyboardInterrupt
    in the reading loop: ``summary["interrupted"]``). The output bag (and with ``report=True`` the report)
    is written into a temporary folder under ``out`` and moved into place at the end, so a replay killed
    outright leaves the previous run's outputs as they were; so does one that processed no frame (its
    report, if any, goes where ``write_outputs`` says: ``result.report``).
    """
    from tqdm import tqdm

    settings = settings if settings is not None else ReplaySettings()
    bag = Path(bag) if bag is not None else SAMPLE_BAG
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        reader = bag_io.open_reader(bag)
    except Exception:
        _remove_if_empty(out, made)
        raise
    stage = Path(tempfile.mkdtemp(prefix=".discene_replay-", dir=out))
    try:
        if pipeline is None:
            pipeline = build_pipeline(settings.model, settings.backend, settings.device, fp16=settings.fp16,
                                      compile=settings.compile, cuda_graph=settings.cuda_graph, tf32=settings.tf32,
                                      tf32_convolutions=settings.tf32_convolutions,
                                      score_threshold=settings.score_threshold, frame_graph=settings.frame_graph)
        config = pipeline.config
        topic = bag_io.pick_image_topic(reader, settings.image_topic)
        if topic is None:
            raise bag_io.BagError(f"bag {bag} has no sensor_msgs/Image or CompressedImage topic")
        use_depth = config.use_depth if settings.use_depth is None else settings.use_depth
        if use_depth and not config.use_depth:
            raise ValueError(f"--use-depth: model '{config.name}' has no depth branch (use a DiScene-dagger model)")
        # the image topic's own camera_info first, as the node (and image_transport) pairs them
        info_topic = bag_io.pick_topic(reader, settings.info_topic, ("sensor_msgs/msg/CameraInfo",),
                                       prefer=(camera_info_topic_for(topic), bag_io.CAMERA_INFO_TOPIC))
        depth_topic = bag_io.pick_depth_topic(reader, settings.depth_topic) if use_depth else None
        if use_depth and depth_topic is None:
            raise bag_io.BagError(f"bag {bag} has no depth image topic (an Image named '*depth*' or a compressedDepth "
                                  "CompressedImage); give --depth-topic")
        errors: list[str] = []
        gt = read_ground_truth(reader, tuple(config.grid_shape), config.voxel_size, errors, config.num_classes)
        gt_messages = ground_truth_messages(reader)
        matcher = GroundTruthMatcher(gt, round(settings.gt_stamp_tolerance_s * 1e9))
        evaluator = Evaluator(config.num_classes) if gt else None
        pipelined, loop_mode = frame_loop_mode(settings.pipelining, pipeline)
        # the bag reader pairs and locates each frame before the loop gets it: no stage waits for that
        prepare_thread = uses_prepare_thread(pipelined, pipeline)
        if not prepare_thread:
            loop_mode += ", each frame prepared right before its launch"
        compressed = any(c.topic == topic and c.msgtype == bag_io.IMAGE_TYPES[1] for c in reader.connections)
        pipeline.post_threads = post_threads_for(pipelined, compressed)
        rectified, images_note = images_rectified(settings.rectified, topic)  # the node's rule, on the bag's topic
        processor = FrameProcessor(pipeline, ProcessorSettings(use_depth=use_depth,
                                                               depth_max_offset_s=settings.sync_tolerance_s,
                                                               use_fallback_pose=settings.use_fallback_pose,
                                                               check_depth_frame=settings.check_depth_frame,
                                                               rectified=rectified))
        frames = BagFrames(reader, topic, info_topic, depth_topic, settings.world_frame, matcher, processor,
                           settings.sync_tolerance_s, settings.sync_wait_s, settings.base_frame)
        factory = TypestoreFactory(bag_io.typestore())
        total = sum(c.msgcount for c in reader.connections if c.topic == topic)
        freeze_startup_objects()  # as the node: no full garbage collection of the start-up objects mid-run
        start = time.perf_counter()
        writer = (bag_io.BagWriter(stage / "occupancy_bag", settings.storage, factory.typestore)
                  if settings.output_bag else None)
        rep = Replayer(processor, writer, factory, settings.world_frame, matcher.by_image, evaluator,
                       settings.n_renders)
        with contextlib.ExitStack() as stack:
            if writer is not None:
                writer.open()
                stack.callback(rep.close_output_bag)
            bar = stack.enter_context(tqdm(total=min(total, settings.max_frames or total), unit="frame",
                                           desc="discene-replay", disable=not settings.progress))
            rep.run(iter(frames), settings.max_frames, bar, settings.realtime, pipelined,
                    decode_thread=uses_decode_thread(compressed, pipelined, prepare_thread),
                    prepare_thread=prepare_thread)
        end = time.perf_counter()
        wall = end - start
        damage = getattr(reader, "damage", None)  # McapPrefixReader: a truncated or damaged mcap
        processed = rep.stats.processed > 0  # else the previous run's outputs stay as they were
        kept = ("the metrics, report and output bag cover the frames processed before that" if processed else
                "no frame was processed before that")
        interrupted = (f"interrupted after {rep.stats.received} of {total} colour images; {kept}"
                       if rep.interrupted else None)
        errors += [e for e in (interrupted, frames.error, damage, rep.write_error) if e]
        if rep.internal_errors:
            errors.append(f"{len(rep.internal_errors)} frames failed unexpectedly, first: {rep.internal_errors[0]}")
        truth = ground_truth_status(gt_messages, matcher, rep, evaluator)
        if truth["status"] in ("unmatched", "fallback_pose"):  # an evaluation that scored nothing is incomplete
            errors.append(truth["note"])
        summary = _summary(bag, pipeline, rep, wall, settings.realtime, evaluator, errors,
                           out / "occupancy_bag" if writer is not None and processed else None, topic, gt)
        summary.update(_warm_up(rep, end), frame_loop=loop_mode, pipelined=pipelined, interrupted=rep.interrupted,
                       info_topic=info_topic, other_image_topics=other_cameras(reader, topic), rectified=rectified,
                       images_note=images_note)
        summary["fallback_pose_note"] = frames.fallback_note if rep.fallback_pose_frames else None
        summary["camera_orientation_note"] = " ".join(n for n in frames.orientation_notes.values() if n) or None
        summary["bag_note"] = getattr(reader, "note", None)  # e.g. read without its metadata.yaml
        summary["invalid_transforms"] = frames.invalid_transforms or None
        summary["ground_truth"] = truth
        result = ReplayResult(summary, rep.renders)
        if settings.report:
            result.report = write_outputs(out, summary, rep.renders, stage)
        elif processed:
            publish_outputs(stage, out)
        return result
    finally:
        reader.close()
        shutil.rmtree(stage, ignore_errors=True)
        _remove_if_empty(out, made)


def _remove_if_empty(out: Path, made: bool) -> None:
    """A replay that ends before it writes anything (an unreadable model, say) leaves no empty --out folder."""
    if made and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def other_cameras(reader: Any, topic: str) -> list[str]:
    """Colour image topics of the bag other than ``topic`` and its own transports (``.../compressed``)."""
    return [name for name in bag_io.colour_image_topics(reader)
            if name != topic and not name.startswith(topic + "/") and not topic.startswith(name + "/")]


def ground_truth_messages(reader: Any) -> int:
    """Ground-truth grids in the bag: its grid pose messages, where a labels or cloud topic goes with them."""
    topics = {c.topic for c in reader.connections}
    if not topics & {bag_io.GT_LABELS_TOPIC, bag_io.GT_TOPIC}:
        return 0
    return sum(c.msgcount for c in reader.connections if c.topic == bag_io.GT_POSE_TOPIC)


def ground_truth_status(messages: int, matcher: GroundTruthMatcher, rep: Replayer,
                        evaluator: Evaluator | None) -> dict[str, Any]:
    """Whether and how the run was scored, for the summary's ``ground_truth``: ``status`` none (no ground truth
    in the bag), no_frame (no frame processed), unusable (none of it readable), unmatched (no processed frame
    has ground truth at its stamp), fallback_pose (every frame scored was on the fallback pose), else scored;
    ``note`` says it in a line (None when every frame was scored on its TF pose and every grid matched an image);
    ``unmatched_grids`` counts the usable grids no image read matched."""
    gt, processed, scored = matcher.grids, rep.stats.processed, 0 if evaluator is None else evaluator.frames
    out = {"messages": messages, "usable": len(gt), "scored_frames": scored, "unmatched_grids": matcher.unmatched()}
    not_computed = "IoU/mIoU not computed"
    if not messages:
        return {**out, "status": "none", "note": f"no ground truth in the bag: {not_computed}"}
    grids = f"the bag has {messages} ground-truth grids"
    if not processed:
        return {**out, "status": "no_frame", "note": f"no frame was processed: {not_computed} ({grids})"}
    if not gt:
        return {**out, "status": "unusable", "note": f"{grids}, none of them usable: {not_computed}"}
    tolerance = (f"within {matcher.tolerance_ns / 1e9:g} s of the image's (--gt-stamp-tolerance)"
                 if matcher.tolerance_ns else "which must equal the image's exactly unless --gt-stamp-tolerance allows an offset")
    if not scored:
        near = min(gt, key=lambda stamp: abs(stamp - rep.first_unscored))
        return {**out, "status": "unmatched", "note": (
            f"{grids} ({len(gt)} usable) but none of the {processed} processed frames has one at its stamp: ground "
            f"truth is matched to an image by header stamp, {tolerance} (the first "
            f"image at {rep.first_unscored} ns, the nearest ground truth at {near} ns, "
            f"{(near - rep.first_unscored) / 1e6:+.3f} ms from it): {not_computed}")}
    every = evaluator.result()["all_frames"]
    on_fallback = "" if every is None else f"IoU {100 * every['iou']:.2f} mIoU {100 * every['miou']:.2f}"
    if scored == evaluator.fallback_frames:
        return {**out, "status": "fallback_pose", "note": (
            f"all {scored} scored frames used the fallback camera pose: {not_computed} (over them {on_fallback}: "
            "a score of where the camera was assumed to be, not of the model)")}
    notes = []
    if every is not None:
        notes.append(f"{every['fallback_pose_frames']} of the {scored} scored frames used the fallback camera pose "
                     f"and are left out of IoU/mIoU (all {scored}: {on_fallback})")
    if processed > scored:
        notes.append(f"{processed - scored} of the {processed} processed frames had no usable ground truth at their "
                     "stamp (not scored)")
    if out["unmatched_grids"]:
        notes.append(f"{out['unmatched_grids']} of the {len(gt)} usable ground-truth grids matched no image read "
                     "(stamped apart from every image, or after the last one)")
    return {**out, "status": "scored", "note": "; ".join(notes) or None}


def _summary(bag: Path, pipeline: Any, rep: Replayer, wall: float, realtime: bool, evaluator: Evaluator | None,
             errors: list[str], out_bag: Path | None, topic: str, gt: dict) -> dict[str, Any]:
    snap = rep.stats.snapshot()
    metrics: dict[str, Any] = {"iou": None, "miou": None, "per_class_iou": None, "evaluated_frames": 0,
                               "all_frames": None}
    if evaluator is not None and evaluator.frames:
        metrics = evaluator.result()
    skipped = dict(snap["skipped"])
    return {
        "bag": str(bag), "image_topic": topic, "model_config": pipeline.config.name,
        "backend": pipeline.backend.describe(), "pipeline": pipeline.describe(), "realtime": realtime,
        "images": snap["received"], "frames": snap["processed"],
        "fps": snap["processed"] / wall if wall > 0 else 0.0,
        "latency_ms": latency_percentiles(rep.stats.latencies_ms),
        "stage_ms": {k: latency_percentiles(v) for k, v in rep.stage_ms.items()},
        **metrics,
        "unknown_voxels_known": None if evaluator is None or not evaluator.frames else not evaluator.unknown_missing,
        "skipped": sum(skipped.values()), "skipped_by_reason": skipped, "first_skip_by_reason": dict(rep.first_skips),
        "dropped": snap["dropped"] - rep.unfinished, "unfinished": rep.unfinished,
        "fallback_pose_frames": rep.fallback_pose_frames, "output_bag": None if out_bag is None else str(out_bag),
        "error": "; ".join(errors) if errors else None,
    }


def _warm_up(rep: Replayer, end: float) -> dict[str, float | None]:
    """The first frame carries the one-off warm-up (allocations, kernel selection): its latency, and the
    frame rate of the frames after it, reported separately from the overall FPS."""
    lat = list(rep.stats.latencies_ms)
    after = None
    if len(lat) > 1 and rep.first_done is not None and end > rep.first_done:
        after = (len(lat) - 1) / (end - rep.first_done)
    return {"first_frame_ms": lat[0] if lat else None, "fps_after_first_frame": after}


def empty_summary(bag: str | Path, error: str) -> dict[str, Any]:
    """Summary of a replay that could not read a single frame."""
    return {"bag": str(bag), "image_topic": None, "model_config": None, "backend": None, "realtime": False,
            "images": 0, "frames": 0, "fps": 0.0, "latency_ms": latency_percentiles([]), "stage_ms": {},
            "iou": None, "miou": None, "per_class_iou": None, "evaluated_frames": 0, "all_frames": None, "skipped": 0,
            "skipped_by_reason": {}, "first_skip_by_reason": {}, "dropped": 0, "unfinished": 0, "fallback_pose_frames": 0, "output_bag": None,
            "first_frame_ms": None, "fps_after_first_frame": None, "interrupted": False, "info_topic": None,
            "other_image_topics": [], "rectified": None, "images_note": None, "bag_note": None,
            "invalid_transforms": None, "ground_truth": None, "error": error}


def _write_json(path: str | None, summary: dict[str, Any]) -> Path | None:
    """Write the summary as JSON to ``path``; returns where it went. A run that processed no frame keeps
    a previous run's file there and writes beside it (``failed_sibling``), as its report does."""
    if not path:
        return None
    target = output_target(Path(path), processed=bool(summary.get("frames")), keep=Path(path).exists())
    text = json.dumps(summary, indent=1) + "\n"
    atomic_write(target, lambda f: f.write(text.encode()))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discene-replay", description=__doc__.splitlines()[0])
    parser.add_argument("--bag", default=None, help="ROS 2 bag directory (mcap or sqlite3); default: the shipped sample bag")
    parser.add_argument("--model", default=None, help="checkpoint/.onnx/.engine; default: the shipped lite_distilled.pt")
    parser.add_argument("--backend", default="torch", help="torch, onnxruntime or tensorrt")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present, as the node), "
                        "cpu or cuda[:N]")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA torch autocast / FP16 engine)")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="torch backend: eager launches instead of the CUDA graph (CPU: static buffers)")
    parser.add_argument("--no-frame-graph", dest="frame_graph", action="store_false",
                        help="torch backend on CUDA: the preprocessing's and the network's CUDA graphs replayed apart, "
                             "not one graph per buffer slot for the whole frame (less GPU memory, more host time)")
    parser.add_argument("--compile", action="store_true", help="torch backend on CUDA: torch.compile the network")
    parser.add_argument("--tf32", action="store_true", help="torch backend on CUDA in FP32: TF32 tensor cores")
    parser.add_argument("--tf32-convolutions", action="store_true",
                        help="torch backend on CUDA in FP32: TF32 for the convolutions only (PyTorch's default FP32)")
    parser.add_argument("--out", default="discene_replay",
                        help="output directory for report.md, renders/ and occupancy_bag/ (default: ./discene_replay); "
                             "a finished run replaces the previous run's outputs there")
    parser.add_argument("--storage", choices=bag_io.STORAGES, default="mcap", help="output bag storage")
    parser.add_argument("--no-output-bag", dest="output_bag", action="store_false",
                        help="metrics and report only: no occupancy_bag/ (it takes about 0.25 MB per frame)")
    parser.add_argument("--realtime", action="store_true", help="play at the recorded rate, dropping stale frames")
    parser.add_argument("--pipelining", choices=PIPELINING_MODES, default="auto",
                        help="overlap consecutive frames' stages (on), run the network alone with only the next "
                             "frame's decode and preprocessing beside the post-processing (off), or on only where "
                             "the network runs on a GPU (auto, the node's default)")
    parser.add_argument("--json", default=None, help="write the summary as JSON here")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many colour images (default: all)")
    parser.add_argument("--image-topic", default=None, help="colour topic (default: auto-detect)")
    parser.add_argument("--camera-info-topic", default=None, help="CameraInfo topic (default: auto-detect)")
    parser.add_argument("--rectified", choices=RECTIFIED_MODES, default="auto",
                        help="the images are rectified (true: not undistorted, intrinsics from CameraInfo P) or raw "
                             "(false: undistorted with K where CameraInfo has non-zero coefficients); auto, the node's "
                             "default: rectified where the image topic's name starts with image_rect")
    parser.add_argument("--depth-topic", default=None,
                        help="aligned depth topic, a raw Image or image_transport's compressedDepth (default: "
                             "auto-detect, raw first)")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--use-depth", dest="use_depth", action="store_true", default=None,
                       help="pair depth with each image and feed it to the model (default: when the model has a "
                            "depth branch)")
    depth.add_argument("--no-depth", dest="use_depth", action="store_false", help="ignore depth topics")
    parser.add_argument("--no-check-depth-frame", dest="check_depth_frame", action="store_false",
                        help="use depth whose header frame_id differs from the colour image's (the node's "
                             "check_depth_frame:=false); by default such depth is skipped as not registered")
    parser.add_argument("--world-frame", default=bag_io.WORLD_FRAME,
                        help=f"TF frame the camera pose is looked up in and outputs are published in (default: {bag_io.WORLD_FRAME})")
    parser.add_argument("--base-frame", default="base_link",
                        help="robot frame of the camera mount, for the fallback pose when world_frame is not in TF")
    parser.add_argument("--no-fallback-pose", action="store_true",
                        help="skip frames without a TF pose instead of using the fallback camera pose")
    parser.add_argument("--sync-tolerance", type=float, default=0.02,
                        help="largest stamp difference of colour vs depth / camera info, s")
    parser.add_argument("--sync-wait", type=float, default=0.5,
                        help="how long (bag time, s) a colour image waits for its depth, camera info and TF")
    parser.add_argument("--gt-stamp-tolerance", type=float, default=0.0,
                        help="largest stamp difference of ground truth vs its image, s (default 0: equal stamps); "
                             "each image is scored against the nearest unused grid within it: keep it under half "
                             "the frame interval")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="occupancy score threshold (default: the model config's)")
    parser.add_argument("--renders", type=int, default=3, help="frames rendered into the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt_on_sigterm)  # a service manager stops us as Ctrl-C
    try:
        return run_cli(args)
    except KeyboardInterrupt:  # outside the frame loop (loading the model, writing the report): nothing published
        print("discene-replay: interrupted before its outputs were written; the previous run's outputs in "
              f"{args.out} are as they were", file=sys.stderr)
        return INTERRUPTED_EXIT
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def interrupt_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``timeout``, a service manager) ends the replay as Ctrl-C does: its report and
    output bag keep the frames processed so far."""
    raise KeyboardInterrupt(f"signal {signum}")


def kept_outputs_note(out: Path, report: Path, written: Path | None, json_path: str | None) -> str:
    """The stderr lines of a run that processed no frame: where its report (and JSON) went, and that a
    previous run's outputs were kept."""
    lines = [f"report: {report}"]
    if written is not None and json_path is not None and written != Path(json_path):
        lines.append(f"summary JSON: {written} (the previous run's {json_path} is kept)")
    if report.name == FAILED_REPORT:
        lines.append(f"the previous run's outputs in {out} are as they were")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """``main`` after parsing: the replay, its summary on stdout and its exit code."""
    out = Path(args.out)
    bag = args.bag if args.bag is not None else str(SAMPLE_BAG)
    try:
        check_output_folder(out, "--out")
        if args.json:
            check_output_file(args.json, "--json", {"--bag": bag, "--model": args.model})
    except ValueError as exc:
        print(f"discene-replay: error: {exc}", file=sys.stderr)
        return 2
    try:
        settings = ReplaySettings(
            model=args.model, backend=args.backend, device=None if args.device == "auto" else args.device,
            fp16=args.fp16, cuda_graph=args.cuda_graph, frame_graph=args.frame_graph, compile=args.compile,
            tf32=args.tf32,
            tf32_convolutions=args.tf32_convolutions,
            score_threshold=args.score_threshold, image_topic=args.image_topic, info_topic=args.camera_info_topic,
            depth_topic=args.depth_topic, use_depth=args.use_depth, check_depth_frame=args.check_depth_frame,
            rectified=args.rectified,
            world_frame=args.world_frame,
            base_frame=args.base_frame, use_fallback_pose=not args.no_fallback_pose,
            sync_tolerance_s=args.sync_tolerance, sync_wait_s=args.sync_wait,
            gt_stamp_tolerance_s=args.gt_stamp_tolerance, realtime=args.realtime,
            pipelining=args.pipelining, max_frames=args.max_frames, storage=args.storage,
            output_bag=args.output_bag, n_renders=args.renders,
            progress=not args.no_progress, report=True)
        result = replay(args.bag, out, settings)
    except bag_io.BagError as exc:  # nothing could be read: still leave a report saying so
        summary = empty_summary(bag, str(exc))
        report = write_outputs(out, summary, [])
        written = _write_json(args.json, summary)
        print(f"discene-replay: error: {exc}\n{kept_outputs_note(out, report, written, args.json)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"discene-replay: error: {bag_io.missing_package_note(exc)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as exc:  # OSError: a missing file, a full disk
        print(f"discene-replay: error: {exc}", file=sys.stderr)
        return 2
    report = result.report or out / "report.md"
    s = result.summary
    written = _write_json(args.json, s)
    lat = s["latency_ms"]
    warm = (f" ({s['fps_after_first_frame']:.2f} FPS after the first frame, which took {s['first_frame_ms']:.0f} ms "
            "with the warm-up)") if s.get("fps_after_first_frame") else ""
    unfinished = f", unfinished {s['unfinished']}" if s.get("unfinished") else ""
    print(f"frames {s['frames']}/{s['images']} (skipped {s['skipped']}, dropped {s['dropped']}{unfinished}), "
          f"{s['fps']:.2f} FPS{warm}, latency p50 {lat['p50']:.1f} ms p90 {lat['p90']:.1f} ms p99 {lat['p99']:.1f} ms "
          f"[{s['backend']}; frame loop {s.get('frame_loop')}]")
    truth = s["ground_truth"]
    if s["iou"] is not None:
        on_tf = " with a TF pose" if s.get("all_frames") else ""
        print(f"IoU {100 * s['iou']:.2f}  mIoU {100 * s['miou']:.2f}  over {s['evaluated_frames']} frames{on_tf}"
              + (f" ({truth['note']})" if truth["note"] else ""))
    else:
        print(ground_truth_line(truth, "below"))
    no_bag = "none (--no-output-bag)" if not args.output_bag else "none (no frame was processed)"
    print(f"report: {report}\noutput bag: {s['output_bag'] or no_bag}")
    if s.get("other_image_topics") and args.image_topic is None:
        print(f"discene-replay: note: read {s['image_topic']} (camera info {s['info_topic']}); the bag has other "
              f"image topics too: {', '.join(s['other_image_topics'])} (--image-topic chooses)", file=sys.stderr)
    if s.get("bag_note"):
        print(f"discene-replay: note: {s['bag_note']}", file=sys.stderr)
    for note in ("fallback_pose_note", "camera_orientation_note"):
        if s.get(note):
            print(f"discene-replay: WARNING: {s[note]}", file=sys.stderr)
    if s.get("invalid_transforms"):
        print(f"discene-replay: WARNING: {invalid_transforms_note(s['invalid_transforms'])}", file=sys.stderr)
    if s["frames"] == 0 and not s.get("interrupted"):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped_by_reason"].items())) or "no colour image read"
        first = "".join(f"\nfirst {k}: {v}" for k, v in sorted(s["first_skip_by_reason"].items())
                        if k != "internal_error")  # those are in the error, as when some frames were processed
        error = f"\n{s['error']}" if s["error"] else ""
        print(f"discene-replay: error: no frame was processed ({reasons}){first}{error}\n"
              f"{kept_outputs_note(out, report, written, args.json)}", file=sys.stderr)
        return 3
    if s["error"]:
        print(f"discene-replay: the run is incomplete: {s['error']}", file=sys.stderr)
        return INTERRUPTED_EXIT if s.get("interrupted") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
