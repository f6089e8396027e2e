"""numpy -> ROS message: the node's outputs and the input messages that bags and tests are made of.

Messages are built through a :mod:`discene_ros.msg_factory` factory (rclpy or rosbags typestore), so
this module imports no ROS package. The other direction (message -> numpy, what the node reads) is
:mod:`discene_ros.msg_decode`.

Published layouts (documented in README / DESIGN.md section 5):
- occupancy PointCloud2: one point per occupied voxel centre, height 1, little endian, 24-byte
  points ``x y z`` float32 at 0/4/8, ``rgb`` float32 at 12 (bits of ``r<<16 | g<<8 | b``), ``label``
  uint8 at 16, ``score`` float32 at 20.
- grid pose: ``geometry_msgs/PoseStamped`` whose position is ``voxel_origin`` (the world corner of
  voxel (0,0,0)), identity orientation (the grid is world-axis aligned).
"""
from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from models import native_postprocess
from models.classes import CLASS_COLORS, CLASS_NAMES, LABEL_RGB_BITS, NUM_CLASSES
from models.geometry import finite_origin

from . import rvl
from .errors import DepthError, UnsupportedEncodingError
from .msg_decode import COMPRESSED_DEPTH_HEADER
from .msg_factory import MessageFactory

# PointCloud2 layout of occupied voxels (also used for the ground truth in bags, score 1.0)
CLOUD_DTYPE = np.dtype({
    "names": ["x", "y", "z", "rgb", "label", "score"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "u1", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 20],
    "itemsize": 24,
})


