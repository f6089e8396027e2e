"""The rclpy occupancy node: wiring around FrameProcessor (processing.py) and the conversions.

Callbacks only store messages: colour images go to a newest-frame slot, camera info and depth to
stamp-indexed buffers. A worker thread takes the newest colour frame, pairs it with the camera
info and depth of its header stamp (bounded wait, ``pairing.py``), looks up the camera pose in TF
at that stamp, runs the pipeline and publishes. A colour frame replaced before the worker took it
is dropped and counted. Parameters are read once at start-up and declared read-only.

ROS 2 is an optional dependency of this package (bag replay and training run without it), so the
rclpy imports below are guarded; ``main`` (via ``entry.occupancy_node``) reports what is missing.

Run: ``ros2 run discene_ros occupancy_node --ros-args --params-file config/occupancy.yaml`` or
``ros2 launch discene_ros occupancy.launch.py``.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import params as P
from .camera_pose import TransformNotReadyError, describe_fallback, mount_fallback_pose
from .conversions import stats_to_diagnostics, transform_to_matrix
from .errors import FrameError
from .msg_factory import EveryNth, RclpyFactory
from .pairing import FramePartners
from .processing import (
    FrameInput,
    FrameProcessor,
    FrameStats,
    LatestFrameSlot,
    ProcessorSettings,
    WarnThrottle,
    build_outputs,
)
from .undistort import DISTORTION_MODELS, needs_undistortion

try:  # ROS 2: optional (see the module docstring)
    import rclpy
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.duration import Duration
    from rclpy.exceptions import ParameterException
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.time import Time
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from tf2_ros import (
        Buffer,
        ConnectivityException,
        ExtrapolationException,
        LookupException,
        TransformException,
        TransformListener,
    )

    ROS_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the class below is then never instantiated
    Node = object
    ROS_IMPORT_ERROR = exc

INFERENCE_THREAD = "discene_inference"


def sensor_qos() -> Any:
    """Sensor-data QoS with depth 1: best effort, volatile, keep last 1 (the newest frame wins)."""
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def parameter_descriptor(spec: P.ParamSpec) -> Any:
    """Read-only descriptor with the description and range of one ``params.PARAMETERS`` row.

    Read-only: the node reads its parameters once, so ``ros2 param set`` must be refused rather
    than reported as applied while changing nothing.
    """
    descriptor = ParameterDescriptor(description=spec.description, read_only=True)
    if spec.range is not None and spec.kind == "float":
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                              to_value=float(spec.range[1]), step=0.0)]
    elif spec.range is not None and spec.kind == "int":
        descriptor.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=1)]
    return descriptor


def build_pipeline(cfg: dict[str, Any]) -> Any:
    """Backend + OccupancyPipeline from node parameters."""
    from export.backends import create_backend
    from export.pipeline import OccupancyPipeline

    path = Path(cfg["model_path"]) if cfg["model_path"] else P.DEFAULT_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (parameter model_path)")
    backend = create_backend(cfg["backend"], path, device=None if cfg["device"] == "auto" else cfg["device"],
                             fp16=cfg["fp16"], compile=cfg["compile"], cuda_graph=cfg["cuda_graph"])
    return OccupancyPipeline(backend)


class OccupancyNode(Node):
    """Subscribes RGB (+CameraInfo, +depth), publishes occupancy cloud, markers, grid pose, diagnostics."""

    def __init__(self, pipeline: Any = None, **kwargs: Any) -> None:
        super().__init__(P.NODE_NAME, **kwargs)
        self.cfg = P.validate({spec.name: self.declare_parameter(spec.name, spec.default,
                                                                 parameter_descriptor(spec)).value
                               for spec in P.PARAMETERS})
        self.factory = RclpyFactory()
        self.pipeline = pipeline if pipeline is not None else build_pipeline(self.cfg)
        if self.cfg["score_threshold"] >= 0.0:  # post-processing only: same network and backend
            self.pipeline.config.score_threshold = float(self.cfg["score_threshold"])
        self.pipeline.config.closing = bool(self.cfg["closing"])
        self.marker_schedule = EveryNth(self.cfg["marker_period"])
        settings = ProcessorSettings(
            use_depth=self.cfg["use_depth"], depth_max_offset_s=self.cfg["sync_tolerance_s"],
            use_fallback_pose=self.cfg["use_fallback_pose"],
            fallback_camera_height=self.cfg["fallback_camera_height"],
            fallback_camera_pitch_deg=self.cfg["fallback_camera_pitch_deg"], floor_z=self.cfg["floor_z"])
        self.processor = FrameProcessor(self.pipeline, settings)
        self.stats = FrameStats()
        self.throttle = WarnThrottle(self.cfg["warn_throttle_s"])
        self.slot = LatestFrameSlot()
        self.partners = FramePartners(self.cfg["sync_tolerance_s"], self.cfg["sync_wait_s"], self.cfg["use_depth"])
        self.fallback_note: str | None = None
        self.mount_found = False
        self.undistortion_logged = False
        self.stop_event = threading.Event()

        self.tf_buffer = Buffer()
        self.tf_listener = TransformListener(self.tf_buffer, self)
        qos = sensor_qos()
        if self.cfg["use_compressed"]:
            self.image_topic = self.cfg["image_topic"].rstrip("/") + "/compressed"
            self.create_subscription(CompressedImage, self.image_topic, self.image_callback, qos)
        else:
            self.image_topic = self.cfg["image_topic"]
            self.create_subscription(Image, self.image_topic, self.image_callback, qos)
        self.create_subscription(CameraInfo, self.cfg["camera_info_topic"], self.camera_info_callback, qos)
        if self.cfg["use_depth"]:
            self.create_subscription(Image, self.cfg["depth_topic"], self.depth_callback, qos)
        new_class = self.factory.msg_class
        self.cloud_pub = self.create_publisher(new_class("sensor_msgs/msg/PointCloud2"), P.TOPIC_CLOUD, 1)
        self.grid_pose_pub = self.create_publisher(new_class("geometry_msgs/msg/PoseStamped"), P.TOPIC_GRID_POSE, 1)
        self.markers_pub = (self.create_publisher(new_class("visualization_msgs/msg/MarkerArray"), P.TOPIC_MARKERS, 1)
                            if self.cfg["publish_markers"] else None)
        self.diagnostics_pub = self.create_publisher(new_class("diagnostic_msgs/msg/DiagnosticArray"),
                                                     P.TOPIC_DIAGNOSTICS, 1)
        self.create_timer(self.cfg["diagnostics_period_s"], self.diagnostics_timer_callback)

        self.inference_thread = threading.Thread(target=self.inference_loop, name=INFERENCE_THREAD, daemon=True)
        self.inference_thread.start()
        describe = getattr(self.pipeline, "describe", self.pipeline.backend.describe)
        self.get_logger().info(
            f"occupancy node ready: {describe()}, image {self.image_topic}, world frame "
            f"'{self.cfg['world_frame']}'. Raw images with non-zero {'/'.join(DISTORTION_MODELS)} coefficients "
            "in their CameraInfo are undistorted here; other distortion models need rectified images (image_proc)")

    # -- callbacks: store only, never process here
    def image_callback(self, msg: Any) -> None:
        self.stats.on_received(self.slot.put(FrameInput(image=msg, received_s=time.monotonic())))

    def camera_info_callback(self, msg: Any) -> None:
        self.partners.info.add(msg)

    def depth_callback(self, msg: Any) -> None:
        self.partners.depth.add(msg)

    def diagnostics_timer_callback(self) -> None:
        stamp = self.get_clock().now().nanoseconds
        diag = stats_to_diagnostics(self.factory, self.stats.snapshot(), stamp,
                                    hardware_id=self.pipeline.backend.describe())
        status = diag.status[0]
        pose_source = "TF" if self.fallback_note is None else f"FALLBACK: {self.fallback_note}"
        status.values.append(self.factory.new("diagnostic_msgs/msg/KeyValue", key="pose_source", value=pose_source))
        if self.fallback_note is not None:
            status.level = max(status.level, type(status).WARN)
            status.message = "fallback camera pose (world frame not in TF); " + status.message
        self.diagnostics_pub.publish(diag)

    # -- the inference thread
    def inference_loop(self) -> None:
        """Process the newest frame until destroy_node; never ends with a traceback (Ctrl-C included)."""
        while not self.stop_event.is_set():
            frame = self.slot.take(timeout=0.2)
            if frame is None:
                continue
            try:
                self.process_frame(frame)
            except Exception as exc:  # publishing after rclpy shut the context down, or an internal error
                if self.shutting_down():
                    return
                self.skip_frame("internal_error", f"{type(exc).__name__}: {exc}")

    def shutting_down(self) -> bool:
        return self.stop_event.is_set() or not self.context.ok()

    def process_frame(self, frame: FrameInput) -> None:
        """Pair, locate and process one frame; bad input is skipped, counted and warned about (throttled)."""
        try:
            frame.camera_info, frame.depth = self.partners.match(frame.stamp_ns)
            self.log_undistortion(frame.camera_info)
            frame.cam_pose = self.camera_pose(frame.image.header.frame_id, frame.stamp_ns)
            result = self.processor.process(frame)
            markers = self.markers_pub is not None and self.marker_schedule.due()
            msgs = build_outputs(self.factory, result, self.cfg["world_frame"], frame.stamp_ns, markers=markers)
        except FrameError as exc:
            self.skip_frame(exc.reason, str(exc))
            return
        if self.shutting_down():  # Ctrl-C: rclpy may have shut the context down already
            return
        self.cloud_pub.publish(msgs["cloud"])
        self.grid_pose_pub.publish(msgs["grid_pose"])
        if "markers" in msgs:
            self.markers_pub.publish(msgs["markers"])
        self.stats.on_processed((time.monotonic() - frame.received_s) * 1e3)

    def skip_frame(self, reason: str, text: str) -> None:
        self.stats.on_skipped(reason)
        if self.throttle.allow(reason):
            self.get_logger().warning(f"skipped frame ({reason}): {text}")

    def log_undistortion(self, info: Any) -> None:
        if not self.undistortion_logged and needs_undistortion(info):
            self.undistortion_logged = True
            self.get_logger().info(f"camera info has {info.distortion_model} distortion {list(info.d)}: "
                                   "undistorting every image (maps computed once)")

    def camera_pose(self, camera_frame: str, stamp_ns: int) -> np.ndarray | None:
        """camera->world 4x4 from TF at the image stamp (interpolated); None when the transform does not
        exist at all (the processor then uses the fallback pose, if allowed).

        A transform that exists but not yet at the stamp is waited for up to ``tf_timeout_s``, then the
        frame is skipped (TransformNotReadyError): never a made-up pose for a lagging TF.
        """
        world = self.cfg["world_frame"]
        if self.fallback_note is not None and not self.tf_buffer.can_transform(world, camera_frame, Time()):
            return None  # known absent and still absent: no point waiting tf_timeout_s on every frame
        try:
            tf = self.tf_buffer.lookup_transform(world, camera_frame, Time(nanoseconds=stamp_ns),
                                                 timeout=Duration(seconds=self.cfg["tf_timeout_s"]))
        except (LookupException, ConnectivityException) as exc:
            self.note_fallback(camera_frame, exc)
            return None
        except ExtrapolationException as exc:
            raise TransformNotReadyError(f"TF {world} -> {camera_frame} is not available at the image stamp "
                                         f"after waiting {self.cfg['tf_timeout_s']} s: {exc}") from exc
        except TransformException as exc:
            raise TransformNotReadyError(f"TF lookup {world} -> {camera_frame} failed: {exc}") from exc
        if self.fallback_note is not None:
            self.get_logger().info(f"world frame '{world}' is in TF now: camera poses come from TF again")
            self.fallback_note, self.mount_found = None, False
        return transform_to_matrix(tf)

    def note_fallback(self, camera_frame: str, exc: Exception) -> None:
        """World frame absent: take the fallback height and pitch from the camera mount; say so loudly once."""
        if not self.cfg["use_fallback_pose"] or self.mount_found:
            return
        mount = None
        try:
            mount = transform_to_matrix(self.tf_buffer.lookup_transform(self.cfg["base_frame"], camera_frame, Time()))
        except (TransformException, FrameError):
            pass
        if mount is not None:
            self.mount_found = True
            self.processor.fallback_pose = mount_fallback_pose(mount, self.cfg["floor_z"])
        elif self.fallback_note is not None:
            return
        self.fallback_note = describe_fallback(self.cfg["world_frame"], camera_frame, self.cfg["base_frame"], mount,
                                               self.cfg["fallback_camera_height"],
                                               self.cfg["fallback_camera_pitch_deg"])
        self.get_logger().error(f"{self.fallback_note} (TF: {exc})")

    def destroy_node(self) -> None:
        """Stop the inference thread (an in-flight frame is not published), then the rclpy node."""
        self.stop_event.set()
        self.slot.close()
        self.partners.close()
        self.inference_thread.join(timeout=5.0)
        self.pipeline.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run discene_ros occupancy_node``: 1 when the node cannot start (a clear message, no traceback)."""
    if ROS_IMPORT_ERROR is not None:
        print(f"occupancy_node: cannot start: ROS 2 is not importable ({ROS_IMPORT_ERROR}); source your ROS 2 "
              "installation (e.g. /opt/ros/humble/setup.bash). Bag replay works without ROS: discene-replay",
              file=sys.stderr)
        return 1
    rclpy.init(args=args)
    node = None
    try:
        node = OccupancyNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ParameterException, FileNotFoundError, ValueError, ImportError) as exc:
        if node is not None:  # configuration errors only count at start-up
            raise
        print(f"occupancy_node: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
