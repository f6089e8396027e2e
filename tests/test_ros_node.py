"""The rclpy node against a fake rclpy built from the real one, its parameter file, RViz config, package.xml.

No ROS 2 is installed here. The fake ``rclpy.node.Node`` (test_ros_support) carries every member of
the real class, read from ../shared/ros2-python/*/rclpy/node.py, and enters ``self.handle`` in
``__init__`` as rclpy does; declare_parameter raises rclpy's exception classes; publishing after
shutdown fails as in rclpy. Published messages are serialised with the real Humble definitions.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.typesys import Stores, get_typestore
from test_ros_support import (
    RCLPY_PUBLISHER_METHODS,
    TF2_LISTENER_METHODS,
    TF2_LISTENER_PARAMETERS,
    BlockBackend,
    FakeRos,
    install_fake_rclpy,
    pipeline_for,
    rcl_value,
    real_node_members,
    wait_until,
)

import discene_ros.node
from discene_ros import msg_decode, msg_encode
from discene_ros import params as P
from discene_ros.camera_pose import mount_height_pitch, orientation_problem
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import images_rectified, post_threads_for
from models import native_postprocess

ROOT = Path(__file__).resolve().parents[1]
STORE = get_typestore(Stores.ROS2_HUMBLE)
F = TypestoreFactory(STORE)
K = np.array([[100.0, 0, 64], [0, 100, 48], [0, 0, 1]])
RGB = np.full((96, 128, 3), 90, np.uint8)
MS = 1_000_000
TF_TOPICS = {"/tf", "/tf_static"}  # the node's TF listener's subscriptions


def _as_numpy_data(msg):
    """rclpy keeps uint8[] as array.array('B'); the typestore serialiser wants numpy."""
    msg.data = np.frombuffer(msg.data, np.uint8)
    return msg


def _as_integer_levels(diag):
    """rclpy keeps a byte field as bytes of length 1 (and writes that byte); the typestore serialiser wants the
    integer."""
    return dataclasses.replace(diag, status=[dataclasses.replace(s, level=s.level[0]) for s in diag.status])


@pytest.fixture()
def ros():
    """(FakeRos, discene_ros.node reloaded against the fake rclpy); the real module is restored after."""
    mp = pytest.MonkeyPatch()
    fake = FakeRos(STORE)
    install_fake_rclpy(mp, fake)
    module = importlib.reload(discene_ros.node)
    yield fake, module
    for node in fake.nodes:
        if not node.fake_destroyed and hasattr(node, "frames"):
            node.destroy_node()
    mp.undo()
    importlib.reload(discene_ros.node)


def make_node(ros, backend=None, **overrides):
    fake, module = ros
    fake.overrides.update(overrides)
    return module.OccupancyNode(pipeline=pipeline_for(backend or BlockBackend()))


def depth_config():
    cfg = BlockBackend().config
    cfg.use_depth = True
    return cfg


def published(node, topic):
    return {p.topic: p for p in node.publishers}[topic].published


# ----------------------------------------------------------------------------- construction and rclpy's API
def test_module_imports_without_ros_and_main_says_so(capsys):
    assert discene_ros.node.ROS_IMPORT_ERROR is not None  # no ROS 2 here
    assert discene_ros.node.main([]) == 1
    assert "source your ROS 2" in capsys.readouterr().err


def test_node_shadows_no_member_of_rclpys_node(ros):
    members = real_node_members()
    if not members:
        pytest.skip("../shared/ros2-python is absent: rclpy's real Node members are unknown")
    node = make_node(ros)
    own_class = set(vars(ros[1].OccupancyNode))
    own_instance = set(vars(node)) - set(vars(ros[1].Node("plain")))  # what OccupancyNode itself assigns
    for distro, names in members.items():
        assert "handle" in names and names["handle"] == "property", distro
        assert own_class & set(names) <= {"__init__", "destroy_node", "__doc__", "__module__"}, distro
        assert not own_instance & set(names), distro


def test_the_fake_node_catches_a_shadowed_handle(ros):
    """The defect that shipped: a method named `handle` breaks Node.__init__ (it enters self.handle)."""
    class Broken(ros[1].OccupancyNode):
        def handle(self, frame):
            return None

    with pytest.raises((AttributeError, TypeError)):
        Broken(pipeline=pipeline_for(BlockBackend()))


def test_parameters_qos_topics(ros):
    node = make_node(ros, world_frame="map")
    assert node.get_name() == P.NODE_NAME
    assert list(node._parameters) == ["use_sim_time"] + [p.name for p in P.PARAMETERS]  # rclpy's, then ours
    assert not [text for level, text in node.get_logger().records if "does not have" in text]
    for spec in P.PARAMETERS:
        descriptor = node.describe_parameter(spec.name)
        assert descriptor.description == spec.description and descriptor.read_only
        if spec.range:
            (rng,) = descriptor.floating_point_range if spec.kind == "float" else descriptor.integer_range
            assert (rng.from_value, rng.to_value) == spec.range
        assert descriptor.additional_constraints == ("one of: " + ", ".join(spec.choices) if spec.choices else "")
    assert node.cfg["world_frame"] == "map"
    assert node.pipeline.config.score_threshold == 0.5  # negative default: the model's own threshold
    subs = {s.topic: s for s in node.subscriptions}
    tf = {topic: subs.pop(topic) for topic in ("/tf", "/tf_static")}  # the TF listener's, as tf2_ros_py makes them
    assert tf["/tf"].callback == node.tf_listener.callback and tf["/tf_static"].callback == node.tf_listener.static_callback
    assert set(subs) == {"/camera/color/image_raw", "/camera/color/camera_info"}  # no depth: use_depth false
    assert subs["/camera/color/image_raw"].msg_type.msgtype == "sensor_msgs/msg/Image"
    assert subs["/camera/color/image_raw"].callback == node.image_callback
    for sub in subs.values():
        assert sub.qos.depth == 1 and sub.qos.reliability == "best_effort" and sub.qos.history == "keep_last"
    assert {p.topic: p.msg_type.msgtype for p in node.publishers} == {
        P.TOPIC_CLOUD: "sensor_msgs/msg/PointCloud2", P.TOPIC_GRID_POSE: "geometry_msgs/msg/PoseStamped",
        P.TOPIC_MARKERS: "visualization_msgs/msg/MarkerArray", P.TOPIC_DIAGNOSTICS: "diagnostic_msgs/msg/DiagnosticArray"}
    assert node.timers[0][0] == P.defaults()["diagnostics_period_s"]


def test_parameters_the_node_does_not_have_are_named_in_one_warning(ros):
    """rclpy drops overrides of undeclared names silently; a misspelt one in a parameter file is named,
    with the parameter it was probably meant to be. rclpy's own use_sim_time is not reported."""
    node = make_node(ros, scor_threshold=0.3, use_sim_time=True, lens_model="wide")
    (note,) = [text for level, text in node.get_logger().records if level == "warn" and "does not have" in text]
    assert "'lens_model'" in note and "'scor_threshold' (did you mean 'score_threshold'?)" in note
    assert "use_sim_time" not in note and "2 parameter(s)" in note
    assert node.get_parameter("use_sim_time").value is True
    assert node.cfg["score_threshold"] == P.defaults()["score_threshold"]  # the typo changed nothing


def test_unknown_parameters_note():
    known = [spec.name for spec in P.PARAMETERS]
    assert P.unknown_parameters_note(["world_frame"], known) is None
    note = P.unknown_parameters_note(["worldframe", "zzz"], known)
    assert "'worldframe' (did you mean 'world_frame'?)" in note and "'zzz'," not in note and note.count("did you") == 1


def test_camera_info_is_found_beside_the_image_topic_unless_given(ros):
    """image_transport's CameraSubscriber rule: a user who sets only image_topic gets its camera_info."""
    node = make_node(ros, image_topic="/front/color/image_raw", use_compressed=True, sync_wait_s=0.0)
    assert {s.topic for s in node.subscriptions} - TF_TOPICS == {"/front/color/image_raw/compressed",
                                                                 "/front/color/camera_info"}
    assert any("camera info /front/color/camera_info" in t for level, t in node.get_logger().records)
    node.image_callback(msg_encode.rgb_to_compressed(F, RGB, "cam", 5 * MS, "jpeg"))  # its camera info never came
    assert wait_until(lambda: node.stats.skipped["missing_camera_info"] == 1)
    assert wait_until(lambda: any("no CameraInfo received yet on /front/color/camera_info" in t
                                  for level, t in node.get_logger().records if level == "warn"))
    node.destroy_node()
    ros[0].overrides.clear()
    node = make_node(ros, image_topic="/front/color/image_raw", camera_info_topic="/calib/front")
    assert {s.topic for s in node.subscriptions} - TF_TOPICS == {"/front/color/image_raw", "/calib/front"}


