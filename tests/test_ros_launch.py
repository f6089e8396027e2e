"""launch/occupancy.launch.py run by the real launch / launch_ros of Humble and Jazzy.

The upstream Python packages are in ../shared/ros2-python (see its README); where that folder is
absent the tests skip. The launch file is included as ``ros2 launch`` does, its Node actions
expand their parameters, and the node's effective parameters are computed from the parameter
files it would get with rcl's and rclpy's rule (``effective_parameters``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import yaml

from discene_ros import launch_params
from discene_ros import params as P

ROOT = Path(__file__).resolve().parents[1]
ROS2_PYTHON = ROOT.parent / "shared" / "ros2-python"
DISTROS = ("humble", "jazzy")

STUBS = {  # what launch_ros imports at import time from rclpy and two interface packages; none of it runs here
    "rclpy/__init__.py": "Context = object\ndef init(*a, **k): pass\ndef shutdown(*a, **k): pass\n"
                   "def create_node(*a, **k): raise RuntimeError('no rclpy here')\n",
    "rclpy/executors.py": "class SingleThreadedExecutor:\n    pass\n",
    "rclpy/parameter.py": "class Parameter:\n    pass\n",
    "rclpy/validate_namespace.py": "def validate_namespace(namespace):\n    return True\n",
    "rclpy/validate_node_name.py": "def validate_node_name(node_name):\n    return True\n",
    "rclpy/logging.py": "def get_logging_directory():\n    return '/tmp'\n",
    "lifecycle_msgs/__init__.py": "",
    "lifecycle_msgs/msg.py": "from interface_stub import __getattr__  # noqa: F401\n",
    "lifecycle_msgs/srv.py": "from interface_stub import __getattr__  # noqa: F401\n",
    "composition_interfaces/__init__.py": "",
    "composition_interfaces/srv.py": "from interface_stub import __getattr__  # noqa: F401\n",
    "interface_stub.py": "class Anything(type):\n    def __getattr__(cls, name):\n        return cls\n\n\n"
                         "def __getattr__(name):\n    return Anything(name, (), {})\n",
}


@dataclass(frozen=True)
class LaunchEnv:
    """Where the probe runs: ``base`` (the rclpy stub, the probes' logs), the package ``prefix``, and one
    serving probe per distro (``tests/launch_probe.py --serve``), shared by the module's tests."""

    base: Path
    prefix: Path
    probes: dict = field(default_factory=dict, compare=False)

    @property
    def shipped(self) -> Path:
        """The installed launch file (what ``ros2 launch discene_ros occupancy.launch.py`` runs)."""
        return self.prefix / "share" / "discene_ros" / "launch" / "occupancy.launch.py"

    def ask(self, distro: str, argv: list[str]) -> dict:
        """One launch by the distro's probe: its reply, ``{"nodes": [...]}`` or ``{"error": traceback}``."""
        probe = self.probes.get(distro)
        if probe is None or probe.poll() is not None:
            src = ROS2_PYTHON / distro
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([
                str(src / "launch"), str(src / "launch_ros"), str(src / "ament_index_python"), str(self.base / "stub"),
                str(ROOT)]), TMPDIR=str(self.base / "tmp"))  # launch_ros's own temporary files stay in here
            log = open(self.base / f"probe_{distro}.log", "a")  # the probe's stderr, read back if it ends
            probe = subprocess.Popen([sys.executable, str(ROOT / "tests" / "launch_probe.py"), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                     cwd=self.base)
            log.close()
            self.probes[distro] = probe
        request = {"argv": argv, "env": {"AMENT_PREFIX_PATH": str(self.prefix), "INNER_LAUNCH": str(self.shipped)}}
        probe.stdin.write(json.dumps(request) + "\n")
        probe.stdin.flush()
        watchdog = threading.Timer(120, probe.kill)  # a launch that hangs ends its probe, not the suite
        watchdog.start()
        try:
            line = probe.stdout.readline()
        finally:
            watchdog.cancel()
        if not line:
            raise RuntimeError(f"the {distro} launch probe ended: {(self.base / f'probe_{distro}.log').read_text()[-3000:]}")
        return json.loads(line)


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
    """Environment for the probe: a package prefix with this package's share files, the rclpy stub."""
    if not ROS2_PYTHON.is_dir():
        pytest.skip(f"{ROS2_PYTHON} is absent: the real launch/launch_ros sources are needed for these tests")
    pytest.importorskip("lark", reason="the real launch package imports lark (pip install -e '.[dev]')")
    pytest.importorskip("osrf_pycommon", reason="the real launch package imports osrf_pycommon")
    base = tmp_path_factory.mktemp("launch_env")
    (base / "tmp").mkdir()
    for name, text in STUBS.items():
        (base / "stub" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "stub" / name).write_text(text)
    prefix = base / "prefix"
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    (index / "discene_ros").write_text("")
    (index / "rviz2").write_text("")
    share = prefix / "share" / "discene_ros"
    for folder in ("config", "rviz", "launch"):
        (share / folder).mkdir(parents=True)
        for f in (ROOT / folder).iterdir():
            (share / folder / f.name).write_bytes(f.read_bytes())
    for pkg in ("discene_ros", "rviz2"):  # ExecutableInPackage looks in lib/<package>
        (prefix / "lib" / pkg).mkdir(parents=True)
        exe = prefix / "lib" / pkg / ("occupancy_node" if pkg == "discene_ros" else "rviz2")
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    env = LaunchEnv(base, prefix)
    yield env
    for probe in env.probes.values():
        probe.stdin.close()
        probe.wait(timeout=30)


def run_launch(launch_env: LaunchEnv, distro: str, *args: str, launch_file: Path | None = None) -> dict:
    """{node name: {"namespace", "cmd": [...], "params": effective parameters or None, "remaps": {from: to}}}
    from the real launch
    code, for the shipped launch file or ``launch_file`` (which finds the shipped one in $INNER_LAUNCH)."""
    reply = launch_env.ask(distro, [str(launch_file or launch_env.shipped), *args])
    if "error" in reply:
        raise RuntimeError(reply["error"][-3000:])
    out = {}
    for node in reply["nodes"]:
        out[node["name"]] = {"namespace": node["namespace"], "cmd": node["cmd"],
                             "params": effective_parameters(node["params"], node["name"], node["namespace"]),
                             "remaps": dict(node["remaps"]), "respawn": (node["respawn"], node["respawn_delay"])}
    return out


def effective_parameters(arguments: list | None, node_name: str, namespace: str = "/") -> dict | None:
    """rclpy's parameter overrides for a node from its ``--params-file`` arguments (in order). rcl reads all
    files into one table of node keys: a key seen before is reused, a new one appended (parse.c, find_node);
    rclpy applies the keys in that order, later wins, each matched to the node's full name with ``/*`` one
    name token and ``/**`` any (rclpy node.cpp, _populate_node_parameters_from_rcl_params)."""
    if arguments is None:
        return None
    if not namespace.startswith("/"):  # launch_ros's "<node_namespace_unspecified>": the node's own, here "/"
        namespace = "/"
    fqn = namespace.rstrip("/") + "/" + node_name
    table = {}
    for _, is_file, text in arguments:
        assert is_file, "the launch file passes parameters as files only"
        for key, entry in (yaml.safe_load(text) or {}).items():
            table.setdefault(key, {}).update(entry["ros__parameters"])
    out = {}
    for key, parameters in table.items():
        pattern = (key if key.startswith("/") else "/" + key).replace("/*", r"(/\w+)")
        if re.fullmatch(pattern, fqn, re.ASCII):
            out.update(parameters)
    return out


def params_file(path: Path, entries: dict) -> Path:
    """A parameter file with these node entries in this order (safe_dump would sort the keys)."""
    path.write_text(yaml.safe_dump({key: {"ros__parameters": values} for key, values in entries.items()},
                                   sort_keys=False))
    return path


@pytest.mark.parametrize("distro", DISTROS)
def test_defaults_come_from_the_shipped_params_file(launch_env, distro):
    nodes = run_launch(launch_env, distro)
    assert set(nodes) == {P.NODE_NAME}  # rviz is off by default
    assert nodes[P.NODE_NAME]["params"] == P.defaults()


@pytest.mark.parametrize("distro", DISTROS)
def test_a_users_params_file_is_not_overridden_by_launch_defaults(launch_env, distro, tmp_path):
    mine = tmp_path / "my_robot.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"world_frame": "map", "use_depth": True,
                                                                 "score_threshold": 0.4}}}))
    params = run_launch(launch_env, distro, f"params_file:={mine}")[P.NODE_NAME]["params"]
    assert params == {"world_frame": "map", "use_depth": True, "score_threshold": 0.4}


