"""The rclpy occupancy node: wiring around ``processing.FrameLoop`` and the message
conversions (``msg_decode``, ``msg_encode``).

Callbacks only store messages: colour images go to the frame loop, camera info and depth to
stamp-indexed buffers. The decode stage pairs the newest colour frame with the camera info and depth
of its header stamp (bounded wait, ``pairing.py``), looks up the camera pose in TF at that stamp and
decodes it (on thread ``frame_decode`` for compressed images in a pipelined loop; otherwise at the
start of the prepare stage); the prepare stage (``frame_prepare``) preprocesses (uploads) it; the finish stage
(``frame_infer``) infers, post-processes and publishes, while the stages before it already work on
the next frames. A frame replaced by a newer one before a stage took it is dropped and counted;
diagnostics carry received, processed, skipped by reason, dropped and the frames in flight.
Parameters are read once at start-up, stored as the node uses them (``pipelining:=on`` arrives as a
bool and reads back as 'on') and then made read-only.

ROS 2 is an optional dependency of this package (bag replay and training run without it), so the
rclpy imports below are guarded; ``main`` (via ``entry.occupancy_node``) reports what is missing.

Run: ``ros2 run discene_ros occupancy_node --ros-args --params-file config/occupancy.yaml`` or
``ros2 launch discene_ros occupancy.launch.py``.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from . import params as P
from .camera_pose import TransformNotReadyError, orientation_problem, use_fallback
from .errors import FrameError, StampError, TransformError
from .msg_decode import camera_frame_id, check_pose, transform_to_matrix
from .msg_encode import stats_to_diagnostics
from .msg_factory import EveryNth, RclpyFactory
from .pairing import STAMP_JUMP_BACK_NS, FramePartners
from .processing import (
    FrameInput,
    FrameLoop,
    FrameProcessor,
    FrameStats,
    ProcessedFrame,
    ProcessorSettings,
    WarnThrottle,
    build_outputs,
    build_pipeline,
    decodes_on_decode_thread,
    frame_loop_mode,
    freeze_startup_objects,
    images_rectified,
    post_threads_for,
    tune_postprocess,
    uses_decode_thread,
    uses_prepare_thread,
)
from .tf_links import TransformWatch
from .undistort import needs_undistortion

try:  # ROS 2: optional (see the module docstring)
    import rclpy
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.duration import Duration
    from rclpy.exceptions import NameValidationException, ParameterException
    from rclpy.executors import ExternalShutdownException
    from rclpy.impl.implementation_singleton import rclpy_implementation
    from rclpy.node import Node
    from rclpy.parameter import Parameter
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

    # rcl's errors (e.g. a malformed --ros-args rule) and ROS arguments rcl does not know, raised by rclpy.init
    RCLError, UnknownROSArgsError = rclpy_implementation.RCLError, rclpy_implementation.UnknownROSArgsError
    ROS_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # the class below is then never instantiated
    Node = object
    ROS_IMPORT_ERROR = exc


def watched_listener(buffer: Any, node: Any, watch: TransformWatch) -> Any:
    """tf2_ros's TransformListener whose /tf and /tf_static callbacks show each TFMessage to ``watch`` before
    tf2 stores its valid transforms (and drops the others) as usual. The listener binds ``self.callback`` and
    ``self.static_callback`` to its subscriptions in ``__init__`` (tf2_ros_py, Humble to Rolling), so the
    overrides are what the subscriptions call."""

    class WatchedTransformListener(TransformListener):
        def callback(self, data: Any) -> None:
            watch.seen(data.transforms)
            super().callback(data)

        def static_callback(self, data: Any) -> None:
            watch.seen(data.transforms)
            super().static_callback(data)

    return WatchedTransformListener(buffer, node)


# Frames the frame loop may hold at once (waiting for each of its three stages and in it, one more
# launched ahead), plus one being submitted and one being counted as dropped: ``in_flight`` beyond this
# is a counting bug.
MAX_IN_FLIGHT = 9
# No colour image for this long (since start-up, or since the last one): diagnostics WARN and a log line at
# most every NO_IMAGE_LOG_PERIOD_S; a wrong topic name or a silent camera otherwise shows nowhere in the log.
NO_IMAGE_WARN_S = 5.0
NO_IMAGE_LOG_PERIOD_S = 30.0
# destroy_node waits this long in all for the frame threads: ros2 launch sends SIGTERM 5 s after SIGINT
# (sigterm_timeout) and SIGKILL 5 s later
SHUTDOWN_TIMEOUT_S = 5.0


def sensor_qos() -> Any:
    """Sensor-data QoS with depth 1: best effort, volatile, keep last 1 (the newest frame wins)."""
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.VOLATILE)


def parameter_descriptor(spec: P.ParamSpec, read_only: bool = True) -> Any:
    """Descriptor with the description and range of one ``params.PARAMETERS`` row.

    Read-only in the end: the node reads its parameters once, so ``ros2 param set`` must be refused rather
    than reported as applied while changing nothing (``OccupancyNode.settle_parameters`` locks them after
    start-up). Dynamically typed where ``spec.dynamic_typing`` says so (``params.validate`` then converts
    and checks the value).
    """
    descriptor = ParameterDescriptor(description=spec.description, read_only=read_only,
                                     dynamic_typing=spec.dynamic_typing)
    if spec.range is not None and spec.kind == "float":
        descriptor.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                              to_value=float(spec.range[1]), step=0.0)]
    elif spec.range is not None and spec.kind == "int":
        descriptor.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=1)]
    if spec.choices is not None:
        descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
    return descriptor


class OccupancyNode(Node):
    """Subscribes RGB (+CameraInfo, +depth), publishes occupancy cloud, markers, grid pose, diagnostics."""

    def __init__(self, pipeline: Any = None, **kwargs: Any) -> None:
        super().__init__(P.NODE_NAME, **kwargs)
        declared = {spec.name: self.declare_parameter(spec.name, spec.default,
                                                      parameter_descriptor(spec, read_only=False)).value
                    for spec in P.PARAMETERS}
        self.cfg = P.validate(declared)
        self.settle_parameters(declared)
        self.factory = RclpyFactory()
        # post-processing only (same network and backend); a negative threshold keeps the model's
        postprocess = {"closing": self.cfg["closing"],
                       "score_threshold": self.cfg["score_threshold"] if self.cfg["score_threshold"] >= 0.0 else None}
        if pipeline is None:
            pipeline = build_pipeline(self.cfg["model_path"], self.cfg["backend"], self.cfg["device"],
                                      fp16=self.cfg["fp16"], compile=self.cfg["compile"],
                                      cuda_graph=self.cfg["cuda_graph"], tf32=self.cfg["tf32"],
                                      tf32_convolutions=self.cfg["tf32_convolutions"],
                                      frame_graph=self.cfg["frame_graph"])
        self.pipeline = tune_postprocess(pipeline, **postprocess)
        self.marker_schedule = EveryNth(self.cfg["marker_period"])
        # image_transport's naming: a topic ending in /compressed carries CompressedImage, use_compressed or not
        image_topic = self.cfg["image_topic"].rstrip("/")
        compressed = self.cfg["use_compressed"] or image_topic.endswith("/compressed")
        self.image_topic = P.base_image_topic(image_topic) + "/compressed" if compressed else self.cfg["image_topic"]
        rectified, images_note = images_rectified(self.cfg["rectified"], self.image_topic)
        settings = ProcessorSettings(
            use_depth=self.cfg["use_depth"], depth_max_offset_s=self.cfg["sync_tolerance_s"],
            use_fallback_pose=self.cfg["use_fallback_pose"],
            fallback_camera_height=self.cfg["fallback_camera_height"],
            fallback_camera_pitch_deg=self.cfg["fallback_camera_pitch_deg"], floor_z=self.cfg["floor_z"],
            check_depth_frame=self.cfg["check_depth_frame"], rectified=rectified)
        self.processor = FrameProcessor(self.pipeline, settings)
        self.stats = FrameStats()
        self.throttle = WarnThrottle(self.cfg["warn_throttle_s"])
        self.fallback_note: str | None = None
        self.mount_found = False
        self.undistortion_logged = False
        self.orientation_checked: set[str] = set()  # camera frames whose pose from TF was checked (camera_pose)
        self.last_image_stamp_ns: int | None = None
        self.started_s, self.last_image_s = time.monotonic(), None  # when the node started / got its last image
        self.idle_throttle = WarnThrottle(NO_IMAGE_LOG_PERIOD_S)

        self.tf_buffer = Buffer()
        self.tf_watch = TransformWatch()  # which links /tf has, valid or not: tf2 drops the invalid ones
        self.tf_listener = watched_listener(self.tf_buffer, self, self.tf_watch)
        qos = sensor_qos()
        # empty: beside the image topic, as image_transport's CameraSubscriber pairs them
        self.info_topic = self.cfg["camera_info_topic"] or P.camera_info_topic_for(self.image_topic)
        self.partners = FramePartners(self.cfg["sync_tolerance_s"], self.cfg["sync_wait_s"], self.cfg["use_depth"],
                                      info_topic=self.info_topic, depth_topic=self.cfg["depth_topic"])
        self.create_subscription(CompressedImage if compressed else Image, self.image_topic, self.image_callback, qos)
        self.create_subscription(CameraInfo, self.info_topic, self.camera_info_callback, qos)
        if self.cfg["use_depth"]:  # image_transport's compressedDepth topic, or a raw depth Image
            depth_type = CompressedImage if self.cfg["depth_topic"].endswith("/compressedDepth") else Image
            self.create_subscription(depth_type, self.cfg["depth_topic"], self.depth_callback, qos)
        new_class = self.factory.msg_class
        self.cloud_pub = self.create_publisher(new_class("sensor_msgs/msg/PointCloud2"), P.TOPIC_CLOUD, 1)
        self.grid_pose_pub = self.create_publisher(new_class("geometry_msgs/msg/PoseStamped"), P.TOPIC_GRID_POSE, 1)
        self.markers_pub = (self.create_publisher(new_class("visualization_msgs/msg/MarkerArray"), P.TOPIC_MARKERS, 1)
                            if self.cfg["publish_markers"] else None)
        self.diagnostics_pub = self.create_publisher(new_class("diagnostic_msgs/msg/DiagnosticArray"),
                                                     P.TOPIC_DIAGNOSTICS, 1)
        self.create_timer(self.cfg["diagnostics_period_s"], self.diagnostics_timer_callback)

        pipelined, loop_mode = frame_loop_mode(self.cfg["pipelining"], self.pipeline)
        prepare_thread = uses_prepare_thread(pipelined, self.pipeline)
        # locating a frame (pairing, TF) may wait: on the decode thread then, never on the finish stage's
        locates = self.cfg["sync_wait_s"] > 0 or self.cfg["tf_timeout_s"] > 0
        decode_thread = uses_decode_thread(compressed, pipelined, prepare_thread, locates=locates)
        decode_on_thread = decodes_on_decode_thread(compressed, prepare_thread)
        self.pipeline.post_threads = post_threads_for(pipelined, compressed)
        if decode_thread:
            loop_mode += (", compressed images decoded on a thread of their own" if prepare_thread else
                          ", frames located and decoded on a thread of their own, prepared right before their launch"
                          if decode_on_thread else
                          ", frames located on a thread of their own, decoded and prepared right before their launch")
        elif not prepare_thread:
            loop_mode += (", each frame located, decoded and prepared right before its launch (sync_wait_s and "
                          "tf_timeout_s are 0: locating never waits)")
        self.frames = FrameLoop(self.processor, self.stats, deliver=self.publish_outputs,
                                locate=self.locate_frame, on_skip=self.skip_frame,
                                stopping=lambda: not self.context.ok(), pipelined=pipelined,
                                decode_thread=decode_thread, prepare_thread=prepare_thread,
                                decode_on_thread=decode_on_thread)
        describe = getattr(self.pipeline, "describe", self.pipeline.backend.describe)
        frozen = freeze_startup_objects()  # no full garbage collection pauses the frames for their sake
        self.get_logger().info(
            f"occupancy node ready: {describe()}, frame loop {loop_mode}, {frozen} start-up objects frozen out of "
            f"the garbage collector, image {self.image_topic}, camera info {self.info_topic}, world frame "
            f"'{self.cfg['world_frame']}', {images_note}")
        self.warn_unknown_parameters()

    def settle_parameters(self, declared: dict[str, Any]) -> None:
        """Store the values the node runs with where they differ from the declared ones, then make every
        parameter read-only. rcl types an unquoted ``pipelining:=on`` as a bool and ``floor_z:=0`` as an
        integer, and tf2 frame ids carry no leading "/": ``ros2 param get`` shows 'on', 0.0 and 'map', not
        True, 0 and '/map'. Nothing spins the node yet, so no ``ros2 param set`` can come in between."""
        changed = [Parameter(name, value=self.cfg[name]) for name, value in declared.items()
                   if type(value) is not type(self.cfg[name]) or value != self.cfg[name]]
        for param, result in zip(changed, self.set_parameters(changed), strict=True):
            if not result.successful:
                raise ValueError(f"parameter '{param.name}': cannot store {param.value!r}: {result.reason}")
        for spec in P.PARAMETERS:
            locked = parameter_descriptor(spec)
            locked.type = self.describe_parameter(spec.name).type  # what declare_parameter typed it as
            self.set_descriptor(spec.name, locked)

    def warn_unknown_parameters(self) -> None:
        """Parameter overrides (parameter files, ``-p``) of names this node never declared: rclpy drops them
        silently, so a misspelt name would leave its default in force. rclpy keeps the overrides in
        ``Node._parameter_overrides`` (Humble and Jazzy; there is no public accessor); rclpy's own
        parameters (``use_sim_time``) are declared and so not reported."""
        given = [name for name in getattr(self, "_parameter_overrides", {}) if not self.has_parameter(name)]
        note = P.unknown_parameters_note(given, [spec.name for spec in P.PARAMETERS])
        if note is not None:
            self.get_logger().warning(note)

    # -- callbacks: store only, never process here
    def image_callback(self, msg: Any) -> None:
        self.last_image_s = time.monotonic()
        self.frames.submit(FrameInput(image=msg, received_s=self.last_image_s))

    def camera_info_callback(self, msg: Any) -> None:
        self.partners.add_info(msg)

    def depth_callback(self, msg: Any) -> None:
        self.partners.depth.add(msg)

    def diagnostics_timer_callback(self) -> None:
        stamp = self.get_clock().now().nanoseconds
        snapshot = self.stats.snapshot()
        # the node's full name keeps the statuses of one node per camera apart (namespaces) in the aggregator
        diag = stats_to_diagnostics(self.factory, snapshot, stamp, name=f"{self.get_fully_qualified_name()}: occupancy",
                                    hardware_id=self.pipeline.backend.describe())
        status = diag.status[0]
        pose_source = "TF" if self.fallback_note is None else f"FALLBACK: {self.fallback_note}"
        # every received frame is processed, skipped or dropped; the rest is still in the frame loop
        in_flight = (snapshot["received"] - snapshot["processed"] - sum(snapshot["skipped"].values())
                     - snapshot["dropped"])
        status.values += [self.factory.new("diagnostic_msgs/msg/KeyValue", key=key, value=value)
                          for key, value in (("pose_source", pose_source), ("in_flight", str(in_flight)))]
        if self.fallback_note is not None:
            status.level = max(status.level, type(status).WARN)
            status.message = "fallback camera pose (world frame not in TF); " + status.message
        idle = self.no_image_note()
        if idle is not None:
            status.level = max(status.level, type(status).WARN)
            status.message = f"{idle}; {status.message}"
        if not 0 <= in_flight <= MAX_IN_FLIGHT:
            status.level = type(status).ERROR
            status.message = f"frame counters disagree ({in_flight} frames in flight); " + status.message
        self.diagnostics_pub.publish(diag)

    def no_image_note(self) -> str | None:
        """What to say when no colour image came for NO_IMAGE_WARN_S (logged at most every
        NO_IMAGE_LOG_PERIOD_S), else None."""
        since = self.started_s if self.last_image_s is None else self.last_image_s
        idle_s = time.monotonic() - since
        if idle_s < NO_IMAGE_WARN_S:
            return None
        what = "no image received yet" if self.last_image_s is None else "no image received"
        note = f"{what} on {self.image_topic} for {idle_s:.0f} s"
        if self.idle_throttle.allow("no_image"):
            self.get_logger().warning(f"{note}: is the camera publishing there? `ros2 topic info -v {self.image_topic}` "
                                      "shows its publishers, message type and QoS")
        return note

    # -- the frame loop's stages (processing.FrameLoop): locate_frame in the decode stage, publish_outputs
    # in the finish stage
    def locate_frame(self, frame: FrameInput) -> None:
        """Decode stage, before decoding: camera info and depth of the image stamp, camera pose from TF."""
        camera_frame = camera_frame_id(frame.image.header)  # an image naming no frame is skipped before any wait
        self.note_time_jump(frame.stamp_ns)
        frame.camera_info, frame.depth = self.partners.match(frame.stamp_ns)
        self.log_undistortion(frame.camera_info)
        frame.cam_pose = self.camera_pose(camera_frame, frame.stamp_ns)
        if frame.cam_pose is not None and camera_frame not in self.orientation_checked:
            self.orientation_checked.add(camera_frame)  # once per camera frame: a mount does not change
            problem = orientation_problem(frame.cam_pose, camera_frame)
            if problem is not None:
                self.get_logger().warning(problem)

    def publish_outputs(self, frame: FrameInput, result: ProcessedFrame) -> None:
        """Finish stage: build and publish the frame's messages (never called once destroy_node began)."""
        # markers only for a listener (RViz, a bag recorder): a CUBE_LIST of every voxel costs more to build
        # and convert than the cloud
        markers = (self.markers_pub is not None and self.marker_schedule.due()
                   and self.markers_pub.get_subscription_count() > 0)
        msgs = build_outputs(self.factory, result, self.cfg["world_frame"], frame.stamp_ns, markers=markers)
        self.cloud_pub.publish(msgs["cloud"])
        self.grid_pose_pub.publish(msgs["grid_pose"])
        if "markers" in msgs:
            self.markers_pub.publish(msgs["markers"])

    def skip_frame(self, frame: FrameInput, reason: str, text: str) -> None:
        """A bad frame (already counted by reason): a warning, throttled per reason."""
        if self.throttle.allow(reason):
            self.get_logger().warning(f"skipped frame ({reason}): {text}")

    def note_time_jump(self, stamp_ns: int) -> None:
        """Image stamps that jump back (a bag played with --loop, a simulator reset): tf2 refuses the new time
        line's transforms while they are more than its cache time (10 s) older than the old line's newest,
        and mixes the two lines otherwise; its Buffer clears itself only on a jump of the node's clock, and
        on Humble not even then. So the history is cleared here (static transforms stay). The camera info
        and depth buffers clear themselves (``pairing.StampedBuffer``)."""
        last, self.last_image_stamp_ns = self.last_image_stamp_ns, stamp_ns
        if last is not None and stamp_ns < last - STAMP_JUMP_BACK_NS:
            self.tf_buffer.clear()
            self.get_logger().warning(f"image stamps jumped back by {(last - stamp_ns) / 1e9:.1f} s (a bag played "
                                      "with --loop, or a simulator reset): TF history cleared, static transforms kept")

    def log_undistortion(self, info: Any) -> None:
        """Say once that raw images are undistorted (never for rectified ones, whose D is the raw lens's)."""
        if not self.undistortion_logged and not self.processor.settings.rectified and needs_undistortion(info):
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
            self.refuse_invalid_chain(world, camera_frame)
            # known absent and still absent: no point waiting tf_timeout_s on every frame; but a mount that
            # reached TF after the first frames (robot_state_publisher starting late) replaces fixed parameters
            if not self.mount_found and self.tf_buffer.can_transform(self.cfg["base_frame"], camera_frame, Time()):
                self.note_fallback(camera_frame, "the camera mount is in TF now")
            return None
        if stamp_ns < 0:
            raise StampError(f"image stamp {stamp_ns * 1e-9:.3f} s is before the epoch: no camera pose in TF at it")
        try:
            tf = self.tf_buffer.lookup_transform(world, camera_frame, Time(nanoseconds=stamp_ns),
                                                 timeout=Duration(seconds=self.cfg["tf_timeout_s"]))
        except (LookupException, ConnectivityException) as exc:
            self.refuse_invalid_chain(world, camera_frame)
            self.note_fallback(camera_frame, f"TF: {exc}")
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

    def refuse_invalid_chain(self, world: str, camera_frame: str) -> None:
        """TransformError (the frame is skipped as bad_transform) when tf2 lacks ``world`` -> ``camera_frame`` only
        because every transform of a link between them was invalid: published but unusable is not absent, so no
        fallback pose (e.g. a localizer publishing NaN)."""
        problem = self.tf_watch.invalid_chain(world, camera_frame)
        if problem is not None:
            raise TransformError(problem)

    def note_fallback(self, camera_frame: str, why: str) -> None:
        """World frame absent: take the fallback height and pitch from the camera mount, else the fixed
        parameters; say so loudly once for each."""
        if not self.cfg["use_fallback_pose"] or self.mount_found:
            return
        mount = None
        try:
            tf = self.tf_buffer.lookup_transform(self.cfg["base_frame"], camera_frame, Time())
            mount = check_pose(transform_to_matrix(tf), "camera mount")  # tf2 keeps an infinite translation
        except (TransformException, FrameError):
            pass
        if mount is None and self.fallback_note is not None:
            return  # the fixed-parameter fallback was announced already
        self.mount_found = mount is not None
        self.fallback_note = use_fallback(self.processor, mount, self.cfg["world_frame"], camera_frame,
                                          self.cfg["base_frame"])
        unusable_mount = None if mount is not None else self.tf_watch.invalid_chain(self.cfg["base_frame"], camera_frame)
        self.get_logger().error(f"{self.fallback_note} ({why}{'; ' + unusable_mount if unusable_mount else ''})")

    def destroy_node(self) -> None:
        """Stop the frame stages (nothing is published from here on; frames in flight are counted as
        dropped), join their threads, close the pipeline unless a thread may still use it, then destroy the
        rclpy node."""
        self.frames.close(discard=True, timeout=SHUTDOWN_TIMEOUT_S, wake=self.partners.close)
        running = self.frames.running_threads()
        if not running:
            self.pipeline.close()
        else:  # closing it would free buffers (a TensorRT engine's) under a running inference
            self.get_logger().warning(
                f"frame threads did not stop within {SHUTDOWN_TIMEOUT_S:g} s: {', '.join(running)}; the pipeline "
                "is left open until the process exits")
        super().destroy_node()


