"""How rcl and rclpy apply ROS 2 parameter files to one node, for launch/occupancy.launch.py.

rcl parses every ``--params-file`` of a process into one table of node-name keys: a key already seen is
reused (its later values overwrite), a new one is appended (rcl_yaml_param_parser/src/parse.c,
``find_node``). rclpy applies the keys in that first-seen order, later ones win, each key matched to the
node's full name with ``/*`` standing for one name token and ``/**`` for any number
(``_populate_node_parameters_from_rcl_params`` in rclpy/src/rclpy/node.cpp, the same on Humble and Jazzy).
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

PARAMS_KEY = "ros__parameters"
LAYOUT = "its top level must map node names to {ros__parameters: {name: value}}"


def full_name(namespace: str, name: str) -> str:
    """The node's fully qualified name, what rclpy matches parameter-file keys against."""
    return namespace.rstrip("/") + "/" + name


def read_entries(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(node key, parameters) of a parameter file in file order; nested node keys joined with ``/`` and
    nested parameters with ``.`` as rcl does. A missing or malformed file is named in one line."""
    if not Path(path).exists():
        raise FileNotFoundError(f"params_file {path} does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"params_file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a folder, no read permission, a binary file
        raise ValueError(f"params_file {path} cannot be read as text: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"params_file {path} is not a ROS 2 parameter file: {LAYOUT}")
    entries = []

    def walk(key: str, mapping: dict) -> None:
        for name, value in mapping.items():
            if name == PARAMS_KEY:
                if not key or not isinstance(value, dict):
                    raise ValueError(f"params_file {path}: entry {key or name!r} is not a ROS 2 parameter entry: "
                                     f"{LAYOUT}")
                entries.append((key, flat_parameters(value)))
            elif isinstance(value, dict):  # a node key in parts: rcl joins them with one "/"
                walk(str(name) if not key else key + ("" if key.endswith("/") else "/") + str(name), value)
            elif value is not None:
                raise ValueError(f"params_file {path}: entry {name!r} is not a ROS 2 parameter entry: {LAYOUT}")

    walk("", data)
    return entries


def flat_parameters(parameters: dict, prefix: str = "") -> dict[str, Any]:
    """Nested parameter maps as rcl names them: ``{a: {b: 1}}`` is the parameter ``a.b``."""
    out = {}
    for name, value in parameters.items():
        if isinstance(value, dict):
            out.update(flat_parameters(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def key_matches(key: str, node_full_name: str) -> bool:
    """rclpy's rule: a leading ``/`` is added, ``/*`` becomes one ``/token``, so ``/**`` any number."""
    pattern = (key if key.startswith("/") else "/" + key).replace("/*", r"(/\w+)")
    return re.fullmatch(pattern, node_full_name, re.ASCII) is not None


def node_parameters(entries: list[tuple[str, dict[str, Any]]], node_full_name: str) -> dict[str, Any]:
    """The parameters rclpy gives the node from these entries (all its files' entries, in command-line order)."""
    table: dict[str, dict[str, Any]] = {}  # insertion order: rcl's first-seen order of the keys
    for key, parameters in entries:
        table.setdefault(key, {}).update(parameters)
    out = {}
    for key, parameters in table.items():
        if key_matches(key, node_full_name):
            out.update(parameters)
    return out


def winning_key(entries: list[tuple[str, dict[str, Any]]], node_full_name: str) -> str:
    """A key for parameters that must win over these entries: one that matches the node and that they do not
    have, so that rcl appends it after theirs: the full name, prefixed with ``/**`` until it is new."""
    taken = {key for key, _ in entries}
    key = node_full_name
    while key in taken:
        key = "/**" + key
    return key


def write_winning_file(entries: list[tuple[str, dict[str, Any]]], node_full_name: str,
                       parameters: dict[str, Any]) -> str:
    """A parameter file (path) whose ``parameters`` win over ``entries`` when passed after them. Written as
    JSON, which is YAML with every string double-quoted, so rcl reads ``"123"`` or ``"inf"`` as a string."""
    document = {winning_key(entries, node_full_name): {PARAMS_KEY: parameters}}
    with tempfile.NamedTemporaryFile("w", prefix="discene_launch_params_", suffix=".yaml", delete=False) as f:
        f.write(json.dumps(document, indent=2) + "\n")
    return f.name