@pytest.mark.parametrize("distro", DISTROS)
def test_single_overrides_change_only_themselves(launch_env, distro, tmp_path):
    nodes = run_launch(launch_env, distro, "world_frame:=map", "use_depth:=true", "score_threshold:=0.3",
                       "image_topic:=/cam/123", "model_path:=/models/lite.onnx")
    expected = {**P.defaults(), "world_frame": "map", "use_depth": True, "score_threshold": 0.3,
                "image_topic": "/cam/123", "model_path": "/models/lite.onnx"}
    assert nodes[P.NODE_NAME]["params"] == expected
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({P.NODE_NAME: {"ros__parameters": {"world_frame": "map", "backend": "onnxruntime"}}}))
    params = run_launch(launch_env, distro, f"params_file:={mine}", "world_frame:=odom")[P.NODE_NAME]["params"]
    assert params == {"world_frame": "odom", "backend": "onnxruntime"}  # the given argument wins over the file


@pytest.mark.parametrize("distro", DISTROS)
def test_an_empty_argument_is_refused_so_a_file_value_is_undone_by_naming_the_default(launch_env, distro, tmp_path):
    """``ros2 launch`` refuses ``name:=`` (the probe follows ros2launch's rule), so the README tells users to
    name the value an empty parameter stands for; here the camera_info topic beside the image."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"camera_info_topic": "/other/camera_info"}}}))
    with pytest.raises(RuntimeError, match="malformed launch argument 'camera_info_topic:='"):
        run_launch(launch_env, distro, f"params_file:={mine}", "camera_info_topic:=")
    derived = P.camera_info_topic_for(P.defaults()["image_topic"])
    params = run_launch(launch_env, distro, f"params_file:={mine}", f"camera_info_topic:={derived}")[P.NODE_NAME]["params"]
    assert params == {"camera_info_topic": derived}
    including = tmp_path / "including.launch.py"  # an empty string from an including file: not given
    including.write_text(NAMESPACED.replace('("world_frame", "odom")', f'("params_file", "{mine}"), ("camera_info_topic", "")'))
    assert run_launch(launch_env, distro, launch_file=including)[P.NODE_NAME]["params"] == {
        "camera_info_topic": "/other/camera_info"}


@pytest.mark.parametrize("distro", DISTROS)
def test_the_parameter_file_of_given_arguments_is_removed_when_the_launch_shuts_down(launch_env, distro, tmp_path):
    """Each launch with an argument writes a parameter file (and one for RViz's use_sim_time); it lives as long
    as the launch (a respawned node reads it again) and not longer, while the params_file is left alone."""
    mine = params_file(tmp_path / "mine.yaml", {"discene_occupancy": {"world_frame": "map"}})
    reply = launch_env.ask(distro, [str(launch_env.shipped), f"params_file:={mine}", "world_frame:=odom"])
    node = next(node for node in reply["nodes"] if node["name"] == "discene_occupancy")
    written = [path for path, _, _ in node["params"] if path != str(mine)]
    assert len(written) == 1 and "odom" in node["params"][1][2]  # it was there while the launch ran
    assert reply["kept_after_shutdown"] == [str(mine)]
    reply = launch_env.ask(distro, [str(launch_env.shipped), "rviz:=true", "use_sim_time:=true"])
    rviz = next(node for node in reply["nodes"] if node["name"] == "rviz2")
    assert len(rviz["params"]) == 1 and "use_sim_time" in rviz["params"][0][2]  # RViz's file: removed as well
    assert reply["kept_after_shutdown"] == [str(launch_env.shipped.parents[1] / "config" / "occupancy.yaml")]


@pytest.mark.parametrize("distro", DISTROS)
def test_speed_options_are_launch_arguments(launch_env, distro):
    params = run_launch(launch_env, distro, "fp16:=true", "compile:=true", "tf32:=true",
                        "tf32_convolutions:=true", "cuda_graph:=false")[P.NODE_NAME]["params"]
    assert {k: params[k] for k in ("fp16", "compile", "tf32", "tf32_convolutions", "cuda_graph")} == {
        "fp16": True, "compile": True, "tf32": True, "tf32_convolutions": True, "cuda_graph": False}


@pytest.mark.parametrize("distro", DISTROS)
def test_rectified_is_a_launch_argument_kept_as_its_word(launch_env, distro):
    """rectified:=true reaches the node as the string parameter's word, not as the bool rcl would read."""
    for word in P.RECTIFIED_MODES:
        params = run_launch(launch_env, distro, f"rectified:={word}")[P.NODE_NAME]["params"]
        assert params["rectified"] == word and P.validate({"rectified": params["rectified"]})["rectified"] == word


@pytest.mark.parametrize("distro", DISTROS)
def test_booleans_are_true_false_and_1_is_refused_clearly(launch_env, distro):
    params = run_launch(launch_env, distro, "use_fallback_pose:=false", "use_compressed:=True")[P.NODE_NAME]["params"]
    assert params["use_fallback_pose"] is False and params["use_compressed"] is True
    with pytest.raises(RuntimeError, match="booleans are true or false"):
        run_launch(launch_env, distro, "use_depth:=1")


@pytest.mark.parametrize("distro", DISTROS)
def test_rviz_gets_the_effective_world_frame(launch_env, distro, tmp_path):
    nodes = run_launch(launch_env, distro, "rviz:=true")
    cmd = nodes["rviz2"]["cmd"]
    assert cmd[cmd.index("-f") + 1] == P.defaults()["world_frame"]
    assert cmd[cmd.index("-d") + 1].endswith("share/discene_ros/rviz/discene.rviz")
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"world_frame": "map"}}}))
    cmd = run_launch(launch_env, distro, "rviz:=true", f"params_file:={mine}")["rviz2"]["cmd"]
    assert cmd[cmd.index("-f") + 1] == "map"
    cmd = run_launch(launch_env, distro, "rviz:=true", "world_frame:=camera_init")["rviz2"]["cmd"]
    assert cmd[cmd.index("-f") + 1] == "camera_init"