def test_camera_info_topic_for_follows_image_transport():
    cases = {"/camera/color/image_raw": "/camera/color/camera_info",
             "/camera/color/image_raw/compressed": "/camera/color/camera_info",  # the base topic's
             "color/image_raw": "color/camera_info", "image_raw": "camera_info", "/image": "/camera_info",
             "//a//b/image/": "/a/b/camera_info"}  # getCameraInfoTopic drops empty tokens
    assert {topic: P.camera_info_topic_for(topic) for topic in cases} == cases


def test_rectified_auto_rule_reads_the_image_topic_name():
    """image_proc's image_rect / image_rect_color, RealSense's image_rect_raw, and their /compressed transports."""
    cases = {"/camera/image_rect": True, "/camera/image_rect_color": True, "/camera/infra1/image_rect_raw": True,
             "/camera/image_rect/compressed": True, "/camera/image_rect_color/compressed/": True, "image_rect": True,
             "/camera/color/image_raw": False, "/camera/color/image_raw/compressed": False,
             "/image_rect/image_raw": False, "/camera/image": False, "/camera/rect_image": False}
    assert {topic: P.rectified_topic(topic) for topic in cases} == cases
    assert images_rectified("auto", "/camera/image_rect/compressed")[0]
    assert images_rectified("false", "/camera/image_rect")[0] is False
    assert images_rectified("true", "/camera/color/image_raw")[0] is True
    with pytest.raises(ValueError, match="rectified must be auto, true or false"):
        images_rectified("yes", "/camera/image_rect")


def test_rectified_parameter_is_validated_and_takes_rcl_booleans():
    assert P.validate({})["rectified"] == "auto" and P.PARAMS_BY_NAME["rectified"].dynamic_typing
    assert P.validate({"rectified": rcl_value("true")})["rectified"] == "true"  # rcl makes a bool of it
    assert P.validate({"rectified": rcl_value("false")})["rectified"] == "false"
    assert P.validate({"pipelining": rcl_value("on")})["pipelining"] == "on"
    with pytest.raises(ValueError, match="'rectified'='on' is not one of auto, true, false"):
        P.validate({"rectified": "on"})
    assert P.validate({"pipelining": rcl_value("true")})["pipelining"] == "on"  # rcl reads true and on alike


@pytest.mark.parametrize("overrides, rectified, said", [
    ({}, False, "raw images (rectified auto: /camera/color/image_raw is not an image_rect topic): undistorted here "
                "with K where their CameraInfo has non-zero plumb_bob/rational_polynomial/equidistant coefficients"),
    ({"image_topic": "/camera/image_rect", "use_compressed": True}, True,
     "rectified images (rectified auto: /camera/image_rect/compressed is an image_rect topic): not undistorted, "
     "intrinsics from CameraInfo P"),
    ({"image_topic": "/camera/image_rect", "rectified": "false"}, False, "raw images (rectified false)"),
    ({"rectified": True}, True, "rectified images (rectified true)")])
def test_rectified_parameter_sets_the_processor_and_says_so(ros, overrides, rectified, said):
    fake, _ = ros
    node = make_node(ros, world_frame="map", **overrides)
    assert node.processor.settings.rectified is rectified
    (ready,) = [text for level, text in node.get_logger().records if "occupancy node ready" in text]
    assert said in ready
    assert node.get_parameter("rectified").value in ("auto", "true", "false")
    # a rectified image beside the raw calibration's CameraInfo: never undistorted, never logged as such
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    info = msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 10 * MS)
    info.d = np.array([-0.1, 0.01, 0.0, 0.0, 0.0])
    node.camera_info_callback(info)
    node.image_callback(msg_encode.rgb_to_compressed(F, RGB, "cam", 10 * MS, "png") if node.image_topic.endswith(
        "/compressed") else msg_encode.rgb_to_image(F, RGB, "cam", 10 * MS))
    assert wait_until(lambda: node.stats.processed == 1) and not node.stats.skipped
    assert node.processor.undistort.maps_built == (0 if rectified else 1)
    logged = any("undistorting every image" in text for _, text in node.get_logger().records)
    assert logged is not rectified


@pytest.mark.parametrize("pipelining, serial, said", [
    ("auto", True, "frame loop the network alone, the next frame decoded and prepared beside this one's "
                   "post-processing (pipelining auto: the network runs on the CPU"),
    ("on", False, "frame loop pipelining on"), ("off", True, "frame loop pipelining off")])
def test_pipelining_parameter_sets_the_frame_loop_and_says_so(ros, pipelining, serial, said):
    """On the CPU (where the test backend runs) auto means the network alone; the start-up log says which."""
    node = make_node(ros, pipelining=pipelining)
    assert node.frames.runner.serial is serial
    assert (node.frames.network_done is not None) is serial  # the next frame's host work beside this one's
    # the network alone, the post-processing kernel takes the core the inference left (processing.post_threads_for)
    assert node.pipeline.post_threads == post_threads_for(not serial) == (2 if serial and os.cpu_count() > 1 else 1)
    (ready,) = [text for level, text in node.get_logger().records if "occupancy node ready" in text]
    post = (f"native kernel, {node.pipeline.post_threads} thread" if native_postprocess.available()
            else "torch ops; native kernel")
    assert said in ready and post in ready
    compressed = make_node(ros, pipelining=pipelining, use_compressed=True)
    assert compressed.pipeline.post_threads == post_threads_for(not serial, compressed=True) == 1  # the decode's core