# ----------------------------------------------------------------------------- headers
def make_header(factory: MessageFactory, stamp_ns: int, frame_id: str) -> Any:
    """std_msgs/Header for a stamp in nanoseconds."""
    stamp = factory.new("builtin_interfaces/msg/Time", sec=int(stamp_ns // 1_000_000_000),
                        nanosec=int(stamp_ns % 1_000_000_000))
    return factory.new("std_msgs/msg/Header", stamp=stamp, frame_id=str(frame_id))


# ----------------------------------------------------------------------------- transforms
def matrix_to_quaternion(rot: np.ndarray) -> tuple[float, float, float, float]:
    """3x3 rotation -> (x, y, z, w), the robust branch-on-largest-diagonal form."""
    m = np.asarray(rot, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = ((m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s)
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(max(1.0 + m[i, i] - m[j, j] - m[k, k], 1e-12))
        v = [0.0, 0.0, 0.0]
        v[i] = 0.25 * s
        v[j] = (m[j, i] + m[i, j]) / s
        v[k] = (m[k, i] + m[i, k]) / s
        q = (v[0], v[1], v[2], (m[k, j] - m[j, k]) / s)
    return tuple(float(c) for c in q)  # type: ignore[return-value]


def matrix_to_transform_stamped(factory: MessageFactory, pose: np.ndarray, parent: str, child: str,
                                stamp_ns: int) -> Any:
    """4x4 child->parent pose -> geometry_msgs/TransformStamped (for /tf in bags)."""
    qx, qy, qz, qw = matrix_to_quaternion(pose[:3, :3])
    tx, ty, tz = (float(v) for v in pose[:3, 3])
    transform = factory.new(
        "geometry_msgs/msg/Transform",
        translation=factory.new("geometry_msgs/msg/Vector3", x=tx, y=ty, z=tz),
        rotation=factory.new("geometry_msgs/msg/Quaternion", x=qx, y=qy, z=qz, w=qw),
    )
    return factory.new("geometry_msgs/msg/TransformStamped", header=make_header(factory, stamp_ns, parent),
                       child_frame_id=child, transform=transform)


# ----------------------------------------------------------------------------- point clouds
def pack_rgb(colors: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB -> (N,) float32 whose bits are ``r<<16 | g<<8 | b`` (the PCL/RViz convention)."""
    c = np.asarray(colors, dtype=np.uint32)
    packed = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    return packed.astype("<u4").view("<f4")


# PointField datatype constant names by numpy type code (the constants' values come from the factory's class)
_POINTFIELD_NAMES = {"f4": "FLOAT32", "u1": "UINT8", "u4": "UINT32"}


def _cloud_words(count: int) -> np.ndarray:
    """Uninitialised (count, 6) little-endian float32 block whose rows are :data:`CLOUD_DTYPE` points,
    filled one 4-byte column at a time (no zero fill: every byte is written), then viewed as the
    structured array by :func:`_as_points`."""
    return np.empty((count, CLOUD_DTYPE.itemsize // 4), dtype="<f4")


def _fill_attributes(words: np.ndarray, labels: Any, scores: Any) -> None:
    """Write rgb, label and score columns. The label goes in as a little-endian uint32 word, i.e. the
    uint8 label at byte 16 and zeros in the padding bytes 17..19, as in a zero-initialised array."""
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(labels) != len(words) or len(scores) != len(words):
        raise ValueError(f"cloud inputs disagree: {len(words)} points, labels {labels.shape}, scores {scores.shape}")
    bits = words.view("<u4")
    bits[:, 3] = LABEL_RGB_BITS.take(labels)
    bits[:, 4] = labels
    words[:, 5] = scores


def _as_points(words: np.ndarray) -> np.ndarray:
    return words.view(CLOUD_DTYPE).reshape(-1)


def cloud_points(centers: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Structured (M,) array in :data:`CLOUD_DTYPE` from voxel centres, labels and scores."""
    centers = np.asarray(centers)
    if centers.ndim != 2 or centers.shape[1] != 3:
        raise ValueError(f"cloud inputs disagree: centers {centers.shape} are not (M, 3)")
    words = _cloud_words(len(centers))  # labels and scores are checked against its M by _fill_attributes
    for axis in range(3):
        words[:, axis] = centers[:, axis]
    _fill_attributes(words, labels, scores)
    return _as_points(words)


class CloudRows(NamedTuple):
    """An OccupancyFrame's PointCloud2 points, with what their writer saw: whether every x, y and z (as
    float32) and every score is finite. None where it did not look (numpy's columns, without the kernel)."""

    points: np.ndarray  # (M,) CLOUD_DTYPE
    xyz_finite: bool | None
    scores_finite: bool | None


def occupancy_points(frame: Any) -> np.ndarray:
    """OccupancyFrame -> structured (M,) :data:`CLOUD_DTYPE` array of its occupied voxels.

    The same bytes as ``cloud_points(frame.centers_world(), frame.voxel_labels, frame.voxel_scores)``
    (tests/test_pointcloud2_build.py compares them) in half the time: each coordinate is
    ``centers_world``'s float64 ``origin + (index + 0.5) * size``, computed one axis at a time on a
    contiguous column and rounded to float32 as it is written. numpy runs the (M, 3) float64 form
    with the (3,) origin broadcast as M inner loops of 3 elements, about twice as slow.
    """
    return occupancy_cloud(frame).points


def occupancy_cloud(frame: Any) -> CloudRows:
    """``occupancy_points`` and, where the native kernel wrote the rows (one GIL-free C loop: 0.03 against
    0.07 ms for 12k voxels), whether every coordinate and every score is finite. A frame whose rows came from
    the device (``models.device_cloud.CloudFrame``: the same bytes) gives them as they are."""
    words = getattr(frame, "cloud_words", None)
    if words is not None:
        return CloudRows(_as_points(words), *frame.cloud_finite)
    indices = np.asarray(frame.voxel_indices).reshape(-1, 3)
    origin = np.asarray(frame.voxel_origin, dtype=np.float64).reshape(3)
    size = frame.voxel_size
    words = _cloud_words(len(indices))
    labels, scores = np.asarray(frame.voxel_labels).reshape(-1), np.asarray(frame.voxel_scores).reshape(-1)
    if len(labels) == len(scores) == len(words):
        finite = native_postprocess.cloud_words(indices, labels, scores, LABEL_RGB_BITS, origin, size,
                                                words.view("<u4"))
        if finite is not None:
            return CloudRows(_as_points(words), *finite)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite centres are the check's to report
        for axis in range(3):
            column = indices[:, axis].astype(np.float64)
            column += 0.5
            column *= size
            np.add(origin[axis], column, out=column)  # origin first, as in centers_world (NaN payloads)
            words[:, axis] = column
    _fill_attributes(words, labels, scores)
    return CloudRows(_as_points(words), None, None)


@functools.lru_cache(maxsize=32)
def _field_layout(dtype: np.dtype) -> tuple[tuple[str, int, str], ...]:
    """(name, offset, PointField constant name) of each field of a structured point dtype."""
    layout = []
    for name in dtype.names:
        dt, offset = dtype.fields[name][:2]
        constant = _POINTFIELD_NAMES.get(dt.str[1:])
        if constant is None:
            raise ValueError(f"field {name!r} has dtype {dt} with no PointField equivalent used here")
        layout.append((name, int(offset), constant))
    return tuple(layout)


def _xyz_finite(points: np.ndarray) -> bool:
    """True when every x, y and z is finite (PointCloud2's ``is_dense``: no invalid points).

    A :data:`CLOUD_DTYPE` array is first checked as one flat run of float32 words (twice as fast as
    three strided fields): its rgb and label words are never inf or NaN as floats, so all words finite
    means x, y, z finite; only otherwise (a NaN score, say) are the three fields checked one by one.
    """
    if points.dtype == CLOUD_DTYPE and bool(np.isfinite(np.ascontiguousarray(points).view("<f4")).all()):
        return True
    return all(bool(np.isfinite(points[name]).all()) for name in ("x", "y", "z") if name in points.dtype.names)


@functools.lru_cache(maxsize=32)
def _point_fields(factory: MessageFactory, dtype: np.dtype) -> tuple[Any, ...]:
    """The PointField messages of a structured point dtype, built once per factory and dtype: every cloud
    of a run shares them (publishing only reads them)."""
    field_cls = factory.msg_class("sensor_msgs/msg/PointField")
    return tuple(factory.new("sensor_msgs/msg/PointField", name=name, offset=offset,
                             datatype=int(getattr(field_cls, constant)), count=1)
                 for name, offset, constant in _field_layout(dtype))


def points_to_pointcloud2(factory: MessageFactory, points: np.ndarray, frame_id: str, stamp_ns: int,
                          is_dense: bool | None = None) -> Any:
    """Structured (M,) array -> sensor_msgs/PointCloud2 (height 1), data filled in one copy. ``is_dense``:
    whether every x, y and z is finite, when the caller already knows (else the points are scanned)."""
    step = points.dtype.itemsize
    return factory.new(
        "sensor_msgs/msg/PointCloud2", header=make_header(factory, stamp_ns, frame_id), height=1,
        width=len(points), fields=list(_point_fields(factory, points.dtype)), is_bigendian=False, point_step=step,
        row_step=step * len(points), data=factory.uint8_array(np.ascontiguousarray(points).view(np.uint8)),
        is_dense=_xyz_finite(points) if is_dense is None else bool(is_dense),
    )


def occupancy_to_pointcloud2(factory: MessageFactory, frame: Any, frame_id: str, stamp_ns: int,
                             rows: CloudRows | None = None) -> Any:
    """OccupancyFrame -> PointCloud2 of occupied voxel centres (x, y, z, rgb, label, score) in frame_id.
    ``rows``: the frame's ``occupancy_cloud``, where the caller already has it (the node's output check
    makes it). The native kernel reports ``is_dense`` as it writes the rows: right after an inference the
    scan of ``_xyz_finite`` took 0.11 ms here (docs/results/frame_path.md, session 10)."""
    points, is_dense, _ = occupancy_cloud(frame) if rows is None else rows
    return points_to_pointcloud2(factory, points, frame_id, stamp_ns, is_dense)


def label_grid_to_png(factory: MessageFactory, labels: np.ndarray, frame_id: str, stamp_ns: int) -> Any:
    """Dense (X, Y, Z) uint8 label grid -> lossless mono8 PNG CompressedImage of shape (X, Y*Z).

    Pixel (row x, column y*Z + z) holds label (x, y, z), 255 unknown included: a few kB per frame,
    where a cloud of the unknown voxels would take megabytes.
    """
    return factory.new("sensor_msgs/msg/CompressedImage", header=make_header(factory, stamp_ns, frame_id),
                       format="png", data=factory.uint8_array(label_grid_png(labels)))


def label_grid_png(labels: np.ndarray) -> bytes:
    """Dense (X, Y, Z) uint8 label grid -> the lossless mono8 PNG bytes of :func:`label_grid_to_png`."""
    grid = np.asarray(labels, dtype=np.uint8)
    if grid.ndim != 3:
        raise ValueError(f"label grid must be (X, Y, Z), got shape {grid.shape}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grid.reshape(grid.shape[0], -1))).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- RViz markers, pose, diagnostics
def _pose(factory: MessageFactory, position: np.ndarray | None = None) -> Any:
    x, y, z = (float(v) for v in (position if position is not None else (0.0, 0.0, 0.0)))
    return factory.new("geometry_msgs/msg/Pose", position=factory.new("geometry_msgs/msg/Point", x=x, y=y, z=z),
                       orientation=factory.new("geometry_msgs/msg/Quaternion", x=0.0, y=0.0, z=0.0, w=1.0))


# Marker points are grid-local voxel centres (the marker pose is the grid corner), so the Point
# messages are the same every frame: made once per (point class, voxel size, grid shape), reused, and
# looked up with numpy (an object array over the grid cells) instead of a dict per point.
@dataclass
class _PointCache:
    points: np.ndarray  # (X*Y*Z,) object: the Point message of each grid cell, None until first used
    made: np.ndarray    # (X*Y*Z,) bool


_MARKER_POINTS: dict[tuple, _PointCache] = {}


def _cached_points(factory: MessageFactory, flat_ids: np.ndarray, size: float, grid_shape: tuple[int, ...]) -> list:
    """The Point messages of the grid cells ``flat_ids`` (unique), made for the cells seen for the first time."""
    point_cls = factory.msg_class("geometry_msgs/msg/Point")
    key = (id(point_cls), size, grid_shape)
    cache = _MARKER_POINTS.get(key)
    if cache is None:
        cells = int(np.prod(grid_shape))
        cache = _MARKER_POINTS[key] = _PointCache(np.empty(cells, dtype=object), np.zeros(cells, dtype=bool))
    missing = flat_ids[~cache.made[flat_ids]]
    if len(missing):
        centers = (np.stack(np.unravel_index(missing, grid_shape), axis=-1) + 0.5) * size  # grid-local metres
        for n, (x, y, z) in zip(missing.tolist(), centers.tolist(), strict=True):
            cache.points[n] = factory.new("geometry_msgs/msg/Point", x=x, y=y, z=z)
        cache.made[missing] = True
    return cache.points[flat_ids].tolist()


def occupancy_to_marker_array(factory: MessageFactory, frame: Any, frame_id: str, stamp_ns: int,
                              ns: str = "discene_occupancy", alpha: float = 1.0) -> Any:
    """OccupancyFrame -> MarkerArray: a DELETEALL, then one CUBE_LIST per class present (id = label).

    Each CUBE_LIST's pose is the grid corner (voxel_origin) and its points the voxel centres in grid
    coordinates (metres), whose Point messages are cached across frames.
    """
    marker_cls = factory.msg_class("visualization_msgs/msg/Marker")
    header = make_header(factory, stamp_ns, frame_id)
    markers = [factory.new("visualization_msgs/msg/Marker", header=header, ns=ns, id=0, action=marker_cls.DELETEALL,
                           pose=_pose(factory))]
    indices = np.asarray(frame.voxel_indices, dtype=np.int64).reshape(-1, 3)
    labels = np.asarray(frame.voxel_labels).reshape(-1)
    size = float(frame.voxel_size)
    grid_shape = tuple(int(n) for n in np.shape(frame.labels))
    flat = (indices[:, 0] * grid_shape[1] + indices[:, 1]) * grid_shape[2] + indices[:, 2]
    # the voxels grouped by class (each class in the frame's order), their points looked up in one go and
    # sliced per class: one pass instead of a mask, two gathers and a lookup per class (0.83 -> 0.33 ms here)
    order = np.argsort(labels, kind="stable")
    points = _cached_points(factory, flat[order], size, grid_shape)
    end = 0
    for label, count in enumerate(np.bincount(labels).tolist()):
        begin, end = end, end + count
        if count == 0 or label == 0 or label > NUM_CLASSES:
            continue
        r, g, b = (float(c) / 255.0 for c in CLASS_COLORS[label])
        markers.append(factory.new(
            "visualization_msgs/msg/Marker", header=header, ns=ns, id=label, type=marker_cls.CUBE_LIST,
            action=marker_cls.ADD, pose=_pose(factory, frame.voxel_origin),
            scale=factory.new("geometry_msgs/msg/Vector3", x=size, y=size, z=size),
            color=factory.new("std_msgs/msg/ColorRGBA", r=r, g=g, b=b, a=float(alpha)),
            points=points[begin:end], text=CLASS_NAMES[label],
        ))
    return factory.new("visualization_msgs/msg/MarkerArray", markers=markers)


def grid_pose_msg(factory: MessageFactory, voxel_origin: np.ndarray, frame_id: str, stamp_ns: int) -> Any:
    """PoseStamped of the grid: position = voxel_origin (corner of voxel (0,0,0)), identity orientation."""
    return factory.new("geometry_msgs/msg/PoseStamped", header=make_header(factory, stamp_ns, frame_id),
                       pose=_pose(factory, finite_origin(voxel_origin).tolist()))


def stats_to_diagnostics(factory: MessageFactory, stats: Mapping[str, Any], stamp_ns: int,
                         name: str = "discene_ros: occupancy", hardware_id: str = "discene_ros") -> Any:
    """Stats snapshot (``FrameStats.snapshot()``) -> DiagnosticArray with one status.

    Level OK while frames are processed, WARN when none was processed in the window or frames were
    skipped in it.
    """
    status_cls = factory.msg_class("diagnostic_msgs/msg/DiagnosticStatus")
    lat = stats.get("latency_ms", {})
    skipped = stats.get("skipped", {})
    window_processed = int(stats.get("window_processed", stats.get("processed", 0)))
    window_skipped = int(stats.get("window_skipped", 0))
    if window_processed == 0:
        level, message = status_cls.WARN, "no frame processed in the last period"
    elif window_skipped > 0:
        level, message = status_cls.WARN, f"{stats.get('fps', 0.0):.1f} FPS, {window_skipped} bad frames skipped"
    else:
        level, message = status_cls.OK, f"{stats.get('fps', 0.0):.1f} FPS, p50 latency {lat.get('p50', 0.0):.1f} ms"
    values = {
        "fps": f"{stats.get('fps', 0.0):.2f}",
        **{f"latency_{k}_ms": f"{v:.2f}" for k, v in lat.items()},
        "received": str(stats.get("received", 0)),
        "processed": str(stats.get("processed", 0)),
        "dropped": str(stats.get("dropped", 0)),
        "skipped": str(sum(skipped.values())),
        **{f"skipped_{reason}": str(count) for reason, count in sorted(skipped.items())},
    }
    kvs = [factory.new("diagnostic_msgs/msg/KeyValue", key=k, value=v) for k, v in values.items()]
    status = factory.new("diagnostic_msgs/msg/DiagnosticStatus", level=level, name=name, message=message,
                         hardware_id=hardware_id, values=kvs)
    return factory.new("diagnostic_msgs/msg/DiagnosticArray", header=make_header(factory, stamp_ns, ""), status=[status])


# ----------------------------------------------------------------------------- building input messages (bags, tests)
def rgb_to_image(factory: MessageFactory, rgb: np.ndarray, frame_id: str, stamp_ns: int, encoding: str = "rgb8") -> Any:
    """(H, W, 3) uint8 RGB -> sensor_msgs/Image in rgb8, bgr8, rgba8, bgra8 or mono8."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding in ("rgba8", "bgra8"):
        alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
        pixels = np.concatenate([rgb if encoding == "rgba8" else rgb[..., ::-1], alpha], axis=-1)
    elif encoding == "mono8":
        pixels = rgb.mean(axis=-1).round().astype(np.uint8)[..., None]
    else:
        raise UnsupportedEncodingError(f"cannot build an image in encoding {encoding!r}")
    h, w, c = pixels.shape
    return factory.new("sensor_msgs/msg/Image", header=make_header(factory, stamp_ns, frame_id), height=h, width=w,
                       encoding=encoding, is_bigendian=False, step=w * c,
                       data=factory.uint8_array(np.ascontiguousarray(pixels)))


def rgb_to_compressed(factory: MessageFactory, rgb: np.ndarray, frame_id: str, stamp_ns: int,
                      fmt: str = "jpeg", quality: int = 90) -> Any:
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage (jpeg or png, encoded with PIL)."""
    if fmt not in ("jpeg", "png"):
        raise UnsupportedEncodingError(f"compressed format must be 'jpeg' or 'png', got {fmt!r}")
    out = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(out, format="JPEG" if fmt == "jpeg" else "PNG",
                                                          **({"quality": quality} if fmt == "jpeg" else {}))
    return factory.new("sensor_msgs/msg/CompressedImage", header=make_header(factory, stamp_ns, frame_id),
                       format=fmt, data=factory.uint8_array(out.getvalue()))


def _millimetres(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Depth in metres -> whole millimetres in 0..65535 (16UC1's unit), 0 where not ``valid``."""
    return np.where(valid, np.clip(np.round(depth * 1000.0), 0, 65535), 0)


def depth_to_image(factory: MessageFactory, depth_m: np.ndarray, frame_id: str, stamp_ns: int,
                   encoding: str = "16UC1") -> Any:
    """(H, W) metres -> depth Image, 16UC1 (mm, 0 invalid) or 32FC1 (m, NaN invalid)."""
    depth = np.asarray(depth_m, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    if encoding == "16UC1":
        pixels = _millimetres(depth, valid).astype("<u2")
    elif encoding == "32FC1":
        pixels = np.where(valid, depth, np.nan).astype("<f4")
    else:
        raise DepthError(f"cannot build a depth image in encoding {encoding!r}")
    h, w = pixels.shape
    return factory.new("sensor_msgs/msg/Image", header=make_header(factory, stamp_ns, frame_id), height=h, width=w,
                       encoding=encoding, is_bigendian=False, step=w * pixels.itemsize,
                       data=factory.uint8_array(np.ascontiguousarray(pixels)))


def depth_to_compressed_depth(factory: MessageFactory, depth_m: np.ndarray, frame_id: str, stamp_ns: int,
                              encoding: str = "16UC1", depth_max: float = 10.0,
                              depth_quantization: float = 100.0, codec: str = "png") -> Any:
    """(H, W) metres -> compressedDepth CompressedImage as compressed_depth_image_transport encodes it (its
    defaults ``depth_max`` 10 m and ``depth_quantization`` 100): 16UC1 16-bit millimetres up to
    ``depth_max``; 32FC1 inverse depth ``quant_a / d + quant_b`` truncated to uint16 (0 invalid); the
    12-byte ConfigHeader, then the pixels as a PNG (format ``"<encoding>; compressedDepth"``, Humble's) or
    RVL-coded (``codec="rvl"``: ``"<encoding>; compressedDepth rvl"``, Jazzy's)."""
    depth = np.asarray(depth_m, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    quant_a = quant_b = 0.0
    if encoding == "16UC1":
        mm = _millimetres(depth, valid)
        pixels = np.where(mm > int(np.float32(depth_max) * np.float32(1000.0)), 0, mm).astype(np.uint16)
    elif encoding == "32FC1":
        quant_a = float(np.float32(depth_quantization) * np.float32(depth_quantization + 1.0))
        quant_b = float(np.float32(1.0) - np.float32(quant_a) / np.float32(depth_max))
        d = depth.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.float32(quant_a) / d + np.float32(quant_b)
        pixels = np.where(valid & (d < np.float32(depth_max)), np.trunc(inv), 0).astype(np.uint16)
    else:
        raise DepthError(f"compressedDepth carries 16UC1 or 32FC1 depth, not {encoding!r}")
    if codec == "rvl":
        body, fmt = rvl.encode(pixels), f"{encoding}; compressedDepth rvl"
    elif codec == "png":
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")  # PIL writes uint16 as a 16-bit greyscale PNG
        body, fmt = out.getvalue(), f"{encoding}; compressedDepth"
    else:
        raise ValueError(f"compressedDepth codec must be png or rvl, not {codec!r}")
    header = COMPRESSED_DEPTH_HEADER.pack(0, quant_a, quant_b)
    return factory.new("sensor_msgs/msg/CompressedImage", header=make_header(factory, stamp_ns, frame_id),
                       format=fmt, data=factory.uint8_array(np.frombuffer(header + body, np.uint8)))


def k_to_camera_info(factory: MessageFactory, k: np.ndarray, height: int, width: int, frame_id: str,
                     stamp_ns: int) -> Any:
    """3x3 K -> CameraInfo (plumb_bob, zero distortion, identity R, P = [K | 0])."""
    k = np.asarray(k, dtype=np.float64).reshape(3, 3)
    p = np.zeros((3, 4))
    p[:, :3] = k
    return factory.new("sensor_msgs/msg/CameraInfo", header=make_header(factory, stamp_ns, frame_id),
                       height=int(height), width=int(width), distortion_model="plumb_bob",
                       d=factory.float64_sequence(np.zeros(5)), k=factory.float64_array(k),
                       r=factory.float64_array(np.eye(3)), p=factory.float64_array(p))
