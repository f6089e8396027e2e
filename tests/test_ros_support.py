"""Shared helpers of the discene_ros tests (no tests here): test backends and a fake rclpy module tree.

The fake rclpy records what the node asks of the rclpy API (parameters with descriptors, QoS,
subscriptions, publishers, timers, init/shutdown); its message classes are the real ROS 2
definitions from the rosbags typestore, so published messages can be CDR-serialised.
"""
from __future__ import annotations

import ast
import functools
import math
import re
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.interfaces import Nodetype

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


def run_frames(runner: Any, n: int, pause_s: float = 0.0, timeout: float = 20.0) -> dict[str, int]:
    """Submit frames 0..n-1 to a FrameRunner (``pause_s`` after each), wait until every one is done, close
    it; its counts."""
    try:
        for item in range(n):
            runner.submit(item)
            if pause_s:
                time.sleep(pause_s)
        assert runner.wait_idle(timeout)
    finally:
        runner.close()
    return runner.counts()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False); for threaded tests."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def pipeline_for(backend: Backend) -> OccupancyPipeline:
    return OccupancyPipeline(backend)


# ----------------------------------------------------------------------------- fake rclpy
ROS2_PYTHON = Path(__file__).resolve().parents[2] / "shared" / "ros2-python"
DISTROS = ("humble", "jazzy")


def real_node_members() -> dict[str, dict[str, str]]:
    """{distro: {member: "property" | "method" | "attribute"}} of rclpy's real ``Node`` class, read with
    ``ast`` from ../shared/ros2-python/<distro>/rclpy/node.py (importing it needs the C extension);
    attributes are what ``Node.__init__`` and its methods assign on ``self``. Empty when absent."""
    return {distro: dict(members) for distro, members in _parsed_node_members()}


