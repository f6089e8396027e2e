# ruff: noqa: I001  (ruff takes the repository folder launch/ for the launch package)
"""Launch the DiScene occupancy node (and optionally RViz 2 with the shipped config).

    ros2 launch discene_ros occupancy.launch.py image_topic:=/camera/color/image_raw world_frame:=odom rviz:=true
    ros2 launch discene_ros occupancy.launch.py params_file:=my_robot.yaml

Parameters come from ``params_file`` (default: the shipped config/occupancy.yaml). The launch
arguments below override single parameters, and only when given: an argument left out keeps the
value of ``params_file`` (``ros2 launch`` refuses an empty value, ``name:=``, and an empty string from
an including launch file counts as not given). A given argument wins over every entry of ``params_file``:
it goes to the node in a parameter file of its own (in the temporary directory, removed when the launch
shuts down), under a node key that ``params_file`` lacks, which rcl applies last
(discene_ros/launch_params.py). Booleans are ``true`` / ``false`` (not 1 / 0). RViz gets the effective
``world_frame`` (the argument, else rclpy's reading of ``params_file`` for the node's full name,
namespace included) as its fixed frame, its camera display (the occupancy over the image) follows the
effective ``image_topic`` and camera info, and it runs in the node's namespace (included under
``PushRosNamespace``, one per camera). ``use_sim_time`` goes to both (RViz's in a file removed likewise).
"""
from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.conditions import IfCondition
from launch.event_handlers import OnShutdown
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare
from launch_ros.utilities import make_namespace_absolute, prefix_namespace

from discene_ros.launch_params import full_name, node_parameters, read_entries, write_winning_file
from discene_ros.params import NODE_NAME, PARAMS_BY_NAME, base_image_topic, camera_info_topic_for

PACKAGE = "discene_ros"
# Node parameters offered as launch arguments (type, description and default come from discene_ros/params.py).
LAUNCH_PARAMETERS = ("model_path", "backend", "device", "fp16", "cuda_graph", "compile", "tf32",
                     "tf32_convolutions", "image_topic", "rectified", "use_compressed", "camera_info_topic", "depth_topic",
                     "use_depth", "world_frame", "use_fallback_pose", "score_threshold", "pipelining")
NOT_GIVEN = ""  # default of those arguments: keep the params_file value
# The image topic of the Camera display in rviz/discene.rviz (the occupancy drawn over the image), and the
# camera_info RViz finds beside it (image_transport's rule); both are remapped to the node's effective
# topics. The occupancy displays name relative topics, so a namespaced launch finds them.
RVIZ_CAMERA_TOPIC = "/camera/color/image_raw"
RVIZ_CAMERA_INFO_TOPIC = camera_info_topic_for(RVIZ_CAMERA_TOPIC)
RVIZ_NODE = "rviz2"
RESPAWN_DELAY_S = 2.0  # with respawn:=true, the node restarts this long after it ended


def boolean(name: str, text: str) -> bool:
    """A boolean launch argument: true or false only (1 / 0 are refused rather than guessed)."""
    if text.strip().lower() not in ("true", "false"):
        raise ValueError(f"launch argument {name}:={text}: booleans are true or false")
    return text.strip().lower() == "true"


def typed_value(name: str, text: str):
    """A launch argument string as the node parameter's type; bool only as true/false."""
    kind = PARAMS_BY_NAME[name].kind
    if kind == "bool":
        return boolean(name, text)
    if kind == "float":
        return float(text)
    if kind == "int":
        return int(text)
    return text


def remove_at_shutdown(path: str) -> RegisterEventHandler:
    """Delete a parameter file this launch wrote when the launch ends (a respawned node reads it again)."""
    return RegisterEventHandler(OnShutdown(on_shutdown=lambda event, context: Path(path).unlink(missing_ok=True)))