def test_compressed_and_depth_subscriptions(ros):
    node = make_node(ros, BlockBackend(depth_config()), use_compressed=True, use_depth=True)
    subs = {s.topic: s.msg_type.msgtype for s in node.subscriptions}
    assert subs["/camera/color/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    assert subs["/camera/aligned_depth_to_color/image_raw"] == "sensor_msgs/msg/Image"
    # on the CPU (auto: one frame at a time) a decode thread would overlap nothing
    assert "frame_decode" not in {t.name for t in node.frames.runner._threads}
    (ready,) = [text for level, text in node.get_logger().records if "occupancy node ready" in text]
    assert "decoded on a thread of their own" not in ready


@pytest.mark.parametrize("use_compressed", [False, True])
def test_an_image_topic_ending_in_compressed_is_subscribed_as_compressed_images(ros, use_compressed):
    """Users name the transport's topic itself: no '/compressed/compressed', no Image type on it."""
    node = make_node(ros, image_topic="/camera/color/image_raw/compressed", use_compressed=use_compressed)
    subs = {s.topic: s.msg_type.msgtype for s in node.subscriptions}
    assert subs["/camera/color/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    assert not any(topic.endswith("/compressed/compressed") for topic in subs)


def test_a_compressed_depth_topic_is_subscribed_and_decoded(ros):
    """depth_topic ending in /compressedDepth: image_transport's compressedDepth CompressedImage, as
    realsense2_camera publishes it next to the raw topic."""
    fake, _ = ros
    topic = "/camera/aligned_depth_to_color/image_raw/compressedDepth"
    seen = []

    class Probe(BlockBackend):
        def infer(self, inputs):
            seen.append(float(inputs.depth.max()))
            return super().infer(inputs)

    node = make_node(ros, Probe(depth_config()), use_depth=True, world_frame="map", depth_topic=topic)
    assert {s.topic: s.msg_type.msgtype for s in node.subscriptions}[topic] == "sensor_msgs/msg/CompressedImage"
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    stamp = 2_000 * MS
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
    node.depth_callback(msg_encode.depth_to_compressed_depth(F, np.full((96, 128), 2.5), "cam", stamp, "32FC1"))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
    assert wait_until(lambda: node.stats.processed == 1) and not node.stats.skipped
    assert seen == [pytest.approx(2.5, abs=2.5**2 / 10100)]  # within the codec's inverse-depth quantisation


def test_compressed_images_get_a_decode_thread_in_a_pipelined_loop(ros):
    node = make_node(ros, use_compressed=True, pipelining="on")
    assert "frame_decode" in {t.name for t in node.frames.runner._threads}
    (ready,) = [text for level, text in node.get_logger().records if "occupancy node ready" in text]
    assert "compressed images decoded on a thread of their own" in ready


@pytest.mark.full_startup_collection
def test_start_up_objects_are_frozen_out_of_the_garbage_collector(ros):
    """A full collection must not scan the model and the modules mid-run: the node freezes what start-up
    made (gc.freeze) and says how much; what the frame loop makes afterwards stays collectable."""
    import gc
    import re

    gc.unfreeze()
    node = make_node(ros)
    (ready,) = [text for level, text in node.get_logger().records if "occupancy node ready" in text]
    said = int(re.search(r"(\d+) start-up objects frozen out of the garbage collector", ready).group(1))
    frozen = gc.get_freeze_count()  # frozen objects freed since (by reference counting) have left it
    assert 10_000 < frozen <= said  # torch, numpy, the model: far more than a frame loop makes
    later = [object() for _ in range(3)], {}
    assert gc.is_tracked(later) and gc.get_freeze_count() <= frozen  # objects made after start-up: not frozen
    assert len(gc.get_objects()) < frozen  # what a full collection scans leaves the frozen ones out


@pytest.mark.parametrize("pipelining", ["auto", "on"])
def test_raw_images_are_decoded_in_the_prepare_stage(ros, pipelining):
    node = make_node(ros, pipelining=pipelining)
    assert "frame_decode" not in {t.name for t in node.frames.runner._threads}


@pytest.mark.parametrize("waits", [True, False])
def test_a_launch_ahead_loop_prepares_each_frame_before_its_launch(ros, lite_model, lite_config, waits):
    """A fused pipeline (the CUDA path's launch-ahead loop, here on the CPU) in a pipelined loop: no prepare
    thread, the finish stage prepares each frame. Where locating a frame may wait (``sync_wait_s`` or
    ``tf_timeout_s`` above 0), raw images get a decode thread all the same, where the stamp pairing and TF run
    without holding up the finish stage, which decodes them (``decodes_on_decode_thread``); with both at 0 the
    finish stage locates them too, without waiting. Frames flow and are published."""
    from export.backends.torch_backend import TorchBackend
    from export.pipeline import OccupancyPipeline

    fake, module = ros
    fake.overrides.update(pipelining="on", world_frame="map", **({} if waits else {"sync_wait_s": 0.0,
                                                                                   "tf_timeout_s": 0.0}))
    backend = TorchBackend(lite_model, lite_config, device="cpu", cuda_graph=True)
    node = module.OccupancyNode(pipeline=OccupancyPipeline(backend, fuse=True))
    threads = {"frame_decode", "frame_infer"} if waits else {"frame_infer"}
    assert {t.name for t in node.frames.runner._threads} == threads
    (ready,) = [text for level, text in node.get_logger().records if "occupancy node ready" in text]
    assert ("frames located on a thread of their own, decoded and prepared right before their launch" if waits else
            "each frame located, decoded and prepared right before its launch") in ready
    located: list[str] = []  # the thread each frame's stamp pairing ran on
    decoded: list[str] = []  # and its decode
    match, decode = node.partners.match, node.processor.decode_frame
    node.partners.match = lambda *a, **k: located.append(threading.current_thread().name) or match(*a, **k)
    node.processor.decode_frame = lambda *a, **k: decoded.append(threading.current_thread().name) or decode(*a, **k)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    for i in range(3):
        stamp = 1_000 * MS + i * MS
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
        assert wait_until(lambda n=i + 1: node.stats.processed + node.stats.dropped == n)
    assert node.stats.processed == 3 and len(published(node, P.TOPIC_CLOUD)) == 3
    assert located == ["frame_decode" if waits else "frame_infer"] * 3 and decoded == ["frame_infer"] * 3
    bad = msg_encode.rgb_to_image(F, RGB, "cam", 1_000 * MS + 3 * MS)  # refused by the finish stage's decode
    bad.encoding = "8UC3"  # no colour encoding: cv_bridge only (not installed here)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 1_000 * MS + 3 * MS))
    node.image_callback(bad)
    assert wait_until(lambda: node.stats.skipped["unsupported_encoding"] == 1)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 1_000 * MS + 4 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 1_000 * MS + 4 * MS))
    assert wait_until(lambda: node.stats.processed == 4) and node.frames.alive()  # and the loop goes on
    timeouts = {t.nanoseconds for _, _, _, t in fake.tf_lookups}
    assert len(fake.tf_lookups) == 5 and timeouts == ({50_000_000} if waits else {0})


def test_values_as_rcl_types_them_start_the_node(ros):
    """rcl types an unquoted ``-p``/YAML value by its spelling: ``pipelining:=on`` is a bool and
    ``floor_z:=0`` an integer, which statically typed string and float declarations refused."""
    node = make_node(ros, pipelining=rcl_value("on"), floor_z=rcl_value("0"), sync_wait_s=rcl_value("1"),
                     fallback_camera_pitch_deg=rcl_value("20"))
    assert node.cfg["pipelining"] == "on" and node.cfg["floor_z"] == 0.0 and node.cfg["sync_wait_s"] == 1.0
    assert all(type(node.cfg[k]) is float for k in ("floor_z", "sync_wait_s", "fallback_camera_pitch_deg"))
    node.destroy_node()
    assert make_node(ros, pipelining=rcl_value("off")).cfg["pipelining"] == "off"


def test_parameters_show_the_values_the_node_runs_with_and_stay_read_only(ros):
    """``ros2 param get`` reads the stored parameter: 'on', not the bool rcl made of ``pipelining:=on``; 0.0,
    not the integer of ``floor_z:=0``; the frame id tf2 is asked for, not '/map'. All read-only afterwards."""
    fake, _ = ros
    node = make_node(ros, pipelining=rcl_value("on"), floor_z=rcl_value("0"), world_frame="/map",
                     score_threshold=0.3)
    shown = {name: node.get_parameter(name).value for name in ("pipelining", "floor_z", "world_frame")}
    assert shown == {"pipelining": "on", "floor_z": 0.0, "world_frame": "map"} and type(shown["floor_z"]) is float
    assert sorted(name for name, _ in fake.parameter_events) == ["floor_z", "pipelining", "world_frame"]
    assert node.get_parameter("score_threshold").value == 0.3  # as given: nothing to store
    assert all(node.describe_parameter(spec.name).read_only for spec in P.PARAMETERS)
    Parameter = sys.modules["rclpy.parameter"].Parameter
    results = node.set_parameters([Parameter("pipelining", value="off"), Parameter("floor_z", value=1.0)])
    assert [r.successful for r in results] == [False, False] and node.get_parameter("pipelining").value == "on"


