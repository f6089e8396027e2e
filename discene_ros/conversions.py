"""ROS message <-> numpy conversions, free of any ROS import.

Inputs are duck-typed (rclpy messages, rosbags typestore messages and ROS 1 style upper-case
``K`` all work); outputs are built through a :mod:`discene_ros.msg_factory` factory. Every bad input
raises a :class:`discene_ros.errors.FrameError` subclass that names the problem.

Published layouts (documented in README / DESIGN.md section 5):
- occupancy PointCloud2: one point per occupied voxel centre, height 1, little endian, 24-byte
  points ``x y z`` float32 at 0/4/8, ``rgb`` float32 at 12 (bits of ``r<<16 | g<<8 | b``), ``label``
  uint8 at 16, ``score`` float32 at 20.
- grid pose: ``geometry_msgs/PoseStamped`` whose position is ``voxel_origin`` (the world corner of
  voxel (0,0,0)), identity orientation (the grid is world-axis aligned).
"""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.classes import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES, label_colors
from models.geometry import scale_intrinsic

from .errors import (
    CameraInfoError,
    CloudFormatError,
    DecodeError,
    DepthError,
    ImageSizeError,
    PoseError,
    TransformError,
    UnsupportedEncodingError,
)
from .msg_factory import MessageFactory

# encoding -> (channels, channel slice giving RGB) for the zero-copy colour path (slices are views)
_COLOR_ENCODINGS: dict[str, tuple[int, slice]] = {
    "rgb8": (3, slice(None)), "bgr8": (3, slice(2, None, -1)), "rgba8": (4, slice(0, 3)),
    "bgra8": (4, slice(2, None, -1)), "mono8": (1, slice(None)),
}
SUPPORTED_IMAGE_ENCODINGS = tuple(_COLOR_ENCODINGS)
SUPPORTED_DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")

# PointCloud2 layout of occupied voxels (also used for the ground truth in bags, score 1.0)
CLOUD_DTYPE = np.dtype({
    "names": ["x", "y", "z", "rgb", "label", "score"],
    "formats": ["<f4", "<f4", "<f4", "<f4", "u1", "<f4"],
    "offsets": [0, 4, 8, 12, 16, 20],
    "itemsize": 24,
})
_POINTFIELD_TYPES = {  # sensor_msgs/PointField datatype constants
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8",
}
_FIELD_DATATYPE = {"<f4": 7, "u1": 2}

# Limits on what a frame may claim (see check_intrinsics / check_pose / compressed_to_rgb).
MAX_IMAGE_PIXELS = 64_000_000    # a compressed header claiming more is refused before decoding (8K is 33 Mpx)
FOCAL_RANGE = (0.1, 50.0)        # focal length / image size along its axis: 157 deg .. 1.1 deg field of view
PRINCIPAL_MARGIN = 0.25          # principal point may lie this fraction of the size outside the image
MAX_SKEW_RATIO = 0.1             # |K[0,1]| / fx
ROTATION_TOL = 1e-3              # max |R^T R - I| entry and |det R - 1| of a camera pose
MAX_TRANSLATION_M = 1e5          # |t| of a camera pose; beyond it float32 voxel centres lose centimetres
QUATERNION_NORM2_TOL = 0.01      # | |q|^2 - 1 | allowed in TF, the tolerance tf2's BufferCore uses

# Reduced JPEG decoding (compressed_to_rgb's ``min_size_hw``): libjpeg scales by 1/2, 1/4 or 1/8 inside
# the inverse DCT, about 2x faster for 640x480 -> 320x240 on the sample frames (less on noisy images,
# whose Huffman decoding it does not shorten). The image is decoded at least this many times
# the network input in both axes; measured on the sample dataset's train frames (640x480, lite
# 256x192), the network input then differs from full decode + the same resize by mean 0.45-0.53, max
# 15-16 grey levels (at 1.0x: mean 0.92, max 34), and the shipped lite model's labels agree on 99.97 %
# of the voxels (occupied IoU 99.8 %). tests/test_jpeg_reduced.py holds mean <= 0.6 and max <= 20.
JPEG_REDUCE_MARGIN = 1.25