@pytest.mark.parametrize("distro", DISTROS)
@pytest.mark.parametrize("keys", [(f"/{P.NODE_NAME}", "/**"), (f"/**/{P.NODE_NAME}", f"/{P.NODE_NAME}", "/**")])
def test_a_given_argument_wins_over_every_entry_of_the_params_file(launch_env, distro, tmp_path, keys):
    """rcl reuses a node key it has seen: launch arguments filed under the node's own name, which the user's
    file already has before its /**, were applied before /** and lost to it."""
    mine = params_file(tmp_path / "mine.yaml", {key: {"world_frame": "map", "backend": "onnxruntime"} for key in keys})
    nodes = run_launch(launch_env, distro, f"params_file:={mine}", "world_frame:=odom", "rviz:=true")
    assert nodes[P.NODE_NAME]["params"] == {"world_frame": "odom", "backend": "onnxruntime"}
    cmd = nodes["rviz2"]["cmd"]
    assert cmd[cmd.index("-f") + 1] == "odom"


@pytest.mark.parametrize("distro", DISTROS)
def test_rviz_follows_the_params_file_entry_that_rclpy_applies_last(launch_env, distro, tmp_path):
    """rclpy applies the keys in their order, so a /** after the node's own entry wins over it."""
    mine = params_file(tmp_path / "mine.yaml", {
        P.NODE_NAME: {"world_frame": "odom", "image_topic": "/usb_cam/image_raw"},
        "/**": {"world_frame": "map"}})
    nodes = run_launch(launch_env, distro, f"params_file:={mine}", "rviz:=true")
    assert nodes[P.NODE_NAME]["params"] == {"world_frame": "map", "image_topic": "/usb_cam/image_raw"}
    cmd = nodes["rviz2"]["cmd"]
    assert cmd[cmd.index("-f") + 1] == "map"
    assert set(nodes["rviz2"]["remaps"].values()) == {"/usb_cam/image_raw", "/usb_cam/camera_info"}


