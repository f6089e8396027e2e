"""rclpy wiring against its API contract (fake rclpy module tree), parameter file, launch file, RViz config.

No ROS 2 is installed here: these tests check what the node asks of rclpy (parameters with
descriptors and ranges, QoS, topics, init/shutdown order) and that frames fed to its callbacks
come out as valid ROS 2 messages (serialised with the real Humble definitions). They do not
prove behaviour inside a real ROS 2 graph.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.typesys import Stores, get_typestore
from test_ros_support import BlockBackend, FakeRos, install_fake_rclpy, pipeline_for

from discene_ros import conversions as conv
from discene_ros import node as node_mod
from discene_ros import params as P
from discene_ros.msg_factory import TypestoreFactory

ROOT = Path(__file__).resolve().parents[1]
STORE = get_typestore(Stores.ROS2_HUMBLE)
F = TypestoreFactory(STORE)
K = np.array([[100.0, 0, 64], [0, 100, 48], [0, 0, 1]])


def test_module_imports_without_ros():
    assert "rclpy" not in sys.modules or isinstance(sys.modules["rclpy"], types.ModuleType)
    with pytest.raises(ImportError, match="source your ROS 2"):
        node_mod.make_node_class()


def _wait(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _as_numpy_data(msg):
    """rclpy keeps uint8[] as array.array('B'); the typestore serialiser wants numpy."""
    msg.data = np.frombuffer(msg.data, np.uint8)
    return msg


@pytest.fixture()
def fake_node(monkeypatch):
    ros = FakeRos(STORE, overrides={"world_frame": "map", "warn_throttle_s": 60.0, "use_fallback_pose": False})
    install_fake_rclpy(monkeypatch, ros)
    backend = BlockBackend(delay_s=0.03)
    node = node_mod.make_node_class()(pipeline=pipeline_for(backend))
    yield ros, node, backend
    node.destroy_node()


def test_parameters_qos_topics(fake_node):
    ros, node, _ = fake_node
    assert node.name == P.NODE_NAME
    assert list(node.parameters) == [p.name for p in P.PARAMETERS]
    for spec in P.PARAMETERS:
        default, descriptor = node.parameters[spec.name]
        assert default == spec.default and descriptor.description == spec.description
        if spec.range:
            (rng,) = descriptor.floating_point_range if spec.kind == "float" else descriptor.integer_range
            assert (rng.from_value, rng.to_value) == spec.range
    assert P.defaults()["score_threshold"] < 0  # default: keep the model's own threshold
    assert node.pipeline.config.score_threshold == node.pipeline.backend.config.score_threshold == 0.5
    assert node.cfg["world_frame"] == "map"
    subs = {topic: (t.msgtype, qos) for t, topic, _, qos in node.subscriptions}
    assert set(subs) == {"/camera/color/image_raw", "/camera/color/camera_info"}  # no depth: use_depth false
    assert subs["/camera/color/image_raw"][0] == "sensor_msgs/msg/Image"
    for _, qos in subs.values():
        assert qos.depth == 1 and qos.reliability == "best_effort" and qos.history == "keep_last"
    pubs = {p.topic: p.msg_type.msgtype for p in node.publishers}
    assert pubs == {P.TOPIC_CLOUD: "sensor_msgs/msg/PointCloud2", P.TOPIC_GRID_POSE: "geometry_msgs/msg/PoseStamped",
                    P.TOPIC_MARKERS: "visualization_msgs/msg/MarkerArray",
                    P.TOPIC_DIAGNOSTICS: "diagnostic_msgs/msg/DiagnosticArray"}
    assert node.timers[0][0] == P.defaults()["diagnostics_period_s"]


def test_compressed_and_depth_subscriptions(monkeypatch):
    ros = FakeRos(STORE, overrides={"use_compressed": True, "use_depth": True})
    install_fake_rclpy(monkeypatch, ros)
    cfg = BlockBackend().config
    cfg.use_depth = True
    node = node_mod.make_node_class()(pipeline=pipeline_for(BlockBackend(cfg)))
    try:
        subs = {topic: t.msgtype for t, topic, _, _ in node.subscriptions}
        assert subs["/camera/color/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
        assert subs["/camera/aligned_depth_to_color/image_raw"] == "sensor_msgs/msg/Image"
    finally:
        node.destroy_node()


def test_bad_parameter_value_is_refused(monkeypatch):
    install_fake_rclpy(monkeypatch, FakeRos(STORE, overrides={"score_threshold": 1.5}))
    with pytest.raises(ValueError, match="score_threshold"):
        node_mod.make_node_class()(pipeline=pipeline_for(BlockBackend()))


def test_non_negative_score_threshold_overrides_the_models(monkeypatch):
    install_fake_rclpy(monkeypatch, FakeRos(STORE, overrides={"score_threshold": 0.3}))
    node = node_mod.make_node_class()(pipeline=pipeline_for(BlockBackend()))
    try:
        assert node.pipeline.config.score_threshold == 0.3
    finally:
        node.destroy_node()


def test_frames_flow_drop_and_publish(fake_node):
    ros, node, backend = fake_node
    ros.transforms[("map", "cam")] = conv.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    info = conv.k_to_camera_info(F, K, 96, 128, "cam", 0)
    node.on_camera_info(info)
    rgb = np.full((96, 128, 3), 90, np.uint8)
    for i in range(20):  # 20 frames in ~0.1 s against a 30 ms backend
        node.on_image(conv.rgb_to_image(F, rgb, "cam", 1_000 + i))
        time.sleep(0.005)
    pubs = {p.topic: p for p in node.publishers}
    assert _wait(lambda: node.stats.processed + node.stats.dropped == 20)
    assert node.stats.dropped > 0 and node.stats.processed == backend.calls
    clouds = pubs[P.TOPIC_CLOUD].published
    assert len(clouds) == node.stats.processed and conv.stamp_to_ns(clouds[-1].header.stamp) == 1_019
    cloud = clouds[-1]
    assert cloud.header.frame_id == "map" and cloud.width == 40
    assert cloud.data.typecode == "B"  # rclpy's uint8[] type
    back = STORE.deserialize_cdr(STORE.serialize_cdr(_as_numpy_data(cloud), cloud.__msgtype__), cloud.__msgtype__)
    assert set(conv.pointcloud2_to_array(back)["label"]) == {3}
    period = P.defaults()["marker_period"]
    assert len(pubs[P.TOPIC_MARKERS].published) == -(-len(clouds) // period)  # first frame, then every N-th
    node.publish_diagnostics()
    diag = pubs[P.TOPIC_DIAGNOSTICS].published[-1]
    values = {kv.key: kv.value for kv in diag.status[0].values}
    assert int(values["dropped"]) == node.stats.dropped and float(values["fps"]) > 0
    STORE.serialize_cdr(diag, diag.__msgtype__)


def test_bad_frames_are_skipped_counted_and_throttled(fake_node):
    ros, node, _ = fake_node
    rgb = np.full((96, 128, 3), 90, np.uint8)
    node.on_image(conv.rgb_to_image(F, rgb, "cam", 1))  # no camera info yet
    assert _wait(lambda: node.stats.skipped["missing_camera_info"] == 1)
    node.on_camera_info(conv.k_to_camera_info(F, K, 96, 128, "cam", 0))
    for i in range(3):  # no TF and the fallback is disabled
        node.on_image(conv.rgb_to_image(F, rgb, "cam", 10 + i))
        assert _wait(lambda i=i: node.stats.skipped["missing_tf"] == i + 1)
    ros.transforms[("map", "cam")] = conv.matrix_to_transform_stamped(F, np.eye(4), "map", "cam", 0)
    bad = conv.rgb_to_image(F, rgb, "cam", 20)
    bad.encoding = "bayer_rggb8"
    node.on_image(bad)
    short = conv.rgb_to_image(F, rgb, "cam", 21)
    short.data = short.data[:100]
    time.sleep(0.3)
    node.on_image(short)
    wrong_size = conv.rgb_to_image(F, np.zeros((50, 128, 3), np.uint8), "cam", 22)
    time.sleep(0.3)
    node.on_image(wrong_size)
    assert _wait(lambda: sum(node.stats.skipped.values()) == 7)
    assert node.stats.skipped["unsupported_encoding"] == 1 and node.stats.skipped["bad_image_size"] == 1
    assert node.stats.skipped["bad_camera_info"] == 1 and node.stats.processed == 0
    warnings = [text for level, text in node.logger.records if level == "warn"]
    assert sum("missing_tf" in w for w in warnings) == 1  # throttled: 3 frames, one warning
    assert len(warnings) == 5


def test_main_init_spin_shutdown_order(monkeypatch):
    ros = FakeRos(STORE)
    install_fake_rclpy(monkeypatch, ros)
    monkeypatch.setattr(node_mod, "build_pipeline", lambda cfg: pipeline_for(BlockBackend()))
    assert node_mod.main([]) == 0
    assert ros.calls == ["init", "spin", "try_shutdown"]
    assert ros.nodes[0].destroyed


def test_main_reports_a_missing_model_and_shuts_down(monkeypatch, tmp_path, capsys):
    ros = FakeRos(STORE, overrides={"model_path": str(tmp_path / "missing.pt")})
    install_fake_rclpy(monkeypatch, ros)
    assert node_mod.main([]) == 1
    assert ros.calls == ["init", "try_shutdown"]
    assert "missing.pt not found" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(monkeypatch, tmp_path):
    cfg = P.defaults()
    cfg["model_path"] = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="model_path"):
        node_mod.build_pipeline(cfg)


def test_yaml_mirrors_the_parameter_table():
    values = P.load_yaml_params(ROOT / "config" / "occupancy.yaml")
    assert values == P.defaults()
    assert P.validate(values) == P.defaults()
    with pytest.raises(ValueError, match="unknown parameter"):
        P.validate({"imagetopic": "/x"})
    with pytest.raises(ValueError, match="outside"):
        P.validate({"fallback_camera_pitch_deg": 120.0})


class _Recorder:
    """Fake launch / launch_ros classes: keep their constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_launch_file_structure(monkeypatch):
    """Imports launch/occupancy.launch.py with recording stand-ins of launch and launch_ros."""
    modules = {}
    for name, classes in {
        "launch": ["LaunchDescription"], "launch.actions": ["DeclareLaunchArgument"],
        "launch.conditions": ["IfCondition"], "launch.substitutions": ["LaunchConfiguration", "PathJoinSubstitution"],
        "launch_ros": [], "launch_ros.actions": ["Node"], "launch_ros.parameter_descriptions": ["ParameterValue"],
        "launch_ros.substitutions": ["FindPackageShare"],
    }.items():
        mod = types.ModuleType(name)
        for cls in classes:
            setattr(mod, cls, type(cls, (_Recorder,), {}))
        modules[name] = mod
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("occupancy_launch", ROOT / "launch" / "occupancy.launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    desc = launch.generate_launch_description()
    actions = desc.args[0]
    declared = {a.args[0]: a.kwargs["default_value"] for a in actions if type(a).__name__ == "DeclareLaunchArgument"}
    assert {"model_path", "backend", "image_topic", "camera_info_topic", "depth_topic", "use_depth", "world_frame",
            "score_threshold", "rviz", "params_file"} <= set(declared)
    yaml_defaults = P.defaults()
    for name, default, kind, _ in launch.ARGUMENTS:
        if kind is not None:  # launch defaults equal the YAML defaults, typed like the node parameter
            assert yaml.safe_load(default or "''") == yaml_defaults[name], name
            assert P.PARAMS_BY_NAME[name].kind == {str: "string", bool: "bool", float: "float"}[kind]
    nodes = [a for a in actions if type(a).__name__ == "Node"]
    occ, rviz = nodes
    assert (occ.kwargs["package"], occ.kwargs["executable"]) == ("discene_ros", "occupancy_node")
    params_file, overrides = occ.kwargs["parameters"]
    assert params_file.args == ("params_file",)
    assert overrides["use_depth"].kwargs["value_type"] is bool and overrides["model_path"].kwargs["value_type"] is str
    assert rviz.kwargs["executable"] == "rviz2" and rviz.kwargs["condition"].args[0].args == ("rviz",)
    assert rviz.kwargs["arguments"][0] == "-d" and rviz.kwargs["arguments"][1].args[0][1:] == ["rviz", "discene.rviz"]
    ast.parse((ROOT / "launch" / "occupancy.launch.py").read_text())  # and it is plain Python


def test_rviz_config_has_occupancy_displays():
    config = yaml.safe_load((ROOT / "rviz" / "discene.rviz").read_text())
    displays = {d["Class"]: d for d in config["Visualization Manager"]["Displays"]}
    cloud = displays["rviz_default_plugins/PointCloud2"]
    assert cloud["Topic"]["Value"] == "/" + P.TOPIC_CLOUD and cloud["Color Transformer"] == "RGB8"
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/" + P.TOPIC_MARKERS
    assert displays["rviz_default_plugins/Pose"]["Topic"]["Value"] == "/" + P.TOPIC_GRID_POSE
    assert config["Visualization Manager"]["Global Options"]["Fixed Frame"] == P.defaults()["world_frame"]
    # setup.py installs these files where ros2 launch finds them
    setup = (ROOT / "setup.py").read_text()
    assert "launch/*.launch.py" in setup and "rviz/*.rviz" in setup and "config/*.yaml" in setup


def test_robot_side_modules_do_not_import_training_or_rosbags():
    """A robot installs no training extras and needs no rosbags: the node side must not import them."""
    import subprocess

    code = ("import sys, discene_ros.node, discene_ros.processing, discene_ros.conversions, discene_ros.msg_factory; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'training', 'rosbags', 'rclpy', 'cv2', 'scipy'}); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_with_real_rclpy_where_installed():
    """On a machine with ROS 2 sourced: the node starts under real rclpy with its declared parameters."""
    rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed here")
    rclpy.init()
    try:
        node = node_mod.make_node_class()(pipeline=pipeline_for(BlockBackend()))
        try:
            assert node.get_parameter("world_frame").value == P.defaults()["world_frame"]
            rng = node.describe_parameter("score_threshold").floating_point_range[0]
            assert (rng.from_value, rng.to_value) == P.PARAMS_BY_NAME["score_threshold"].range
        finally:
            node.destroy_node()
    finally:
        rclpy.try_shutdown()
