"""The TF link bookkeeping shared by the replay's TfTree and the node's TransformWatch (discene_ros/tf_links.py)."""
from __future__ import annotations

import numpy as np
from rosbags.typesys import Stores, get_typestore

from discene_ros import msg_encode
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.tf_links import TransformWatch, link_path, only_invalid_link

F = TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))


def _tf(parent: str, child: str, rotation=(0.0, 0.0, 0.0, 1.0), translation=(0.0, 0.0, 0.0)):
    tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4), parent, child, 0)
    for axis, value in zip("xyz", translation, strict=True):
        setattr(tf.transform.translation, axis, value)
    for axis, value in zip("xyzw", rotation, strict=True):
        setattr(tf.transform.rotation, axis, value)
    return tf


def test_link_path_walks_links_both_ways_and_says_none_when_not_joined():
    links = [("map", "odom"), ("odom", "base"), ("base", "cam")]
    assert link_path(links, "map", "cam") == [(("base", "cam"), False), (("odom", "base"), False),
                                               (("map", "odom"), False)]
    assert link_path(links, "cam", "odom") == [(("odom", "base"), True), (("base", "cam"), True)]
    assert link_path(links, "map", "arm") is None


def test_only_invalid_link_names_the_first_unusable_link_of_the_chain():
    invalid = {("odom", "base"): "rotation quaternion [0.0, 0.0, 0.0, 0.0] is zero"}
    assert only_invalid_link([("map", "odom"), ("base", "cam")], invalid, "map", "cam") == (
        ("odom", "base"), invalid[("odom", "base")])
    assert only_invalid_link([("map", "odom"), ("odom", "base"), ("base", "cam")], invalid, "map", "cam") is None
    assert only_invalid_link([("map", "odom")], invalid, "map", "arm") is None  # not joined at all: absent
    assert only_invalid_link([("map", "odom")], {}, "map", "cam") is None


def test_transform_watch_keeps_what_tf2_would_drop_until_a_valid_transform_comes():
    watch = TransformWatch()
    watch.seen([_tf("/map", "odom", rotation=(0.0, 0.0, 0.0, 0.0)),  # zero quaternion; a leading slash as tf2 strips
                _tf("odom", "base", translation=(float("nan"), 0.0, 0.0)),
                _tf("base", "cam"), _tf("", "x"), _tf("y", "y")])  # tf2 drops the last two: no frames joined by them
    problem = watch.invalid_chain("map", "cam")  # the unusable link nearest the camera is named
    assert problem is not None and "every transform odom -> base so far was invalid" in problem
    assert "translation [nan, 0.0, 0.0] is NaN" in problem
    watch.seen([_tf("odom", "base")])
    problem = watch.invalid_chain("map", "cam")
    assert problem is not None and "map -> odom" in problem and "zero" in problem
    watch.seen([_tf("map", "odom", rotation=(0.0, 0.0, float("inf"), 1.0))])
    assert "not finite" in watch.invalid_chain("map", "cam")
    watch.seen([_tf("map", "odom", rotation=(0.0, 0.0, 0.0, 0.9))])  # |q|^2 = 0.81: tf2 normalises it and keeps it
    assert watch.invalid_chain("map", "cam") is None
    watch.seen([_tf("map", "odom", rotation=(0.0, 0.0, 0.0, 0.0))])  # once valid, tf2 has it: lags, not absent
    assert watch.invalid_chain("map", "cam") is None
    assert watch.invalid_chain("map", "arm") is None


def test_transform_watch_calls_invalid_only_what_tf2_drops():
    """tf2 normalises any finite non-zero quaternion and keeps an infinite translation (it checks for NaN only):
    such a link is in its Buffer, so a lookup failing through it is not an invalid chain."""
    for rotation, translation in (((0.0, 0.0, 0.3, 1.2), (0.0, 0.0, 0.0)), ((0.0, 0.0, 0.0, 2.0), (0.0, 0.0, 0.0)),
                                  ((0.0, 0.0, 0.0, 1.0), (float("inf"), 0.0, 0.0))):
        watch = TransformWatch()
        watch.seen([_tf("map", "odom", rotation=rotation, translation=translation), _tf("odom", "cam")])
        assert watch.invalid_chain("map", "cam") is None, (rotation, translation)
    watch = TransformWatch()
    watch.seen([_tf("map", "odom", rotation=(1e-170, 0.0, 0.0, 0.0)), _tf("odom", "cam")])  # |q|^2 underflows: NaN
    assert "too small to normalise" in watch.invalid_chain("map", "cam")
