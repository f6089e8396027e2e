# ruff: noqa: I001  (ruff takes the repository folder launch/ for the launch package)
"""Launch the DiScene occupancy node (and optionally RViz 2 with the shipped config).

    ros2 launch discene_ros occupancy.launch.py image_topic:=/camera/color/image_raw world_frame:=odom rviz:=true

Parameters come from ``config/occupancy.yaml`` (``params_file``); the launch arguments below
override the most common ones. Their defaults equal the YAML defaults.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

PACKAGE = "discene_ros"

# (name, default, type of the node parameter, description); type None = launch-only argument
ARGUMENTS = (
    ("model_path", "", str, "Checkpoint (.pt), ONNX (.onnx) or TensorRT engine (.engine); empty = shipped lite model"),
    ("backend", "torch", str, "torch, onnxruntime or tensorrt"),
    ("device", "auto", str, "torch device: auto, cpu or cuda"),
    ("image_topic", "/camera/color/image_raw", str, "RGB image topic"),
    ("use_compressed", "false", bool, "Subscribe to <image_topic>/compressed instead"),
    ("camera_info_topic", "/camera/color/camera_info", str, "CameraInfo topic of the RGB image"),
    ("depth_topic", "/camera/aligned_depth_to_color/image_raw", str, "Aligned depth topic (16UC1 mm / 32FC1 m)"),
    ("use_depth", "false", bool, "Use the depth topic (DiScene-dagger models)"),
    ("world_frame", "odom", str, "Gravity-aligned frame of the grid and outputs"),
    ("use_fallback_pose", "true", bool, "Use the fixed camera height/pitch when TF has no camera pose"),
    ("score_threshold", "-1.0", float, "Occupancy score threshold; negative = the model's own"),
    ("rviz", "false", None, "Start RViz 2 with rviz/discene.rviz"),
)


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    actions = [DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "occupancy.yaml"]),
                                     description="ROS 2 parameter file of the node")]
    actions += [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, _, text in ARGUMENTS]
    overrides = {name: ParameterValue(LaunchConfiguration(name), value_type=kind)
                 for name, _, kind, _ in ARGUMENTS if kind is not None}
    actions.append(Node(package=PACKAGE, executable="occupancy_node", name="discene_occupancy", output="screen",
                        parameters=[LaunchConfiguration("params_file"), overrides]))
    actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                        arguments=["-d", PathJoinSubstitution([share, "rviz", "discene.rviz"])],
                        condition=IfCondition(LaunchConfiguration("rviz"))))
    return LaunchDescription(actions)