def test_a_stored_value_rclpy_refuses_ends_in_cannot_start(ros, monkeypatch, capsys):
    """Should params.validate ever hand back a value outside the descriptor's range, rclpy refuses to store it:
    the node must say so, not start with a parameter that reads back other than it runs."""
    fake, module = ros
    validate = module.P.validate
    monkeypatch.setattr(module.P, "validate", lambda values: {**validate(values), "floor_z": 50.0})
    monkeypatch.setattr(module, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert module.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("occupancy_node: cannot start:") and "Traceback" not in err
    assert re.search(r"parameter 'floor_z': cannot store 50.0: .*out of range", err)


def test_parameter_set_at_runtime_is_refused_not_ignored(ros):
    """`ros2 param set` must not report success for a parameter the node reads only once."""
    node = make_node(ros)
    (result,) = node.set_parameters([sys.modules["rclpy.parameter"].Parameter("world_frame", value="map")])
    assert not result.successful and "read-only" in result.reason
    assert node.cfg["world_frame"] == "odom"


def test_non_negative_score_threshold_overrides_the_models(ros):
    assert make_node(ros, score_threshold=0.3).pipeline.config.score_threshold == 0.3


@pytest.mark.parametrize("overrides, text", [
    ({"score_threshold": 1.5}, "out of range"),           # InvalidParameterValueException (descriptor range)
    ({"closing": rcl_value("maybe")}, "expecting type"),  # InvalidParameterTypeException
    ({"sync_wait_s": rcl_value("long")}, "must be float"),  # dynamically typed: params.validate's type check
    ({"floor_z": rcl_value("20")}, "outside [-10.0, 10.0]"),  # an integer skips rclpy's float range: validate's
    ({"floor_z": rcl_value(".nan")}, "out of range"),      # rclpy's float range refuses NaN
    ({"backend": "tensorflow"}, "unknown backend"),       # the backend factory's ValueError
    ({"pipelining": "sometimes"}, "not one of auto, on, off"),  # params.validate: a string outside its choices
])
def test_bad_parameters_end_in_cannot_start_not_a_traceback(ros, overrides, text, capsys, monkeypatch):
    fake, module = ros
    fake.overrides.update(overrides)
    if "backend" not in overrides:
        monkeypatch.setattr(module, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert module.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("occupancy_node: cannot start:") and text in err.lower() and "Traceback" not in err
    assert fake.calls == ["init", "try_shutdown"]


def test_backend_that_cannot_be_set_up_is_one_line_naming_its_type(ros, tmp_path, capsys, monkeypatch):
    """TensorRT without a usable GPU (a RuntimeError): one line, as a bad parameter; a programming error
    (TypeError) keeps its traceback."""
    from test_backends_trt import Machine, _write_onnx

    from export.trt_build import build_engine
    from models.config import lite

    fake, module = ros
    Machine(monkeypatch, "10.3")
    build_engine(_write_onnx(tmp_path / "model.onnx", lite()), tmp_path / "model.engine")
    Machine(monkeypatch, "10.3", no_cuda=True)
    fake.overrides.update(backend="tensorrt", model_path=str(tmp_path / "model.engine"))
    assert module.main([]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("occupancy_node: cannot start: RuntimeError: TensorRT 10.3.0.26 could not create a runtime")
    assert len(err.splitlines()) == 1 and fake.calls == ["init", "try_shutdown"]

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(module, "build_pipeline", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        module.main([])


@pytest.mark.parametrize("args, overrides, said", [
    ([], {"image_topic": "/camera/color/image raw"},
     "cannot start: Invalid topic name: topic name must not contain characters other than alphanumerics, '_', '~', "
     "'{', or '}': '/camera/color/image raw'\n"),  # rclpy's InvalidTopicNameException, its caret line dropped
    ([], {"depth_topic": "/camera/2d/depth", "use_depth": True},
     "cannot start: Invalid topic name: topic name token must not start with a number: '/camera/2d/depth'\n"),
    (["--ros-args", "-p", "world_frame"], {},
     "cannot start: failed to initialize rcl: Couldn't parse parameter override rule: '-p world_frame'"),
    (["--ros-args", "--params-file"], {}, "cannot start: failed to initialize rcl: Couldn't parse trailing"),
    (["--ros-args", "--log-levle", "debug"], {},
     "cannot start: unknown ROS arguments (after --ros-args): ['--log-levle', 'debug']\n"),
])
def test_bad_topic_names_and_ros_args_end_in_cannot_start_not_a_traceback(ros, monkeypatch, capsys, args, overrides,
                                                                          said):
    """A malformed topic name (rclpy's InvalidTopicNameException) and bad --ros-args (rcl's errors from
    rclpy.init) went out as tracebacks."""
    fake, module = ros
    fake.overrides.update(overrides)
    monkeypatch.setattr(module, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert module.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("occupancy_node: cannot start:") and said in err and "Traceback" not in err
    assert err.count("\n") == 1 and fake.calls[-1] == "try_shutdown"


def test_main_init_spin_destroy_shutdown(ros, monkeypatch):
    fake, module = ros
    monkeypatch.setattr(module, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert module.main([]) == 0
    assert fake.calls == ["init", "spin", "try_shutdown"] and fake.nodes[0].fake_destroyed
    fake.spin_raises = sys.modules["rclpy.executors"].ExternalShutdownException
    assert module.main([]) == 0


def test_backend_parameters_reach_the_pipeline_builder(ros, monkeypatch):
    fake, module = ros
    seen = {}

    def build(*args, **kwargs):
        seen.update(kwargs)
        return pipeline_for(BlockBackend())

    monkeypatch.setattr(module, "build_pipeline", build)
    fake.overrides.update(fp16=True, compile=True, cuda_graph=False, tf32=True, tf32_convolutions=True,
                          frame_graph=False)
    module.OccupancyNode()
    assert {k: seen[k] for k in ("fp16", "compile", "cuda_graph", "tf32", "tf32_convolutions", "frame_graph")} == {
        "fp16": True, "compile": True, "cuda_graph": False, "tf32": True, "tf32_convolutions": True,
        "frame_graph": False}


def test_main_reports_a_missing_model_and_shuts_down(ros, tmp_path, capsys):
    fake, module = ros
    fake.overrides["model_path"] = str(tmp_path / "missing.pt")
    assert module.main([]) == 1
    assert fake.calls == ["init", "try_shutdown"]
    assert "missing.pt not found" in capsys.readouterr().err
    fake.overrides["model_path"] = str(tmp_path)  # a folder of models, not one
    assert module.main([]) == 1
    assert "is a directory: give the model file in it" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    fake.overrides["model_path"] = str(tmp_path / "garbage.pt")
    assert module.main([]) == 1
    assert "cannot start: checkpoint" in capsys.readouterr().err  # CheckpointError is a ValueError: one line


# ----------------------------------------------------------------------------- frames
def test_frames_flow_drop_and_publish(ros):
    fake, _ = ros
    node = make_node(ros, BlockBackend(delay_s=0.03), world_frame="map", warn_throttle_s=60.0)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    for i in range(20):  # 20 frames in ~0.1 s against a 30 ms backend
        stamp = 1_000 * MS + i * MS
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
        time.sleep(0.005)
    assert wait_until(lambda: node.stats.processed + node.stats.dropped == 20)
    assert node.stats.dropped > 0 and node.stats.processed == node.pipeline.backend.calls
    clouds = published(node, P.TOPIC_CLOUD)
    assert len(clouds) == node.stats.processed and msg_decode.stamp_to_ns(clouds[-1].header.stamp) == 1_019 * MS
    cloud = clouds[-1]
    assert cloud.header.frame_id == "map" and cloud.width == 40 and cloud.data.typecode == "B"
    back = STORE.deserialize_cdr(STORE.serialize_cdr(_as_numpy_data(cloud), cloud.__msgtype__), cloud.__msgtype__)
    assert set(msg_decode.pointcloud2_to_array(back)["label"]) == {3}
    period = P.defaults()["marker_period"]
    assert len(published(node, P.TOPIC_MARKERS)) == -(-len(clouds) // period)  # first frame, then every N-th
    assert {stamp for _, _, stamp, _ in fake.tf_lookups} <= {1_000 * MS + i * MS for i in range(20)}  # image stamps
    node.diagnostics_timer_callback()
    diag = published(node, P.TOPIC_DIAGNOSTICS)[-1]
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert int(values["dropped"]) == node.stats.dropped and float(values["fps"]) > 0 and values["pose_source"] == "TF"
    assert diag.status[0].name == f"/{P.NODE_NAME}: occupancy"  # the node's full name: one status per camera
    assert isinstance(diag.status[0].level, bytes) and diag.status[0].level == type(diag.status[0]).OK
    back = STORE.deserialize_cdr(STORE.serialize_cdr(_as_integer_levels(diag), diag.__msgtype__), diag.__msgtype__)
    assert back.status[0].level == 0 and back.status[0].name == diag.status[0].name


def test_markers_are_built_only_while_something_subscribes(ros):
    fake, _ = ros
    node = make_node(ros, world_frame="map", marker_period=2)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    markers_pub = {p.topic: p for p in node.publishers}[P.TOPIC_MARKERS]

    def feed(first: int, count: int) -> None:
        for i in range(first, first + count):  # one at a time: none dropped
            stamp = 1_000 * MS + i * MS
            node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
            node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
            assert wait_until(lambda i=i: node.stats.processed == i + 1)

    markers_pub.subscribers = 0
    feed(0, 4)
    assert len(published(node, P.TOPIC_CLOUD)) == 4 and published(node, P.TOPIC_MARKERS) == []
    markers_pub.subscribers = 1  # RViz connects: every 2nd frame again
    feed(4, 4)
    stamps = [msg_decode.stamp_to_ns(m.markers[0].header.stamp) for m in published(node, P.TOPIC_MARKERS)]
    assert stamps == [1_004 * MS, 1_006 * MS]


def test_fake_publisher_has_only_rclpys_methods(ros):
    node = make_node(ros)
    fake_publisher = type(node.publishers[0])
    methods = {name for name, value in vars(fake_publisher).items() if callable(value) and not name.startswith("_")}
    assert methods and methods <= RCLPY_PUBLISHER_METHODS


def test_fake_transform_listener_is_tf2_ros_pys(ros):
    import inspect

    fake_listener = sys.modules["tf2_ros"].TransformListener
    methods = {name for name, value in vars(fake_listener).items() if callable(value)}
    assert "callback" in methods and methods <= TF2_LISTENER_METHODS
    assert tuple(inspect.signature(fake_listener.__init__).parameters) == TF2_LISTENER_PARAMETERS


def test_fake_byte_fields_are_bytes_as_rosidl_generates_them(ros):
    """rosidl_generator_py makes a byte constant bytes (DiagnosticStatus.WARN is b'\\x01') and its field's setter
    takes bytes of length 1 only: the fake's ints let diagnostics code pass that compares levels with integers."""
    status_cls = sys.modules["diagnostic_msgs.msg"].DiagnosticStatus
    assert (status_cls.OK, status_cls.WARN, status_cls.ERROR, status_cls.STALE) == (b"\x00", b"\x01", b"\x02", b"\x03")
    assert status_cls().level == b"\x00" and max(status_cls.OK, status_cls.WARN) == status_cls.WARN
    node = make_node(ros)
    array = sys.modules["diagnostic_msgs.msg"].DiagnosticArray(status=[status_cls(level=1)])
    with pytest.raises(AssertionError, match="'level' field must be of type 'bytes'"):
        node.diagnostics_pub.publish(array)
    node.diagnostics_timer_callback()  # the node's own: no frame yet, WARN, as bytes
    status = published(node, P.TOPIC_DIAGNOSTICS)[-1].status[0]
    assert status.level == status_cls.WARN


def _tf_message(*links):
    """TFMessage of (parent, child, 4x4 or None for an all-NaN transform, stamp_ns) links."""
    transforms = []
    for parent, child, pose, stamp in links:
        tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4) if pose is None else pose, parent, child, stamp)
        if pose is None:
            for v in (tf.transform.translation, tf.transform.rotation):
                for axis in ("x", "y", "z"):
                    setattr(v, axis, float("nan"))
            tf.transform.rotation.w = float("nan")
        transforms.append(tf)
    return F.new("tf2_msgs/msg/TFMessage", transforms=transforms)


def _deliver_tf(node, topic, message):
    (sub,) = [s for s in node.subscriptions if s.topic == topic]
    sub.callback(message)


@pytest.mark.parametrize("chain", ["world link", "middle link"])
def test_a_world_frame_published_only_as_invalid_transforms_skips_frames_instead_of_the_fallback(ros, chain):
    """tf2 drops a NaN transform with a log line, so a localizer that publishes only NaN leaves the world frame
    absent from the Buffer: the node sees the TFMessages itself and skips the frames as bad_transform, where it
    used to place them at the fallback pose. A valid transform of the link ends it."""
    fake, _ = ros
    node = make_node(ros, world_frame="map", warn_throttle_s=60.0, tf_timeout_s=0.0)
    _deliver_tf(node, "/tf_static", _tf_message(("base_link", "cam", _mount(0.6, 10.0), 0)))
    if chain == "world link":  # map -> base_link only ever NaN
        _deliver_tf(node, "/tf", _tf_message(("map", "base_link", None, 1 * MS)))
    else:  # map -> odom fine, odom -> base_link only ever NaN
        _deliver_tf(node, "/tf", _tf_message(("map", "odom", np.eye(4), 1 * MS), ("odom", "base_link", None, 1 * MS)))
    error = "LookupException" if chain == "world link" else "ConnectivityException"
    fake.transforms[("map", "cam")] = getattr(sys.modules["tf2_ros"], error)("not in tf2's Buffer")
    assert all(authority == "default_authority" for _, authority, _ in fake.tf_set)
    assert len(fake.tf_set) == (2 if chain == "world link" else 3)  # every transform still goes to tf2, which drops

    def frame(i: int) -> None:
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", (10 + i) * MS))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", (10 + i) * MS))

    for i in range(2):
        frame(i)
        assert wait_until(lambda n=i + 1: node.stats.skipped["bad_transform"] == n)
    assert node.stats.processed == 0 and node.fallback_note is None
    assert not [t for level, t in node.get_logger().records if level == "error"]  # no fallback announced
    warned = [t for level, t in node.get_logger().records if level == "warn" and "bad_transform" in t]
    bad = "map -> base_link" if chain == "world link" else "odom -> base_link"
    assert len(warned) == 1 and f"every transform {bad} so far was invalid" in warned[0] and "not finite" in warned[0]

    fixed = ("map", "base_link") if chain == "world link" else ("odom", "base_link")
    _deliver_tf(node, "/tf", _tf_message((*fixed, np.eye(4), 12 * MS)))
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, _mount(0.6, 10.0), "map", "cam", 0)
    frame(2)
    assert wait_until(lambda: node.stats.processed == 1)
    assert node.stats.skipped["bad_transform"] == 2


def test_an_absent_world_frame_still_gets_the_fallback_beside_invalid_links_elsewhere(ros):
    """An invalid link that does not join the world frame and the camera changes nothing: fallback as before. A
    camera mount published only as invalid transforms leaves the fixed height and pitch, and the log says why."""
    fake, _ = ros
    node = make_node(ros, world_frame="odom", warn_throttle_s=60.0)
    _deliver_tf(node, "/tf", _tf_message(("arm_base", "gripper", None, 1 * MS)))
    _deliver_tf(node, "/tf_static", _tf_message(("base_link", "cam", None, 0)))
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 10 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 10 * MS))
    assert wait_until(lambda: node.stats.processed == 1)
    assert node.fallback_note is not None and not node.stats.skipped
    (error,) = [t for level, t in node.get_logger().records if level == "error"]
    assert "fixed parameters" in error and "every transform base_link -> cam so far was invalid" in error
    assert "gripper" not in error