NAMESPACED = """
import os
from launch import LaunchDescription
from launch.actions import GroupAction, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch_ros.actions import PushRosNamespace


def generate_launch_description():
    return LaunchDescription([GroupAction([PushRosNamespace("front"), IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.environ["INNER_LAUNCH"]), launch_arguments=[("world_frame", "odom")])])])
"""


@pytest.mark.parametrize("distro", DISTROS)
def test_a_namespace_pushed_by_an_including_launch_file_reaches_the_node(launch_env, distro, tmp_path):
    """Two cameras = the launch file included twice under PushRosNamespace: each node in its namespace
    (its outputs are relative topics), the given arguments filed under its own full name."""
    wrapper = tmp_path / "front.launch.py"
    wrapper.write_text(NAMESPACED)
    node = run_launch(launch_env, distro, launch_file=wrapper)[P.NODE_NAME]
    assert node["namespace"] == "/front"
    assert node["params"] == {**P.defaults(), "world_frame": "odom"}
    assert not P.TOPIC_CLOUD.startswith("/") and not P.TOPIC_MARKERS.startswith("/")


@pytest.mark.parametrize("distro", DISTROS)
def test_rviz_under_a_namespace_follows_the_entries_for_that_namespace(launch_env, distro, tmp_path):
    """Keys naming the namespaced node (/front/..., /*/...) apply to it; the root node's own key does not."""
    mine = params_file(tmp_path / "mine.yaml", {
        f"/front/{P.NODE_NAME}": {"world_frame": "map", "image_topic": "/front/image_raw"},
        f"/*/{P.NODE_NAME}": {"camera_info_topic": "/front/calibration"},
        f"/{P.NODE_NAME}": {"world_frame": "wrong", "image_topic": "/wrong/image_raw"}})
    wrapper = tmp_path / "front.launch.py"
    wrapper.write_text(NAMESPACED.replace('("world_frame", "odom")', f'("params_file", "{mine}"), ("rviz", "true")'))
    nodes = run_launch(launch_env, distro, launch_file=wrapper)
    assert nodes[P.NODE_NAME]["params"] == {"world_frame": "map", "image_topic": "/front/image_raw",
                                            "camera_info_topic": "/front/calibration"}
    cmd = nodes["rviz2"]["cmd"]
    assert cmd[cmd.index("-f") + 1] == "map"
    assert set(nodes["rviz2"]["remaps"].values()) == {"/front/image_raw", "/front/calibration"}
    given = f'("params_file", "{mine}"), ("world_frame", "odom")'
    wrapper.write_text(NAMESPACED.replace('("world_frame", "odom")', given))
    assert run_launch(launch_env, distro, launch_file=wrapper)[P.NODE_NAME]["params"]["world_frame"] == "odom"


