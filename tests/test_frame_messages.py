"""Marker publishing period and PointCloud2.is_dense (frame path message side)."""
from __future__ import annotations

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from discene_ros import conversions as conv
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
    good = conv.points_to_pointcloud2(F, conv.cloud_points(centers, [1, 2], [0.9, 0.8]), "odom", 0)
    assert good.is_dense
    centers[1, 2] = np.nan
    bad = conv.points_to_pointcloud2(F, conv.cloud_points(centers, [1, 2], [0.9, 0.8]), "odom", 0)
    assert not bad.is_dense
    assert conv.points_to_pointcloud2(F, conv.cloud_points(np.zeros((0, 3)), [], []), "odom", 0).is_dense
