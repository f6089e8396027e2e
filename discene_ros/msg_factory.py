"""Message factories: build ROS 2 messages the same way for rclpy and for the rosbags typestore.

The message builders (``msg_encode``) never import a message package themselves; they receive a factory with
``new(msgtype, **fields)`` plus helpers for numeric array fields, whose Python types differ between
rclpy (``array.array`` / numpy for fixed arrays) and rosbags (numpy arrays everywhere).
"""
from __future__ import annotations

import array
import importlib
from typing import Any, Protocol

import numpy as np

_NUMPY_BASE = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "uint8": np.uint8, "int8": np.int8,
    "uint16": np.uint16, "int16": np.int16, "uint32": np.uint32, "int32": np.int32,
    "uint64": np.uint64, "int64": np.int64, "float32": np.float32, "float64": np.float64,
}


class MessageFactory(Protocol):
    """What ``msg_encode`` needs to create messages (rclpy or rosbags typestore)."""

    def new(self, msgtype: str, **fields: Any) -> Any: ...

    def uint8_array(self, buf: bytes | np.ndarray) -> Any: ...

    def float64_array(self, values: Any) -> Any: ...

    def float64_sequence(self, values: Any) -> Any: ...

    def msg_class(self, msgtype: str) -> type: ...


class TypestoreFactory:
    """Factory on a rosbags typestore; fields left out get the ROS default (0, '', empty, nested default)."""

    def __init__(self, typestore: Any) -> None:
        self.typestore = typestore
        self._layouts: dict[str, tuple[type, list, frozenset[str]]] = {}

    def msg_class(self, msgtype: str) -> type:
        try:
            return self.typestore.types[msgtype]
        except KeyError as exc:
            raise KeyError(f"message type {msgtype!r} is not in the rosbags typestore") from exc

    def new(self, msgtype: str, **fields: Any) -> Any:
        layout = self._layouts.get(msgtype)
        if layout is None:  # class and field definitions looked up once per type (new runs ~10 times a frame)
            _, defs = self.typestore.fielddefs[msgtype]
            layout = self._layouts[msgtype] = (self.msg_class(msgtype), defs, frozenset(name for name, _ in defs))
        cls, defs, names = layout
        if len(fields) != len(names) or not names.issuperset(fields):
            unknown = sorted(set(fields) - names)
            if unknown:
                raise TypeError(f"{msgtype} has no fields {unknown}")
            for name, node in defs:
                if name not in fields:
                    fields[name] = self._default(node)
        return cls(**fields)

    def _default(self, node: tuple) -> Any:
        kind, spec = node
        kind = int(kind)
        if kind == 1:  # BASE
            base = spec[0]
            if base == "string":
                return ""
            if base == "bool":
                return False
            return 0.0 if base.startswith("float") else 0
        if kind == 2:  # NAME
            return self.new(spec)
        sub, length = spec  # ARRAY (3) or SEQUENCE (4)
        if int(sub[0]) == 1 and sub[1][0] in _NUMPY_BASE:
            return np.zeros(length if kind == 3 else 0, dtype=_NUMPY_BASE[sub[1][0]])
        return [self._default(sub) for _ in range(length if kind == 3 else 0)]

    def uint8_array(self, buf: bytes | np.ndarray) -> np.ndarray:
        if isinstance(buf, np.ndarray):
            return np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        return np.frombuffer(buf, dtype=np.uint8)

    def float64_array(self, values: Any) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(-1)

    def float64_sequence(self, values: Any) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(-1)


class RclpyFactory:
    """Factory on the installed ROS 2 Python message packages (imported lazily by name)."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def msg_class(self, msgtype: str) -> type:
        if msgtype not in self._classes:
            package, _, name = msgtype.split("/")
            try:
                module = importlib.import_module(f"{package}.msg")
            except ImportError as exc:
                raise ImportError(f"ROS 2 message package '{package}' is not installed (needed for {msgtype}); "
                                  "source your ROS 2 installation") from exc
            self._classes[msgtype] = getattr(module, name)
        return self._classes[msgtype]

    def new(self, msgtype: str, **fields: Any) -> Any:
        return self.msg_class(msgtype)(**fields)

    def uint8_array(self, buf: bytes | np.ndarray) -> array.array:
        # rclpy stores uint8[] as array.array('B'), which the generated setter takes as it is, whereas a
        # numpy array or list would be checked element by element. frombytes reads the numpy buffer
        # directly: one memcpy (``tobytes`` first would make it two).
        data = array.array("B")
        data.frombytes(np.ascontiguousarray(buf).reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) else buf)
        return data

    def float64_array(self, values: Any) -> np.ndarray:
        # fixed-size float64[N] fields (CameraInfo.k/r/p) are numpy arrays in rclpy
        return np.asarray(values, dtype=np.float64).reshape(-1)

    def float64_sequence(self, values: Any) -> array.array:
        # unbounded float64[] fields (CameraInfo.d) are array.array('d') in rclpy
        return array.array("d", np.asarray(values, dtype=np.float64).reshape(-1).tolist())


class EveryNth:
    """Publishing schedule for costly optional outputs (the RViz MarkerArray): due on the first frame
    and then on every ``period``-th frame; ``period`` 1 = every frame, 0 = never."""

    def __init__(self, period: int) -> None:
        if int(period) < 0:
            raise ValueError(f"period must be >= 0 frames (0 = never), got {period}")
        self.period = int(period)
        self.count = 0

    def due(self) -> bool:
        """Count one frame; True when the output should be built and published for it."""
        due = self.period > 0 and self.count % self.period == 0
        self.count += 1
        return due
