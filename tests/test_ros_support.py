"""Shared helpers of the discene_ros tests (no tests here): test backends and a fake rclpy module tree.

The fake rclpy records what the node asks of the rclpy API (parameters with descriptors, QoS,
subscriptions, publishers, timers, init/shutdown); its message classes are the real ROS 2
definitions from the rosbags typestore, so published messages can be CDR-serialised.
"""
from __future__ import annotations

import sys
import time
import types
from typing import Any

import numpy as np

from export.backends.base import Backend
from export.pipeline import OccupancyPipeline
from models.config import ModelConfig, lite


class BlockBackend(Backend):
    """Deterministic stand-in network: every query sits on one voxel of a fixed block, class ``label``.

    ``delay_s`` makes it slow (frame-dropping tests); ``calls`` counts inferences.
    """

    name = "block"

    def __init__(self, config: ModelConfig | None = None, delay_s: float = 0.0, label: int = 3) -> None:
        super().__init__(config or lite(), "cpu")
        self.delay_s, self.label, self.calls = delay_s, label, 0

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        cfg = self.config
        q, r, c = cfg.decoder.num_queries, cfg.decoder.num_refines[-1], cfg.num_classes
        shape = np.asarray(cfg.grid_shape)
        idx = np.stack(np.unravel_index(np.arange(q) % 40, (4, 5, 2)), -1) + [10, 20, 3]  # 40 voxels
        points = np.repeat(((idx + 0.5) / shape)[:, None, :], r, axis=1)[None].astype(np.float32)
        scores = np.zeros((1, q, r, c), np.float32)
        scores[..., self.label - 1] = 0.9
        return {"points": points, "scores": scores}


class OracleBackend(Backend):
    """Returns the ground truth of the frame (looked up by its voxel_origin) as network output.

    One query per occupied voxel (config with many single-point queries), so a replay against the
    same ground truth must score IoU 1: it checks the whole bag -> replay -> metric chain.
    """

    name = "oracle"

    def __init__(self, grids: dict[tuple, np.ndarray], max_voxels: int = 40000) -> None:
        cfg = lite()
        cfg.decoder.num_queries, cfg.decoder.num_refines = max_voxels, [1]
        cfg.closing = False  # the ground truth itself, not closed: IoU 1 against it
        super().__init__(cfg.validate(), "cpu")
        self.grids = grids

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        grid = self.grids[tuple(np.round(inputs.voxel_origin, 6))]
        idx = np.argwhere((grid > 0) & (grid != 255))
        q, c = self.config.decoder.num_queries, self.config.num_classes
        assert len(idx) <= q, "raise max_voxels"
        points = np.zeros((1, q, 1, 3), np.float32)
        scores = np.zeros((1, q, 1, c), np.float32)
        points[0, : len(idx), 0] = (idx + 0.5) / np.asarray(self.config.grid_shape)
        scores[0, np.arange(len(idx)), 0, grid[tuple(idx.T)].astype(int) - 1] = 1.0
        return {"points": points, "scores": scores}


def pipeline_for(backend: Backend) -> OccupancyPipeline:
    return OccupancyPipeline(backend)


# ----------------------------------------------------------------------------- fake rclpy
class FakeRos:
    """Everything the node asked of the fake rclpy, for assertions."""

    def __init__(self, typestore: Any, overrides: dict[str, Any] | None = None) -> None:
        self.typestore = typestore
        self.overrides = dict(overrides or {})
        self.calls: list[str] = []
        self.nodes: list[Any] = []
        self.qos: list[Any] = []
        self.transforms: dict[tuple[str, str], Any] = {}   # (target, source) -> TransformStamped
        self.spin_raises: type[BaseException] = KeyboardInterrupt


def _msg_module(ros: FakeRos, package: str) -> types.ModuleType:
    from discene_ros.msg_factory import TypestoreFactory

    factory = TypestoreFactory(ros.typestore)
    mod = types.ModuleType(f"{package}.msg")
    for name in ros.typestore.types:
        pkg, _, cls_name = name.split("/")
        if pkg != package:
            continue
        consts = ros.typestore.fielddefs[name][0]

        def new(cls: type, _msgtype: str = name, **kw: Any) -> Any:
            return factory.new(_msgtype, **kw)

        attrs: dict[str, Any] = {"__new__": new, "msgtype": name}
        attrs.update({c[0]: c[2] for c in consts})
        setattr(mod, cls_name, type(cls_name, (), attrs))
    return mod