def test_bad_frames_are_skipped_counted_and_throttled(ros):
    fake, _ = ros
    node = make_node(ros, world_frame="map", warn_throttle_s=60.0, use_fallback_pose=False, sync_wait_s=0.0)
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 1))  # no camera info yet
    assert wait_until(lambda: node.stats.skipped["missing_camera_info"] == 1)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 0))
    for i in range(3):  # no TF and the fallback is disabled
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 10 + i))
        assert wait_until(lambda i=i: node.stats.skipped["missing_tf"] == i + 1)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    bad = msg_encode.rgb_to_image(F, RGB, "cam", 20)
    bad.encoding = "8UC3"  # no colour encoding: cv_bridge only (not installed here)
    node.image_callback(bad)
    short = msg_encode.rgb_to_image(F, RGB, "cam", 21)
    short.data = short.data[:100]
    time.sleep(0.3)
    node.image_callback(short)
    wrong_size = msg_encode.rgb_to_image(F, np.zeros((50, 128, 3), np.uint8), "cam", 22)
    time.sleep(0.3)
    node.image_callback(wrong_size)
    assert wait_until(lambda: sum(node.stats.skipped.values()) == 7)
    assert node.stats.skipped["unsupported_encoding"] == 1 and node.stats.skipped["bad_image_size"] == 1
    assert node.stats.skipped["bad_camera_info"] == 1 and node.stats.processed == 0
    warnings = [text for level, text in node.get_logger().records if level == "warn" and "skipped frame" in text]
    assert sum("missing_tf" in w for w in warnings) == 1  # throttled: 3 frames, one warning
    assert len(warnings) == 5


@pytest.mark.parametrize("check", [True, False])
def test_depth_in_another_frame_is_skipped_unless_check_depth_frame_is_off(ros, check):
    fake, _ = ros
    node = make_node(ros, BlockBackend(depth_config()), use_depth=True, world_frame="map", check_depth_frame=check)
    assert node.processor.settings.check_depth_frame is check
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    stamp = 3_000 * MS
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
    node.depth_callback(msg_encode.depth_to_image(F, np.full((96, 128), 2.0), "cam_depth_optical_frame", stamp))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
    if check:
        assert wait_until(lambda: node.stats.skipped["bad_depth"] == 1) and node.stats.processed == 0
        warnings = [text for level, text in node.get_logger().records if level == "warn"]
        assert any("registered to the colour camera" in w and "check_depth_frame:=false" in w for w in warnings)
    else:
        assert wait_until(lambda: node.stats.processed == 1) and not node.stats.skipped


def test_depth_published_after_its_colour_frame_is_paired_by_stamp(ros):
    """A driver publishes aligned depth after the colour image: the newest depth when the colour frame
    arrives is the previous one (67 ms old at 15 Hz). The frame must wait for its own."""
    fake, _ = ros
    node = make_node(ros, BlockBackend(depth_config()), use_depth=True, world_frame="map", sync_wait_s=2.0)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    depth = np.full((96, 128), 2.0, np.float32)
    previous = 1_000 * MS
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", previous))
    node.depth_callback(msg_encode.depth_to_image(F, depth, "cam", previous))
    stamp = previous + 67 * MS
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
    time.sleep(0.05)
    assert node.stats.processed == 0 and not node.stats.skipped  # waiting for its depth
    node.depth_callback(msg_encode.depth_to_image(F, depth, "cam", stamp))
    assert wait_until(lambda: node.stats.processed == 1)
    assert not node.stats.skipped
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp + 67 * MS))  # its depth never comes
    node.depth_callback(msg_encode.depth_to_image(F, depth, "cam", stamp + 200 * MS))  # a later one: stop waiting
    assert wait_until(lambda: node.stats.skipped["depth_not_synchronised"] == 1)


def test_camera_info_arriving_a_fraction_of_a_ms_later_is_not_skipped(ros):
    fake, _ = ros
    node = make_node(ros, world_frame="map", sync_wait_s=2.0)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    stamp = 5_000 * MS
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp))
    time.sleep(0.0003)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
    assert wait_until(lambda: node.stats.processed == 1)
    assert not node.stats.skipped


