"""The rclpy occupancy node: thin wiring around FrameProcessor (processing.py) and the conversions.

Subscriptions (sensor-data QoS, depth 1) only store the newest message; a worker thread takes the
newest colour frame, looks up the camera pose in TF, runs the pipeline and publishes. A colour
frame replaced before the worker took it is dropped and counted. rclpy, the message packages and
tf2_ros are imported only when the node is built, so this module imports without ROS.

Run: ``ros2 run discene_ros occupancy_node --ros-args --params-file config/occupancy.yaml`` or
``ros2 launch discene_ros occupancy.launch.py``.
"""
from __future__ import annotations

import importlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import params as P
from .errors import FrameError
from .msg_factory import EveryNth
from .processing import (
    FrameInput,
    FrameProcessor,
    FrameStats,
    LatestFrameSlot,
    ProcessorSettings,
    WarnThrottle,
    build_outputs,
)


def _ros(module: str) -> Any:
    """Import a ROS 2 Python module, with an error that says to source ROS 2."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"the occupancy node needs ROS 2 ('{module}' is not importable): source your ROS 2 "
                          "installation (e.g. /opt/ros/humble/setup.bash); bag replay works without ROS: "
                          "discene-replay") from exc


def sensor_qos() -> Any:
    """Sensor-data QoS with depth 1: best effort, volatile, keep last 1 (the newest frame wins)."""
    qos = _ros("rclpy.qos")
    return qos.QoSProfile(depth=1, history=qos.HistoryPolicy.KEEP_LAST,
                          reliability=qos.ReliabilityPolicy.BEST_EFFORT, durability=qos.DurabilityPolicy.VOLATILE)


def declare_parameters(node: Any) -> dict[str, Any]:
    """Declare every parameter of params.PARAMETERS with description and range; return their values."""
    msg = _ros("rcl_interfaces.msg")
    values = {}
    for spec in P.PARAMETERS:
        descriptor = msg.ParameterDescriptor(description=spec.description)
        if spec.range is not None and spec.kind == "float":
            descriptor.floating_point_range = [msg.FloatingPointRange(from_value=float(spec.range[0]),
                                                                      to_value=float(spec.range[1]), step=0.0)]
        elif spec.range is not None and spec.kind == "int":
            descriptor.integer_range = [msg.IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]),
                                                         step=1)]
        node.declare_parameter(spec.name, spec.default, descriptor)
        values[spec.name] = node.get_parameter(spec.name).value
    return P.validate(values)


def build_pipeline(cfg: dict[str, Any]) -> Any:
    """Backend + OccupancyPipeline from node parameters (score threshold applied to the model config)."""
    from export.backends import create_backend
    from export.pipeline import OccupancyPipeline

    path = Path(cfg["model_path"]) if cfg["model_path"] else P.DEFAULT_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (parameter model_path)")
    backend = create_backend(cfg["backend"], path, device=None if cfg["device"] == "auto" else cfg["device"],
                             fp16=cfg["fp16"], compile=cfg["compile"], cuda_graph=cfg["cuda_graph"])
    return OccupancyPipeline(backend)


def make_node_class() -> type:
    """Build the Node subclass after importing rclpy (so this module imports without ROS)."""
    node_mod = _ros("rclpy.node")
    rclpy_time = _ros("rclpy.time")
    rclpy_duration = _ros("rclpy.duration")

    class OccupancyNode(node_mod.Node):
        """Subscribes RGB (+CameraInfo, +depth), publishes occupancy cloud, markers, grid pose, diagnostics."""

        def __init__(self, pipeline: Any = None, **kwargs: Any) -> None:
            super().__init__(P.NODE_NAME, **kwargs)
            from .msg_factory import RclpyFactory

            self.cfg = declare_parameters(self)
            self.factory = RclpyFactory()
            self.pipeline = pipeline if pipeline is not None else build_pipeline(self.cfg)
            # the threshold only affects post-processing: same network, same backend config object
            if self.cfg["score_threshold"] >= 0.0:
                self.pipeline.config.score_threshold = float(self.cfg["score_threshold"])
            self.pipeline.config.closing = bool(self.cfg["closing"])
            self.marker_schedule = EveryNth(self.cfg["marker_period"])
            settings = ProcessorSettings(
                use_depth=self.cfg["use_depth"], depth_max_offset_s=self.cfg["depth_max_offset_s"],
                use_fallback_pose=self.cfg["use_fallback_pose"],
                fallback_camera_height=self.cfg["fallback_camera_height"],
                fallback_camera_pitch_deg=self.cfg["fallback_camera_pitch_deg"], floor_z=self.cfg["floor_z"])
            self.processor = FrameProcessor(self.pipeline, settings)
            self.stats = FrameStats()
            self.throttle = WarnThrottle(self.cfg["warn_throttle_s"])
            self.slot = LatestFrameSlot()
            self._info: Any = None
            self._depth: Any = None
            self._init_tf()
            self._init_io()
            self._running = True
            self._worker = threading.Thread(target=self._work, name="discene_inference", daemon=True)
            self._worker.start()
            describe = getattr(self.pipeline, "describe", self.pipeline.backend.describe)
            self.get_logger().info(f"occupancy node ready: {describe()}, image "
                                   f"{self.image_topic}, world frame '{self.cfg['world_frame']}'")

        def _init_tf(self) -> None:
            tf2_ros = _ros("tf2_ros")
            self._tf_exception = tf2_ros.TransformException
            self.tf_buffer = tf2_ros.Buffer()
            self.tf_listener = tf2_ros.TransformListener(self.tf_buffer, self)

        def _init_io(self) -> None:
            sensor = _ros("sensor_msgs.msg")
            qos = sensor_qos()
            f = self.factory
            if self.cfg["use_compressed"]:
                self.image_topic = self.cfg["image_topic"].rstrip("/") + "/compressed"
                self.create_subscription(sensor.CompressedImage, self.image_topic, self.on_image, qos)
            else:
                self.image_topic = self.cfg["image_topic"]
                self.create_subscription(sensor.Image, self.image_topic, self.on_image, qos)
            self.create_subscription(sensor.CameraInfo, self.cfg["camera_info_topic"], self.on_camera_info, qos)
            if self.cfg["use_depth"]:
                self.create_subscription(sensor.Image, self.cfg["depth_topic"], self.on_depth, qos)
            self.pub_cloud = self.create_publisher(f.msg_class("sensor_msgs/msg/PointCloud2"), P.TOPIC_CLOUD, 1)
            self.pub_pose = self.create_publisher(f.msg_class("geometry_msgs/msg/PoseStamped"), P.TOPIC_GRID_POSE, 1)
            self.pub_markers = (self.create_publisher(f.msg_class("visualization_msgs/msg/MarkerArray"),
                                                      P.TOPIC_MARKERS, 1) if self.cfg["publish_markers"] else None)
            self.pub_diag = self.create_publisher(f.msg_class("diagnostic_msgs/msg/DiagnosticArray"),
                                                  P.TOPIC_DIAGNOSTICS, 1)
            self.create_timer(self.cfg["diagnostics_period_s"], self.publish_diagnostics)

        # -- callbacks: store only, never process here
        def on_image(self, msg: Any) -> None:
            self.stats.on_received(self.slot.put(FrameInput(image=msg, received_s=time.monotonic())))

        def on_camera_info(self, msg: Any) -> None:
            self._info = msg

        def on_depth(self, msg: Any) -> None:
            self._depth = msg

        # -- worker
        def _work(self) -> None:
            while self._running:
                frame = self.slot.take(timeout=0.2)
                if frame is not None:
                    self.handle(frame)

        def handle(self, frame: FrameInput) -> None:
            """Process one frame; any bad input is skipped, counted and warned about (throttled)."""
            try:
                frame.camera_info, frame.depth = self._info, self._depth
                frame.cam_pose = self.lookup_pose(frame.image.header.frame_id, frame.stamp_ns)
                result = self.processor.process(frame)
                markers = self.pub_markers is not None and self.marker_schedule.due()
                msgs = build_outputs(self.factory, result, self.cfg["world_frame"], frame.stamp_ns, markers=markers)
            except FrameError as exc:
                self._skip(exc.reason, str(exc))
                return
            except Exception as exc:  # never die on input: count and report internal failures too
                self._skip("internal_error", f"{type(exc).__name__}: {exc}")
                return
            self.pub_cloud.publish(msgs["cloud"])
            self.pub_pose.publish(msgs["grid_pose"])
            if "markers" in msgs:
                self.pub_markers.publish(msgs["markers"])
            if result.used_fallback_pose and self.throttle.allow("fallback_pose"):
                self.get_logger().warning(f"no TF from '{frame.image.header.frame_id}' to '{self.cfg['world_frame']}': "
                                       "using the fallback camera pose")
            self.stats.on_processed((time.monotonic() - frame.received_s) * 1e3)

        def _skip(self, reason: str, text: str) -> None:
            self.stats.on_skipped(reason)
            if self.throttle.allow(reason):
                self.get_logger().warning(f"skipped frame ({reason}): {text}")

        def lookup_pose(self, camera_frame: str, stamp_ns: int) -> Any:
            """camera->world 4x4 from TF at the image stamp, or None when TF has none."""
            from .conversions import transform_to_matrix

            try:
                tf = self.tf_buffer.lookup_transform(
                    self.cfg["world_frame"], camera_frame, rclpy_time.Time(nanoseconds=stamp_ns),
                    timeout=rclpy_duration.Duration(seconds=self.cfg["tf_timeout_s"]))
            except self._tf_exception:
                return None
            return transform_to_matrix(tf)

        def publish_diagnostics(self) -> None:
            from .conversions import stats_to_diagnostics

            now = self.get_clock().now().nanoseconds
            self.pub_diag.publish(stats_to_diagnostics(self.factory, self.stats.snapshot(), now,
                                                       hardware_id=self.pipeline.backend.describe()))

        def destroy_node(self) -> None:
            self._running = False
            self.slot.close()
            self._worker.join(timeout=5.0)
            self.pipeline.close()
            super().destroy_node()

    return OccupancyNode


def main(args: list[str] | None = None) -> int:
    """Entry point (``ros2 run discene_ros occupancy_node``); 1 when the node cannot start."""
    rclpy = _ros("rclpy")
    rclpy.init(args=args)  # not `with rclpy.init()`: that fails on Humble/Jazzy (DESIGN.md section 7)
    try:
        try:
            node = make_node_class()()
        except (FileNotFoundError, ValueError, ImportError) as exc:  # configuration errors, not input errors
            print(f"occupancy_node: cannot start: {exc}", file=sys.stderr)
            return 1
        stop = (KeyboardInterrupt, getattr(_ros("rclpy.executors"), "ExternalShutdownException", KeyboardInterrupt))
        try:
            rclpy.spin(node)
        except stop:
            pass
        finally:
            node.destroy_node()
        return 0
    finally:
        # try_shutdown tolerates the context already shut down by the SIGINT handler (Jazzy)
        getattr(rclpy, "try_shutdown", rclpy.shutdown)()


if __name__ == "__main__":
    sys.exit(main())
