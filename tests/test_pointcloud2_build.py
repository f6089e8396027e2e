"""The occupancy PointCloud2 builder (``msg_encode.occupancy_to_pointcloud2``) gives the same message
bytes as the plain reference in benchmarks/bench_pointcloud2.py, through the rosbags typestore factory
and the rclpy factory; the factories' fast paths keep their behaviour."""
from __future__ import annotations

import array
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from discene_ros import msg_encode
from discene_ros.msg_factory import RclpyFactory, TypestoreFactory
from models import native_postprocess
from models.postprocess import OccupancyFrame

ROOT = Path(__file__).resolve().parents[1]
STORE = get_typestore(Stores.ROS2_HUMBLE)
F = TypestoreFactory(STORE)
STAMP = 1_700_000_123_456_789_012


_spec = importlib.util.spec_from_file_location("bench_pointcloud2", ROOT / "benchmarks" / "bench_pointcloud2.py")
bench = importlib.util.module_from_spec(_spec)  # the reference builder and the synthetic frames
_spec.loader.exec_module(bench)


class TypestoreClassesRclpyFactory(RclpyFactory):
    """RclpyFactory (plain constructor calls, array.array for uint8[]) on the typestore's classes, which
    take the same keyword fields as rclpy's generated ones."""

    def msg_class(self, msgtype: str) -> type:
        return STORE.types[msgtype]


def _cdr(msg) -> bytes:
    if isinstance(msg.data, array.array):  # rclpy's uint8[] type; the typestore serialiser wants numpy
        msg.data = np.frombuffer(msg.data, np.uint8)
    return bytes(STORE.serialize_cdr(msg, msg.__msgtype__))


def _direct_frame(indices, origin, size=0.08, labels=None, scores=None) -> OccupancyFrame:
    """An OccupancyFrame made without frame_from_voxels (other dtypes than the ones it produces)."""
    indices = np.asarray(indices)
    n = len(indices)
    grid = np.zeros(tuple(int(v) + 1 for v in indices.max(axis=0)) if n else (1, 1, 1), np.uint8)
    labels = np.arange(n) % 256 if labels is None else labels
    scores = np.linspace(0.0, 1.0, n) if scores is None else scores
    return OccupancyFrame(grid, indices, np.asarray(labels, np.uint8), scores, np.asarray(origin), size)


FRAMES = {
    "10k voxels": lambda: bench.synthetic_frame(0),
    "11k voxels, far origin": lambda: bench.synthetic_frame(1, 11_000, origin=(1234.567, -87.1, 3.3)),
    "small grid": lambda: bench.synthetic_frame(2, 7, grid=(3, 4, 5), origin=(0.0, 0.0, 0.0)),
    "empty": lambda: bench.synthetic_frame(3, 0),
    "empty, NaN origin": lambda: bench.synthetic_frame(3, 0, origin=(np.nan, 0.0, 0.0)),
    "NaN origin x": lambda: bench.synthetic_frame(4, 500, origin=(np.nan, 1.0, 2.0)),
    "inf origin y": lambda: bench.synthetic_frame(5, 500, origin=(0.5, np.inf, 2.0)),
    "-inf origin z": lambda: bench.synthetic_frame(6, 500, origin=(0.5, 1.0, -np.inf)),
    "float32 overflow": lambda: bench.synthetic_frame(7, 500, origin=(3.403e38, 0.0, 0.0)),
    "int64 indices, float32 origin, every uint8 label, float64 scores, size 0.1": lambda: _direct_frame(
        np.random.default_rng(8).integers(0, 50, (600, 3)), np.float32([0.3, -0.7, 1e-3]), size=0.1),
    "uint8 indices, integer origin, size 1/16": lambda: _direct_frame(
        np.random.default_rng(9).integers(0, 255, (300, 3)).astype(np.uint8), np.array([-5, 2, 0]), size=0.0625),
}


OVERFLOW = "ignore:overflow encountered in cast:RuntimeWarning"  # the "float32 overflow" frame, as intended