def test_parameter_file_keys_as_rcl_joins_them_and_rclpy_matches_them(tmp_path):
    """Nested node keys are joined with "/" and nested parameters with "." (rcl); /* is one token, /** any,
    a key without a leading / is read with one (rclpy)."""
    path = tmp_path / "nested.yaml"
    path.write_text("front:\n  discene_occupancy:\n    ros__parameters:\n      qos: {depth: 1}\n"
                    "/**:\n  ros__parameters: {a: 1}\n")
    assert launch_params.read_entries(str(path)) == [("front/discene_occupancy", {"qos.depth": 1}), ("/**", {"a": 1})]
    for key, root, front in (("/**", True, True), ("/*", True, False), ("discene_occupancy", True, False),
                             ("/*/discene_occupancy", False, True), ("front/discene_occupancy", False, True),
                             ("/**/discene_occupancy", True, True), ("/**/front/discene_occupancy", False, True)):
        assert launch_params.key_matches(key, "/discene_occupancy") is root, key
        assert launch_params.key_matches(key, "/front/discene_occupancy") is front, key
    entries = [("/front/discene_occupancy", {}), ("/**/front/discene_occupancy", {})]
    assert launch_params.winning_key(entries, "/front/discene_occupancy") == "/**/**/front/discene_occupancy"


