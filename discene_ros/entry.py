"""``occupancy_node`` entry point: checks the runtime before importing the node.

torch is not a pip dependency of this package (the robot's own CUDA / JetPack build, or the CPU
wheel, is installed first), and every frame path imports it. Without it the user gets one line
saying what to install instead of a ModuleNotFoundError traceback; ``--help`` works without torch
and without ROS 2. This module imports neither.
"""
from __future__ import annotations

import importlib
import sys

from . import params as P

TORCH_HELP = ("torch is not installed for this Python ({python}: {error}): install the robot's own torch build (JetPack / "
              "CUDA), or the CPU wheel in a venv that sees the ROS 2 packages: python3 -m venv "
              "--system-site-packages ~/discene-venv && ~/discene-venv/bin/pip install torch (README, 'On a robot')")


def usage() -> str:
    """``--help`` text: how to run the node and its parameters (from the parameter table)."""
    rows = "\n".join(f"  {p.name} ({p.kind}, default {p.default!r}): {p.description}" for p in P.PARAMETERS)
    return ("usage: ros2 run discene_ros occupancy_node [--ros-args -p NAME:=VALUE | --params-file FILE]\n"
            "       ros2 launch discene_ros occupancy.launch.py [NAME:=VALUE ...] [params_file:=FILE]\n\n"
            f"DiScene semantic occupancy node. Parameters (read-only, set at start-up):\n{rows}\n")


def missing_runtime() -> str | None:
    """What is missing to run the node (one line), or None."""
    try:  # imported here, not at the top: it is exactly the optional dependency being checked
        importlib.import_module("torch")
    except ImportError as exc:  # absent, or a build whose libraries do not load
        return TORCH_HELP.format(python=sys.executable, error=exc)
    return None


def occupancy_node(argv: list[str] | None = None) -> int:
    """Console script / lib/discene_ros/occupancy_node: --help, the torch check, then node.main."""
    argv = sys.argv[1:] if argv is None else argv
    ros_args = argv[argv.index("--ros-args"):] if "--ros-args" in argv else []
    if {"-h", "--help"} & set(argv[: len(argv) - len(ros_args)]):
        print(usage())
        return 0
    problem = missing_runtime()
    if problem is not None:
        print(f"occupancy_node: cannot start: {problem}", file=sys.stderr)
        return 1
    from .node import main  # imports torch (processing -> models)

    return main([sys.argv[0], *argv])