def install_fake_rclpy(monkeypatch: Any, ros: FakeRos) -> None:
    """Put rclpy, rclpy.node/qos/time/duration/executors, rcl_interfaces.msg, tf2_ros and message
    packages into sys.modules for the duration of a test."""

    class Logger:
        def __init__(self) -> None:
            self.records: list[tuple[str, str]] = []

        def info(self, text: str) -> None:
            self.records.append(("info", text))

        def warn(self, text: str) -> None:
            self.records.append(("warn", text))

        warning = warn

        def error(self, text: str) -> None:
            self.records.append(("error", text))

    class Publisher:
        def __init__(self, msg_type: Any, topic: str, qos: Any) -> None:
            self.msg_type, self.topic, self.qos, self.published = msg_type, topic, qos, []

        def publish(self, msg: Any) -> None:
            self.published.append(msg)

    class Parameter:
        def __init__(self, value: Any) -> None:
            self.value = value

    class Clock:
        def now(self) -> Any:
            return types.SimpleNamespace(nanoseconds=time.time_ns())

    class Node:
        def __init__(self, name: str, **kwargs: Any) -> None:
            self.name = name
            self.parameters: dict[str, tuple[Any, Any]] = {}
            self.subscriptions: list[tuple[Any, str, Any, Any]] = []
            self.publishers: list[Publisher] = []
            self.timers: list[tuple[float, Any]] = []
            self.logger = Logger()
            self.destroyed = False
            ros.nodes.append(self)

        def declare_parameter(self, name: str, value: Any = None, descriptor: Any = None,
                              ignore_override: bool = False) -> Parameter:
            if name in self.parameters:
                raise RuntimeError(f"parameter {name} declared twice")
            self.parameters[name] = (value, descriptor)
            return Parameter(ros.overrides.get(name, value))

        def get_parameter(self, name: str) -> Parameter:
            return Parameter(ros.overrides.get(name, self.parameters[name][0]))

        def create_subscription(self, msg_type: Any, topic: str, callback: Any, qos: Any) -> Any:
            self.subscriptions.append((msg_type, topic, callback, qos))
            return object()

        def create_publisher(self, msg_type: Any, topic: str, qos: Any) -> Publisher:
            pub = Publisher(msg_type, topic, qos)
            self.publishers.append(pub)
            return pub

        def create_timer(self, period: float, callback: Any) -> Any:
            self.timers.append((period, callback))
            return object()

        def get_logger(self) -> Logger:
            return self.logger

        def get_clock(self) -> Clock:
            return Clock()

        def destroy_node(self) -> None:
            self.destroyed = True

    rclpy = types.ModuleType("rclpy")
    rclpy.init = lambda args=None: ros.calls.append("init")
    rclpy.shutdown = lambda: ros.calls.append("shutdown")
    rclpy.try_shutdown = lambda: ros.calls.append("try_shutdown")
    rclpy.ok = lambda: True

    def spin(node: Any) -> None:
        ros.calls.append("spin")
        raise ros.spin_raises()

    rclpy.spin = spin
    node_mod = types.ModuleType("rclpy.node")
    node_mod.Node = Node
    qos_mod = types.ModuleType("rclpy.qos")

    class QoSProfile:
        def __init__(self, **kw: Any) -> None:
            self.__dict__.update(kw)
            ros.qos.append(self)

    qos_mod.QoSProfile = QoSProfile
    qos_mod.HistoryPolicy = types.SimpleNamespace(KEEP_LAST="keep_last", KEEP_ALL="keep_all")
    qos_mod.ReliabilityPolicy = types.SimpleNamespace(BEST_EFFORT="best_effort", RELIABLE="reliable")
    qos_mod.DurabilityPolicy = types.SimpleNamespace(VOLATILE="volatile", TRANSIENT_LOCAL="transient_local")
    time_mod = types.ModuleType("rclpy.time")
    time_mod.Time = lambda nanoseconds=0, seconds=0: types.SimpleNamespace(nanoseconds=nanoseconds + int(seconds * 1e9))
    dur_mod = types.ModuleType("rclpy.duration")
    dur_mod.Duration = lambda seconds=0.0, nanoseconds=0: types.SimpleNamespace(seconds=seconds)
    exec_mod = types.ModuleType("rclpy.executors")
    exec_mod.ExternalShutdownException = type("ExternalShutdownException", (Exception,), {})

    rcl_msg = types.ModuleType("rcl_interfaces.msg")

    class ParameterDescriptor:
        def __init__(self, description: str = "", **kw: Any) -> None:
            self.description = description
            self.floating_point_range: list[Any] = []
            self.integer_range: list[Any] = []

    rcl_msg.ParameterDescriptor = ParameterDescriptor
    rcl_msg.FloatingPointRange = lambda **kw: types.SimpleNamespace(**kw)
    rcl_msg.IntegerRange = lambda **kw: types.SimpleNamespace(**kw)

    tf2 = types.ModuleType("tf2_ros")

    class TransformException(Exception):
        pass

    class Buffer:
        def lookup_transform(self, target: str, source: str, when: Any, timeout: Any = None) -> Any:
            if (target, source) not in ros.transforms:
                raise TransformException(f"no transform {source} -> {target}")
            return ros.transforms[(target, source)]

    tf2.TransformException = TransformException
    tf2.Buffer = Buffer
    tf2.TransformListener = lambda buffer, node, **kw: types.SimpleNamespace(buffer=buffer, node=node)

    modules = {"rclpy": rclpy, "rclpy.node": node_mod, "rclpy.qos": qos_mod, "rclpy.time": time_mod,
               "rclpy.duration": dur_mod, "rclpy.executors": exec_mod,
               "rcl_interfaces": types.ModuleType("rcl_interfaces"), "rcl_interfaces.msg": rcl_msg, "tf2_ros": tf2}
    for package in ("sensor_msgs", "geometry_msgs", "visualization_msgs", "diagnostic_msgs", "std_msgs",
                    "builtin_interfaces", "tf2_msgs"):
        modules[package] = types.ModuleType(package)
        modules[f"{package}.msg"] = _msg_module(ros, package)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