def resolve(topic: str, namespace: str) -> str:
    """rcl's expansion of a topic name for a node in ``namespace`` (no ``~`` or substitutions here)."""
    return topic if topic.startswith("/") else namespace.rstrip("/") + "/" + topic


def rviz_displays() -> dict:
    config = yaml.safe_load((ROOT / "rviz" / "discene.rviz").read_text())
    return {d["Class"]: d for d in config["Visualization Manager"]["Displays"]}


@pytest.mark.parametrize("distro", DISTROS)
def test_rviz_under_a_namespace_shows_that_nodes_topics(launch_env, distro, tmp_path):
    """RViz started by the included launch file runs in the same namespace, and its displays name the
    node's outputs relative to it: /front/occupancy/points, not the unnamespaced /occupancy/points."""
    wrapper = tmp_path / "front.launch.py"
    wrapper.write_text(NAMESPACED.replace('("world_frame", "odom")', '("world_frame", "odom"), ("rviz", "true")'))
    nodes = run_launch(launch_env, distro, launch_file=wrapper)
    node_ns, rviz_ns = nodes[P.NODE_NAME]["namespace"], nodes["rviz2"]["namespace"]
    assert node_ns == rviz_ns == "/front"
    displays = rviz_displays()
    names = {d["Name"] for d in displays.values()}
    assert set(displays["rviz_default_plugins/Camera"]["Visibility"]) <= names | {"Value"}  # display names
    for plugin, topic in (("PointCloud2", P.TOPIC_CLOUD), ("MarkerArray", P.TOPIC_MARKERS), ("Pose", P.TOPIC_GRID_POSE)):
        shown = displays[f"rviz_default_plugins/{plugin}"]["Topic"]["Value"]
        assert resolve(shown, rviz_ns) == resolve(topic, node_ns) == "/front/" + topic
    assert resolve(displays["rviz_default_plugins/PointCloud2"]["Topic"]["Value"], "/") == "/" + P.TOPIC_CLOUD


@pytest.mark.parametrize("distro", DISTROS)
def test_rvizs_camera_display_is_remapped_to_the_nodes_image_and_camera_info(launch_env, distro, tmp_path):
    """The Camera display draws the occupancy over the image; RViz finds its camera_info beside the image
    topic (image_transport's rule), so both are remapped to what the node reads."""
    camera = rviz_displays()["rviz_default_plugins/Camera"]["Topic"]["Value"]
    info = P.camera_info_topic_for(camera)
    assert run_launch(launch_env, distro, "rviz:=true")["rviz2"]["remaps"] == {
        camera: P.defaults()["image_topic"], info: "/camera/color/camera_info"}
    remaps = run_launch(launch_env, distro, "rviz:=true", "image_topic:=/front_cam/image_raw/compressed")["rviz2"]["remaps"]
    assert remaps == {camera: "/front_cam/image_raw", info: "/front_cam/camera_info"}  # RViz subscribes the raw image
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"image_topic": "/usb_cam/image_raw",
                                                                 "camera_info_topic": "/usb_cam/calibration"}}}))
    assert run_launch(launch_env, distro, "rviz:=true", f"params_file:={mine}")["rviz2"]["remaps"] == {
        camera: "/usb_cam/image_raw", info: "/usb_cam/calibration"}