# ----------------------------------------------------------------------------- stamps and headers
def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (sec, nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_header(factory: MessageFactory, stamp_ns: int, frame_id: str) -> Any:
    """std_msgs/Header for a stamp in nanoseconds."""
    stamp = factory.new("builtin_interfaces/msg/Time", sec=int(stamp_ns // 1_000_000_000),
                        nanosec=int(stamp_ns % 1_000_000_000))
    return factory.new("std_msgs/msg/Header", stamp=stamp, frame_id=str(frame_id))


# ----------------------------------------------------------------------------- images
def _byte_buffer(data: Any) -> np.ndarray:
    """Message ``data`` (numpy, bytes, array.array, memoryview, list) as a flat uint8 view."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _rows(msg: Any, bytes_per_pixel: int) -> np.ndarray:
    """(H, W * bytes_per_pixel) uint8 view of an Image honouring ``step`` padding; checks sizes."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"image has invalid size {width}x{height}")
    row = width * bytes_per_pixel
    if step < row:
        raise ImageSizeError(f"image step {step} is smaller than width*bytes_per_pixel = {row} ({msg.encoding})")
    buf = _byte_buffer(msg.data)
    if buf.size < step * height:
        raise ImageSizeError(f"image data has {buf.size} bytes, expected step*height = {step}*{height} = {step * height}")
    return buf[: step * height].reshape(height, step)[:, :row]


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image -> (H, W, 3) uint8 RGB.

    rgb8/bgr8/rgba8/bgra8/mono8 are numpy views of the message buffer (no copy; mono8 is broadcast,
    read-only); other encodings go through cv_bridge, imported lazily.
    """
    encoding = str(msg.encoding).lower()
    if encoding not in _COLOR_ENCODINGS:
        return _cv_bridge_to_rgb(msg)
    channels, rgb = _COLOR_ENCODINGS[encoding]
    pixels = _rows(msg, channels).reshape(int(msg.height), int(msg.width), channels)
    if channels == 1:
        return np.broadcast_to(pixels, (*pixels.shape[:2], 3))
    return pixels[..., rgb]


def _cv_bridge_to_rgb(msg: Any) -> np.ndarray:
    try:
        from cv_bridge import CvBridge
    except ImportError as exc:
        raise UnsupportedEncodingError(
            f"image encoding {msg.encoding!r} needs cv_bridge, which is not installed; without it the "
            f"supported encodings are {', '.join(SUPPORTED_IMAGE_ENCODINGS)} and compressed jpeg/png") from exc
    try:
        rgb = CvBridge().imgmsg_to_cv2(msg, desired_encoding="rgb8")
    except Exception as exc:  # cv_bridge raises its own CvBridgeError and plain TypeErrors
        raise UnsupportedEncodingError(f"cv_bridge cannot convert encoding {msg.encoding!r} to rgb8: {exc}") from exc
    return np.asarray(rgb, dtype=np.uint8)


def reduced_decode_size(network_hw: tuple[int, int] | list[int]) -> tuple[int, int]:
    """The smallest (H, W) a JPEG may be decoded at for a network input of ``network_hw``."""
    return tuple(math.ceil(JPEG_REDUCE_MARGIN * int(s)) for s in network_hw)


def jpeg_reduction(width: int, height: int, min_size_hw: tuple[int, int] | None) -> int:
    """The largest libjpeg scale-down (8, 4, 2, else 1) that divides the image exactly and keeps it at
    least ``min_size_hw`` (H, W); exact division keeps K a plain 1/r scaling of the full image's K."""
    if min_size_hw is None:
        return 1
    for r in (8, 4, 2):
        if width % r == 0 and height % r == 0 and width // r >= min_size_hw[1] and height // r >= min_size_hw[0]:
            return r
    return 1


def compressed_to_rgb(msg: Any, min_size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (H, W, 3) uint8 RGB, via cv2 if present else PIL.

    ``min_size_hw``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (``jpeg_reduction``, with
    PIL's ``draft``, also when cv2 is present) as long as it stays at least this size; the returned
    image then has the reduced size and ``camera_info_to_k(info, rgb.shape[:2])`` scales K to it.
    """
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise UnsupportedEncodingError(f"compressed image format {msg.format!r} is a depth image, not colour")
    buf = _byte_buffer(msg.data)
    if buf.size < 8:
        raise DecodeError(f"compressed image has only {buf.size} bytes")
    is_jpeg = buf[0] == 0xFF and buf[1] == 0xD8
    is_png = bytes(buf[:8]) == b"\x89PNG\r\n\x1a\n"
    if not (is_jpeg or is_png):
        raise UnsupportedEncodingError(f"compressed image format {msg.format!r}: data is neither JPEG nor PNG")
    width, height = _compressed_size(msg, buf)
    if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
        raise ImageSizeError(f"compressed {msg.format!r} image header claims {width}x{height} pixels; the limit "
                             f"is {MAX_IMAGE_PIXELS} pixels")
    reduce = jpeg_reduction(width, height, min_size_hw) if is_jpeg else 1
    try:
        import cv2
    except ImportError:
        cv2 = None
    try:
        if cv2 is not None and reduce == 1:
            bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if bgr is None:
                raise DecodeError(f"cv2 could not decode the {msg.format!r} compressed image ({buf.size} bytes)")
            return bgr[..., ::-1]
        with Image.open(io.BytesIO(buf.tobytes())) as img:
            if reduce > 1:
                img.draft("RGB", (width // reduce, height // reduce))
            return np.asarray(img.convert("RGB"))
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (truncation, bombs, libjpeg errors) skips the frame
        raise DecodeError(f"could not decode the {msg.format!r} compressed image ({buf.size} bytes): "
                          f"{type(exc).__name__}: {exc}") from exc


def _compressed_size(msg: Any, buf: np.ndarray) -> tuple[int, int]:
    """(width, height) from the JPEG/PNG header only (PIL's ``open`` parses the header, decodes nothing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(buf.tobytes())) as img:
                return int(img.size[0]), int(img.size[1])
    except Image.DecompressionBombError as exc:  # PIL's own, larger limit, raised while reading the header
        raise ImageSizeError(f"compressed {msg.format!r} image header claims too many pixels ({exc}); the limit "
                             f"is {MAX_IMAGE_PIXELS} pixels") from None
    except Exception as exc:  # noqa: BLE001 - a header PIL cannot parse
        raise DecodeError(f"compressed {msg.format!r} image has an unreadable header ({buf.size} bytes): "
                          f"{type(exc).__name__}: {exc}") from exc


def any_image_to_rgb(msg: Any, min_size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Image or CompressedImage (told apart by the ``format`` field) -> (H, W, 3) uint8 RGB; a JPEG may
    come back reduced (``compressed_to_rgb``'s ``min_size_hw``), a raw Image always at its size."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_to_rgb(msg, min_size_hw)
    return image_to_rgb(msg)


def depth_to_metres(msg: Any) -> np.ndarray:
    """Depth Image (16UC1/mono16 in mm, 32FC1 in m) -> (H, W) float32 metres; NaN/inf/<=0 -> 0 (invalid)."""
    encoding = str(msg.encoding)
    order = ">" if bool(msg.is_bigendian) else "<"
    if encoding in ("16UC1", "mono16"):
        raw = _rows(msg, 2).copy().view(f"{order}u2").reshape(int(msg.height), int(msg.width))
        depth = raw.astype(np.float32) * np.float32(0.001)
    elif encoding == "32FC1":
        raw = _rows(msg, 4).copy().view(f"{order}f4").reshape(int(msg.height), int(msg.width))
        depth = raw.astype(np.float32)
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    else:
        raise DepthError(f"depth encoding {encoding!r} is not supported; use one of {', '.join(SUPPORTED_DEPTH_ENCODINGS)}")
    if not np.any(depth > 0):
        raise DepthError(f"depth image {msg.width}x{msg.height} has no valid pixel (all zero, NaN or inf)")
    return depth


# ----------------------------------------------------------------------------- camera info and TF
def check_intrinsics(k: np.ndarray, width: int, height: int) -> np.ndarray:
    """Raise CameraInfoError unless ``k`` is a pinhole K that makes sense for a ``width`` x ``height`` image.

    K[2] must be [0 0 1] and K[1,0] zero; fx/width and fy/height in :data:`FOCAL_RANGE` (fields of view
    between about 1 and 157 degrees); the principal point within :data:`PRINCIPAL_MARGIN` of the image;
    |skew| at most :data:`MAX_SKEW_RATIO` * fx. Returns ``k`` as a (3, 3) float64 array.
    """
    k = np.asarray(k, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(k)):
        raise CameraInfoError(f"K has non-finite values: {k.reshape(-1).tolist()}")
    if abs(k[2, 2] - 1.0) > 1e-6 or abs(k[2, 0]) > 1e-9 or abs(k[2, 1]) > 1e-9 or abs(k[1, 0]) > 1e-9:
        raise CameraInfoError(f"K is not a pinhole camera matrix: last row {k[2].tolist()} must be [0, 0, 1] "
                              f"and K[1,0]={k[1, 0]} must be 0")
    fx, fy, skew, cx, cy = k[0, 0], k[1, 1], k[0, 1], k[0, 2], k[1, 2]
    if fx <= 0 or fy <= 0:
        raise CameraInfoError(f"camera info is uncalibrated or invalid: fx={fx}, fy={fy} must be > 0")
    lo, hi = FOCAL_RANGE
    if not (lo <= fx / width <= hi and lo <= fy / height <= hi):
        raise CameraInfoError(f"focal lengths fx={fx:.6g}, fy={fy:.6g} are outside {lo}..{hi} times the image "
                              f"size {width}x{height}")
    m = PRINCIPAL_MARGIN
    if not (-m * width <= cx <= (1 + m) * width and -m * height <= cy <= (1 + m) * height):
        raise CameraInfoError(f"principal point ({cx:.6g}, {cy:.6g}) lies far outside the {width}x{height} image")
    if abs(skew) > MAX_SKEW_RATIO * fx:
        raise CameraInfoError(f"skew K[0,1]={skew:.6g} exceeds {MAX_SKEW_RATIO} * fx = {MAX_SKEW_RATIO * fx:.6g}")
    return k


def check_pose(pose: np.ndarray, what: str = "camera pose") -> np.ndarray:
    """Raise PoseError unless ``pose`` is a rigid 4x4 transform: finite, bottom row [0 0 0 1], rotation
    orthonormal with det +1 (within :data:`ROTATION_TOL`), |translation| <= :data:`MAX_TRANSLATION_M`."""
    m = np.asarray(pose, dtype=np.float64)
    if m.shape != (4, 4):
        raise PoseError(f"{what} must be 4x4, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise PoseError(f"{what} has non-finite values")
    if np.max(np.abs(m[3] - [0.0, 0.0, 0.0, 1.0])) > 1e-9:
        raise PoseError(f"{what} is projective: bottom row {m[3].tolist()} must be [0, 0, 0, 1]")
    rot = m[:3, :3]
    ortho = float(np.max(np.abs(rot.T @ rot - np.eye(3))))
    det = float(np.linalg.det(rot))
    if ortho > ROTATION_TOL or abs(det - 1.0) > ROTATION_TOL:
        kind = "a reflection" if det < 0 else "not a rotation (scaled or sheared)"
        raise PoseError(f"{what} is {kind}: max |R^T R - I| = {ortho:.3g}, det R = {det:.6g} (tolerance {ROTATION_TOL})")
    dist = float(np.linalg.norm(m[:3, 3]))
    if dist > MAX_TRANSLATION_M:
        raise PoseError(f"{what} translation is {dist:.3g} m from the origin (limit {MAX_TRANSLATION_M:g} m)")
    return m


def camera_info_to_k(msg: Any, image_hw: tuple[int, int] | None = None, aspect_tol: float = 0.01) -> np.ndarray:
    """CameraInfo -> 3x3 K for an image of size ``image_hw`` (H, W), rescaled from the info resolution.

    Binning is applied first; a different aspect ratio (beyond ``aspect_tol``) is a mismatch, not a resize.
    K is checked (:func:`check_intrinsics`) against the info resolution when it has one.
    """
    k = np.asarray(getattr(msg, "k", None) if hasattr(msg, "k") else getattr(msg, "K", None), dtype=np.float64)
    if k.size != 9 or not np.all(np.isfinite(k)):
        raise CameraInfoError(f"camera info K must hold 9 finite numbers, got {k.reshape(-1).tolist()}")
    k = k.reshape(3, 3)
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise CameraInfoError(f"camera info is uncalibrated or invalid: fx={k[0, 0]}, fy={k[1, 1]} must be > 0")
    bx, by = max(int(getattr(msg, "binning_x", 0)), 1), max(int(getattr(msg, "binning_y", 0)), 1)
    width, height = int(msg.width) // bx, int(msg.height) // by
    if width > 0 and height > 0:
        check_intrinsics(k, int(msg.width), int(msg.height))
    if image_hw is None:
        return k
    if width <= 0 or height <= 0:
        raise CameraInfoError(f"camera info has no resolution ({msg.width}x{msg.height}); cannot check the image size")
    k = k.copy()
    k[0, :] /= bx
    k[1, :] /= by
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    if (img_h, img_w) == (height, width):
        return k
    if abs((img_w / img_h) / (width / height) - 1.0) > aspect_tol:
        raise CameraInfoError(
            f"image size {img_w}x{img_h} does not match camera info {width}x{height} (different aspect ratio)")
    return scale_intrinsic(k, (height, width), (img_h, img_w))


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Unit quaternion -> 3x3 rotation matrix; normalised here once |q|^2 is within
    :data:`QUATERNION_NORM2_TOL` of 1 (tf2's rule), otherwise TransformError."""
    q = np.array([x, y, z, w], dtype=np.float64)
    if not np.all(np.isfinite(q)):
        raise TransformError(f"rotation quaternion {q.tolist()} is not finite")
    norm2 = float(q @ q)
    if abs(norm2 - 1.0) > QUATERNION_NORM2_TOL:
        what = "zero" if norm2 < 1e-18 else f"not unit (|q|^2 = {norm2:.6g})"
        raise TransformError(f"rotation quaternion {q.tolist()} is {what}")
    x, y, z, w = q / math.sqrt(norm2)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def transform_to_matrix(msg: Any) -> np.ndarray:
    """geometry_msgs/Transform or TransformStamped -> 4x4 (child -> parent, i.e. camera -> world).

    Raises TransformError (a FrameError: the frame it belongs to is skipped) for a zero, non-finite or
    non-unit quaternion or a non-finite translation.
    """
    tf = msg.transform if hasattr(msg, "transform") else msg
    t, r = tf.translation, tf.rotation
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(r.x, r.y, r.z, r.w)
    out[:3, 3] = [t.x, t.y, t.z]
    if not np.all(np.isfinite(out)):
        raise TransformError(f"transform translation {[t.x, t.y, t.z]} is not finite")
    return out


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


def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb`: (N,) float32 -> (N, 3) uint8."""
    packed = np.ascontiguousarray(rgb, dtype="<f4").view("<u4")
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.uint8)


# packed colour of every uint8 label: one table lookup per point instead of colour rows + packing (5x faster)
_LABEL_RGB = pack_rgb(label_colors(np.arange(256, dtype=np.uint8)))


def cloud_points(centers: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Structured (M,) array in :data:`CLOUD_DTYPE` from voxel centres, labels and scores."""
    centers = np.asarray(centers)
    labels = np.asarray(labels, dtype=np.uint8).reshape(-1)
    if centers.ndim != 2 or centers.shape[1] != 3 or len(centers) != len(labels) or len(labels) != len(scores):
        raise ValueError(f"cloud inputs disagree: centers {centers.shape}, labels {labels.shape}, scores {np.shape(scores)}")
    points = np.zeros(len(labels), dtype=CLOUD_DTYPE)
    points["x"], points["y"], points["z"] = centers[:, 0], centers[:, 1], centers[:, 2]
    points["rgb"] = _LABEL_RGB[labels]
    points["label"] = labels
    points["score"] = np.asarray(scores, dtype=np.float32).reshape(-1)
    return points


def points_to_pointcloud2(factory: MessageFactory, points: np.ndarray, frame_id: str, stamp_ns: int) -> Any:
    """Structured (M,) array -> sensor_msgs/PointCloud2 (height 1), data filled in one copy."""
    field_cls = factory.msg_class("sensor_msgs/msg/PointField")
    fields = []
    for name in points.dtype.names:
        dt, offset = points.dtype.fields[name][:2]
        datatype = {"f4": field_cls.FLOAT32, "u1": field_cls.UINT8, "u4": field_cls.UINT32}.get(dt.str[1:])
        if datatype is None:
            raise ValueError(f"field {name!r} has dtype {dt} with no PointField equivalent used here")
        fields.append(factory.new("sensor_msgs/msg/PointField", name=name, offset=int(offset),
                                  datatype=int(datatype), count=1))
    step = points.dtype.itemsize
    xyz = [points[name] for name in ("x", "y", "z") if name in points.dtype.names]
    dense = all(bool(np.isfinite(c).all()) for c in xyz)  # PointCloud2: is_dense means no invalid points
    return factory.new(
        "sensor_msgs/msg/PointCloud2", header=make_header(factory, stamp_ns, frame_id), height=1,
        width=len(points), fields=fields, is_bigendian=False, point_step=step, row_step=step * len(points),
        data=factory.uint8_array(np.ascontiguousarray(points).view(np.uint8)), is_dense=dense,
    )


def occupancy_to_pointcloud2(factory: MessageFactory, frame: Any, frame_id: str, stamp_ns: int) -> Any:
    """OccupancyFrame -> PointCloud2 of occupied voxel centres (x, y, z, rgb, label, score) in frame_id."""
    points = cloud_points(frame.centers_world(), frame.voxel_labels, frame.voxel_scores)
    return points_to_pointcloud2(factory, points, frame_id, stamp_ns)


def pointcloud2_to_array(msg: Any) -> np.ndarray:
    """PointCloud2 -> structured (N,) array with the message's own fields (any offsets, padding, endianness)."""
    order = ">" if bool(msg.is_bigendian) else "<"
    names, formats, offsets = [], [], []
    for field in msg.fields:
        code = _POINTFIELD_TYPES.get(int(field.datatype))
        if code is None:
            raise CloudFormatError(f"PointCloud2 field {field.name!r} has unknown datatype {field.datatype}")
        count = int(field.count) or 1
        names.append(str(field.name))
        formats.append((order + code) if count == 1 else (order + code, (count,)))
        offsets.append(int(field.offset))
    step, width, height = int(msg.point_step), int(msg.width), int(msg.height)
    try:
        dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": step})
    except ValueError as exc:
        raise CloudFormatError(f"PointCloud2 fields do not fit point_step {step}: {exc}") from exc
    if width * height == 0:
        return np.zeros(0, dtype=dtype)
    row_step = int(msg.row_step)
    buf = _byte_buffer(msg.data)
    if row_step < width * step or buf.size < row_step * (height - 1) + width * step:
        raise CloudFormatError(f"PointCloud2 data has {buf.size} bytes, too few for {height} rows of "
                               f"{width} points (point_step {step}, row_step {row_step})")
    rows = np.zeros((height, width * step), dtype=np.uint8)
    for r in range(height):
        rows[r] = buf[r * row_step: r * row_step + width * step]
    return rows.reshape(-1).view(dtype)


def cloud_to_label_grid(msg: Any, voxel_origin: np.ndarray, voxel_size: float,
                        grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Labelled voxel-centre cloud (e.g. the ground truth topic) -> dense (X, Y, Z) uint8 grid, 0 elsewhere."""
    points = pointcloud2_to_array(msg)
    for name in ("x", "y", "z", "label"):
        if name not in (points.dtype.names or ()):
            raise CloudFormatError(f"PointCloud2 has no {name!r} field (fields: {points.dtype.names})")
    xyz = np.stack([points["x"], points["y"], points["z"]], axis=-1).astype(np.float64)
    idx = np.floor((xyz - np.asarray(voxel_origin, dtype=np.float64)) / voxel_size).astype(np.int64)
    shape = np.asarray(grid_shape)
    inside = np.all((idx >= 0) & (idx < shape), axis=1)
    if not np.all(inside):
        raise CloudFormatError(f"{int((~inside).sum())} of {len(idx)} cloud points lie outside the grid at {voxel_origin}")
    grid = np.zeros(tuple(grid_shape), dtype=np.uint8)
    grid[idx[:, 0], idx[:, 1], idx[:, 2]] = points["label"]
    return grid


def label_grid_to_png(factory: MessageFactory, labels: np.ndarray, frame_id: str, stamp_ns: int) -> Any:
    """Dense (X, Y, Z) uint8 label grid -> lossless mono8 PNG CompressedImage of shape (X, Y*Z).

    Pixel (row x, column y*Z + z) holds label (x, y, z), 255 unknown included: a few kB per frame,
    where a cloud of the unknown voxels would take megabytes.
    """
    grid = np.asarray(labels, dtype=np.uint8)
    if grid.ndim != 3:
        raise ValueError(f"label grid must be (X, Y, Z), got shape {grid.shape}")
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grid.reshape(grid.shape[0], -1))).save(out, format="PNG")
    return factory.new("sensor_msgs/msg/CompressedImage", header=make_header(factory, stamp_ns, frame_id),
                       format="png", data=factory.uint8_array(out.getvalue()))


def png_to_label_grid(msg: Any, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`label_grid_to_png` for a grid of ``grid_shape``."""
    try:
        with Image.open(io.BytesIO(_byte_buffer(msg.data).tobytes())) as img:
            flat = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CloudFormatError(f"ground-truth label image is not a readable PNG: {exc}") from exc
    x, y, z = (int(n) for n in grid_shape)
    if flat.dtype != np.uint8 or flat.shape != (x, y * z):
        raise CloudFormatError(f"ground-truth label image is {flat.dtype} {flat.shape}, expected uint8 ({x}, {y * z}) "
                               f"for a {x}x{y}x{z} grid")
    return flat.reshape(x, y, z)


# ----------------------------------------------------------------------------- RViz markers, pose, diagnostics
def _pose(factory: MessageFactory, position: np.ndarray | None = None) -> Any:
    x, y, z = (float(v) for v in (position if position is not None else (0.0, 0.0, 0.0)))
    return factory.new("geometry_msgs/msg/Pose", position=factory.new("geometry_msgs/msg/Point", x=x, y=y, z=z),
                       orientation=factory.new("geometry_msgs/msg/Quaternion", x=0.0, y=0.0, z=0.0, w=1.0))


# Marker points are grid-local voxel centres (the marker pose is the grid corner), so the Point
# messages are the same every frame: made once per (point class, voxel size, grid shape), reused.
_MARKER_POINTS: dict[tuple, dict[int, Any]] = {}


def _cached_points(factory: MessageFactory, flat_ids: np.ndarray, indices: np.ndarray, size: float,
                   grid_shape: tuple[int, ...]) -> list:
    point_cls = factory.msg_class("geometry_msgs/msg/Point")
    cache = _MARKER_POINTS.setdefault((id(point_cls), size, grid_shape), {})
    missing = [n for n, f in enumerate(flat_ids.tolist()) if f not in cache]
    for n in missing:
        x, y, z = ((indices[n].astype(np.float64) + 0.5) * size).tolist()
        cache[int(flat_ids[n])] = factory.new("geometry_msgs/msg/Point", x=x, y=y, z=z)
    return [cache[f] for f in flat_ids.tolist()]


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
    labels = np.asarray(frame.voxel_labels)
    size = float(frame.voxel_size)
    grid_shape = tuple(int(n) for n in np.shape(frame.labels))
    flat = (indices[:, 0] * grid_shape[1] + indices[:, 1]) * grid_shape[2] + indices[:, 2]
    for label in np.unique(labels):
        if label == 0 or label > NUM_CLASSES:
            continue
        r, g, b = (float(c) / 255.0 for c in CLASS_COLORS[label])
        sel = labels == label
        pts = _cached_points(factory, flat[sel], indices[sel], size, grid_shape)
        markers.append(factory.new(
            "visualization_msgs/msg/Marker", header=header, ns=ns, id=int(label), type=marker_cls.CUBE_LIST,
            action=marker_cls.ADD, pose=_pose(factory, frame.voxel_origin),
            scale=factory.new("geometry_msgs/msg/Vector3", x=size, y=size, z=size),
            color=factory.new("std_msgs/msg/ColorRGBA", r=r, g=g, b=b, a=float(alpha)),
            points=pts, text=CLASS_NAMES[label],
        ))
    return factory.new("visualization_msgs/msg/MarkerArray", markers=markers)


def grid_pose_msg(factory: MessageFactory, voxel_origin: np.ndarray, frame_id: str, stamp_ns: int) -> Any:
    """PoseStamped of the grid: position = voxel_origin (corner of voxel (0,0,0)), identity orientation."""
    origin = np.asarray(voxel_origin, dtype=np.float64).reshape(-1)
    if origin.size != 3 or not np.all(np.isfinite(origin)):
        raise ValueError(f"voxel_origin must be 3 finite numbers, got {origin.tolist()}")
    return factory.new("geometry_msgs/msg/PoseStamped", header=make_header(factory, stamp_ns, frame_id),
                       pose=_pose(factory, origin))


def grid_origin_from_pose(msg: Any) -> np.ndarray:
    """Inverse of :func:`grid_pose_msg` (PoseStamped or Pose) -> voxel_origin (3,)."""
    pose = msg.pose if hasattr(msg, "pose") else msg
    p = pose.position
    return np.array([p.x, p.y, p.z], dtype=np.float64)


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


def depth_to_image(factory: MessageFactory, depth_m: np.ndarray, frame_id: str, stamp_ns: int,
                   encoding: str = "16UC1") -> Any:
    """(H, W) metres -> depth Image, 16UC1 (mm, 0 invalid) or 32FC1 (m, NaN invalid)."""
    depth = np.asarray(depth_m, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    if encoding == "16UC1":
        pixels = np.where(valid, np.clip(np.round(depth * 1000.0), 0, 65535), 0).astype("<u2")
    elif encoding == "32FC1":
        pixels = np.where(valid, depth, np.nan).astype("<f4")
    else:
        raise DepthError(f"cannot build a depth image in encoding {encoding!r}")
    h, w = pixels.shape
    return factory.new("sensor_msgs/msg/Image", header=make_header(factory, stamp_ns, frame_id), height=h, width=w,
                       encoding=encoding, is_bigendian=False, step=w * pixels.itemsize,
                       data=factory.uint8_array(np.ascontiguousarray(pixels)))


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