@functools.cache
def _parsed_node_members() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """``real_node_members`` as parsed once per test process (0.1 s a parse; every fake rclpy asks for it)."""
    out: dict[str, dict[str, str]] = {}
    for distro in DISTROS:
        path = ROS2_PYTHON / distro / "rclpy" / "node.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text())
        (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Node"]
        members: dict[str, str] = {}
        for item in cls.body:
            if isinstance(item, ast.FunctionDef):
                is_property = any(getattr(d, "id", None) == "property" or getattr(d, "attr", None) == "setter"
                                  for d in item.decorator_list)
                members[item.name] = "property" if is_property else "method"
            elif isinstance(item, ast.Assign):
                members.update({t.id: "attribute" for t in item.targets if isinstance(t, ast.Name)})
        for node in ast.walk(cls):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                name = f"_Node{node.attr}" if node.attr.startswith("__") else node.attr
                members.setdefault(name, "attribute")
        out[distro] = {(f"_Node{k}" if k.startswith("__") and not k.endswith("__") else k): v
                       for k, v in members.items()}
    return tuple((distro, tuple(members.items())) for distro, members in out.items())


# The methods and properties of rclpy's ``Publisher`` (rclpy/rclpy/publisher.py of ros2/rclpy, the same on its
# humble and jazzy branches), which ../shared/ros2-python does not carry: the fake's must be among them.
RCLPY_PUBLISHER_METHODS = frozenset({"publish", "get_subscription_count", "topic_name", "handle", "destroy",
                                     "assert_liveliness", "wait_for_all_acked"})


# tf2_ros_py's TransformListener (tf2_ros_py/tf2_ros/transform_listener.py of ros2/geometry2, the same file on its
# humble and jazzy branches), which ../shared/ros2-python does not carry: its methods, and its constructor's
# parameters in order. The fake's must be these. (Rolling adds tf_topic and tf_static_topic, geometry2 PR #709: a
# node passing them would fail on Humble and Jazzy.)
TF2_LISTENER_METHODS = frozenset({"__init__", "__del__", "unregister", "callback", "static_callback"})
TF2_LISTENER_PARAMETERS = ("self", "buffer", "node", "spin_thread", "qos", "static_qos")


# rcl_interfaces/msg/ParameterType's numbers of the Python types the node's parameters take (rclpy's
# Parameter.Type.from_parameter_value); the fake keeps a parameter's and a descriptor's type as these.
PARAMETER_TYPES = {bool: 1, int: 2, float: 3, str: 4}


class FakeContext:
    def __init__(self) -> None:
        self._ok = False

    def ok(self) -> bool:
        return self._ok

    def init(self) -> None:
        self._ok = True

    def shutdown(self) -> None:
        self._ok = False


class FakeRos:
    """Everything the node asked of the fake rclpy, for assertions."""

    def __init__(self, typestore: Any, overrides: dict[str, Any] | None = None) -> None:
        self.typestore = typestore
        self.overrides = dict(overrides or {})
        self.calls: list[str] = []
        self.nodes: list[Any] = []
        self.qos: list[Any] = []
        self.context = FakeContext()
        self.context.init()  # tests build nodes directly, as after rclpy.init()
        # (target, source) -> TransformStamped, or an exception instance to raise (e.g. extrapolation)
        self.transforms: dict[tuple[str, str], Any] = {}
        self.tf_lookups: list[tuple[str, str, int, Any]] = []
        self.tf_clears = 0
        self.tf_invalid_queries = 0  # can_transform calls with a frame id tf2 refuses
        self.tf_set: list[tuple[Any, str, bool]] = []  # (transform, authority, static) the listener handed to tf2
        self.parameter_events: list[tuple[str, Any]] = []  # (name, value) of each parameter set after declaring
        self.spin_raises: type[BaseException] = KeyboardInterrupt
        self.spin_hook: Any = None


_RCL_TRUE = ("Y", "y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")
_RCL_FALSE = ("N", "n", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")


def rcl_value(text: str) -> Any:
    """The value an unquoted ``-p name:=text`` (or parameter-file scalar) reaches rclpy with: rcl's
    ``rcl_yaml_param_parser`` ``get_value`` tries bool words, then an integer (strtoll, base 0), then a
    float (strtod), else keeps the string."""
    if text in _RCL_TRUE or text in _RCL_FALSE:
        return text in _RCL_TRUE
    whole = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if whole:
        digits = whole.group(2)
        base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
        return int(whole.group(1) + (digits[2:] if base == 16 else digits), base)
    if text in (".nan", ".NaN", ".NAN"):
        return math.nan
    if text.lstrip("+-") in (".inf", ".Inf", ".INF") and len(text) - len(text.lstrip("+-")) <= 1:
        return -math.inf if text.startswith("-") else math.inf
    if "_" not in text:  # Python's float() takes digit separators, strtod does not
        try:
            return float(text)
        except ValueError:
            pass
    return text


def _msg_module(ros: FakeRos, package: str) -> types.ModuleType:
    """``<package>.msg`` of the fake: each class is the typestore's (so messages serialise to CDR) with rclpy's
    constants and defaults where they differ: rosidl_generator_py makes a byte (octet) constant and a byte
    field's default ``bytes`` (constant_value_to_py: DiagnosticStatus.WARN is b'\\x01'), the typestore ints.
    Fields left out get their ROS default, as rclpy's constructors give them."""
    from discene_ros.msg_factory import TypestoreFactory

    factory = TypestoreFactory(ros.typestore)
    mod = types.ModuleType(f"{package}.msg")
    for name in ros.typestore.types:
        pkg, _, cls_name = name.split("/")
        if pkg != package:
            continue
        base = ros.typestore.types[name]
        consts, fields = ros.typestore.fielddefs[name]
        constants = {c[0]: bytes([c[2]]) if c[1] == "byte" else c[2] for c in consts}
        byte_fields = [field for field, (nodetype, desc) in fields if nodetype == Nodetype.BASE and desc[0] == "byte"]

        def __init__(self: Any, _msgtype: str = name, _base: type = base, _constants: dict = constants,
                     _byte_fields: list = byte_fields, **kw: Any) -> None:
            for key in (*_constants, "__msgtype__"):  # what dataclasses.replace passes on besides the fields
                kw.pop(key, None)
            for field in _byte_fields:
                kw.setdefault(field, bytes([0]))
            filled = factory.new(_msgtype, **kw)  # the typestore's defaults for the fields left out
            _base.__init__(self, **{field: getattr(filled, field) for field, _ in ros.typestore.fielddefs[_msgtype][1]},
                           **{key: value for key, value in _constants.items() if hasattr(filled, key)})

        setattr(mod, cls_name, type(cls_name, (base,), {"__init__": __init__, "msgtype": name, **constants}))
    return mod


def byte_field_problem(typestore: Any, msg: Any) -> str | None:
    """The first byte field of ``msg`` (nested messages included) that rclpy's generated setter would refuse:
    rosidl_generator_py takes only ``bytes`` of length 1 for a byte (octet) field, e.g. DiagnosticStatus.level."""
    for name, (nodetype, desc) in typestore.fielddefs[msg.__msgtype__][1]:
        value = getattr(msg, name)
        if nodetype == Nodetype.BASE and desc[0] == "byte":
            if not (isinstance(value, bytes) and len(value) == 1):
                return (f"{msg.__msgtype__}.{name} = {value!r}: The '{name}' field must be of type 'bytes' or "
                        "'ByteString' with length 1")
            continue
        nested = _nested_type(nodetype, desc)
        if nested is not None and _has_byte_field(typestore, nested):
            for item in [value] if nodetype == Nodetype.NAME else value:
                if (problem := byte_field_problem(typestore, item)) is not None:
                    return problem
    return None


def _nested_type(nodetype: Any, desc: Any) -> str | None:
    """The message type of a field that holds messages (one, an array or a sequence), else None."""
    if nodetype == Nodetype.NAME:
        return desc
    if nodetype in (Nodetype.ARRAY, Nodetype.SEQUENCE) and desc[0][0] == Nodetype.NAME:
        return desc[0][1]
    return None


def _has_byte_field(typestore: Any, msgtype: str) -> bool:
    """Whether ``msgtype`` has a byte field, itself or in a nested message (so a point cloud's are not walked)."""
    return any((nodetype == Nodetype.BASE and desc[0] == "byte")
               or ((nested := _nested_type(nodetype, desc)) is not None and _has_byte_field(typestore, nested))
               for _, (nodetype, desc) in typestore.fielddefs[msgtype][1])


def _exceptions_module() -> types.ModuleType:
    """rclpy.exceptions with the real parameter exception hierarchy (rclpy/exceptions.py)."""
    mod = types.ModuleType("rclpy.exceptions")

    class ParameterException(Exception):
        def __init__(self, error_msg: str, parameters: Any) -> None:
            Exception.__init__(self, f"{error_msg}: {parameters}")

    class InvalidParameterTypeException(ParameterException):
        def __init__(self, desired_parameter: Any, expected_type: Any) -> None:
            ParameterException.__init__(
                self, f"Trying to set parameter '{desired_parameter.name}' to '{desired_parameter.value}' of type "
                      f"'{type(desired_parameter.value).__name__}', expecting type '{expected_type}'",
                desired_parameter.name)

    class InvalidParameterValueException(ParameterException):
        def __init__(self, parameter: str, value: Any, reason: str) -> None:
            ParameterException.__init__(
                self, f"Invalid parameter value ({value}) for parameter. Reason: {reason}", parameter)

    class ParameterAlreadyDeclaredException(ParameterException):
        def __init__(self, parameters: Any) -> None:
            ParameterException.__init__(self, "Parameter(s) already declared", parameters)

    class ParameterNotDeclaredException(ParameterException):
        def __init__(self, parameters: Any) -> None:
            ParameterException.__init__(self, "Invalid access to undeclared parameter(s)", parameters)

    class ParameterImmutableException(ParameterException):
        def __init__(self, parameters: Any) -> None:
            ParameterException.__init__(self, "Attempted to modify read-only parameter", parameters)

    class NotInitializedException(Exception):
        pass

    class NameValidationException(Exception):
        def __init__(self, name_type: str, name: str, error_msg: str, invalid_index: int, *args: Any) -> None:
            Exception.__init__(self, f"Invalid {name_type}: {error_msg}:\n  '{name}'\n   {' ' * invalid_index}^")

    class InvalidTopicNameException(NameValidationException):
        def __init__(self, name: str, error_msg: str, invalid_index: int, *args: Any) -> None:
            NameValidationException.__init__(self, "topic name", name, error_msg, invalid_index)

    for cls in (ParameterException, InvalidParameterTypeException, InvalidParameterValueException,
                ParameterAlreadyDeclaredException, ParameterNotDeclaredException, ParameterImmutableException,
                NotInitializedException, NameValidationException, InvalidTopicNameException):
        setattr(mod, cls.__name__, cls)
    return mod


def _implementation_module() -> types.ModuleType:
    """rclpy.impl.implementation_singleton: the C extension's exceptions as rclpy's _rclpy_pybind11.cpp registers
    them (RCLError and UnknownROSArgsError are RuntimeErrors)."""
    mod = types.ModuleType("rclpy.impl.implementation_singleton")
    rcl_error = type("RCLError", (RuntimeError,), {})
    mod.rclpy_implementation = types.SimpleNamespace(
        RCLError=rcl_error, RCLInvalidROSArgsError=type("RCLInvalidROSArgsError", (rcl_error,), {}),
        UnknownROSArgsError=type("UnknownROSArgsError", (RuntimeError,), {}))
    return mod


# rcl's --ros-args flags (rcl/src/rcl/arguments.c): those taking a value, those taking none
ROS_ARG_RULES = {"-r": "remap rule", "--remap": "remap rule", "-p": "parameter override rule",
                 "--param": "parameter override rule", "--params-file": "file path", "--log-level": "log level",
                 "--log-config-file": "file path", "-e": "enclave", "--enclave": "enclave"}
ROS_ARG_FLAGS = ("--disable-rosout-logs", "--enable-rosout-logs", "--disable-stdout-logs", "--enable-stdout-logs",
                 "--disable-external-lib-logs", "--enable-external-lib-logs")


def ros_args_error(args: list[str] | None, implementation: Any) -> Exception | None:
    """What rclpy.init raises for ``args``, for the common mistakes: a trailing flag without its value or a
    remap / parameter rule without ``:=`` (rcl_init fails: RCLError with rcl's message), and flags rcl does
    not know (rclpy's throw_if_unparsed_ros_args: UnknownROSArgsError, the repr of their list)."""
    unknown, inside, i = [], False, 0
    args = list(args or [])
    while i < len(args):
        arg = args[i]
        if arg == "--ros-args":
            inside = True
        elif arg == "--" and inside:
            inside = False
        elif inside and arg in ROS_ARG_RULES:
            if i + 1 == len(args):
                return implementation.RCLError(f"failed to initialize rcl: Couldn't parse trailing {arg} flag. "
                                               f"No {ROS_ARG_RULES[arg]} found.")
            if arg in ("-r", "--remap", "-p", "--param") and ":=" not in args[i + 1]:
                kind = "remap" if arg in ("-r", "--remap") else "parameter override"
                return implementation.RCLError(f"failed to initialize rcl: Couldn't parse {kind} rule: "
                                               f"'{arg} {args[i + 1]}'")  # rcl adds its lexer's error
            i += 1
        elif inside and arg not in ROS_ARG_FLAGS:
            unknown.append(arg)
        i += 1
    return implementation.UnknownROSArgsError(repr(unknown)) if unknown else None


def topic_name_problem(name: str) -> tuple[str, int] | None:
    """rcl_validate_topic_name (rcl/src/rcl/validate_topic_name.c) for names without ``{}`` substitutions:
    (rcl's message, index of the bad character), or None for a valid name."""
    if not name:
        return "topic name must not be empty string", 0
    if name[0].isdigit():
        return "topic name token must not start with a number", 0
    if name.endswith("/"):
        return "topic name must not end with a forward slash", len(name) - 1
    for i, char in enumerate(name):
        if char == "~" and i != 0:
            return "topic name must not have tilde '~' unless it is the first character", i
        if not (char.isascii() and (char.isalnum() or char in "_/~{}")):
            return "topic name must not contain characters other than alphanumerics, '_', '~', '{', or '}'", i
    for i in range(len(name) - 1):
        if name[i] == "/" and name[i + 1].isdigit():
            return "topic name token must not start with a number", i + 1
        if i == 1 and name[0] == "~":
            return "topic name must not have a tilde '~' that is not followed by a forward slash '/'", 1
    return None


def out_of_range(name: str, value: Any, descriptor: Any) -> str:
    """rclpy's range check of a value against its descriptor (a float range for a float, an integer range for an
    integer, as ``_apply_descriptor``): the reason it fails, or "" when it passes."""
    ranges = {float: getattr(descriptor, "floating_point_range", []),
              int: getattr(descriptor, "integer_range", [])}.get(type(value), [])
    for rng in ranges:
        if not rng.from_value <= value <= rng.to_value:
            return f"Parameter {name} out of range. Min: {rng.from_value}, Max: {rng.to_value}"
    return ""


def _not_faked(name: str, kind: str) -> Any:
    def fail(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"fake rclpy: Node.{name} is a real rclpy member that the fake does not implement")

    return property(fail) if kind == "property" else fail


def install_fake_rclpy(monkeypatch: Any, ros: FakeRos) -> None:
    """Put rclpy (+ node, qos, time, duration, executors, exceptions), rcl_interfaces.msg, tf2_ros and
    message packages into sys.modules for the duration of a test."""
    exc = _exceptions_module()

    class Logger:
        def __init__(self) -> None:
            self.records: list[tuple[str, str]] = []

        def info(self, text: str) -> None:
            self.records.append(("info", text))

        def warning(self, text: str) -> None:
            self.records.append(("warn", text))

        warn = warning

        def error(self, text: str) -> None:
            self.records.append(("error", text))

    class Publisher:
        """Its public methods are rclpy's (``RCLPY_PUBLISHER_METHODS``); ``subscribers`` is what
        ``get_subscription_count`` reports (one listener unless a test says otherwise)."""

        def __init__(self, node: Any, msg_type: Any, topic: str, qos: Any) -> None:
            self.node, self.msg_type, self.topic, self.qos, self.published = node, msg_type, topic, qos, []
            self.subscribers = 1

        def publish(self, msg: Any) -> None:
            if not self.node.context.ok():  # what rclpy's C layer raises after shutdown
                raise RuntimeError("failed to publish: publisher's context is invalid")
            problem = byte_field_problem(ros.typestore, msg)
            assert problem is None, problem  # rclpy's setter raises this AssertionError when the field is set
            self.published.append(msg)

        def get_subscription_count(self) -> int:
            return self.subscribers

    class Subscription:
        def __init__(self, msg_type: Any, topic: str, callback: Any, qos: Any) -> None:
            self.msg_type, self.topic, self.callback, self.qos = msg_type, topic, callback, qos

    class Parameter:
        """rclpy.parameter.Parameter's constructor: ``type_`` second, inferred from the value when None
        (here as rcl_interfaces' ParameterType number, ``PARAMETER_TYPES``)."""

        def __init__(self, name: str, type_: Any = None, value: Any = None) -> None:
            self.name, self.value = name, value
            self.type_ = PARAMETER_TYPES.get(type(value), 0) if type_ is None else type_

    class SetParametersResult:
        def __init__(self, successful: bool, reason: str = "") -> None:
            self.successful, self.reason = successful, reason

    class Clock:
        def now(self) -> Any:
            return types.SimpleNamespace(nanoseconds=time.time_ns())

    class Handle:
        """rclpy's Node.handle is a context manager (the node's C handle); Node.__init__ enters it."""

        def __enter__(self) -> Handle:
            return self

        def __exit__(self, *args: Any) -> None:
            return None

    class Node:
        def __init__(self, node_name: str, *, context: Any = None, cli_args: Any = None, namespace: Any = None,
                     use_global_arguments: bool = True, enable_rosout: bool = True,
                     start_parameter_services: bool = True, parameter_overrides: Any = None,
                     allow_undeclared_parameters: bool = False,
                     automatically_declare_parameters_from_overrides: bool = False) -> None:
            self._context = ros.context if context is None else context
            self._parameters: dict[str, Any] = {}
            self._descriptors: dict[str, Any] = {}
            self._publishers: list[Publisher] = []
            self._subscriptions: list[Subscription] = []
            self._timers: list[tuple[float, Any]] = []
            if not self._context.ok():
                raise exc.NotInitializedException("cannot create node")
            ns = "/" + (namespace or "").strip("/")
            with self._context_handle():
                self._Node__node = types.SimpleNamespace(name=node_name, namespace=ns)
            with self.handle:  # as rclpy does: a subclass shadowing `handle` fails here
                self._logger = Logger()
            # what rclpy reads from --params-file / -p for this node (declared or not), by name
            self._parameter_overrides = {name: Parameter(name, value=value) for name, value in ros.overrides.items()}
            self._clock = Clock()
            self.declare_parameter("use_sim_time", False)  # as rclpy's TimeSource(node=self) does
            self.fake_destroyed = False
            ros.nodes.append(self)

        def _context_handle(self) -> Handle:
            return Handle()

        @property
        def handle(self) -> Handle:
            return Handle()

        @property
        def context(self) -> Any:
            return self._context

        @property
        def publishers(self) -> list[Publisher]:
            return list(self._publishers)

        @property
        def subscriptions(self) -> list[Subscription]:
            return list(self._subscriptions)

        @property
        def timers(self) -> list[tuple[float, Any]]:
            return list(self._timers)

        def get_name(self) -> str:
            return self._Node__node.name

        def get_namespace(self) -> str:
            return self._Node__node.namespace

        def get_fully_qualified_name(self) -> str:  # as rcl_node_get_fully_qualified_name
            return self.get_namespace().rstrip("/") + "/" + self.get_name()

        def declare_parameter(self, name: str, value: Any = None, descriptor: Any = None,
                              ignore_override: bool = False) -> Parameter:
            """Overrides from ``ros.overrides``; type and range checks raise rclpy's exceptions, as its
            ``_apply_descriptor``: no type check under dynamic typing, a range only for a value of its type."""
            if name in self._parameters:
                raise exc.ParameterAlreadyDeclaredException(name)
            given = value if ignore_override or name not in self._parameter_overrides else (
                self._parameter_overrides[name].value)
            if type(given) is not type(value) and not getattr(descriptor, "dynamic_typing", False):
                raise exc.InvalidParameterTypeException(Parameter(name, value=given), type(value).__name__.upper())
            outside = out_of_range(name, given, descriptor)
            if outside:
                raise exc.InvalidParameterValueException(name, given, outside)
            self._parameters[name] = Parameter(name, value=given)
            if descriptor is not None:  # rclpy types the descriptor by the default, or by the value if dynamic
                descriptor.type = PARAMETER_TYPES[type(given if descriptor.dynamic_typing else value)]
            self._descriptors[name] = descriptor
            return self._parameters[name]

        def has_parameter(self, name: str) -> bool:
            return name in self._parameters

        def get_parameter(self, name: str) -> Parameter:
            if name not in self._parameters:
                raise exc.ParameterNotDeclaredException(name)
            return self._parameters[name]

        def describe_parameter(self, name: str) -> Any:
            return self._descriptors[name]

        def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
            """What `ros2 param set` ends in; a read-only parameter is refused like rclpy's _apply_descriptor."""
            results = []
            for param in parameter_list:
                if not isinstance(param, Parameter):  # rclpy's _check_undeclared_parameters
                    raise TypeError(f"parameter must be instance of type '{Parameter!r}'")
                if param.name not in self._parameters:
                    raise exc.ParameterNotDeclaredException([param.name])
                results.append(self._apply_descriptor(param, self._descriptors[param.name], True))
                if results[-1].successful:
                    self._parameters[param.name] = param
                    ros.parameter_events.append((param.name, param.value))
            return results

        def _apply_descriptor(self, param: Parameter, descriptor: Any = None,
                              check_read_only: bool = True) -> SetParametersResult:
            """rclpy's checks in order: read-only, then the type (a dynamic descriptor takes the value's)."""
            descriptor = self.describe_parameter(param.name) if descriptor is None else descriptor
            if check_read_only and descriptor.read_only:
                return SetParametersResult(False, f"Trying to set a read-only parameter: {param.name}.")
            if descriptor.dynamic_typing:
                descriptor.type = param.type_
            elif param.type_ != descriptor.type:
                return SetParametersResult(False, f"Wrong parameter type, expected '{descriptor.type}' got "
                                                  f"'{param.type_}'")
            outside = out_of_range(param.name, param.value, descriptor)
            return SetParametersResult(not outside, outside)

        def set_descriptor(self, name: str, descriptor: Any, alternative_value: Any = None) -> Any:
            """rclpy's: refused for an undeclared or read-only parameter; the current value must pass the new
            descriptor (the fake takes no alternative value)."""
            if name not in self._parameters:
                raise exc.ParameterNotDeclaredException(name)
            if self.describe_parameter(name).read_only:
                raise exc.ParameterImmutableException(name)
            assert alternative_value is None, "fake rclpy: set_descriptor's alternative_value is not faked"
            result = self._apply_descriptor(self._parameters[name], descriptor, False)
            if not result.successful:
                raise exc.InvalidParameterValueException(name, self._parameters[name].value, result.reason)
            descriptor.name = name
            self._descriptors[name] = descriptor
            return self._parameters[name].value

        def create_subscription(self, msg_type: Any, topic: str, callback: Any, qos_profile: Any, *,
                                callback_group: Any = None, event_callbacks: Any = None,
                                qos_overriding_options: Any = None, raw: bool = False) -> Subscription:
            self._validate_topic_or_service_name(topic)
            sub = Subscription(msg_type, topic, callback, qos_profile)
            self._subscriptions.append(sub)
            return sub

        def create_publisher(self, msg_type: Any, topic: str, qos_profile: Any, *, callback_group: Any = None,
                             event_callbacks: Any = None, qos_overriding_options: Any = None,
                             publisher_class: Any = None) -> Publisher:
            self._validate_topic_or_service_name(topic)
            pub = Publisher(self, msg_type, topic, qos_profile)
            self._publishers.append(pub)
            return pub

        def _validate_topic_or_service_name(self, topic_or_service_name: str, *, is_service: bool = False) -> None:
            """rclpy's check after rcl refused a name (create_subscription / create_publisher)."""
            if (problem := topic_name_problem(topic_or_service_name)) is not None:
                raise exc.InvalidTopicNameException(topic_or_service_name, *problem)

        def create_timer(self, timer_period_sec: float, callback: Any, callback_group: Any = None,
                         clock: Any = None) -> Any:
            self._timers.append((timer_period_sec, callback))
            return object()

        def get_logger(self) -> Logger:
            return self._logger

        def get_clock(self) -> Clock:
            return self._clock

        def destroy_subscription(self, subscription: Subscription) -> bool:
            if subscription not in self._subscriptions:
                return False
            self._subscriptions.remove(subscription)
            return True

        def destroy_node(self) -> None:
            self.fake_destroyed = True

    members = {name: kind for distro in real_node_members().values() for name, kind in distro.items()}
    for name, kind in members.items():
        if kind != "attribute" and not hasattr(Node, name):
            setattr(Node, name, _not_faked(name, kind))

    rclpy = types.ModuleType("rclpy")

    implementation = _implementation_module()

    def init(args: Any = None) -> None:
        ros.calls.append("init")
        if (error := ros_args_error(args, implementation.rclpy_implementation)) is not None:
            raise error
        ros.context.init()

    def try_shutdown() -> None:
        ros.calls.append("try_shutdown")
        ros.context.shutdown()

    def spin(node: Any) -> None:
        ros.calls.append("spin")
        if ros.spin_hook is not None:
            ros.spin_hook(node)
        raise ros.spin_raises()

    rclpy.init, rclpy.try_shutdown, rclpy.spin = init, try_shutdown, spin
    rclpy.ok = ros.context.ok
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

    def rclpy_time(*, seconds: float = 0, nanoseconds: int = 0, clock_type: Any = None) -> Any:
        if seconds < 0 or nanoseconds < 0:  # as rclpy.time.Time
            raise ValueError(f"{'Seconds' if seconds < 0 else 'Nanoseconds'} value must not be negative")
        return types.SimpleNamespace(nanoseconds=nanoseconds + int(seconds * 1e9))

    time_mod.Time = rclpy_time
    dur_mod = types.ModuleType("rclpy.duration")
    dur_mod.Duration = lambda seconds=0, nanoseconds=0: types.SimpleNamespace(
        nanoseconds=nanoseconds + int(seconds * 1e9))
    exec_mod = types.ModuleType("rclpy.executors")
    exec_mod.ExternalShutdownException = type("ExternalShutdownException", (Exception,), {})

    rcl_msg = types.ModuleType("rcl_interfaces.msg")

    class ParameterDescriptor:
        def __init__(self, name: str = "", type: int = 0, description: str = "", additional_constraints: str = "",
                     read_only: bool = False, dynamic_typing: bool = False,
                     floating_point_range: Any = (), integer_range: Any = ()) -> None:
            self.name, self.type, self.description = name, type, description
            self.additional_constraints, self.read_only, self.dynamic_typing = additional_constraints, read_only, dynamic_typing
            self.floating_point_range, self.integer_range = list(floating_point_range), list(integer_range)

    rcl_msg.ParameterDescriptor = ParameterDescriptor
    rcl_msg.FloatingPointRange = lambda from_value=0.0, to_value=0.0, step=0.0: types.SimpleNamespace(
        from_value=from_value, to_value=to_value, step=step)
    rcl_msg.IntegerRange = lambda from_value=0, to_value=0, step=0: types.SimpleNamespace(
        from_value=from_value, to_value=to_value, step=step)

    tf2 = types.ModuleType("tf2_ros")

    class TransformException(Exception):
        pass

    tf_errors = {name: type(name, (TransformException,), {}) for name in (
        "LookupException", "ConnectivityException", "ExtrapolationException", "InvalidArgumentException",
        "TimeoutException")}

    def invalid_frame(function: str, frame: str) -> str | None:  # tf2's BufferCore::validateFrameId
        if not frame:
            return f'Invalid argument "" passed to {function} - in tf2 frame_ids cannot be empty'
        if frame.startswith("/"):
            return f'Invalid argument "{frame}" passed to {function} - in tf2 frame_ids cannot start with a \'/\''
        return None

    class Buffer:
        def lookup_transform(self, target_frame: str, source_frame: str, time: Any, timeout: Any = None) -> Any:
            ros.tf_lookups.append((target_frame, source_frame, time.nanoseconds, timeout))
            for function, frame in (("lookupTransform argument target_frame", target_frame),
                                    ("lookupTransform argument source_frame", source_frame)):
                if (problem := invalid_frame(function, frame)) is not None:
                    raise tf_errors["InvalidArgumentException"](problem)
            found = ros.transforms.get((target_frame, source_frame))
            if found is None:
                raise tf_errors["LookupException"](f'"{target_frame}" passed to lookupTransform argument target_frame '
                                                   "does not exist.")
            if isinstance(found, BaseException):
                raise found
            return found

        def can_transform(self, target_frame: str, source_frame: str, time: Any, timeout: Any = None) -> bool:
            if invalid_frame("canTransform", target_frame) or invalid_frame("canTransform", source_frame):
                ros.tf_invalid_queries += 1  # tf2_py's canTransformCore: False, the reason in its error string
                return False
            found = ros.transforms.get((target_frame, source_frame))
            return found is not None and not isinstance(found, BaseException)

        def clear(self) -> None:  # tf2.BufferCore.clear: drops the history, keeps static transforms
            ros.tf_clears += 1

        def set_transform(self, transform: Any, authority: str) -> None:  # the listener's hand-over, recorded
            ros.tf_set.append((transform, authority, False))

        def set_transform_static(self, transform: Any, authority: str) -> None:
            ros.tf_set.append((transform, authority, True))

    class TransformListener:
        """tf2_ros_py's TransformListener (transform_listener.py, the same on Humble, Jazzy and Rolling): the
        constructor subscribes ``self.callback`` to /tf and ``self.static_callback`` to /tf_static, and each
        callback hands every transform of the TFMessage to the buffer (which drops the invalid ones)."""

        def __init__(self, buffer: Any, node: Any, *, spin_thread: bool = False, qos: Any = None,
                     static_qos: Any = None) -> None:
            assert not spin_thread, "fake tf2_ros: TransformListener(spin_thread=True) is not faked"
            if qos is None:
                qos = qos_mod.QoSProfile(depth=100, durability=qos_mod.DurabilityPolicy.VOLATILE,
                                         history=qos_mod.HistoryPolicy.KEEP_LAST)
            if static_qos is None:
                static_qos = qos_mod.QoSProfile(depth=100, durability=qos_mod.DurabilityPolicy.TRANSIENT_LOCAL,
                                                history=qos_mod.HistoryPolicy.KEEP_LAST)
            self.buffer, self.node = buffer, node
            self.group = object()  # a ReentrantCallbackGroup in tf2_ros_py
            tf_message = sys.modules["tf2_msgs.msg"].TFMessage
            self.tf_sub = node.create_subscription(tf_message, "/tf", self.callback, qos, callback_group=self.group)
            self.tf_static_sub = node.create_subscription(tf_message, "/tf_static", self.static_callback, static_qos,
                                                          callback_group=self.group)

        def unregister(self) -> None:
            self.node.destroy_subscription(self.tf_sub)
            self.node.destroy_subscription(self.tf_static_sub)

        def callback(self, data: Any) -> None:
            for transform in data.transforms:
                self.buffer.set_transform(transform, "default_authority")

        def static_callback(self, data: Any) -> None:
            for transform in data.transforms:
                self.buffer.set_transform_static(transform, "default_authority")

    tf2.TransformException, tf2.Buffer = TransformException, Buffer
    for name, cls in tf_errors.items():
        setattr(tf2, name, cls)
    tf2.TransformListener = TransformListener

    param_mod = types.ModuleType("rclpy.parameter")
    param_mod.Parameter = Parameter
    modules = {"rclpy": rclpy, "rclpy.node": node_mod, "rclpy.parameter": param_mod, "rclpy.qos": qos_mod, "rclpy.time": time_mod,
               "rclpy.duration": dur_mod, "rclpy.executors": exec_mod, "rclpy.exceptions": exc,
               "rclpy.impl": types.ModuleType("rclpy.impl"), "rclpy.impl.implementation_singleton": implementation,
               "rcl_interfaces": types.ModuleType("rcl_interfaces"), "rcl_interfaces.msg": rcl_msg, "tf2_ros": tf2}
    for package in ("sensor_msgs", "geometry_msgs", "visualization_msgs", "diagnostic_msgs", "std_msgs",
                    "builtin_interfaces", "tf2_msgs"):
        modules[package] = types.ModuleType(package)
        modules[f"{package}.msg"] = _msg_module(ros, package)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
