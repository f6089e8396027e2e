"""ROS message -> numpy: what the node needs to read a frame, free of any ROS import.

Inputs are duck-typed (rclpy messages, rosbags typestore messages and ROS 1 style upper-case ``K``
all work). Every bad input raises a :class:`discene_ros.errors.FrameError` subclass that names the
problem, so that the frame is skipped and counted. The other direction (numpy -> message, for the
node's outputs, bags and tests) is :mod:`discene_ros.msg_encode`.
"""
from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from typing import Any

import numpy as np
from PIL import Image

from models import native_postprocess
from models.geometry import scale_intrinsic

from . import rvl
from .errors import (
    CameraInfoError,
    CloudFormatError,
    DecodeError,
    DepthError,
    FrameIdError,
    ImageSizeError,
    PoseError,
    TransformError,
    UnsupportedEncodingError,
)

# encoding -> (channels, channel slice giving RGB) for the zero-copy colour path (slices are views)
_COLOR_ENCODINGS: dict[str, tuple[int, slice]] = {
    "rgb8": (3, slice(None)), "bgr8": (3, slice(2, None, -1)), "rgba8": (4, slice(0, 3)),
    "bgra8": (4, slice(2, None, -1)), "mono8": (1, slice(None)),
}
# Encodings converted here to what cv_bridge's ``imgmsg_to_cv2(msg, "rgb8")`` gives (its Humble branch and its 2024
# rolling branch, which Jazzy's comes from, share the table), so that a bag replays without ROS: the cvtColor code
# of its conversion table, then a 16-bit image scaled to 8 bits as its convertTo(255/65535) scales it. cv2 does it;
# without cv2 numpy gives the same bytes for YUV and 16-bit (tests/test_msg_decode_encodings.py). OpenCV has no nv24 (4:4:4) code: it is converted by
# the rule of its 4:2:2 code, pixel by pixel. "uyvy"/"yuyv" are Jazzy's names for yuv422/yuv422_yuy2,
# and nv21/nv24 (camera_ros) are decoded like the other YUV encodings; cv_bridge refuses all four.
_YUV422_ORDERS = {"yuv422": "UYVY", "uyvy": "UYVY", "yuv422_yuy2": "YUY2", "yuyv": "YUY2"}  # a pixel pair's bytes
_YUV_SEMIPLANAR = ("nv21", "nv24")  # a Y plane, then interleaved chroma: VU at 4:2:0 (nv21), UV at 4:4:4 (nv24)
_BAYER_CODES = {  # cv_bridge's table. OpenCV's names take the second row's 2nd and 3rd pixels: RGGB is its BG
    "bayer_rggb": "COLOR_BayerBG2RGB", "bayer_bggr": "COLOR_BayerRG2RGB",
    "bayer_gbrg": "COLOR_BayerGR2RGB", "bayer_grbg": "COLOR_BayerGB2RGB",
}
_WIDE_CODES = {"rgb16": None, "bgr16": "COLOR_BGR2RGB", "rgba16": "COLOR_RGBA2RGB", "bgra16": "COLOR_BGRA2RGB",
               "mono16": None}  # 16 bits per channel; the channels as their 8-bit namesakes' in _COLOR_ENCODINGS
_CONVERTED_ENCODINGS = (*_WIDE_CODES, *_YUV422_ORDERS, *_YUV_SEMIPLANAR,
                        *(f"{bayer}{bits}" for bits in (8, 16) for bayer in _BAYER_CODES))
SUPPORTED_IMAGE_ENCODINGS = (*_COLOR_ENCODINGS, *_CONVERTED_ENCODINGS)
NEEDS_OPENCV = tuple(e for e in _CONVERTED_ENCODINGS if e.startswith("bayer_"))  # demosaiced by cv2 only
# OpenCV's YUV 4:2:x -> RGB (BT.601, limited range: R = 1.164 (Y - 16) + 1.596 (V - 128), ...) in fixed point: each
# coefficient times 2^20, rounded; the numpy fallback computes it the same way (equal to cv2 for all 2^24 YUV).
YUV_SHIFT = 20
YUV_CY, YUV_CVR, YUV_CVG, YUV_CUG, YUV_CUB = (round(c * (1 << YUV_SHIFT)) for c in (1.164, 1.596, -0.813, -0.391, 2.018))
WIDE_TO_8BIT = 255.0 / 65535.0  # cv_bridge's 16 -> 8 bit scale (convertTo, rounded to nearest)
SUPPORTED_DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")

_POINTFIELD_TYPES = {  # sensor_msgs/PointField datatype constants
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8",
}

# Limits on what a frame may claim (see check_intrinsics / check_pose / compressed_to_rgb).
MAX_IMAGE_PIXELS = 64_000_000    # a compressed header claiming more is refused before decoding (8K is 33 Mpx)
JPEG_END = b"\xff\xd9"           # JPEG end-of-image marker; encoders may pad a few bytes after it
JPEG_PADDING = (0x00, 0xFF)      # what hardware encoders fill a frame's DMA block with after EOI (skipped)
END_SEARCH = 64                  # bytes at the end of a JPEG (before its padding) or PNG searched for its end marker
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG's first eight bytes
PNG_END = b"IEND\xaeB`\x82"      # PNG's IEND chunk type and its CRC, the file's last eight bytes
# PIL's modes of a 16-bit grey PNG (compressed_image_transport's "mono16; png compressed"). cv2's IMREAD_COLOR keeps
# the high byte of every 16-bit sample (libpng's strip_16: v >> 8; checked for all 65536 values with OpenCV 5.0);
# the PIL fallback does the same for these (its 16-bit RGB, RGBA and grey+alpha modes already keep the high byte).
PIL_GREY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})
FOCAL_RANGE = (0.1, 50.0)        # focal length / image size along its axis: 157 deg .. 1.1 deg field of view
PRINCIPAL_MARGIN = 0.25          # principal point may lie this fraction of the size outside the image
MAX_SKEW_RATIO = 0.1             # |K[0,1]| / fx
ROTATION_TOL = 1e-3              # max |R^T R - I| entry and |det R - 1| of a camera pose
MAX_TRANSLATION_M = 1e5          # |t| of a camera pose; beyond it float32 voxel centres lose centimetres

