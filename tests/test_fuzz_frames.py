"""Seeded property-style fuzz of the per-frame path (what the node and the replay run for each frame).

A few hundred frames are drawn from ten categories (encodings, sizes, row padding, zero/huge sizes,
compressed garbage, camera info, depth, poses, TF, mixtures of faults). Each generator states what
must happen to its frame: processed, or skipped with one exact reason. The test runs every frame
through ``FrameProcessor.process`` + ``build_outputs`` as ``Replayer.handle`` does and checks: no
exception other than FrameError escapes, the skip counts by reason equal the expected ones exactly,
and every published cloud is finite and says so (``is_dense``). A fast stand-in network (BlockBackend)
keeps it to a few seconds.
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image
from rosbags.typesys import Stores, get_typestore
from test_ros_support import BlockBackend, pipeline_for

from discene_ros import msg_decode, msg_encode
from discene_ros.errors import FrameError, TransformError
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import FrameInput, FrameProcessor, ProcessorSettings, build_outputs
from models.config import lite

F = TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
SEED, FRAMES_PER_CATEGORY = 20261127, 30
STAMP = 7_000_000_000
OK = None  # expected outcome: processed

Case = tuple[FrameInput, "str | None", bool]  # frame, expected skip reason (None: processed), needs the depth model


# ----------------------------------------------------------------------------- building blocks
def _size(rng: np.random.Generator) -> tuple[int, int]:
    w = int(rng.integers(8, 80))
    return int(rng.integers(8, 60)), w


def _k(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    f = max(h, w) * rng.uniform(0.5, 2.0)  # within msg_decode.FOCAL_RANGE along both axes, tall images too
    return np.array([[f, 0.0, w / 2], [0.0, f * rng.uniform(0.9, 1.1), h / 2], [0.0, 0.0, 1.0]])


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return msg_decode.quaternion_to_matrix(*(q / np.linalg.norm(q)))


def _pose(rng: np.random.Generator) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = _rotation(rng), rng.uniform(-50, 50, 3)
    return pose


def _rgb(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _frame(rng: np.random.Generator, image=None, hw=None, k=None, info=True, pose="random", depth=None,
           pose_error=None) -> FrameInput:
    h, w = hw or _size(rng)
    image = image if image is not None else msg_encode.rgb_to_image(F, _rgb(h, w, rng), "cam", STAMP, "rgb8")
    camera_info = msg_encode.k_to_camera_info(F, _k(h, w, rng) if k is None else k, h, w, "cam", STAMP) if info else None
    cam_pose = _pose(rng) if isinstance(pose, str) else pose
    return FrameInput(image=image, camera_info=camera_info, depth=depth, cam_pose=cam_pose, pose_error=pose_error)


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG signature + IHDR chunk claiming ``width`` x ``height`` (and nothing decodable after it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real tiny JPEG whose SOF0 frame header is rewritten to claim ``width`` x ``height``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _compressed(data: bytes, fmt: str = "jpeg") -> object:
    return F.new("sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(F, STAMP, "cam"), format=fmt,
                 data=np.frombuffer(data, np.uint8))


def _encoded(rgb: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=fmt)
    return out.getvalue()


def _tf(q: tuple[float, float, float, float], t: tuple[float, float, float] = (0.0, 0.0, 1.0)) -> object:
    transform = F.new("geometry_msgs/msg/Transform",
                      translation=F.new("geometry_msgs/msg/Vector3", x=t[0], y=t[1], z=t[2]),
                      rotation=F.new("geometry_msgs/msg/Quaternion", x=q[0], y=q[1], z=q[2], w=q[3]))
    return F.new("geometry_msgs/msg/TransformStamped", header=msg_encode.make_header(F, STAMP, "world"),
                 child_frame_id="cam", transform=transform)


def _pose_from_tf(rng: np.random.Generator, tf: object) -> FrameInput:
    """What the replay does with a TF message: one tf2 keeps gives the pose, one it drops skips the frame."""
    problem = msg_decode.transform_problem(tf)
    if problem is not None:
        return _frame(rng, pose=None, pose_error=TransformError(problem))
    return _frame(rng, pose=msg_decode.transform_to_matrix(tf))


# ----------------------------------------------------------------------------- categories
def encodings(rng: np.random.Generator) -> Case:
    h, w = _size(rng)
    if rng.random() < 0.6:
        encoding = str(rng.choice(["rgb8", "bgr8", "rgba8", "bgra8", "mono8"]))
        return _frame(rng, msg_encode.rgb_to_image(F, _rgb(h, w, rng), "cam", STAMP, encoding), (h, w)), OK, False
    image = msg_encode.rgb_to_image(F, _rgb(h, w, rng), "cam", STAMP, "rgb8")
    image.encoding = str(rng.choice(["8UC3", "32FC3", "16UC1", "32FC1", "", "RGB8 ", "jpeg"]))  # none decodable without cv_bridge
    return _frame(rng, image, (h, w)), "unsupported_encoding", False


def sizes(rng: np.random.Generator) -> Case:
    h, w = _size(rng)
    image = msg_encode.rgb_to_image(F, _rgb(h, w, rng), "cam", STAMP, "rgb8")
    kind = int(rng.integers(4))
    if kind == 0:
        image.step = w * 3 - int(rng.integers(1, 3))           # step smaller than a row
    elif kind == 1:
        image.data = image.data[: int(rng.integers(0, image.data.size))]  # data cut short
    elif kind == 2:
        image.height = h + int(rng.integers(1, 5))              # header larger than the data
    else:
        return _frame(rng, image, (h, w)), OK, False            # consistent
    return _frame(rng, image, (h, w)), "bad_image_size", False


def padding(rng: np.random.Generator) -> Case:
    h, w = _size(rng)
    encoding = str(rng.choice(["rgb8", "bgra8", "mono8"]))
    image = msg_encode.rgb_to_image(F, _rgb(h, w, rng), "cam", STAMP, encoding)
    row = image.step
    pad = int(rng.integers(1, 40))
    rows = np.frombuffer(image.data.tobytes(), np.uint8).reshape(h, row)
    padded = np.concatenate([rows, rng.integers(0, 256, (h, pad), dtype=np.uint8)], axis=1)
    image.step, image.data = row + pad, np.ascontiguousarray(padded).reshape(-1)
    return _frame(rng, image, (h, w)), OK, False


def zero_and_huge(rng: np.random.Generator) -> Case:
    kind = int(rng.integers(5))
    if kind == 0:
        image = msg_encode.rgb_to_image(F, _rgb(8, 8, rng), "cam", STAMP, "rgb8")
        image.width = 0 if rng.random() < 0.5 else image.width
        image.height = 0 if image.width else image.height
        return _frame(rng, image, (8, 8)), "bad_image_size", False
    if kind == 1:  # raw image claiming 20000x20000 with a few bytes of data
        image = msg_encode.rgb_to_image(F, _rgb(8, 8, rng), "cam", STAMP, "rgb8")
        image.height = image.width = 20000
        image.step = 60000
        return _frame(rng, image, (20000, 20000)), "bad_image_size", False
    if kind == 2:  # PNG header claiming a decompression bomb
        return _frame(rng, _compressed(_png_header_claiming(20000, 20000), "png"), (20000, 20000)), "bad_image_size", False
    if kind == 3:  # JPEG header claiming it
        return _frame(rng, _compressed(_jpeg_claiming(20000, 20000)), (20000, 20000)), "bad_image_size", False
    return _frame(rng, _compressed(_png_header_claiming(0, 16), "png"), (16, 16)), "decode_failed", False


def compressed_garbage(rng: np.random.Generator) -> Case:
    h, w = _size(rng)
    rgb = _rgb(h, w, rng)
    kind = int(rng.integers(6))
    if kind == 0:
        return _frame(rng, _compressed(_encoded(rgb, "JPEG")), (h, w)), OK, False
    if kind == 1:
        return _frame(rng, _compressed(_encoded(rgb, "PNG"), "png"), (h, w)), OK, False
    if kind == 2:  # no JPEG/PNG magic
        return _frame(rng, _compressed(b"GIF89a" + rng.bytes(int(rng.integers(8, 200))))), "unsupported_encoding", False
    if kind == 3:  # too short to hold a header
        return _frame(rng, _compressed(b"\xff\xd8" + rng.bytes(int(rng.integers(0, 6))))), "decode_failed", False
    if kind == 4:  # JPEG magic, then garbage
        return _frame(rng, _compressed(b"\xff\xd8\xff" + rng.bytes(int(rng.integers(8, 300))))), "decode_failed", False
    data = _encoded(rgb, "PNG")  # a PNG cut off inside its image data
    return _frame(rng, _compressed(data[: max(60, len(data) // 2)], "png"), (h, w)), "decode_failed", False


def camera_info(rng: np.random.Generator) -> Case:
    h, w = _size(rng)
    k = _k(h, w, rng)
    kind = int(rng.integers(10))
    if kind == 0:
        return _frame(rng, hw=(h, w), info=False), "missing_camera_info", False
    if kind == 1:
        return _frame(rng, hw=(h, w), k=k), OK, False
    bad = k.copy()
    if kind == 2:
        bad[2, 2] = float(rng.choice([0.0, 1e6, 2.0]))
    elif kind == 3:
        bad[0, 0] = float(rng.choice([1e-300, 1e300, 0.0, -k[0, 0]]))
    elif kind == 4:
        bad[0, 1] = float(rng.choice([1e300, 5.0 * k[0, 0]]))
    elif kind == 5:
        bad[0, 2] = float(rng.choice([10.0 * w, -5.0 * w, 1e9]))
    elif kind == 6:
        bad[1, 1] = float("nan")
    elif kind == 7:
        bad = np.zeros((3, 3))
    elif kind == 8:  # camera info for another aspect ratio
        info = msg_encode.k_to_camera_info(F, k, h, 2 * w + 3, "cam", STAMP)
        frame = _frame(rng, hw=(h, w))
        frame.camera_info = info
        return frame, "bad_camera_info", False
    else:
        bad[2, 0] = 0.5
    return _frame(rng, hw=(h, w), k=bad), "bad_camera_info", False


def depth(rng: np.random.Generator) -> Case:
    h, w = _size(rng)
    metres = rng.uniform(0.3, 5.0, (h, w))
    kind = int(rng.integers(9))
    if kind == 0:
        msg = msg_encode.depth_to_image(F, metres, "cam", STAMP, str(rng.choice(["16UC1", "32FC1"])))
        return _frame(rng, hw=(h, w), depth=msg), OK, True
    if kind in (7, 8):  # image_transport's compressedDepth (png or rvl), whole or cut / with its bytes garbled
        codec = str(rng.choice(["png", "rvl"]))
        msg = msg_encode.depth_to_compressed_depth(F, metres, "cam", STAMP, str(rng.choice(["16UC1", "32FC1"])),
                                                   codec=codec)
        if kind == 7:
            return _frame(rng, hw=(h, w), depth=msg), OK, True
        data = msg.data.tobytes()
        if codec == "rvl":  # cut anywhere: the runs end before the image does (garbled runs may still decode)
            data = data[: int(rng.integers(0, len(data)))]
        else:
            data = bytearray(data[: int(rng.integers(0, len(data)))] if rng.random() < 0.5 else data)
            data[12:] = rng.bytes(len(data) - 12) if len(data) > 12 else b""  # no PNG after the header
        msg.data = np.frombuffer(bytes(data), np.uint8)
        return _frame(rng, hw=(h, w), depth=msg), "bad_depth", True
    if kind == 1:
        return _frame(rng, hw=(h, w), depth=None), "bad_depth", True
    if kind == 2:  # stale: 0.5 s away from the colour image
        msg = msg_encode.depth_to_image(F, metres, "cam", STAMP + 500_000_000)
        return _frame(rng, hw=(h, w), depth=msg), "bad_depth", True
    if kind == 3:
        msg = msg_encode.depth_to_image(F, np.zeros((h, w)), "cam", STAMP, str(rng.choice(["16UC1", "32FC1"])))
        return _frame(rng, hw=(h, w), depth=msg), "bad_depth", True
    if kind == 4:
        msg = msg_encode.depth_to_image(F, metres, "cam", STAMP)
        msg.encoding = str(rng.choice(["mono8", "rgb8", "16SC1"]))
        return _frame(rng, hw=(h, w), depth=msg), "bad_depth", True
    if kind == 5:  # another aspect ratio
        msg = msg_encode.depth_to_image(F, rng.uniform(0.3, 5.0, (h, 2 * w + 3)), "cam", STAMP)
        return _frame(rng, hw=(h, w), depth=msg), "bad_depth", True
    msg = msg_encode.depth_to_image(F, metres, "cam", STAMP)
    msg.data = msg.data[: msg.data.size // 2]
    return _frame(rng, hw=(h, w), depth=msg), "bad_image_size", True


def poses(rng: np.random.Generator) -> Case:
    kind = int(rng.integers(8))
    pose = _pose(rng)
    if kind == 0:
        return _frame(rng, pose=pose), OK, False
    if kind == 1:
        return _frame(rng, pose=None), OK, False  # no TF: the fallback pose
    if kind == 2:
        pose[:3, :3] *= rng.uniform(1.1, 3.0)                   # scaled
    elif kind == 3:
        pose[0, 1] += rng.uniform(0.1, 1.0)                     # sheared
    elif kind == 4:
        pose[:3, 0] *= -1                                       # reflected (det -1)
    elif kind == 5:
        pose[3, :3] = rng.uniform(0.01, 1.0, 3)                 # projective
    elif kind == 6:
        pose[:3, 3] = float(rng.choice([1e300, 1e30, 1e6]))    # absurdly far away
    else:
        pose[1, 1] = float(rng.choice([np.nan, np.inf]))
    return _frame(rng, pose=pose), "bad_pose", False


def tf(rng: np.random.Generator) -> Case:
    q = rng.normal(size=4)
    q = q / np.linalg.norm(q)
    kind = int(rng.integers(6))
    if kind == 0:
        return _pose_from_tf(rng, _tf(tuple(q))), OK, False
    if kind == 1:  # slightly off unit (|q|^2 = 1.004): tf2 normalises it, and so do we
        return _pose_from_tf(rng, _tf(tuple(q * math.sqrt(1.004)))), OK, False
    if kind == 2:
        return _pose_from_tf(rng, _tf((0.0, 0.0, 0.0, 0.0))), "bad_transform", False
    if kind == 3:  # far from unit: tf2 normalises any finite non-zero quaternion
        return _pose_from_tf(rng, _tf(tuple(q * rng.choice([0.01, 0.5, 1.5, 10.0])))), OK, False
    if kind == 4:  # tf2 keeps an infinite translation (it drops NaN only): the pose check refuses the pose
        return _pose_from_tf(rng, _tf(tuple(q), (float("inf"), 0.0, 1.0))), "bad_pose", False
    bad = q.copy()
    bad[int(rng.integers(4))] = float(rng.choice([np.nan, np.inf]))
    if rng.random() < 0.5:
        return _pose_from_tf(rng, _tf(tuple(bad))), "bad_transform", False
    return _pose_from_tf(rng, _tf(tuple(q), (float("nan"), 0.0, 1.0))), "bad_transform", False


def mixtures(rng: np.random.Generator) -> Case:
    """Several faults at once: the first check in decode order (image, camera info, depth, pose) names it."""
    h, w = _size(rng)
    bad_k = _k(h, w, rng)
    bad_k[2, 2] = 0.0
    bad_pose = _pose(rng)
    bad_pose[:3, :3] *= 2.0
    kind = int(rng.integers(4))
    if kind == 0:
        image = msg_encode.rgb_to_image(F, _rgb(h, w, rng), "cam", STAMP, "rgb8")
        image.encoding = "8UC3"  # needs cv_bridge, absent here
        return _frame(rng, image, (h, w), k=bad_k, pose=bad_pose), "unsupported_encoding", False
    if kind == 1:
        return _frame(rng, _compressed(b"\xff\xd8\xff" + rng.bytes(50)), (h, w), info=False), "decode_failed", False
    if kind == 2:
        return _frame(rng, hw=(h, w), k=bad_k, pose=bad_pose, depth=None), "bad_camera_info", True
    return _frame(rng, hw=(h, w), pose=bad_pose, depth=None), "bad_depth", True


CATEGORIES: list[Callable[[np.random.Generator], Case]] = [
    encodings, sizes, padding, zero_and_huge, compressed_garbage, camera_info, depth, poses, tf, mixtures]


@pytest.fixture(scope="module")
def processors() -> dict[bool, FrameProcessor]:
    depth_cfg = lite()
    depth_cfg.use_depth = True
    return {False: FrameProcessor(pipeline_for(BlockBackend())),
            True: FrameProcessor(pipeline_for(BlockBackend(depth_cfg.validate())), ProcessorSettings(use_depth=True))}


def test_fuzzed_frames_never_escape_and_are_counted_exactly(processors):
    rng = np.random.default_rng(SEED)
    expected, got, escapes, processed = Counter(), Counter(), [], 0
    for category in CATEGORIES:
        for i in range(FRAMES_PER_CATEGORY):
            frame, reason, needs_depth = category(rng)
            expected[reason or "processed"] += 1
            try:
                result = processors[needs_depth].process(frame)
                msgs = build_outputs(F, result, "world", frame.stamp_ns)
            except FrameError as exc:
                got[exc.reason] += 1
                if exc.reason != reason:
                    escapes.append(f"{category.__name__} #{i}: expected {reason}, got {exc.reason}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - what the test is looking for
                escapes.append(f"{category.__name__} #{i}: {type(exc).__name__}: {exc}")
                continue
            got["processed"] += 1
            processed += 1
            if reason is not None:
                escapes.append(f"{category.__name__} #{i}: processed, expected skip {reason}")
            cloud = msg_decode.pointcloud2_to_array(msgs["cloud"])
            xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], -1)
            assert len(cloud) > 0 and np.isfinite(xyz).all() and msgs["cloud"].is_dense
    assert escapes == [], "\n".join(escapes)
    assert got == expected
    assert sum(expected.values()) == len(CATEGORIES) * FRAMES_PER_CATEGORY
    assert processed > 50 and len(expected) >= 9  # both outcomes well represented
