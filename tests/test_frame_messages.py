"""Marker publishing period and PointCloud2.is_dense (frame path message side)."""
from __future__ import annotations

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from discene_ros import msg_encode
from discene_ros import params as P
from discene_ros.msg_factory import EveryNth, TypestoreFactory

F = TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))


@pytest.mark.parametrize("period,expected", [(1, [1] * 7), (3, [1, 0, 0, 1, 0, 0, 1]), (0, [0] * 7)])
def test_marker_period(period, expected):
    schedule = EveryNth(period)
    assert [int(schedule.due()) for _ in range(7)] == expected


def test_marker_period_default_and_bad_value():
    assert P.defaults()["marker_period"] > 1  # markers cost more than the cloud: not every frame by default
    with pytest.raises(ValueError, match="period"):
        EveryNth(-1)
    with pytest.raises(ValueError, match="marker_period"):
        P.validate({"marker_period": 0})


def test_pointcloud_is_dense_only_when_every_point_is_finite():
    centers = np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    good = msg_encode.points_to_pointcloud2(F, msg_encode.cloud_points(centers, [1, 2], [0.9, 0.8]), "odom", 0)
    assert good.is_dense
    centers[1, 2] = np.nan
    bad = msg_encode.points_to_pointcloud2(F, msg_encode.cloud_points(centers, [1, 2], [0.9, 0.8]), "odom", 0)
    assert not bad.is_dense
    assert msg_encode.points_to_pointcloud2(F, msg_encode.cloud_points(np.zeros((0, 3)), [], []), "odom", 0).is_dense


def test_marker_points_are_grid_local_and_reused_across_frames():
    from models.postprocess import OccupancyFrame

    labels = np.zeros((60, 60, 36), np.uint8)
    idx = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.int32)
    labels[tuple(idx.T)] = [2, 2, 5]

    def frame(origin):
        return OccupancyFrame(labels=labels, voxel_indices=idx, voxel_labels=np.array([2, 2, 5], np.uint8),
                              voxel_scores=np.ones(3, np.float32), voxel_origin=np.asarray(origin, float),
                              voxel_size=0.08)

    a = msg_encode.occupancy_to_marker_array(F, frame([1.0, -2.0, 0.5]), "odom", 0)
    b = msg_encode.occupancy_to_marker_array(F, frame([3.0, 0.0, 0.0]), "odom", 0)
    by_id = {m.id: m for m in a.markers[1:]}
    pose = by_id[2].pose.position
    assert (pose.x, pose.y, pose.z) == (1.0, -2.0, 0.5)
    world = [(pose.x + p.x, pose.y + p.y, pose.z + p.z) for p in by_id[2].points]
    np.testing.assert_allclose(world, frame([1.0, -2.0, 0.5]).centers_world()[:2])
    assert b.markers[1].points[0] is a.markers[1].points[0]  # same message object, not rebuilt


def test_marker_points_are_right_when_some_are_cached_and_some_are_new():
    from models.postprocess import OccupancyFrame

    rng = np.random.default_rng(3)
    grid = (60, 60, 36)
    cells = rng.choice(np.prod(grid), size=900, replace=False)
    idx = np.stack(np.unravel_index(cells, grid), axis=-1).astype(np.int32)
    size = 0.07  # a voxel size no other test uses: starts with an empty cache
    for part in (slice(0, 300), slice(200, 900)):  # the second frame: 100 cached voxels, 600 new ones
        sub = idx[part]
        labels_1d = rng.integers(1, 12, len(sub)).astype(np.uint8)
        labels = np.zeros(grid, np.uint8)
        labels[tuple(sub.T)] = labels_1d
        frame = OccupancyFrame(labels=labels, voxel_indices=sub, voxel_labels=labels_1d,
                               voxel_scores=np.ones(len(sub), np.float32), voxel_origin=np.zeros(3),
                               voxel_size=size)
        markers = msg_encode.occupancy_to_marker_array(F, frame, "odom", 0).markers[1:]
        for m in markers:
            want = (sub[labels_1d == m.id] + 0.5) * size
            np.testing.assert_array_equal([(p.x, p.y, p.z) for p in m.points], want)
        assert sum(len(m.points) for m in markers) == len(sub)
        assert [m.id for m in markers] == sorted(set(labels_1d.tolist()))  # one CUBE_LIST per class, in order
        assert all(m.text == msg_encode.CLASS_NAMES[m.id] for m in markers)