# Reduced JPEG decoding (compressed_to_rgb's ``min_size_hw``): libjpeg scales by 1/2, 1/4 or 1/8 inside
# the inverse DCT, about 2x faster for 640x480 -> 320x240 on the sample frames (less on noisy images,
# whose Huffman decoding it does not shorten). The image is decoded at least this many times
# the network input in both axes; measured on the sample dataset's train frames (640x480, lite
# 256x192), the network input then differs from full decode + the same resize by mean 0.45-0.53, max
# 15-16 grey levels (at 1.0x: mean 0.92, max 34), and the shipped lite model's labels agree on 99.97 %
# of the voxels (occupied IoU 99.8 %). tests/test_jpeg_reduced.py holds mean <= 0.6 and max <= 20.
JPEG_REDUCE_MARGIN = 1.25


# ----------------------------------------------------------------------------- stamps
def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (sec, nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def camera_frame_id(header: Any) -> str:
    """The frame a message header names, as tf2 stores it: without a leading '/' (tf2 strips it from the
    transforms it is given but refuses to look one up with it, so a ROS 1 style ``/camera`` would never
    be found). An empty frame id raises FrameIdError at once: tf2 would refuse it only after the lookup's
    timeout, and its ``can_transform`` answers False for it, which the fallback pose took for an absent
    world frame."""
    frame = str(header.frame_id).lstrip("/")
    if not frame:
        raise FrameIdError(f"the image header names no frame (frame_id {header.frame_id!r}): the camera driver "
                           "must set its optical frame, whose pose TF gives")
    return frame


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
    read-only); YUV, Bayer and 16-bit colour/grey are converted here as cv_bridge converts them
    (:func:`converted_to_rgb`); other encodings go through cv_bridge, imported lazily.
    """
    encoding = str(msg.encoding).lower()
    if encoding in _CONVERTED_ENCODINGS:
        return converted_to_rgb(msg, encoding)
    if encoding not in _COLOR_ENCODINGS:
        return _cv_bridge_to_rgb(msg)
    channels, rgb = _COLOR_ENCODINGS[encoding]
    pixels = _rows(msg, channels).reshape(int(msg.height), int(msg.width), channels)
    if channels == 1:
        return np.broadcast_to(pixels, (*pixels.shape[:2], 3))
    return pixels[..., rgb]


def converted_to_rgb(msg: Any, encoding: str) -> np.ndarray:
    """An Image in one of ``_CONVERTED_ENCODINGS`` (lower case) -> (H, W, 3) uint8 RGB, the bytes cv_bridge's
    ``imgmsg_to_cv2(msg, "rgb8")`` gives. Preferred to cv_bridge where both exist: the same cv2 calls without
    a CvBridge built per frame, and the same result on a robot as in a replay without ROS."""
    cv2 = opencv()
    if encoding in _WIDE_CODES:
        return _wide_to_rgb(msg, encoding, cv2)
    if encoding in _YUV422_ORDERS or encoding in _YUV_SEMIPLANAR:
        return _yuv_to_rgb(msg, encoding, cv2)
    bits = 16 if encoding.endswith("16") else 8
    raw = _rows(msg, bits // 8)
    if cv2 is None:
        raise UnsupportedEncodingError(f"image encoding {msg.encoding!r} needs cv2 (pip: opencv-python-headless, "
                                       "apt: python3-opencv) to demosaic; it is not installed")
    code = getattr(cv2, _BAYER_CODES[encoding[: -len(str(bits))]])
    if bits == 8:
        return cv2.cvtColor(raw, code)
    return cv2.convertScaleAbs(cv2.cvtColor(_native_u16(raw, msg), code), alpha=WIDE_TO_8BIT)


def _native_u16(raw: np.ndarray, msg: Any) -> np.ndarray:
    """(H, W * 2 * C) bytes of a 16-bit image -> (H, W * C) native-endian uint16, contiguous (cv2 takes no row
    stride that is not a whole number of samples); bytes swapped where the message's order is not this machine's,
    as cv_bridge swaps them."""
    wide = np.ascontiguousarray(raw).view(">u2" if bool(msg.is_bigendian) else "<u2")
    return wide.astype(np.uint16, copy=False)


def _wide_to_rgb(msg: Any, encoding: str, cv2: Any | None) -> np.ndarray:
    """rgb16/bgr16/rgba16/bgra16/mono16 -> 8-bit RGB: cv_bridge's channel conversion, then each value v scaled to
    round(v * 255 / 65535) (cv2's convertTo; the numpy float32 product rounds the same for all 65536 values)."""
    channels, rgb = _COLOR_ENCODINGS[encoding.replace("16", "8")]
    height, width = int(msg.height), int(msg.width)
    pixels = _native_u16(_rows(msg, 2 * channels), msg).reshape(height, width, channels)
    if cv2 is not None:
        code = _WIDE_CODES[encoding]
        if channels == 1:
            wide = pixels[..., 0]
        else:
            wide = pixels if code is None else cv2.cvtColor(pixels, getattr(cv2, code))
        narrow = cv2.convertScaleAbs(wide, alpha=WIDE_TO_8BIT)  # = convertTo(CV_8U, scale) for unsigned input
    else:
        wide = pixels[..., 0] if channels == 1 else pixels[..., rgb]
        narrow = np.rint(wide.astype(np.float32) * np.float32(WIDE_TO_8BIT)).astype(np.uint8)
    if channels == 1:
        return np.broadcast_to(narrow[..., None], (height, width, 3))
    return narrow


def _yuv_to_rgb(msg: Any, encoding: str, cv2: Any | None) -> np.ndarray:
    """yuv422/uyvy, yuv422_yuy2/yuyv, nv21 or nv24 -> RGB. 4:2:2 and 4:2:0 need an even width (a pixel pair shares
    its chroma), 4:2:0 an even height too. nv21 is a Y plane of ``height`` rows and a VU plane of height/2 rows,
    both ``step`` bytes apart; nv24 a Y plane and a UV plane of ``height`` rows 2 * ``step`` apart (V4L2's
    layout, as camera_ros publishes the buffer)."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if width <= 0 or height <= 0:
        raise ImageSizeError(f"image has invalid size {width}x{height}")
    if encoding != "nv24" and width % 2:
        raise ImageSizeError(f"image width {width} is odd; {msg.encoding} stores pixels in pairs that share chroma")
    if encoding == "nv21" and height % 2:
        raise ImageSizeError(f"image height {height} is odd; nv21 (4:2:0) shares chroma between pairs of rows")
    if encoding in _YUV422_ORDERS:
        pairs = _rows(msg, 2).reshape(height, width // 2, 4)
        if cv2 is not None:
            code = getattr(cv2, f"COLOR_YUV2RGB_{_YUV422_ORDERS[encoding]}")
            return cv2.cvtColor(pairs.reshape(height, width, 2), code)
        y0, u, y1, v = (0, 1, 2, 3) if _YUV422_ORDERS[encoding] == "YUY2" else (1, 0, 3, 2)
        luma = pairs[..., [y0, y1]].reshape(height, width)
        return _yuv_numpy(luma, np.repeat(pairs[..., u], 2, axis=1), np.repeat(pairs[..., v], 2, axis=1))
    # nv21: height/2 rows of V,U byte pairs, one pair per 2x2 pixels; nv24: height rows of U,V pairs, one per pixel
    chroma_rows, chroma_step, chroma_width = (height // 2, step, width) if encoding == "nv21" else \
        (height, 2 * step, 2 * width)
    if step < width:
        raise ImageSizeError(f"image step {step} is smaller than the width {width} of its Y plane ({msg.encoding})")
    buf = _byte_buffer(msg.data)
    needed = step * height + chroma_step * chroma_rows
    if buf.size < needed:
        raise ImageSizeError(f"image data has {buf.size} bytes, expected step*height + the chroma plane = "
                             f"{step}*{height} + {chroma_step}*{chroma_rows} = {needed} ({msg.encoding})")
    luma = buf[: step * height].reshape(height, step)[:, :width]
    chroma = buf[step * height: needed].reshape(chroma_rows, chroma_step)[:, :chroma_width]
    if encoding == "nv21":
        if cv2 is not None:  # one (height * 3/2, width) image with the Y plane's row stride, as cv2 takes it
            return cv2.cvtColor(buf[:needed].reshape(height * 3 // 2, step)[:, :width], cv2.COLOR_YUV2RGB_NV21)
        v, u = (np.repeat(np.repeat(chroma[:, k::2], 2, axis=0), 2, axis=1) for k in (0, 1))
        return _yuv_numpy(luma, u, v)
    if cv2 is not None:  # OpenCV has no 4:4:4 code: each pixel as a YUYV pair (Y, U, Y, V) of its own, one kept
        pairs = np.stack([luma, chroma[:, 0::2], luma, chroma[:, 1::2]], axis=-1)
        return cv2.cvtColor(pairs.reshape(height, 2 * width, 2), cv2.COLOR_YUV2RGB_YUY2)[:, 0::2]
    return _yuv_numpy(luma, chroma[:, 0::2], chroma[:, 1::2])


def _yuv_numpy(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-pixel Y, U, V (uint8, equal shapes) -> RGB by OpenCV's fixed-point BT.601 limited-range rule (Y below
    16 counts as 16; each channel rounded, then clipped to 0..255)."""
    luma = np.maximum(y.astype(np.int32) - 16, 0) * YUV_CY + (1 << (YUV_SHIFT - 1))
    u = u.astype(np.int32) - 128
    v = v.astype(np.int32) - 128
    rgb = np.empty((*y.shape, 3), np.uint8)
    for channel, offset in enumerate((YUV_CVR * v, YUV_CVG * v + YUV_CUG * u, YUV_CUB * u)):
        rgb[..., channel] = np.clip((luma + offset) >> YUV_SHIFT, 0, 255)
    return rgb


def _cv_bridge_to_rgb(msg: Any) -> np.ndarray:
    """Any other encoding cv_bridge knows (e.g. 8UC3, 32FC1) -> RGB by cv_bridge, imported only when needed."""
    try:
        from cv_bridge import CvBridge
    except ImportError as exc:
        raise UnsupportedEncodingError(
            f"image encoding {msg.encoding!r} needs cv_bridge, which is not installed; without it the "
            f"supported encodings are {', '.join(SUPPORTED_IMAGE_ENCODINGS)} ({', '.join(NEEDS_OPENCV)} with cv2) "
            "and compressed jpeg/png") from exc
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


@functools.cache
def opencv() -> Any | None:
    """cv2 where it is installed (the decoder on a robot: package.xml depends on python3-opencv), else
    None and PIL decodes; imported on first use, not with this module."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def compressed_to_rgb(msg: Any, min_size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> (H, W, 3) uint8 RGB, via cv2 if present else PIL.

    ``min_size_hw``: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (``jpeg_reduction``: cv2's
    ``IMREAD_REDUCED_COLOR_r``, else PIL's ``draft``; the same libjpeg DCT scaling, the same pixels in
    tests/test_jpeg_reduced.py) as long as it stays at least this size; the returned image then has the
    reduced size and ``camera_info_to_k(info, rgb.shape[:2])`` scales K to it. EXIF orientation is
    ignored by both decoders: CameraInfo describes the sensor's pixel layout. A 16-bit PNG keeps the high byte
    of each sample with both (cv2's ``IMREAD_COLOR`` rule, :data:`PIL_GREY16_MODES`). With cv2 the result is a
    BGR buffer seen as RGB (a reversed-channel view), which the frame path copies as it is.
    """
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise UnsupportedEncodingError(f"compressed image format {msg.format!r} is a depth image, not colour")
    buf = _byte_buffer(msg.data)
    if buf.size < 8:
        raise DecodeError(f"compressed image has only {buf.size} bytes")
    is_jpeg = buf[0] == 0xFF and buf[1] == 0xD8
    is_png = bytes(buf[:8]) == PNG_SIGNATURE
    if not (is_jpeg or is_png):
        raise UnsupportedEncodingError(f"compressed image format {msg.format!r}: data is neither JPEG nor PNG")
    if is_jpeg:
        end = _jpeg_data_end(buf)
        if JPEG_END not in bytes(buf[max(end - END_SEARCH, 0):end]):
            # a cut-off JPEG: PIL refuses it, but some cv2 versions decode the part they got and grey the rest
            raise DecodeError(f"compressed {msg.format!r} image is truncated: no JPEG end-of-image marker in its "
                              f"last {END_SEARCH} bytes before any zero or 0xFF padding ({buf.size} bytes)")
    if is_png and PNG_END not in bytes(buf[-END_SEARCH:]):  # cut off: said here, not in a libpng warning on stderr
        raise DecodeError(f"compressed {msg.format!r} image is truncated: no PNG IEND chunk in its last "
                          f"{END_SEARCH} bytes ({buf.size} bytes)")
    width, height = _compressed_size(msg, buf)
    if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
        raise ImageSizeError(f"compressed {msg.format!r} image header claims {width}x{height} = {width * height} "
                             f"pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
    reduce = jpeg_reduction(width, height, min_size_hw) if is_jpeg else 1
    cv2 = opencv()
    try:
        if cv2 is not None:  # one call that releases the GIL throughout; 20 % faster than PIL here
            flags = (cv2.IMREAD_COLOR if reduce == 1 else getattr(cv2, f"IMREAD_REDUCED_COLOR_{reduce}"))
            bgr = cv2.imdecode(buf, flags | cv2.IMREAD_IGNORE_ORIENTATION)
            if bgr is None:
                raise DecodeError(f"cv2 could not decode the {msg.format!r} compressed image ({buf.size} bytes)")
            return bgr[..., ::-1]
        with Image.open(io.BytesIO(buf.tobytes())) as img:
            if reduce > 1:
                img.draft("RGB", (width // reduce, height // reduce))
            if img.mode in PIL_GREY16_MODES:  # convert("RGB") would clip these at 255
                grey = (np.asarray(img) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(img.convert("RGB"))
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (truncation, bombs, libjpeg errors) skips the frame
        raise DecodeError(f"could not decode the {msg.format!r} compressed image ({buf.size} bytes): "
                          f"{type(exc).__name__}: {exc}") from exc


def _jpeg_data_end(buf: np.ndarray, block: int = 4096) -> int:
    """Length of a JPEG without its trailing padding (0x00 and 0xFF bytes after EOI, as hardware encoders pad
    frames; decoders stop at EOI), found block by block from the end so an unpadded frame costs one block."""
    end = buf.size
    while end > 0:
        chunk = buf[max(end - block, 0):end]
        data = np.flatnonzero((chunk != JPEG_PADDING[0]) & (chunk != JPEG_PADDING[1]))
        if data.size:
            return end - chunk.size + int(data[-1]) + 1
        end -= chunk.size
    return 0


# JPEG frame-header (SOFn) markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# JPEG markers without a length field: TEM and the restart markers RST0..7
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_header_size(data: memoryview) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its frame header, found by walking the marker segments after SOI;
    None where the walk does not reach a frame header with both sizes positive (PIL then decides)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker in _JPEG_BARE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or the scan before any frame header
            return None
        length = data[i + 2] << 8 | data[i + 3]
        if marker in _JPEG_SOF:
            if length < 8 or i + 9 > n:
                return None
            height, width = data[i + 5] << 8 | data[i + 6], data[i + 7] << 8 | data[i + 8]
            return (width, height) if width > 0 and height > 0 else None
        if length < 2:
            return None
        i += 2 + length
    return None


def _png_header_size(data: memoryview) -> tuple[int, int] | None:
    """(width, height) of a PNG from its IHDR chunk, which must come first; None otherwise (PIL decides)."""
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if width > 0 and height > 0 else None


def _compressed_size(msg: Any, buf: np.ndarray) -> tuple[int, int]:
    """(width, height) from the JPEG/PNG header only. Read here from the frame header or IHDR: right after
    an inference PIL's ``open`` took 0.19 ms (docs/results/frame_path.md, session 11); PIL parses the
    headers this does not understand (and decodes nothing)."""
    data = memoryview(buf)
    size = _jpeg_header_size(data) if data[0] == 0xFF else _png_header_size(data)
    if size is not None:
        return size
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


# compressed_depth_image_transport's ConfigHeader before the PNG: format (0 = INV_DEPTH), depthQuantA, depthQuantB
COMPRESSED_DEPTH_HEADER = struct.Struct("<iff")


def _metres(millimetres: np.ndarray) -> np.ndarray:
    """16UC1 depth (whole millimetres) -> float32 metres, one rounding for raw and compressedDepth alike."""
    return millimetres.astype(np.float32) * np.float32(0.001)


def depth_to_metres(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Depth Image (16UC1/mono16 in mm, 32FC1 in m), or image_transport's compressedDepth CompressedImage
    (``compressed_depth_to_metres``) -> (H, W) float32 metres; NaN/inf/<=0 -> 0 (invalid). ``max_pixels`` bounds
    the size a compressed image may claim before it is decoded (a raw one is as large as its data)."""
    if hasattr(msg, "format") and not hasattr(msg, "encoding"):
        return compressed_depth_to_metres(msg, max_pixels)
    encoding = str(msg.encoding)
    order = ">" if bool(msg.is_bigendian) else "<"
    if encoding in ("16UC1", "mono16"):
        raw = _rows(msg, 2).copy().view(f"{order}u2").reshape(int(msg.height), int(msg.width))
        depth = _metres(raw)
    elif encoding == "32FC1":
        raw = _rows(msg, 4).copy().view(f"{order}f4").reshape(int(msg.height), int(msg.width))
        depth = raw.astype(np.float32)
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    else:
        raise DepthError(f"depth encoding {encoding!r} is not supported; use one of {', '.join(SUPPORTED_DEPTH_ENCODINGS)}")
    if not np.any(depth > 0):
        raise DepthError(f"depth image {msg.width}x{msg.height} has no valid pixel (all zero, NaN or inf)")
    return depth


def compressed_depth_to_metres(msg: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """compressedDepth CompressedImage -> (H, W) float32 metres, as compressed_depth_image_transport's codec
    decodes it: after the 12-byte ConfigHeader, 16-bit pixels as a PNG (``"16UC1; compressedDepth"``,
    ``"...; compressedDepth png"``) or RVL-coded (``"...; compressedDepth rvl"``, ``rvl.py``); for 16UC1
    they are millimetres, for 32FC1 quantised inverse depth, ``depthQuantA / (v - depthQuantB)``, 0 invalid."""
    fmt = str(msg.format)
    encoding, _, transport = (part.strip() for part in fmt.partition(";"))
    codec = compressed_depth_codec(fmt, transport)
    buf = _byte_buffer(msg.data)
    payload = buf[COMPRESSED_DEPTH_HEADER.size:]
    if codec == "rvl":
        raw = rvl.decode(payload, max_pixels)
    else:
        raw = _decode_png16(_checked_png(payload, buf.size, max_pixels))
    if not raw.any():  # before any float copy: a few RVL bytes may claim a large all-zero image
        raise DepthError(f"compressedDepth image {raw.shape[1]}x{raw.shape[0]} has no valid pixel (all zero)")
    if encoding in ("16UC1", "mono16"):
        depth = _metres(raw)
    elif encoding == "32FC1":
        _, quant_a, quant_b = COMPRESSED_DEPTH_HEADER.unpack(buf[:COMPRESSED_DEPTH_HEADER.size].tobytes())
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.float32(quant_a) / (raw.astype(np.float32) - np.float32(quant_b))
        depth[(raw == 0) | ~np.isfinite(depth) | (depth < 0)] = 0.0
    else:
        raise DepthError(f"compressedDepth encoding {encoding!r} is not supported; use 16UC1 or 32FC1")
    if not np.any(depth > 0):
        raise DepthError(f"compressedDepth image {raw.shape[1]}x{raw.shape[0]} has no valid pixel")
    return depth


def compressed_depth_codec(fmt: str, transport: str) -> str:
    """``png`` or ``rvl`` from a compressedDepth format's part after ';', by the codec's own rule (a bare
    "compressedDepth", as Humble writes it, is png); DepthError for anything else."""
    words = transport.lower().split()
    if words[:1] != ["compresseddepth"] or len(words) > 2 or words[1:] not in ([], ["png"], ["rvl"]):
        raise DepthError(f"compressed depth format {fmt!r} is not image_transport's compressedDepth with png or rvl "
                         "(e.g. '16UC1; compressedDepth')")
    return words[1] if len(words) == 2 else "png"


def _checked_png(png: np.ndarray, total: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The PNG of a compressedDepth image, checked for its signature, end and size before decoding."""
    if bytes(png[:8]) != PNG_SIGNATURE:
        raise DepthError(f"compressedDepth image ({total} bytes) holds no PNG after its 12-byte header")
    if PNG_END not in bytes(png[-END_SEARCH:]):
        raise DepthError(f"compressedDepth image is truncated: no PNG IEND chunk ({total} bytes)")
    size = _png_header_size(memoryview(png))
    if size is None or size[0] * size[1] > max_pixels:
        raise DepthError(f"compressedDepth PNG header claims {size or 'no valid size'}; the limit is "
                         f"{max_pixels} pixels")
    return png


def _decode_png16(png: np.ndarray) -> np.ndarray:
    """A single-channel 16-bit PNG -> (H, W) uint16, via cv2 where installed, else PIL."""
    cv2 = opencv()
    try:
        if cv2 is not None:
            raw = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)
        else:
            with Image.open(io.BytesIO(png.tobytes())) as img:
                raw = np.asarray(img)
    except Exception as exc:  # noqa: BLE001 - any decoder failure skips the frame
        raise DepthError(f"compressedDepth PNG does not decode: {type(exc).__name__}: {exc}") from exc
    if raw is None or raw.ndim != 2 or raw.dtype not in (np.uint16, np.int32):
        raise DepthError(f"compressedDepth PNG is not a single-channel 16-bit image "
                         f"({None if raw is None else (raw.shape, str(raw.dtype))})")
    return raw.astype(np.uint16, copy=False)


# ----------------------------------------------------------------------------- camera info and TF
def check_intrinsics(k: np.ndarray, width: int, height: int, name: str = "K") -> np.ndarray:
    """Raise CameraInfoError unless ``k`` is a pinhole K that makes sense for a ``width`` x ``height`` image.

    K[2] must be [0 0 1] and K[1,0] zero; fx/width and fy/height in :data:`FOCAL_RANGE` (fields of view
    between about 1 and 157 degrees); the principal point within :data:`PRINCIPAL_MARGIN` of the image;
    |skew| at most :data:`MAX_SKEW_RATIO` * fx. Returns ``k`` as a (3, 3) float64 array. ``name``: what the
    messages call the matrix (P's left 3x3 for a rectified image).
    """
    k = np.asarray(k, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(k)):
        raise CameraInfoError(f"{name} has non-finite values: {k.reshape(-1).tolist()}")
    if abs(k[2, 2] - 1.0) > 1e-6 or abs(k[2, 0]) > 1e-9 or abs(k[2, 1]) > 1e-9 or abs(k[1, 0]) > 1e-9:
        raise CameraInfoError(f"{name} is not a pinhole camera matrix: last row {k[2].tolist()} must be [0, 0, 1] "
                              f"and {name}[1,0]={k[1, 0]} must be 0")
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
    # the same verdict in C where the kernel is built: the decode stage 0.02 ms shorter per frame after a wait
    if native_postprocess.rigid_pose(pose, ROTATION_TOL, MAX_TRANSLATION_M):
        return pose
    m = np.asarray(pose, dtype=np.float64)
    if m.shape != (4, 4):
        raise PoseError(f"{what} must be 4x4, got shape {m.shape}")
    # on Python floats: 16 numbers, once per frame, 5x faster than the numpy calls (4 against 18 us)
    (a, b, c, x), (d, e, f, y), (g, h, i, z), bottom = m.tolist()
    if not all(map(math.isfinite, (a, b, c, x, d, e, f, y, g, h, i, z, *bottom))):
        raise PoseError(f"{what} has non-finite values")
    if max(abs(v - w) for v, w in zip(bottom, (0.0, 0.0, 0.0, 1.0), strict=True)) > 1e-9:
        raise PoseError(f"{what} is projective: bottom row {bottom} must be [0, 0, 0, 1]")
    cols = ((a, d, g), (b, e, h), (c, f, i))  # of R; R^T R holds their dot products
    ortho = max(abs(p[0] * q[0] + p[1] * q[1] + p[2] * q[2] - float(j == k))
                for j, p in enumerate(cols) for k, q in enumerate(cols))
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    if ortho > ROTATION_TOL or abs(det - 1.0) > ROTATION_TOL:
        kind = "a reflection" if det < 0 else "not a rotation (scaled or sheared)"
        raise PoseError(f"{what} is {kind}: max |R^T R - I| = {ortho:.3g}, det R = {det:.6g} (tolerance {ROTATION_TOL})")
    dist = math.hypot(x, y, z)
    if dist > MAX_TRANSLATION_M:
        raise PoseError(f"{what} translation is {dist:.3g} m from the origin (limit {MAX_TRANSLATION_M:g} m)")
    return m


def _matrix_field(msg: Any, name: str) -> Any:
    """CameraInfo's ``k`` or ``p`` (ROS 2), else ``K`` or ``P`` (ROS 1 style); None when it has neither."""
    return getattr(msg, name) if hasattr(msg, name) else getattr(msg, name.upper(), None)


def camera_info_key(msg: Any) -> tuple:
    """The fields of a CameraInfo that K (or P, for rectified images) and the undistortion depend on, as a
    hashable value: two messages with equal keys give the same intrinsics (a camera publishes the same
    calibration with every image)."""
    def raw(values: Any) -> bytes:
        try:
            return memoryview(values).tobytes()  # numpy and array.array fields (rclpy): no conversion
        except TypeError:  # lists and tuples
            return np.asarray(values, dtype=np.float64).tobytes()
    p = _matrix_field(msg, "p")
    return (raw(_matrix_field(msg, "k")), raw(() if p is None else p), raw(getattr(msg, "d", ())),
            str(getattr(msg, "distortion_model", "")), int(msg.width), int(msg.height),
            int(getattr(msg, "binning_x", 0)), int(getattr(msg, "binning_y", 0)), _roi(msg))


def _roi(msg: Any) -> tuple[int, int, int, int]:
    """(x_offset, y_offset, width, height) of CameraInfo's region of interest, in full-resolution (unbinned)
    pixels; all zero (the default) or a zero size means the full image."""
    roi = getattr(msg, "roi", None)
    if roi is None:
        return 0, 0, 0, 0
    return int(roi.x_offset), int(roi.y_offset), int(roi.width), int(roi.height)


def camera_info_to_k(msg: Any, image_hw: tuple[int, int] | None = None, aspect_tol: float = 0.01,
                     rectified: bool = False) -> np.ndarray:
    """CameraInfo -> 3x3 K for an image of size ``image_hw`` (H, W), rescaled from the info resolution.

    ``rectified``: the image is rectified (image_proc's ``image_rect``), whose intrinsics are P's left 3x3
    (sensor_msgs/CameraInfo: it may differ from K, which describes the raw image); else K. The region of
    interest and then binning are applied first, to P as to K (as image_geometry does: the principal
    point moves by the ROI's offset, the image is the ROI's size over the binning); a different aspect
    ratio (beyond ``aspect_tol``) is a mismatch, not a resize. The matrix is checked
    (:func:`check_intrinsics`) against the info resolution when it has one.
    """
    k, name = _info_intrinsics(msg, rectified)
    bx, by = max(int(getattr(msg, "binning_x", 0)), 1), max(int(getattr(msg, "binning_y", 0)), 1)
    full_w, full_h = int(msg.width), int(msg.height)
    if full_w > 0 and full_h > 0:
        check_intrinsics(k, full_w, full_h, name)
    if image_hw is None:
        return k
    if full_w <= 0 or full_h <= 0:
        raise CameraInfoError(f"camera info has no resolution ({msg.width}x{msg.height}); cannot check the image size")
    x0, y0, roi_w, roi_h = _roi(msg)
    if roi_w <= 0 or roi_h <= 0:
        x0, y0, roi_w, roi_h = 0, 0, full_w, full_h
    if x0 < 0 or y0 < 0 or x0 + roi_w > full_w or y0 + roi_h > full_h:
        raise CameraInfoError(f"camera info roi {roi_w}x{roi_h} at ({x0}, {y0}) does not lie in its "
                              f"{full_w}x{full_h} image")
    width, height = roi_w // bx, roi_h // by
    if width <= 0 or height <= 0:
        raise CameraInfoError(f"camera info roi {roi_w}x{roi_h} binned {bx}x{by} leaves no pixel")
    k = k.copy()
    k[0, 2] -= x0
    k[1, 2] -= y0
    k[0, :] /= bx
    k[1, :] /= by
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    if (img_h, img_w) == (height, width):
        return k
    if abs((img_w / img_h) / (width / height) - 1.0) > aspect_tol:
        raise CameraInfoError(
            f"image size {img_w}x{img_h} does not match camera info {width}x{height} (different aspect ratio)")
    return scale_intrinsic(k, (height, width), (img_h, img_w))


def _info_intrinsics(msg: Any, rectified: bool) -> tuple[np.ndarray, str]:
    """(3x3 intrinsics, what messages call them): K of a raw image, P's left 3x3 of a rectified one."""
    if rectified:
        p = np.asarray(_matrix_field(msg, "p"), dtype=np.float64)
        if p.size != 12 or not np.all(np.isfinite(p)):
            raise CameraInfoError(f"camera info P must hold 12 finite numbers, got {p.reshape(-1).tolist()}")
        if not np.any(p):
            raise CameraInfoError("camera info P is all zero, but the image is taken as rectified (its topic is an "
                                  "image_rect one, or rectified:=true), whose intrinsics are P's: if the image is "
                                  "raw, set the node parameter rectified:=false (replay: --rectified false); else "
                                  "give the camera driver a calibration file with P (camera_calibration writes it)")
        k, name = p.reshape(3, 4)[:, :3].copy(), "P[:3,:3]"
    else:
        k = np.asarray(_matrix_field(msg, "k"), dtype=np.float64)
        if k.size != 9 or not np.all(np.isfinite(k)):
            raise CameraInfoError(f"camera info K must hold 9 finite numbers, got {k.reshape(-1).tolist()}")
        k, name = k.reshape(3, 3), "K"
        if not np.any(k):  # what camera drivers publish without a calibration file
            raise CameraInfoError("camera info K is all zero: the camera is uncalibrated. Calibrate it (the "
                                  "camera_calibration package) and give its driver the calibration file")
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise CameraInfoError(f"camera info is uncalibrated or invalid: fx={k[0, 0]}, fy={k[1, 1]} must be > 0 "
                              f"(in {name})")
    return k, name


def quaternion_problem(x: float, y: float, z: float, w: float) -> str | None:
    """Why tf2 drops a rotation quaternion, else None. tf2 (Humble, Jazzy) turns it into a matrix that divides
    by |q|^2 (Matrix3x3::setRotation), so any finite non-zero quaternion is normalised and used; a NaN or
    infinite component, or |q|^2 zero or too small to divide by, makes that matrix NaN, which BufferCore drops
    (TF_NAN_INPUT). On Python floats: the node checks every transform on /tf with it."""
    q = [float(x), float(y), float(z), float(w)]
    if not all(map(math.isfinite, q)):
        return f"rotation quaternion {q} is not finite"
    norm2 = q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]  # in tf2's order (Quaternion::length2)
    if norm2 == 0.0 or math.isinf(2.0 / norm2):
        return f"rotation quaternion {q} is " + ("zero" if not any(q) else
                                                  f"too small to normalise (|q|^2 = {norm2:.3g})")
    return None


def transform_problem(msg: Any) -> str | None:
    """Why tf2 drops a geometry_msgs/Transform(Stamped) (BufferCore::setTransformImpl), else None: a quaternion
    :func:`quaternion_problem` refuses, or a NaN translation. tf2 keeps an infinite translation; the camera pose
    made from it is refused later (:func:`check_pose`)."""
    tf = msg.transform if hasattr(msg, "transform") else msg
    t, r = tf.translation, tf.rotation
    problem = quaternion_problem(r.x, r.y, r.z, r.w)
    if problem is None and any(map(math.isnan, (t.x, t.y, t.z))):
        problem = f"transform translation {[t.x, t.y, t.z]} is NaN"
    return problem


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Quaternion -> 3x3 rotation matrix, normalised as tf2 normalises it; TransformError for one tf2 drops
    (:func:`quaternion_problem`)."""
    problem = quaternion_problem(x, y, z, w)
    if problem is not None:
        raise TransformError(problem)
    return _rotation_matrix(x, y, z, w)


def _rotation_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """3x3 rotation of a quaternion that :func:`quaternion_problem` passed: tf2's Matrix3x3::setRotation, whose
    factor 2/|q|^2 normalises it (and makes the identity of a quaternion whose |q|^2 overflows, as in tf2)."""
    x, y, z, w = float(x), float(y), float(z), float(w)
    s = 2.0 / (x * x + y * y + z * z + w * w)
    xs, ys, zs = x * s, y * s, z * s
    wx, wy, wz = w * xs, w * ys, w * zs
    xx, xy, xz = x * xs, x * ys, x * zs
    yy, yz, zz = y * ys, y * zs, z * zs
    return np.array([
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ])


def transform_to_matrix(msg: Any) -> np.ndarray:
    """geometry_msgs/Transform or TransformStamped -> 4x4 (child -> parent, i.e. camera -> world), the rotation
    normalised as tf2 normalises it and the translation as given.

    Raises TransformError (a FrameError: the frame it belongs to is skipped) for a quaternion tf2 drops (zero or
    non-finite). Whether tf2 keeps the transform at all is :func:`transform_problem`'s answer (a NaN translation
    too); whether the pose is usable, :func:`check_pose`'s.
    """
    tf = msg.transform if hasattr(msg, "transform") else msg
    t, r = tf.translation, tf.rotation
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(r.x, r.y, r.z, r.w)
    out[:3, 3] = [t.x, t.y, t.z]
    return out


# ----------------------------------------------------------------------------- point clouds, ground-truth grids, grid pose
def unpack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Inverse of :func:`discene_ros.msg_encode.pack_rgb`: (N,) float32 -> (N, 3) uint8."""
    packed = np.ascontiguousarray(rgb, dtype="<f4").view("<u4")
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.uint8)


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
    labels = points["label"].astype(np.float64)
    bad = (labels < 0) | (labels > 255) | (labels != np.round(labels))  # NaN too: the uint8 grid would wrap them
    if bad.any():
        raise CloudFormatError(f"{int(bad.sum())} cloud points have labels that are not whole numbers 0..255 "
                               f"(label field {points['label'].dtype}, e.g. {labels[bad][0]})")
    grid = np.zeros(tuple(grid_shape), dtype=np.uint8)
    grid[idx[:, 0], idx[:, 1], idx[:, 2]] = labels
    return grid


def png_to_label_grid(msg: Any, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`discene_ros.msg_encode.label_grid_to_png` for a grid of ``grid_shape``
    (:func:`png_bytes_to_label_grid` on the message's data)."""
    return png_bytes_to_label_grid(msg.data, grid_shape)


def png_bytes_to_label_grid(data: Any, grid_shape: tuple[int, int, int]) -> np.ndarray:
    """The label grid of ``grid_shape`` in lossless mono8 PNG bytes (:func:`discene_ros.msg_encode.label_grid_png`).

    The size in the PNG header must be the grid's before anything is decoded (a corrupt or hostile header
    claiming gigapixels would otherwise be decoded, or end the replay in PIL's decompression-bomb error);
    any decoder failure is a CloudFormatError, so only that frame's ground truth is lost."""
    buf = _byte_buffer(data)
    x, y, z = (int(n) for n in grid_shape)
    if bytes(buf[:8]) != PNG_SIGNATURE:
        raise CloudFormatError(f"ground-truth label image is not a PNG ({buf.size} bytes)")
    size = _png_header_size(memoryview(buf))
    if size != (y * z, x):
        claims = "no readable IHDR header" if size is None else f"a header claiming {size[0]}x{size[1]}"
        raise CloudFormatError(f"ground-truth label image has {claims}, expected {y * z}x{x} for a {x}x{y}x{z} grid")
    try:
        with Image.open(io.BytesIO(buf.tobytes())) as img:
            flat = np.asarray(img)
    except Exception as exc:  # noqa: BLE001 - any decoder failure (truncation, bad zlib data) loses this frame's GT
        raise CloudFormatError(f"ground-truth label image is not a readable PNG: {type(exc).__name__}: {exc}") from exc
    if flat.dtype != np.uint8 or flat.shape != (x, y * z):
        raise CloudFormatError(f"ground-truth label image is {flat.dtype} {flat.shape}, expected uint8 ({x}, {y * z}) "
                               f"for a {x}x{y}x{z} grid")
    return flat.reshape(x, y, z)


def grid_origin_from_pose(msg: Any) -> np.ndarray:
    """Inverse of :func:`discene_ros.msg_encode.grid_pose_msg` (PoseStamped or Pose) -> voxel_origin (3,)."""
    pose = msg.pose if hasattr(msg, "pose") else msg
    p = pose.position
    return np.array([p.x, p.y, p.z], dtype=np.float64)
