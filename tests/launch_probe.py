"""Run launch/occupancy.launch.py with the real ``launch`` / ``launch_ros`` as ``ros2 launch`` would, up
to the point where processes would start; print what each Node action would run, as JSON.

Used by tests/test_ros_launch.py in a subprocess whose PYTHONPATH holds one distro's packages from
../shared/ros2-python plus a minimal rclpy stub (launch_ros imports a few rclpy names). Arguments:
the launch file, then NAME:=VALUE launch arguments; or ``--serve``: one launch per line of standard input
(``{"argv": [...], "env": {...}}``), each answered by one line (``{"nodes": [...], "kept_after_shutdown": [...]}``
or ``{"error": traceback}``),
so that a test module imports launch once per distro, not once per launch (0.6 s each).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

from ament_index_python.packages import PackageNotFoundError
from launch.actions import IncludeLaunchDescription
from launch.events import Shutdown
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.utilities import perform_substitutions
from launch.utilities.type_utils import perform_typed_substitution
from launch_ros.actions import Node

from launch import LaunchContext


def visit(entity, context, nodes):
    if isinstance(entity, Node):
        if entity.condition is not None and not entity.condition.evaluate(context):
            return
        entity._perform_substitutions(context)  # what Node.execute does before starting the process
        cmd = []
        for part in entity.cmd:
            try:
                cmd.append(perform_substitutions(context, part))
            except PackageNotFoundError:  # what `ros2 launch` stops on: an executable's package is not installed
                raise
            except Exception:  # ros_specific_arguments placeholders exist only while executing
                cmd.append("<ros-specific>")
        nodes.append({"name": entity.node_name.rsplit("/", 1)[-1], "namespace": entity.expanded_node_namespace,
                      "cmd": cmd, "params": parameter_files(entity._Node__expanded_parameter_arguments),
                      "remaps": entity.expanded_remapping_rules or [],
                      "respawn": perform_typed_substitution(context, entity._ExecuteLocal__respawn, bool),
                      "respawn_delay": entity._ExecuteLocal__respawn_delay})
        return
    for sub in entity.visit(context) or []:
        visit(sub, context, nodes)


def parameter_files(arguments: list | None) -> list | None:
    """The node's ``--params-file`` arguments as [path, is_file, text]: read now, while the launch runs."""
    if arguments is None:
        return None
    return [[path, is_file, open(path).read() if is_file else None] for path, is_file in arguments]


def shut_down(context: LaunchContext) -> None:
    """What the launch's Shutdown event runs: the OnShutdown handlers registered by the launch file."""
    event = Shutdown(reason="launch probe")
    for handler in list(context._event_handlers):
        if handler.matches(event):
            for entity in handler.handle(event, context) or []:
                visit(entity, context, [])


def launch_arguments(argv: list[str]) -> list[tuple[str, str]]:
    """NAME:=VALUE pairs, refused where ``ros2 launch`` refuses them (ros2launch/api/api.py,
    parse_launch_arguments): no ``:=``, no name, or an empty value (``name:=``)."""
    for arg in argv:
        if arg.count(":=") == 0 or arg.startswith(":=") or (arg.count(":=") == 1 and arg.endswith(":=")):
            raise RuntimeError(f"malformed launch argument '{arg}', expected format '<name>:=<value>'")
    return [tuple(arg.split(":=", 1)) for arg in argv]


def run(argv: list[str]) -> dict:
    """The Node actions of one ``ros2 launch FILE NAME:=VALUE ...``, in a fresh launch context, and the
    parameter files that are still there after the launch has shut down."""
    path, args = argv[0], launch_arguments(argv[1:])
    context = LaunchContext()
    include = IncludeLaunchDescription(PythonLaunchDescriptionSource(path), launch_arguments=args)
    nodes = []
    visit(include, context, nodes)
    shut_down(context)
    files = {path for node in nodes for path, is_file, _ in node["params"] or [] if is_file}
    return {"nodes": nodes, "kept_after_shutdown": sorted(f for f in files if os.path.exists(f))}


def serve() -> None:
    """Answer launches read from standard input, one per line, until it closes. ament_index and the launch
    file read the environment at each launch, so a request's ``env`` (the package prefix) applies to it."""
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        os.environ.update(request["env"])
        try:
            with contextlib.redirect_stdout(sys.stderr):  # what the launch prints stays out of the replies
                reply = run(request["argv"])
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        print(json.dumps(run(sys.argv[1:])))