@pytest.mark.parametrize("error, text", [
    ("ExtrapolationException", "Lookup would require extrapolation into the future"),
    # what tf2 says of a ROS 1 style frame id; neither a lag nor an absent frame, still no made-up pose
    ("InvalidArgumentException", 'Invalid argument "/cam" passed to lookupTransform argument source_frame - '
                                 "tf2 frame_ids cannot start with a '/'"),
])
def test_lagging_or_failing_tf_skips_the_frame_instead_of_a_made_up_pose(ros, error, text):
    fake, _ = ros
    node = make_node(ros, world_frame="map", tf_timeout_s=0.02)
    fake.transforms[("map", "cam")] = getattr(sys.modules["tf2_ros"], error)(text)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 7 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 7 * MS))
    assert wait_until(lambda: node.stats.skipped["tf_not_ready"] == 1)
    assert node.stats.processed == 0

    def warnings() -> list[str]:
        return [t for level, t in node.get_logger().records if level == "warn" and "tf_not_ready" in t]

    assert wait_until(lambda: len(warnings()) == 1) and text in warnings()[0]
    target, source, stamp, timeout = fake.tf_lookups[0]
    assert (target, source, stamp) == ("map", "cam", 7 * MS) and timeout.nanoseconds == 20 * MS


def test_ros1_style_and_empty_camera_frame_ids(ros):
    """tf2 stores "/cam" as "cam" but refuses to look it up: the node asks for "cam". An image naming no
    frame is skipped at once as bad_frame_id, before any pairing wait or TF lookup."""
    fake, _ = ros
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    node = make_node(ros, world_frame="/map", sync_wait_s=1.0)
    assert node.cfg["world_frame"] == "map"
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 7 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "/cam", 7 * MS))
    assert wait_until(lambda: node.stats.processed == 1) and not node.stats.skipped
    assert fake.tf_lookups[-1][:2] == ("map", "cam")
    lookups = len(fake.tf_lookups)
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "", 9 * MS))  # no camera info at 9 ms: pairing would wait 1 s
    assert wait_until(lambda: node.stats.skipped["bad_frame_id"] == 1)  # not tf_not_ready after the wait and lookup
    assert len(fake.tf_lookups) == lookups and not fake.tf_invalid_queries
    assert any("names no frame" in t for level, t in node.get_logger().records if level == "warn")


def test_stamp_before_the_epoch_is_skipped_as_bad_stamp(ros):
    """rclpy's Time refuses negative nanoseconds: such a frame is named bad_stamp, not an internal error."""
    fake, _ = ros
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    node = make_node(ros, world_frame="map")
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", -5 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", -5 * MS))
    assert wait_until(lambda: node.stats.skipped["bad_stamp"] == 1) and not fake.tf_lookups
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 7 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 7 * MS))
    assert wait_until(lambda: node.stats.processed == 1) and set(node.stats.skipped) == {"bad_stamp"}
    assert any("before the epoch" in t for level, t in node.get_logger().records if level == "warn")


def test_tf_frame_parameters_lose_a_leading_slash_and_may_not_be_empty():
    assert P.validate({"world_frame": "/odom", "base_frame": "//base_link"})["world_frame"] == "odom"
    assert P.validate({"base_frame": "/base_link"})["base_frame"] == "base_link"
    with pytest.raises(ValueError, match="'world_frame' names no TF frame"):
        P.validate({"world_frame": "/"})


def _mount(height: float, pitch_deg: float) -> np.ndarray:
    """base_link <- camera: the camera ``height`` m above base_link, looking along +x, pitched down."""
    pitch = np.deg2rad(pitch_deg)
    forward = np.array([np.cos(pitch), 0.0, -np.sin(pitch)])
    right = np.array([0.0, -1.0, 0.0])
    mount = np.eye(4)
    mount[:3, 0], mount[:3, 1], mount[:3, 2] = right, np.cross(forward, right), forward
    mount[:3, 3] = [0.1, 0.0, height]
    return mount


def test_a_camera_looking_up_or_upside_down_in_tf_is_warned_about_once(ros):
    """A frame_id that is not the optical frame (camera_link: x forward, z up) puts the camera looking
    straight up; the node still runs (an unusual mount may be meant) but says so, once per camera frame."""
    fake, _ = ros
    node = make_node(ros, world_frame="map")
    fake.transforms[("map", "camera_link")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "camera_link", 0)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, _mount(1.0, 15.0), "map", "cam", 0)
    for i, frame in enumerate(["camera_link", "camera_link", "cam"]):
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, frame, (i + 1) * MS))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, frame, (i + 1) * MS))
        assert wait_until(lambda i=i: node.stats.processed == i + 1)
    (warning,) = [t for level, t in node.get_logger().records if level == "warn" and "above the horizon" in t]
    assert "camera 'camera_link' looks 90 deg above the horizon" in warning and "REP 103" in warning
    assert not [t for level, t in node.get_logger().records if "'cam'" in t and "horizon" in t]


def test_orientation_problem_limits():
    assert orientation_problem(_mount(1.0, -30.0), "cam") is None  # 30 deg up: allowed
    assert orientation_problem(_mount(1.0, 89.0), "cam") is None  # straight down
    assert "above the horizon" in orientation_problem(_mount(1.0, -50.0), "cam")
    upside_down = _mount(1.0, 15.0) @ np.diag([-1.0, -1.0, 1.0, 1.0])  # 180 deg about the optical axis
    assert "upside down" in orientation_problem(upside_down, "cam")


def test_absent_world_frame_uses_the_mounts_height_and_pitch_loudly_once(ros):
    fake, _ = ros
    node = make_node(ros, world_frame="odom", warn_throttle_s=60.0)
    mount = _mount(0.62, 20.0)
    fake.transforms[("base_link", "cam")] = msg_encode.matrix_to_transform_stamped(F, mount, "base_link", "cam", 0)
    for i in range(3):
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", (10 + i) * MS))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", (10 + i) * MS))
        assert wait_until(lambda i=i: node.stats.processed == i + 1)
    height, pitch_deg = mount_height_pitch(node.processor.fallback_pose)
    assert height == pytest.approx(0.62) and pitch_deg == pytest.approx(20.0)
    errors = [text for level, text in node.get_logger().records if level == "error"]
    assert len(errors) == 1 and "FALLBACK" in errors[0] and "0.62 m" in errors[0] and "20.0 deg" in errors[0]
    assert "set use_fallback_pose:=false to skip" in errors[0]  # the node's parameter
    node.diagnostics_timer_callback()
    status = published(node, P.TOPIC_DIAGNOSTICS)[-1].status[0]
    values = {kv.key: kv.value for kv in status.values}
    assert values["pose_source"].startswith("FALLBACK") and status.level == type(status).WARN == b"\x01"
    assert sum(lookup[:2] == ("odom", "cam") for lookup in fake.tf_lookups) == 1  # no tf_timeout_s wait per frame
    fake.transforms[("odom", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "odom", "cam", 0)
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 20 * MS))
    assert wait_until(lambda: node.stats.processed == 4)
    node.diagnostics_timer_callback()
    values = {kv.key: kv.value for kv in published(node, P.TOPIC_DIAGNOSTICS)[-1].status[0].values}
    assert values["pose_source"] == "TF"


def test_an_infinite_translation_that_tf2_keeps_is_a_bad_pose_and_no_mount(ros):
    """tf2 checks translations for NaN only, so it hands out a transform with an infinite one: the camera pose
    made from it is skipped as bad_pose (as the replay does), and a mount made from it is no mount."""
    fake, _ = ros
    node = make_node(ros, world_frame="map", warn_throttle_s=60.0, fallback_camera_height=1.0)
    far = np.eye(4)
    far[0, 3] = np.inf
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, far, "map", "cam", 0)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 10 * MS))
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 10 * MS))
    assert wait_until(lambda: node.stats.skipped["bad_pose"] == 1)
    del fake.transforms[("map", "cam")]
    fake.transforms[("base_link", "cam")] = msg_encode.matrix_to_transform_stamped(F, far, "base_link", "cam", 0)
    node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 11 * MS))
    assert wait_until(lambda: node.stats.processed == 1)
    assert mount_height_pitch(node.processor.fallback_pose)[0] == pytest.approx(1.0)  # the fixed parameters
    errors = [text for level, text in node.get_logger().records if level == "error"]
    assert len(errors) == 1 and "fixed parameters" in errors[0]