def startup_error_text(exc: BaseException) -> str:
    """The one line ``main`` prints for ``exc``: rclpy's name errors end in the name and a line with a caret under
    its bad character (dropped), and its UnknownROSArgsError says only the arguments. Any other RuntimeError (a
    backend that cannot be set up: no usable GPU, a failed TensorRT build; rcl's own errors are RuntimeErrors too)
    is named by its type, so that it is not mistaken for a setting to change."""
    if isinstance(exc, UnknownROSArgsError):
        return f"unknown ROS arguments (after --ros-args): {exc}"
    lines = str(exc).splitlines()
    if isinstance(exc, NameValidationException):
        lines = lines[:2]
    kind = f"{type(exc).__name__}: " if isinstance(exc, RuntimeError) and not isinstance(exc, RCLError) else ""
    return kind + " ".join(line.strip() for line in lines)


def main(args: list[str] | None = None) -> int:
    """``ros2 run discene_ros occupancy_node``: 1 when the node cannot start (a clear message, no traceback)."""
    if ROS_IMPORT_ERROR is not None:
        print(f"occupancy_node: cannot start: ROS 2 is not importable ({ROS_IMPORT_ERROR}); source your ROS 2 "
              "installation (e.g. /opt/ros/humble/setup.bash). Bag replay works without ROS: discene-replay",
              file=sys.stderr)
        return 1
    node = None
    try:
        rclpy.init(args=args)
        node = OccupancyNode()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ParameterException, FileNotFoundError, ValueError, ImportError, NameValidationException, RuntimeError) as exc:
        if node is not None:  # configuration errors only count at start-up
            raise
        print(f"occupancy_node: cannot start: {startup_error_text(exc)}", file=sys.stderr)
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