@pytest.mark.filterwarnings(OVERFLOW)
@pytest.mark.parametrize("native", [True, False], ids=["C rows", "numpy columns"])
@pytest.mark.parametrize("name", list(FRAMES))
def test_occupancy_cloud_has_the_reference_bytes(name, native, monkeypatch):
    """Both builders of the rows: the native kernel's loop where it is built, numpy's columns without it."""
    if native and not native_postprocess.available():
        pytest.skip(f"native kernel: {native_postprocess.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(native_postprocess, "_kernel", None)
    frame = FRAMES[name]()
    points = msg_encode.occupancy_points(frame)
    assert points.dtype == msg_encode.CLOUD_DTYPE
    assert points.tobytes() == bench.reference_points(frame).tobytes()
    msg = msg_encode.occupancy_to_pointcloud2(F, frame, "odom", STAMP)
    ref = bench.reference_pointcloud2(F, frame, "odom", STAMP)
    assert msg.is_dense == ref.is_dense == bool(np.isfinite(frame.centers_world().astype(np.float32)).all())
    assert _cdr(msg) == _cdr(ref)
    rclpy_factory = TypestoreClassesRclpyFactory()
    through_rclpy = msg_encode.occupancy_to_pointcloud2(rclpy_factory, frame, "odom", STAMP)
    assert isinstance(through_rclpy.data, array.array) and through_rclpy.data.typecode == "B"
    assert _cdr(through_rclpy) == _cdr(bench.reference_pointcloud2(rclpy_factory, frame, "odom", STAMP))


@pytest.mark.filterwarnings(OVERFLOW)
def test_dense_flags_the_non_finite_frames():
    """The flag the fast is_dense path must get right: a NaN score alone leaves the cloud dense."""
    assert msg_encode.occupancy_to_pointcloud2(F, FRAMES["10k voxels"](), "odom", 0).is_dense
    assert msg_encode.occupancy_to_pointcloud2(F, FRAMES["empty, NaN origin"](), "odom", 0).is_dense
    for name in ("NaN origin x", "inf origin y", "-inf origin z", "float32 overflow"):
        assert not msg_encode.occupancy_to_pointcloud2(F, FRAMES[name](), "odom", 0).is_dense, name
    nan_score = _direct_frame([[0, 0, 0], [1, 2, 3]], [0.0, 0.0, 0.0], scores=[np.nan, 0.5])
    assert msg_encode.occupancy_to_pointcloud2(F, nan_score, "odom", 0).is_dense


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cloud_points_has_the_reference_bytes(dtype):
    rng = np.random.default_rng(10)
    centers = (rng.normal(size=(257, 3)) * 100).astype(dtype)
    centers[3, 1] = np.nan
    labels, scores = np.arange(257) % 256, rng.random(257)
    frame = _direct_frame(np.zeros((257, 3), np.int64), [0.0, 0.0, 0.0], labels=labels, scores=scores)
    frame.centers_world = lambda: centers  # the reference takes the centres from the frame
    points = msg_encode.cloud_points(centers, labels, scores)
    assert points.tobytes() == bench.reference_points(frame).tobytes()
    assert not msg_encode.points_to_pointcloud2(F, points, "odom", 0).is_dense
    with pytest.raises(ValueError, match="disagree"):
        msg_encode.cloud_points(centers, labels[:-1], scores)


def test_rclpy_uint8_array_is_one_copy_of_the_bytes():
    factory = RclpyFactory()
    points = msg_encode.occupancy_points(FRAMES["small grid"]())
    data = factory.uint8_array(points)
    assert isinstance(data, array.array) and data.typecode == "B" and data.tobytes() == points.tobytes()
    points["x"] += 1.0  # a copy: later changes to the source do not reach the message
    assert data.tobytes() != points.tobytes()
    strided = np.arange(40, dtype=np.uint8).reshape(4, 10)[:, ::3]
    assert factory.uint8_array(strided).tobytes() == strided.tobytes()
    assert factory.uint8_array(b"\x00\x01\xff").tolist() == [0, 1, 255]
    assert factory.uint8_array(np.arange(3, dtype="<u2")).tobytes() == np.arange(3, dtype="<u2").tobytes()


def test_typestore_factory_new_fills_defaults_and_refuses_unknown_fields():
    for _ in range(2):  # the second round uses the cached field layout
        field = F.new("sensor_msgs/msg/PointField", name="x")
        assert (field.name, field.offset, field.datatype, field.count) == ("x", 0, 0, 0)
        cloud = F.new("sensor_msgs/msg/PointCloud2")
        assert cloud.header.frame_id == "" and cloud.data.dtype == np.uint8 and len(cloud.data) == 0
        with pytest.raises(TypeError, match="no fields"):
            F.new("sensor_msgs/msg/PointField", name="x", offset=0, datatype=7, count=1, colour=3)
        with pytest.raises(TypeError, match="no fields"):  # as many fields as the type has, one unknown
            F.new("sensor_msgs/msg/PointField", name="x", offset=0, datatype=7, colour=3)