def test_a_mount_that_reaches_tf_after_the_first_frames_replaces_the_fixed_fallback(ros):
    """At start-up the camera's first frames can come before robot_state_publisher's static mount: the
    fixed-parameter fallback must give way to the mount once TF has it, not stay for the whole run."""
    fake, _ = ros
    node = make_node(ros, world_frame="odom", warn_throttle_s=60.0, fallback_camera_height=1.0,
                     fallback_camera_pitch_deg=15.0)

    def frame(i: int) -> None:
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", (30 + i) * MS))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", (30 + i) * MS))
        assert wait_until(lambda: node.stats.processed == i + 1)

    for i in range(2):  # neither odom nor the mount in TF: the fixed height and pitch
        frame(i)
    assert mount_height_pitch(node.processor.fallback_pose) == pytest.approx((1.0, 15.0))
    mount = _mount(0.62, 20.0)
    fake.transforms[("base_link", "cam")] = msg_encode.matrix_to_transform_stamped(F, mount, "base_link", "cam", 0)
    for i in range(2, 4):
        frame(i)
    assert mount_height_pitch(node.processor.fallback_pose) == pytest.approx((0.62, 20.0))
    errors = [text for level, text in node.get_logger().records if level == "error"]
    assert len(errors) == 2 and "fixed parameters" in errors[0] and "camera mount" in errors[1]
    node.diagnostics_timer_callback()
    values = {kv.key: kv.value for kv in published(node, P.TOPIC_DIAGNOSTICS)[-1].status[0].values}
    assert "camera mount" in values["pose_source"] and "0.62 m" in values["pose_source"]


def test_image_stamps_jumping_back_clear_the_tf_history_once(ros):
    """``ros2 bag play --loop``: the stamps restart, and tf2 would refuse or mix the new loop's transforms."""
    fake, _ = ros
    node = make_node(ros, world_frame="map")
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    for i, stamp in enumerate((100_000, 100_066, 100_133, 5_000, 5_066)):
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp * MS))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", stamp * MS))
        assert wait_until(lambda i=i: node.stats.processed == i + 1)
        assert fake.tf_clears == (1 if stamp < 100_000 else 0)
    warnings = [t for level, t in node.get_logger().records if level == "warn" and "jumped back" in t]
    assert len(warnings) == 1 and "95.1 s" in warnings[0]


def test_no_image_for_seconds_is_a_diagnostics_warning_and_a_log_line(ros):
    """A wrong image_topic or a silent camera: nothing would show in the log. After NO_IMAGE_WARN_S the
    diagnostics say so (WARN) and the log says what to check, at most every NO_IMAGE_LOG_PERIOD_S."""
    module = ros[1]
    node = make_node(ros, world_frame="map")

    def no_image_logs():
        return [t for level, t in node.get_logger().records if level == "warn" and "no image received" in t]

    node.started_s = time.monotonic()  # just started, however long building the node took on this machine
    status, _ = _diagnostics(node)
    assert "no image" not in status.message
    node.started_s -= module.NO_IMAGE_WARN_S + 1
    status, _ = _diagnostics(node)
    assert status.level == type(status).WARN
    assert re.search(r"no image received yet on /camera/color/image_raw for \d+ s", status.message)
    _diagnostics(node)
    (logged,) = no_image_logs()  # once, not every period
    assert "ros2 topic info -v /camera/color/image_raw" in logged
    _frame(node, 5 * MS)
    status, _ = _diagnostics(node)
    assert "no image" not in status.message
    node.last_image_s -= module.NO_IMAGE_WARN_S + 2  # the camera stopped
    status, _ = _diagnostics(node)
    assert re.search(r"^no image received on /camera/color/image_raw for \d+ s", status.message)


def test_ctrl_c_with_a_frame_in_flight_ends_without_a_thread_traceback(ros):
    """rclpy's SIGINT handler shuts the context down before destroy_node: the in-flight frame must not
    publish on the invalid context nor end the thread with an exception."""
    fake, _ = ros
    node = make_node(ros, BlockBackend(delay_s=0.3), world_frame="map")
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    crashes = []
    previous_hook = threading.excepthook
    threading.excepthook = crashes.append
    try:
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 3 * MS))
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", 3 * MS))
        assert wait_until(lambda: node.pipeline.backend.calls == 1)
        fake.context.shutdown()  # Ctrl-C
        node.destroy_node()
    finally:
        threading.excepthook = previous_hook
    assert not node.frames.alive() and not crashes
    assert not node.stats.skipped and not published(node, P.TOPIC_CLOUD)


class InfBackend(BlockBackend):
    """BlockBackend whose scores are +inf while ``broken`` is set (a frame that fails in stage 2), and
    whose inference waits for ``gate`` (set: no wait)."""

    broken = False

    def __init__(self, delay_s=0.0):
        super().__init__(delay_s=delay_s)
        self.gate = threading.Event()
        self.gate.set()

    def infer(self, inputs):
        out = super().infer(inputs)
        assert self.gate.wait(10)
        if self.broken:
            out["scores"][:] = np.inf
        return out


def test_destroy_with_a_stuck_inference_names_the_thread_and_leaves_the_pipeline_open(ros, monkeypatch):
    """A frame stuck in the network at shutdown: destroy_node waits SHUTDOWN_TIMEOUT_S for all frame threads
    together, names the one still running, and does not close the pipeline under it (a TensorRT close frees the
    buffers a running execute uses): that is left to the process exit. Stopped threads: the pipeline is closed."""
    fake, module = ros
    monkeypatch.setattr(module, "SHUTDOWN_TIMEOUT_S", 0.2)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    closed = []
    for stuck in (True, False):
        backend = InfBackend()
        node = make_node(ros, backend, world_frame="map")
        close = node.pipeline.close
        node.pipeline.close = lambda close=close, stuck=stuck: closed.append(stuck) or close()
        if stuck:
            backend.gate.clear()
            _frame(node, 10 * MS)
            assert wait_until(lambda backend=backend: backend.calls == 1)  # in the network, held there
        node.destroy_node()
        warned = [t for level, t in node.get_logger().records if level == "warn" and "did not stop" in t]
        assert warned == (["frame threads did not stop within 0.2 s: frame_infer; the pipeline is left open until "
                           "the process exits"] if stuck else [])
        assert node.fake_destroyed
        backend.gate.set()
        assert wait_until(lambda node=node: not node.frames.alive())
    assert closed == [False]  # only the node whose threads stopped closed its pipeline


def _diagnostics(node):
    node.diagnostics_timer_callback()
    status = published(node, P.TOPIC_DIAGNOSTICS)[-1].status[0]
    return status, {kv.key: kv.value for kv in status.values}


def _frame(node, stamp, rgb=RGB):
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
    node.image_callback(msg_encode.rgb_to_image(F, rgb, "cam", stamp))


@pytest.mark.parametrize("pipelining", ["on", "off"])
def test_burst_two_stages_exact_counters_newest_last_nothing_after_destroy(ros, pipelining):
    """A burst against a slow network: pipelined, the next frame is prepared while one is inferred; either
    way stale frames are dropped, every frame is accounted for, the newest is published last."""
    fake, _ = ros
    backend = InfBackend(delay_s=0.04)
    node = make_node(ros, backend, world_frame="map", pipelining=pipelining)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    stamps = [2_000 * MS + i * MS for i in range(40)]
    for stamp in stamps:
        _frame(node, stamp)
        time.sleep(0.002)
    assert wait_until(lambda: node.stats.processed + node.stats.dropped + sum(node.stats.skipped.values()) == 40)
    assert node.frames.wait_idle(timeout=5)
    stats = node.stats
    assert stats.received == 40 and stats.dropped > 0 and not stats.skipped
    assert stats.processed == node.pipeline.backend.calls == len(published(node, P.TOPIC_CLOUD))
    published_stamps = [msg_decode.stamp_to_ns(c.header.stamp) for c in published(node, P.TOPIC_CLOUD)]
    assert published_stamps == sorted(set(published_stamps)) and published_stamps[-1] == stamps[-1]
    assert set(published_stamps) <= set(stamps)
    status, values = _diagnostics(node)
    assert values["received"] == "40" and values["in_flight"] == "0" and status.level == type(status).OK
    assert int(values["processed"]) + int(values["dropped"]) + int(values["skipped"]) == 40
    counts = node.frames.runner.counts()  # the runner's own books agree with the node's
    assert counts["submitted"] == 40 and counts["dropped"] == stats.dropped and counts["processed"] == stats.processed

    # destroy with one frame being inferred and one waiting: neither is published, both count as dropped
    backend.gate.clear()
    _frame(node, 3_000 * MS)
    assert wait_until(lambda: backend.calls == stats.processed + 1)  # 3000 held in the network
    _frame(node, 3_001 * MS)
    assert wait_until(lambda: node.frames.runner.counts()["submitted"] == 42)
    clouds_before = len(published(node, P.TOPIC_CLOUD))
    destroy = threading.Thread(target=node.destroy_node)
    destroy.start()
    assert wait_until(lambda: node.frames.closed)
    backend.gate.set()  # 3000 leaves the network after destroy_node began: not published
    destroy.join(10)
    assert not destroy.is_alive() and not node.frames.alive() and node.fake_destroyed
    assert len(published(node, P.TOPIC_CLOUD)) == clouds_before
    assert stats.received == 42 == stats.processed + stats.dropped and not stats.skipped
    _frame(node, 3_002 * MS)  # a late callback after destroy_node: ignored, no error, nothing published
    time.sleep(0.1)
    assert len(published(node, P.TOPIC_CLOUD)) == clouds_before and stats.received == 42