def start_nodes(context, *args, **kwargs):
    """Node and RViz actions from the launch arguments the user actually gave."""
    params_file = LaunchConfiguration("params_file").perform(context)
    given = {name: value for name in LAUNCH_PARAMETERS
             if (value := LaunchConfiguration(name).perform(context)) != NOT_GIVEN}
    overrides = {name: typed_value(name, value) for name, value in given.items()}
    # the node's full name: namespace "" below puts it in the namespace an including launch file pushed
    namespace = make_namespace_absolute(prefix_namespace(context.launch_configurations.get("ros_namespace"), ""))
    node_name = full_name(namespace, NODE_NAME)
    entries = read_entries(params_file)
    in_file = node_parameters(entries, node_name)  # what rclpy gives the node from params_file

    def effective(name: str):  # the value the node will run with
        return given.get(name, in_file.get(name, PARAMS_BY_NAME[name].default))

    # use_sim_time is rclpy's own parameter: given, it goes to the node; given or in the file, to RViz too
    if (sim_time := LaunchConfiguration("use_sim_time").perform(context)) != NOT_GIVEN:
        overrides["use_sim_time"] = boolean("use_sim_time", sim_time)
    rviz_parameters = ({"use_sim_time": overrides.get("use_sim_time", in_file.get("use_sim_time"))}
                       if "use_sim_time" in overrides or "use_sim_time" in in_file else {})
    # RViz's camera display shows the image the node reads (the raw one where the node reads /compressed),
    # with the node's camera info
    camera_topic = base_image_topic(effective("image_topic"))
    info_topic = effective("camera_info_topic") or camera_info_topic_for(camera_topic)
    # the given arguments last, under a node key params_file lacks: rcl applies it after all of its keys
    written = [write_winning_file(entries, node_name, overrides)] if overrides else []
    # RViz's in a file of ours too: launch_ros would write a dict to a temporary file it never removes
    rviz_written = [write_winning_file([], full_name(namespace, RVIZ_NODE), rviz_parameters)] if rviz_parameters else []
    share = FindPackageShare(PACKAGE)
    return [
        *(remove_at_shutdown(path) for path in written + rviz_written),
        Node(package=PACKAGE, executable="occupancy_node", name=NODE_NAME, namespace="", output="screen",
             parameters=[params_file, *written],
             respawn=boolean("respawn", LaunchConfiguration("respawn").perform(context)),
             respawn_delay=RESPAWN_DELAY_S),
        Node(package="rviz2", executable="rviz2", name=RVIZ_NODE, output="screen",
             arguments=["-d", PathJoinSubstitution([share, "rviz", "discene.rviz"]), "-f", effective("world_frame")],
             parameters=rviz_written,
             remappings=[(RVIZ_CAMERA_TOPIC, camera_topic), (RVIZ_CAMERA_INFO_TOPIC, info_topic)],
             condition=IfCondition(LaunchConfiguration("rviz"))),
    ]


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    actions = [DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "occupancy.yaml"]),
                                     description="ROS 2 parameter file of the node")]
    for name in LAUNCH_PARAMETERS:
        spec = PARAMS_BY_NAME[name]
        actions.append(DeclareLaunchArgument(
            name, default_value=NOT_GIVEN,
            description=f"{spec.description} ({spec.kind}; left out: the params_file value, shipped default "
                        f"{spec.default!r})"))
    actions.append(DeclareLaunchArgument("rviz", default_value="false", description="Start RViz 2 (true/false)"))
    actions.append(DeclareLaunchArgument(
        "respawn", default_value="false",
        description=f"Restart the node {RESPAWN_DELAY_S:g} s after it ends for any reason (true/false); a "
                    "configuration it refuses then repeats its one-line error at that pace"))
    actions.append(DeclareLaunchArgument(
        "use_sim_time", default_value=NOT_GIVEN,
        description="Run the node and RViz on /clock (true/false; for `ros2 bag play --clock`); left out: the "
                    "params_file value, else false"))
    actions.append(OpaqueFunction(function=start_nodes))
    return LaunchDescription(actions)