@pytest.mark.parametrize("distro", DISTROS)
def test_use_sim_time_reaches_the_node_and_rviz(launch_env, distro, tmp_path):
    nodes = run_launch(launch_env, distro, "rviz:=true")
    assert "use_sim_time" not in nodes[P.NODE_NAME]["params"] and not nodes["rviz2"]["params"]
    nodes = run_launch(launch_env, distro, "rviz:=true", "use_sim_time:=true")
    assert nodes[P.NODE_NAME]["params"]["use_sim_time"] is True and nodes["rviz2"]["params"] == {"use_sim_time": True}
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"use_sim_time": True}}}))
    nodes = run_launch(launch_env, distro, "rviz:=true", f"params_file:={mine}")
    assert nodes[P.NODE_NAME]["params"]["use_sim_time"] is True and nodes["rviz2"]["params"] == {"use_sim_time": True}
    with pytest.raises(RuntimeError, match="booleans are true or false"):
        run_launch(launch_env, distro, "use_sim_time:=1")


@pytest.mark.parametrize("distro", DISTROS)
def test_respawn_is_off_unless_asked_for(launch_env, distro):
    assert run_launch(launch_env, distro)[P.NODE_NAME]["respawn"] == (False, 2.0)
    assert run_launch(launch_env, distro, "respawn:=true")[P.NODE_NAME]["respawn"] == (True, 2.0)
    with pytest.raises(RuntimeError, match="booleans are true or false"):
        run_launch(launch_env, distro, "respawn:=yes")


@pytest.mark.parametrize("distro", DISTROS)
def test_a_headless_robot_without_rviz2_launches_the_node(launch_env, distro, tmp_path):
    """package.xml does not depend on rviz2 (rosdep would put Qt on every robot): without it installed the
    node launches, and only rviz:=true fails, naming the package."""
    headless = tmp_path / "prefix"
    shutil.copytree(launch_env.prefix, headless, symlinks=True)
    (headless / "share" / "ament_index" / "resource_index" / "packages" / "rviz2").unlink()
    shutil.rmtree(headless / "lib" / "rviz2")
    env = replace(launch_env, prefix=headless)
    assert set(run_launch(env, distro)) == {P.NODE_NAME}
    with pytest.raises(RuntimeError, match="rviz2"):
        run_launch(env, distro, "rviz:=true")
    root = ET.parse(ROOT / "package.xml").getroot()
    assert "rviz2" not in [el.text.strip() for el in root if el.tag.endswith("depend")]


@pytest.mark.parametrize("distro", DISTROS)
@pytest.mark.parametrize("text, said", [
    (None, "does not exist"), ("- a\n- b\n", "is not a ROS 2 parameter file"),
    ("a: [1, 2\n", "is not valid YAML: while parsing a flow sequence"),
    ("/**:\n  ros__parameters: 5\n", "entry '/**' is not a ROS 2 parameter entry"),
    (b"\x89PNG\r\n\x1a\n\xff", "cannot be read as text: 'utf-8' codec can't decode"),
    ("folder", "cannot be read as text: [Errno 21] Is a directory")])
def test_a_bad_params_file_is_named_in_one_line(launch_env, distro, tmp_path, text, said):
    """ros2 launch prints only the exception's message: before, a list at the top level read
    "'list' object has no attribute 'get'", and a binary file a decoding error naming no file."""
    path = tmp_path / "mine.yaml"
    if text == "folder":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(RuntimeError, match=re.escape(f"params_file {path}") + ".*" + re.escape(said)):
        run_launch(launch_env, distro, f"params_file:={path}")