def test_camera_info_slower_than_the_images_is_not_waited_for_once_steady(ros):
    """The node's camera info callback keeps track of the calibration, so that its frames do not wait sync_wait_s
    each for a camera info that a 1 Hz CameraInfo publisher does not send (pairing.FramePartners.add_info)."""
    fake, _ = ros
    node = make_node(ros, world_frame="map", sync_wait_s=2.0)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    waits = []
    lookup = node.partners.info.wait_nearest
    node.partners.info.wait_nearest = lambda stamp, tol, timeout: (waits.append(timeout), lookup(stamp, tol, timeout))[1]
    for stamp in (0, 1_000 * MS):
        node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", stamp))
    for i in range(3):
        node.image_callback(msg_encode.rgb_to_image(F, RGB, "cam", (1_033 + 33 * i) * MS))
        assert wait_until(lambda i=i: node.stats.processed == i + 1)
    assert waits == [0.0, 0.0, 0.0]


def test_bad_frame_in_either_stage_is_skipped_by_reason(ros):
    fake, _ = ros
    backend = InfBackend()
    node = make_node(ros, backend, world_frame="map", warn_throttle_s=60.0)
    fake.transforms[("map", "cam")] = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    _frame(node, 10 * MS)
    assert wait_until(lambda: node.stats.processed == 1)
    bad = msg_encode.rgb_to_image(F, RGB, "cam", 11 * MS)  # stage 1: decode refuses the encoding
    bad.encoding = "8UC3"  # no colour encoding: cv_bridge only (not installed here)
    node.camera_info_callback(msg_encode.k_to_camera_info(F, K, 96, 128, "cam", 11 * MS))
    node.image_callback(bad)
    assert wait_until(lambda: node.stats.skipped["unsupported_encoding"] == 1)
    assert backend.calls == 1  # never reached the network
    backend.broken = True  # stage 2: the network's scores are not finite
    _frame(node, 12 * MS)
    assert wait_until(lambda: node.stats.skipped["non_finite_output"] == 1)
    assert backend.calls == 2
    backend.broken = False
    _frame(node, 13 * MS)
    assert wait_until(lambda: node.stats.processed == 2)
    assert [msg_decode.stamp_to_ns(c.header.stamp) for c in published(node, P.TOPIC_CLOUD)] == [10 * MS, 13 * MS]
    status, values = _diagnostics(node)
    assert values["skipped_unsupported_encoding"] == "1" and values["skipped_non_finite_output"] == "1"
    assert values["received"] == "4" and values["in_flight"] == "0" and values["dropped"] == "0"
    assert status.level == type(status).WARN  # bad frames in the window
    warnings = [text for level, text in node.get_logger().records if level == "warn"]
    assert any("non_finite_output" in w for w in warnings) and any("unsupported_encoding" in w for w in warnings)
    node.stats.on_dropped()  # a frame counted twice: the diagnostics say the books do not balance
    status, values = _diagnostics(node)
    assert values["in_flight"] == "-1" and status.level == type(status).ERROR and "disagree" in status.message


# ----------------------------------------------------------------------------- entry point, files
def _run_entry(*args: str, block_torch: bool) -> subprocess.CompletedProcess:
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch' or name.startswith('torch.'):\n"
               "            raise ModuleNotFoundError(\"No module named 'torch'\")\n"
               "sys.meta_path.insert(0, Block())\n") if block_torch else ""
    code = blocker + f"from discene_ros.entry import occupancy_node\nsys.exit(occupancy_node({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", "import sys\n" + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_entry_without_torch_prints_one_clear_line():
    proc = _run_entry(block_torch=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch is not installed" in lines[0] and "--system-site-packages" in lines[0]
    assert "Traceback" not in proc.stderr


def test_entry_help_needs_neither_torch_nor_ros():
    proc = _run_entry("--help", block_torch=True)
    assert proc.returncode == 0 and "usage: ros2 run discene_ros occupancy_node" in proc.stdout
    assert all(spec.name in proc.stdout for spec in P.PARAMETERS)


def test_entry_with_torch_but_without_ros_says_to_source_ros():
    proc = _run_entry(block_torch=False)
    assert proc.returncode == 1 and "source your ROS 2" in proc.stderr and "Traceback" not in proc.stderr


def test_yaml_mirrors_the_parameter_table():
    values = P.load_yaml_params(ROOT / "config" / "occupancy.yaml")
    assert values == P.defaults()
    lines = (ROOT / "config" / "occupancy.yaml").read_text().splitlines()
    comments = {line.strip().split(":")[0]: above.strip().removeprefix("# ")  # each parameter's comment line
                for above, line in zip(lines[:-1], lines[1:], strict=True) if above.strip().startswith("# ")}
    for spec in P.PARAMETERS:
        in_range = f" [{spec.range[0]}, {spec.range[1]}]" if spec.range else ""
        assert comments[spec.name] == spec.description + in_range, spec.name
    assert P.validate(values) == P.defaults()
    with pytest.raises(ValueError, match="unknown parameter"):
        P.validate({"imagetopic": "/x"})
    with pytest.raises(ValueError, match="outside"):
        P.validate({"fallback_camera_pitch_deg": 120.0})


def test_rviz_config_has_occupancy_displays():
    config = yaml.safe_load((ROOT / "rviz" / "discene.rviz").read_text())
    displays = {d["Class"]: d for d in config["Visualization Manager"]["Displays"]}
    cloud = displays["rviz_default_plugins/PointCloud2"]
    # relative, as the node's: RViz in the node's namespace finds them (tests/test_ros_launch.py)
    assert cloud["Topic"]["Value"] == P.TOPIC_CLOUD and cloud["Color Transformer"] == "RGB8"
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == P.TOPIC_MARKERS
    assert displays["rviz_default_plugins/Pose"]["Topic"]["Value"] == P.TOPIC_GRID_POSE


def test_package_xml_uses_only_rosdep_keys_that_exist():
    """`rosdep install` stops on a key it does not know (ament_python was one): every dependency must be
    a release package or rosdep key of Humble and Jazzy (tests/data/rosdep_keys.yaml, from rosdistro)."""
    known = yaml.safe_load((ROOT / "tests" / "data" / "rosdep_keys.yaml").read_text())["distros"]
    root = ET.parse(ROOT / "package.xml").getroot()
    deps = [el.text.strip() for el in root if el.tag.endswith("depend")]
    assert "ament_python" not in deps and "tf2_ros" not in deps  # the C++ package; Python is tf2_ros_py
    for required in ("tf2_ros_py", "rcl_interfaces", "builtin_interfaces", "ros2launch", "python3-pil"):
        assert required in deps
    for distro, keys in known.items():
        assert not set(deps) - set(keys), (distro, set(deps) - set(keys))
    assert root.find("export/build_type").text == "ament_python"


def test_robot_side_modules_do_not_import_training_or_rosbags():
    """A robot installs no training extras and needs no rosbags: the node side must not import them."""
    code = ("import sys, discene_ros.node, discene_ros.entry, discene_ros.processing, "
            "discene_ros.msg_decode, discene_ros.msg_encode; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'training', 'rosbags', 'cv2', 'scipy'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_with_real_rclpy_where_installed():
    """On a machine with ROS 2 sourced: the node starts under real rclpy with read-only parameters."""
    rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed here")
    from rclpy.parameter import Parameter

    rclpy.init()
    try:
        node = discene_ros.node.OccupancyNode(pipeline=pipeline_for(BlockBackend()))
        try:
            assert node.get_parameter("world_frame").value == P.defaults()["world_frame"]
            rng = node.describe_parameter("score_threshold").floating_point_range[0]
            assert (rng.from_value, rng.to_value) == P.PARAMS_BY_NAME["score_threshold"].range
            (result,) = node.set_parameters([Parameter("world_frame", value="map")])
            assert not result.successful
            assert node.get_parameter("pipelining").value == "auto" and node.describe_parameter("pipelining").read_only
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown()
