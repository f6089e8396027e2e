"""ROS 2 bag reading and writing with rosbags (no ROS install): topics, writer, a small TF tree.

Topics of the bags made by ``discene-dataset-to-bag`` (and read by default by ``discene-replay``):

==========================================  ==========================  =======================================
topic                                       type                        content
==========================================  ==========================  =======================================
/camera/color/image_raw                     sensor_msgs/Image           rgb8 (default)
/camera/color/image_raw/compressed          sensor_msgs/CompressedImage jpeg (``--compressed``)
/camera/color/camera_info                   sensor_msgs/CameraInfo      K of the image, plumb_bob, no distortion
/camera/aligned_depth_to_color/image_raw    sensor_msgs/Image           16UC1 millimetres, 0 invalid
/tf                                         tf2_msgs/TFMessage          world -> camera_color_optical_frame
/discene/ground_truth/occupancy             sensor_msgs/PointCloud2     occupied voxel centres, labels 1..11
                                                                        (layout of the node's output, score 1)
/discene/ground_truth/labels                sensor_msgs/CompressedImage the dense label grid, 255 unknown
                                                                        included, lossless mono8 PNG (X, Y*Z)
/discene/ground_truth/grid_pose             geometry_msgs/PoseStamped   position = voxel_origin (grid corner)
==========================================  ==========================  =======================================

The metric protocol (unknown voxels excluded) needs the labels topic; with only the cloud, voxels
missing from it count as empty. Replay output bags hold ``/discene/occupancy/points`` and ``/discene/occupancy/grid_pose``.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from .conversions import transform_to_matrix

IMAGE_TOPIC = "/camera/color/image_raw"
COMPRESSED_TOPIC = "/camera/color/image_raw/compressed"
CAMERA_INFO_TOPIC = "/camera/color/camera_info"
DEPTH_TOPIC = "/camera/aligned_depth_to_color/image_raw"
TF_TOPIC = "/tf"
TF_STATIC_TOPIC = "/tf_static"
GT_TOPIC = "/discene/ground_truth/occupancy"
GT_POSE_TOPIC = "/discene/ground_truth/grid_pose"
GT_LABELS_TOPIC = "/discene/ground_truth/labels"
PRED_TOPIC = "/discene/occupancy/points"
PRED_POSE_TOPIC = "/discene/occupancy/grid_pose"
WORLD_FRAME = "world"
CAMERA_FRAME = "camera_color_optical_frame"

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
STORAGES = ("mcap", "sqlite3")


class BagError(RuntimeError):
    """A bag that cannot be opened or read (missing, truncated, corrupt, no image topic)."""


def typestore() -> Any:
    """The rosbags typestore used for writing (ROS 2 Humble definitions; identical for these types in Jazzy)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


class BagWriter:
    """rosbags Writer with ``version=8`` (readable by Humble's rosbag2) and connections made on first use."""

    def __init__(self, path: str | Path, storage: str = "mcap", store: Any = None) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise ValueError(f"bag storage must be one of {STORAGES}, got '{storage}'")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"output bag {self.path} already exists; remove it or choose another path")
        self.store = store or typestore()
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(self.path, version=8, storage_plugin=plugin)
        self._connections: dict[str, Any] = {}
        self.count = 0

    def __enter__(self) -> BagWriter:
        self.writer.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()

    def write(self, topic: str, msg: Any, stamp_ns: int) -> None:
        msgtype = msg.__msgtype__
        conn = self._connections.get(topic)
        if conn is None:
            conn = self.writer.add_connection(topic, msgtype, typestore=self.store)
            self._connections[topic] = conn
        elif conn.msgtype != msgtype:
            raise ValueError(f"topic {topic} already has type {conn.msgtype}, cannot write {msgtype}")
        self.writer.write(conn, int(stamp_ns), self.store.serialize_cdr(msg, msgtype))
        self.count += 1


def open_reader(path: str | Path) -> Any:
    """An opened rosbags AnyReader on a ROS 2 bag directory (or a single .mcap / .db3 file)."""
    from rosbags.highlevel import AnyReader

    path = Path(path)
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    if path.is_file() and path.suffix in (".mcap", ".db3"):
        path = path.parent  # rosbag2 bags are directories with metadata.yaml
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    except Exception as exc:  # rosbags raises several reader errors, plus sqlite/mcap/yaml ones
        hint = (" (a truncated mcap file can be salvaged with `mcap recover in.mcap -o fixed.mcap`)"
                if "magic" in str(exc).lower() else "")
        raise BagError(f"cannot open bag {path}: {type(exc).__name__}: {str(exc).rstrip('.')}. The bag is truncated or corrupt, or "
                       "not a ROS 2 bag directory (metadata.yaml + .mcap/.db3)" + hint) from exc
    return reader


def pick_topic(reader: Any, wanted: str | None, types: tuple[str, ...], prefer: tuple[str, ...] = (),
               exclude_word: str | None = None, include_word: str | None = None) -> str | None:
    """Topic to read: ``wanted`` if given (must exist), else a preferred name, else the first of ``types``
    (whose name lacks ``exclude_word`` / contains ``include_word``)."""
    topics = {c.topic: c.msgtype for c in reader.connections}
    if wanted is not None:
        if wanted not in topics:
            raise BagError(f"topic {wanted} is not in the bag; topics: {sorted(topics)}")
        if topics[wanted] not in types:
            raise BagError(f"topic {wanted} has type {topics[wanted]}, expected one of {types}")
        return wanted
    for name in prefer:
        if topics.get(name) in types:
            return name
    for name, msgtype in sorted(topics.items()):
        if msgtype in types and not (exclude_word and exclude_word in name) and (include_word or "") in name:
            return name
    return None


class TfTree:
    """Latest transforms from /tf and /tf_static; composes chains (no time interpolation)."""

    def __init__(self) -> None:
        self._edges: dict[tuple[str, str], np.ndarray] = {}  # (parent, child) -> child->parent 4x4

    def add_message(self, msg: Any) -> None:
        for tf in msg.transforms:
            self.add(tf.header.frame_id.lstrip("/"), tf.child_frame_id.lstrip("/"), transform_to_matrix(tf))

    def add(self, parent: str, child: str, child_to_parent: np.ndarray) -> None:
        self._edges[(parent, child)] = np.asarray(child_to_parent, dtype=np.float64)

    def lookup(self, target: str, source: str) -> np.ndarray | None:
        """4x4 mapping ``source`` coordinates to ``target`` (camera->world for target=world), or None."""
        target, source = target.lstrip("/"), source.lstrip("/")
        if target == source:
            return np.eye(4)
        graph: dict[str, list[tuple[str, np.ndarray]]] = {}
        for (parent, child), m in self._edges.items():
            graph.setdefault(child, []).append((parent, m))
            graph.setdefault(parent, []).append((child, np.linalg.inv(m)))
        seen, queue = {source}, deque([(source, np.eye(4))])
        while queue:
            frame, to_frame = queue.popleft()  # to_frame maps source -> frame
            for nxt, m in graph.get(frame, []):
                if nxt in seen:
                    continue
                chained = m @ to_frame
                if nxt == target:
                    return chained
                seen.add(nxt)
                queue.append((nxt, chained))
        return None
