"""Node parameters in one table: names, defaults, descriptions and ranges.

``node.py`` declares them from this table (ParameterDescriptor with description and range, made
read-only once the node has stored the values it runs with), ``occupancy.launch.py`` offers the
common ones as launch arguments and ``config/occupancy.yaml`` mirrors the defaults; tests keep all
three in step. Adding a parameter is one ``ParamSpec`` line here plus its line in the YAML.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NODE_NAME = "discene_occupancy"
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA_DIR / "lite_distilled.pt"
PIPELINING_MODES = ("auto", "on", "off")  # the pipelining parameter (processing.frame_loop_mode)
RECTIFIED_MODES = ("auto", "true", "false")  # the rectified parameter (processing.images_rectified)
# rcl's YAML parser (``-p name:=value`` and parameter files), like PyYAML, reads an unquoted on/off or
# true/false as a bool: the words a bool stands for in a string parameter offering them
BOOL_CHOICE_WORDS = ({True: "on", False: "off"}, {True: "true", False: "false"})

# Output topics (relative to the node namespace; remap in the launch file if needed).
TOPIC_CLOUD = "occupancy/points"
TOPIC_MARKERS = "occupancy/markers"
TOPIC_GRID_POSE = "occupancy/grid_pose"
TOPIC_DIAGNOSTICS = "/diagnostics"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None   # inclusive, for int/float parameters
    choices: tuple[str, ...] | None = None     # the values a string parameter may take

    @property
    def kind(self) -> str:
        return {bool: "bool", int: "int", float: "float", str: "string"}[type(self.default)]

    @property
    def dynamic_typing(self) -> bool:
        """Declared with dynamic typing, the type checked by ``validate`` instead of rclpy: rcl types an
        unquoted value by its spelling, so ``floor_z:=0`` arrives as an integer and ``pipelining:=on`` or
        ``rectified:=true`` as a bool, which a statically typed declaration refuses."""
        return self.kind == "float" or (self.choices is not None and bool_choice(True, self.choices) is not None)


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("model_path", "", "Checkpoint (.pt, torch), ONNX (.onnx, onnxruntime/tensorrt) or engine (.engine); "
              "empty = the shipped lite_distilled.pt"),
    ParamSpec("backend", "torch", "Inference backend: torch, onnxruntime or tensorrt"),
    ParamSpec("device", "auto", "torch device: auto, cpu or cuda[:N]"),
    ParamSpec("fp16", False, "Half precision inference (CUDA torch autocast / FP16 engine / onnxruntime's TensorRT provider; other "
              "onnxruntime providers run the ONNX as exported, warned)"),
    ParamSpec("cuda_graph", True, "torch backend: static buffers, network and post-processing captured once per "
              "input shape as a CUDA graph and replayed per frame, next frame launched ahead (on the CPU: "
              "static-buffer eager replay)"),
    ParamSpec("frame_graph", True, "torch backend on CUDA with cuda_graph: each buffer slot's whole frame (upload, "
              "preprocessing, network, post-processing, copies back) captured as one CUDA graph: about 0.1 ms "
              "(0.02-0.17) less host CPU time per frame to launch it on an H200, for 100-400 MB more GPU memory (the "
              "network captured once more per slot); off: the preprocessing's and the network's graphs replayed apart"),
    ParamSpec("compile", False, "torch backend on CUDA: torch.compile the network (first frame compiles for tens "
              "of seconds, cached on disk by inductor; with fp16 the paper-size student goes from 133 to 204-232 FPS "
              "on an H200); ignored on the CPU, which stays eager"),
    ParamSpec("tf32", False, "torch backend on CUDA in FP32: TF32 tensor-core convolutions and matmuls (paper-size "
              "student 89 -> 220 FPS on an H200 with compile; 99.8 % of the voxel labels of IEEE FP32 on trained "
              "weights); off: IEEE FP32. No effect with fp16 or on the CPU"),
    ParamSpec("tf32_convolutions", False, "torch backend on CUDA in FP32: TF32 for the convolutions only, matmuls "
              "IEEE, as PyTorch's default FP32 (paper-size student 89 -> 146 FPS on an H200 with compile; 99.99 % of "
              "the voxel labels of IEEE FP32 on trained weights); implied by tf32. No effect with fp16 or on the CPU"),
    ParamSpec("image_topic", "/camera/color/image_raw", "RGB image topic (sensor_msgs/Image; one ending in /compressed "
              "is read as sensor_msgs/CompressedImage)"),
    ParamSpec("use_compressed", False, "Subscribe to <image_topic>/compressed (sensor_msgs/CompressedImage, jpeg/png) "
              "instead of the raw image; compressed images are decoded on a thread of their own where the frame loop "
              "is pipelined"),
    ParamSpec("rectified", "auto", "Whether the images are rectified: true = already undistorted (image_proc's "
              "image_rect), so not undistorted again, intrinsics from CameraInfo P (which may differ from K); false = raw, "
              "undistorted here with K when CameraInfo has non-zero coefficients; auto = true where the image topic's "
              "name (before any /compressed) starts with image_rect (image_rect, image_rect_color, image_rect_raw)",
              choices=RECTIFIED_MODES),
    ParamSpec("camera_info_topic", "", "CameraInfo of the RGB image (any resolution, K is rescaled); empty = the "
              "image topic's camera_info beside it, as image_transport's CameraSubscriber finds it "
              "(/camera/color/image_raw -> /camera/color/camera_info)"),
    ParamSpec("depth_topic", "/camera/aligned_depth_to_color/image_raw",
              "Depth aligned to the RGB image (16UC1 mm or 32FC1 m; a topic ending in /compressedDepth is read as "
              "image_transport's compressedDepth, png or rvl); used only when use_depth is true"),
    ParamSpec("use_depth", False, "Subscribe to depth and feed it to the depth branch (needs a DiScene-dagger model)"),
    ParamSpec("check_depth_frame", True, "Skip a depth image whose header frame_id differs from the colour image's "
              "(a leading '/' aside; an empty one is not checked): depth must be registered to the colour camera "
              "(RealSense: align_depth.enable:=true, aligned_depth_to_color); false: trust depth_topic to be aligned"),
    ParamSpec("sync_tolerance_s", 0.02, "Largest stamp difference between a colour image and its depth image / "
              "camera info, seconds (pairing by header stamp)", (0.0, 1.0)),
    ParamSpec("sync_wait_s", 0.1, "How long a colour image waits for its depth image and camera info, seconds "
              "(camera info only until two in a row had the same calibration: then the newest is used at once). "
              "With tf_timeout_s also 0, locating a frame never waits, and on a GPU the frame loop takes raw images "
              "on one thread (no decode thread): less host CPU per frame", (0.0, 2.0)),
    ParamSpec("world_frame", "odom", "Gravity-aligned frame (z up) of the grid and of all outputs"),
    ParamSpec("tf_timeout_s", 0.05, "How long to wait for the camera pose in TF at the image stamp (TF lagging "
              "the image), seconds; a pose still missing then skips the frame (0: see sync_wait_s)", (0.0, 1.0)),
    ParamSpec("use_fallback_pose", True, "When world_frame is not in TF at all, use a fallback camera pose (the "
              "mount base_frame -> camera from TF, else fallback_camera_height/pitch) instead of skipping the frame; "
              "a world frame TF publishes only as invalid transforms is not absent: its frames are skipped"),
    ParamSpec("base_frame", "base_link", "Robot frame on the floor whose static mount to the camera gives the "
              "fallback pose's height and pitch"),
    ParamSpec("fallback_camera_height", 1.0, "Fallback without a mount in TF: camera height above the floor, metres",
              (0.05, 3.0)),
    ParamSpec("fallback_camera_pitch_deg", 15.0, "Fallback without a mount in TF: camera pitch below the horizon, "
              "degrees (looking along +x)", (-45.0, 89.0)),
    ParamSpec("floor_z", 0.0, "World z of the floor: the bottom face of the grid, metres", (-10.0, 10.0)),
    ParamSpec("score_threshold", -1.0, "Points whose best class score is at most this are empty; "
              "negative = the model's own threshold (from its checkpoint or sidecar)", (-1.0, 0.99)),
    ParamSpec("closing", True, "3x3x3 closing of the voxel scores in post-processing (the reference's default)"),
    ParamSpec("publish_markers", True, "Also publish a MarkerArray (CUBE_LIST per class) for RViz; built only "
              "while something subscribes to it"),
    ParamSpec("marker_period", 20, "Publish the MarkerArray on every N-th processed frame (1 = every frame; "
              "one costs 7-24x the point cloud to build; every 20th costs about the cloud's time per frame or less)",
              (1, 1000)),
    ParamSpec("pipelining", "auto", "Frame loop: on = the next frames' decoding and preprocessing overlap this "
              "frame's inference on threads of their own (what a GPU needs to be kept busy); off = the network runs "
              "alone, and only the next frame's decoding and preprocessing overlap this frame's post-processing and "
              "publishing (a CPU whose inference uses every core: host work beside the inference only slows it "
              "down); auto = on where the network runs on a GPU, off on the CPU", choices=PIPELINING_MODES),
    ParamSpec("diagnostics_period_s", 1.0, "Period of the DiagnosticArray on /diagnostics, seconds", (0.1, 60.0)),
    ParamSpec("warn_throttle_s", 5.0, "At most one warning per problem kind in this many seconds", (0.0, 600.0)),
)
PARAMS_BY_NAME = {p.name: p for p in PARAMETERS}
TF_FRAME_PARAMETERS = ("world_frame", "base_frame")  # looked up in tf2, which refuses "" and a leading "/"


def defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMETERS}


def load_yaml_params(path: str | Path) -> dict[str, Any]:
    """``ros__parameters`` of a ROS 2 parameter file (first node entry, usually ``/**``)."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} is not a ROS 2 parameter file (top level must map node names to ros__parameters)")
    entry = next(iter(data.values()))
    if not isinstance(entry, dict) or "ros__parameters" not in entry:
        raise ValueError(f"{path}: the node entry has no 'ros__parameters'")
    return dict(entry["ros__parameters"])


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Check names, types and ranges against the table; returns the merged parameters."""
    out = defaults()
    for name, value in values.items():
        spec = PARAMS_BY_NAME.get(name)
        if spec is None:
            raise ValueError(f"unknown parameter '{name}'; known: {sorted(PARAMS_BY_NAME)}")
        if spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if spec.choices is not None and isinstance(value, bool) and bool_choice(value, spec.choices) is not None:
            value = bool_choice(value, spec.choices)
        if type(value) is not type(spec.default):
            raise ValueError(f"parameter '{name}' must be {spec.kind}, got {value!r}")
        check_range(name, value)
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"parameter '{name}'={value!r} is not one of {', '.join(spec.choices)}")
        out[name] = value
    for name in TF_FRAME_PARAMETERS:
        out[name] = tf_frame(name, out[name])
    return out


def bool_choice(value: bool, choices: tuple[str, ...]) -> str | None:
    """The word among ``choices`` that a bool stands for (on/off, true/false), else None."""
    for words in BOOL_CHOICE_WORDS:
        if words[value] in choices:
            return words[value]
    return None


def check_range(name: str, value: float) -> None:
    """ValueError when ``value`` lies outside parameter ``name``'s range (NaN lies outside every range)."""
    spec = PARAMS_BY_NAME[name]
    if spec.range is not None and not spec.range[0] <= value <= spec.range[1]:
        raise ValueError(f"parameter '{name}'={value} is outside [{spec.range[0]}, {spec.range[1]}]")


def base_image_topic(image_topic: str) -> str:
    """image_transport's base topic of an image topic: without a ``/compressed`` transport suffix."""
    return image_topic.rstrip("/").removesuffix("/compressed")


def rectified_topic(image_topic: str) -> bool:
    """Whether an image topic's name says its images are rectified: its base name (before any ``/compressed``)
    starts with ``image_rect`` (image_proc's image_rect and image_rect_color, RealSense's image_rect_raw)."""
    return base_image_topic(image_topic).rsplit("/", 1)[-1].startswith("image_rect")


def camera_info_topic_for(image_topic: str) -> str:
    """The CameraInfo topic beside an image topic, image_transport's ``getCameraInfoTopic`` rule (its parent
    namespace + ``/camera_info``) on the base topic; a relative image topic gives a relative one, so that
    both resolve in the node's namespace alike."""
    base = base_image_topic(image_topic)
    parent = "/".join(token for token in base.split("/")[:-1] if token)
    if base.startswith("/"):
        return f"/{parent}/camera_info" if parent else "/camera_info"
    return f"{parent}/camera_info" if parent else "camera_info"


def tf_frame(name: str, value: str) -> str:
    """A frame parameter as tf2 stores frame ids: "/odom" (ROS 1 style) is "odom"; ValueError when empty."""
    frame = value.lstrip("/")
    if not frame:
        raise ValueError(f"parameter '{name}' names no TF frame")
    return frame


def unknown_parameters_note(given: list[str] | set[str], known: list[str] | set[str]) -> str | None:
    """A warning naming the given parameters this node does not have, with the nearest known name of each;
    None when there are none. rclpy ignores such overrides without a word, so a typo in a parameter file
    (``scor_threshold``) would otherwise leave the default in force unnoticed."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    named = []
    for name in unknown:
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        named.append(f"'{name}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
    return (f"ignoring {len(unknown)} parameter(s) given for this node that it does not have: {', '.join(named)}; "
            "`occupancy_node --help` lists its parameters")
