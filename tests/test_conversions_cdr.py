"""CDR serialise/deserialise round trips of every message this package publishes or writes to bags,
with the ROS 2 Humble and Jazzy definitions of the rosbags typestore."""
from __future__ import annotations

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from discene_ros import msg_decode, msg_encode
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import FrameStats
from models.classes import CLASS_COLORS
from models.postprocess import OccupancyFrame

STAMP = 1_700_000_123_000_000_456


@pytest.fixture(params=[Stores.ROS2_HUMBLE, Stores.ROS2_JAZZY], ids=["humble", "jazzy"], scope="module")
def store(request):
    return get_typestore(request.param)


def _occupancy() -> OccupancyFrame:
    labels = np.zeros((60, 60, 36), np.uint8)
    labels[:, :, 0] = 2           # floor
    labels[10:14, 20:22, 1:8] = 5  # chair
    labels[0, 30:40, :] = 3       # wall
    idx = np.argwhere(labels > 0).astype(np.int32)
    scores = np.linspace(0.55, 0.99, len(idx)).astype(np.float32)
    return OccupancyFrame(labels, idx, labels[tuple(idx.T)], scores, np.array([-2.4, 0.5, 0.0]), 0.08)


def _round_trip(store, msg):
    raw = store.serialize_cdr(msg, msg.__msgtype__)
    back = store.deserialize_cdr(raw, msg.__msgtype__)
    assert bytes(store.serialize_cdr(back, msg.__msgtype__)) == bytes(raw)
    return back


def test_occupancy_cloud_round_trip(store):
    f = TypestoreFactory(store)
    occ = _occupancy()
    back = _round_trip(store, msg_encode.occupancy_to_pointcloud2(f, occ, "odom", STAMP))
    assert back.header.frame_id == "odom" and msg_decode.stamp_to_ns(back.header.stamp) == STAMP
    pts = msg_decode.pointcloud2_to_array(back)
    assert len(pts) == len(occ.voxel_labels) and back.row_step == 24 * len(pts)
    np.testing.assert_allclose(np.stack([pts["x"], pts["y"], pts["z"]], -1), occ.centers_world(), atol=1e-5)
    np.testing.assert_array_equal(pts["label"], occ.voxel_labels)
    np.testing.assert_array_equal(pts["score"], occ.voxel_scores)
    np.testing.assert_array_equal(msg_decode.unpack_rgb(pts["rgb"]), CLASS_COLORS[occ.voxel_labels])
    grid = msg_decode.cloud_to_label_grid(back, occ.voxel_origin, occ.voxel_size, occ.labels.shape)
    np.testing.assert_array_equal(grid, occ.labels)


def test_markers_pose_diagnostics_round_trip(store):
    f = TypestoreFactory(store)
    occ = _occupancy()
    markers = _round_trip(store, msg_encode.occupancy_to_marker_array(f, occ, "odom", STAMP)).markers
    marker_cls = store.types["visualization_msgs/msg/Marker"]
    assert markers[0].action == marker_cls.DELETEALL
    by_id = {m.id: m for m in markers[1:]}
    assert set(by_id) == {2, 3, 5}
    chair = by_id[5]
    assert chair.type == marker_cls.CUBE_LIST and len(chair.points) == 4 * 2 * 7
    assert chair.scale.x == pytest.approx(0.08) and chair.color.r == pytest.approx(204 / 255)
    assert chair.pose.orientation.w == 1.0
    pose = _round_trip(store, msg_encode.grid_pose_msg(f, occ.voxel_origin, "odom", STAMP))
    np.testing.assert_allclose(msg_decode.grid_origin_from_pose(pose), occ.voxel_origin)
    stats = FrameStats()
    stats.on_received()
    stats.on_processed(12.5)
    stats.on_skipped("missing_tf")
    diag = _round_trip(store, msg_encode.stats_to_diagnostics(f, stats.snapshot(), STAMP))
    status = diag.status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert status.level == store.types["diagnostic_msgs/msg/DiagnosticStatus"].WARN  # a frame was skipped
    assert values["skipped_missing_tf"] == "1" and values["latency_p50_ms"] == "12.50"


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_input_images_round_trip(store, encoding):
    f = TypestoreFactory(store)
    rgb = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    msg = msg_encode.rgb_to_image(f, rgb, "cam", STAMP, encoding)
    np.testing.assert_array_equal(msg_decode.image_to_rgb(_round_trip(store, msg)), msg_decode.image_to_rgb(msg))


def test_bag_input_messages_round_trip(store):
    f = TypestoreFactory(store)
    rgb = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    png = _round_trip(store, msg_encode.rgb_to_compressed(f, rgb, "cam", STAMP, "png"))
    np.testing.assert_array_equal(msg_decode.compressed_to_rgb(png), rgb)
    depth = np.array([[0.5, 0.0], [2.0, 1.25]])
    for encoding in ("16UC1", "32FC1"):
        back = _round_trip(store, msg_encode.depth_to_image(f, depth, "cam", STAMP, encoding))
        np.testing.assert_allclose(msg_decode.depth_to_metres(back), depth, atol=1e-6)
    k = np.array([[300.0, 0, 160], [0, 310, 120], [0, 0, 1]])
    info = _round_trip(store, msg_encode.k_to_camera_info(f, k, 240, 320, "cam", STAMP))
    np.testing.assert_allclose(msg_decode.camera_info_to_k(info, (480, 640)), k * [[2], [2], [1]])
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    pose[:3, 3] = [1.0, 2.0, 1.5]
    tf = f.new("tf2_msgs/msg/TFMessage", transforms=[msg_encode.matrix_to_transform_stamped(f, pose, "world", "cam", STAMP)])
    np.testing.assert_allclose(msg_decode.transform_to_matrix(_round_trip(store, tf).transforms[0]), pose, atol=1e-12)
    labels = _occupancy().labels.copy()
    labels[30:, :, 20:] = 255
    gt = _round_trip(store, msg_encode.label_grid_to_png(f, labels, "world", STAMP))
    np.testing.assert_array_equal(msg_decode.png_to_label_grid(gt, labels.shape), labels)
    assert len(gt.data) < 5000  # lossless and small
