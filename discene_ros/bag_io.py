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

import bisect
import importlib
import importlib.metadata
import math
import re
import struct
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import yaml

from .camera_pose import TransformNotReadyError
from .errors import TransformError
from .msg_decode import quaternion_to_matrix, stamp_to_ns, transform_problem, transform_to_matrix
from .msg_encode import matrix_to_quaternion
from .tf_links import link_path, only_invalid_link

IMAGE_TOPIC = "/camera/color/image_raw"
COMPRESSED_TOPIC = "/camera/color/image_raw/compressed"
CAMERA_INFO_TOPIC = "/camera/color/camera_info"
COLOUR_WORDS = ("color", "colour", "rgb")  # topic names of a colour stream, preferred when picking topics
DEPTH_TOPIC = "/camera/aligned_depth_to_color/image_raw"
TF_TOPIC = "/tf"
TF_STATIC_TOPIC = "/tf_static"
GT_TOPIC = "/discene/ground_truth/occupancy"
GT_POSE_TOPIC = "/discene/ground_truth/grid_pose"
GT_LABELS_TOPIC = "/discene/ground_truth/labels"
PRED_TOPIC = "/discene/occupancy/points"
PRED_POSE_TOPIC = "/discene/occupancy/grid_pose"
OWN_NAMESPACE = "/discene/"  # the topics above under it are this package's, never a camera's
WORLD_FRAME = "world"
CAMERA_FRAME = "camera_color_optical_frame"

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
STORAGES = ("mcap", "sqlite3")


class BagError(RuntimeError):
    """A bag that cannot be opened or read (missing, truncated, corrupt, no image topic)."""


ROSBAGS_FLOOR = (0, 11)  # mcap writing came in 0.10.9, reading a bag folder's lone storage file in 0.11.0
ROSBAGS_REQUIREMENT = "rosbags>=" + ".".join(map(str, ROSBAGS_FLOOR))  # setup.py's ``ros`` extra


class RosbagsTooOld(ImportError):
    """The installed rosbags is older than ``ROSBAGS_FLOOR``: it imports, then fails obscurely part-way."""


def missing_package_note(exc: ImportError) -> str:
    """A bag tool's error line for ``exc``: for rosbags or tqdm, with the pip command, since rosdep does not
    install rosbags (no apt package), so a robot that built this package with colcon lacks it at first."""
    if isinstance(exc, RosbagsTooOld):
        return str(exc)
    if (exc.name or "").split(".")[0] in ("rosbags", "tqdm"):
        return f"{exc}: the bag tools need the Python packages rosbags and tqdm: pip install '{ROSBAGS_REQUIREMENT}' tqdm"
    return str(exc)


def installed_rosbags() -> str | None:
    """The installed rosbags distribution's version, None where pip metadata has none."""
    try:
        return importlib.metadata.version("rosbags")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_rosbags() -> None:
    """RosbagsTooOld for a rosbags below ``ROSBAGS_FLOOR`` (setup.py's ``ros`` extra asks for it; a robot's
    earlier ``pip install rosbags`` may be older). No metadata: the imports decide."""
    version = installed_rosbags()
    numbers = re.match(r"(\d+)\.(\d+)", version or "")
    if numbers and tuple(int(n) for n in numbers.groups()) < ROSBAGS_FLOOR:
        raise RosbagsTooOld(f"rosbags {version} is installed; the bag tools need {ROSBAGS_REQUIREMENT}: "
                            f"pip install -U '{ROSBAGS_REQUIREMENT}'", name="rosbags")


def typestore() -> Any:
    """The rosbags typestore used for writing (ROS 2 Humble definitions; identical for these types in Jazzy)."""
    check_rosbags()
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

    def open(self) -> None:
        self.writer.open()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> BagWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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


STORAGE_SUFFIXES = (".mcap", ".db3")
REINDEX_HINT = "`ros2 bag reindex <bag folder>` writes it anew"


def open_reader(path: str | Path) -> Any:
    """An opened reader on a ROS 2 bag directory (or a single .mcap / .db3 file).

    A rosbags AnyReader normally; an mcap bag that rosbags refuses (truncated: no summary or end magic) is
    read sequentially up to the damage by :class:`McapPrefixReader`, whose ``damage`` says where it stopped;
    a split bag's files in the order of ``storage_files``, the intact files after a damaged one included.
    A folder whose metadata.yaml is missing or unreadable (left by a killed ``ros2 bag record``) is read
    from its one storage file; the reader's ``note`` then says so (``None`` otherwise).
    """
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    if path.is_file() and path.suffix in STORAGE_SUFFIXES:
        path = path.parent  # rosbag2 bags are directories with metadata.yaml
    try:
        return _any_reader(path, None)
    except Exception as exc:  # rosbags raises several reader errors, plus sqlite/mcap/yaml ones
        reason = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
        open_error = exc
    files = storage_files(path) if path.is_dir() else []
    metadata = path / "metadata.yaml"
    if len(files) == 1:  # the metadata may be what failed: read the storage file alone
        problem = "is missing" if not metadata.exists() else f"cannot be read ({reason})"
        note = (f"{metadata} {problem}, so the bag was read from its storage file {files[0].name} alone "
                f"(topics and types from the file; {REINDEX_HINT})")
        try:
            return _any_reader(files[0], note)
        except Exception as exc:  # the storage file is damaged too: sequential reading below
            reason = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
    elif files and not metadata.exists():
        reason += f" ({len(files)} storage files and no metadata.yaml: {REINDEX_HINT})"
    mcaps = [f for f in files if f.suffix == ".mcap"]
    if mcaps:
        prefix = McapPrefixReader(mcaps, reason)
        if prefix.messages_found:
            return prefix
        reason += f"; sequential reading found no message either ({prefix.damage})"
    hint = (" (a truncated mcap file can be salvaged with `mcap recover in.mcap -o fixed.mcap`)"
            if "magic" in reason.lower() else "")
    raise BagError(f"cannot open bag {path}: {reason}. The bag is truncated or corrupt, or "
                   "not a ROS 2 bag directory (metadata.yaml + .mcap/.db3)" + hint) from open_error


def storage_files(path: Path) -> list[Path]:
    """The .mcap/.db3 files of a bag folder in recording order: as its metadata.yaml lists them (rosbag2's
    ``relative_file_paths``) where it is readable, then any file it does not list, in natural order
    (``rec_2`` before ``rec_10``, as ``ros2 bag record`` numbers its splits)."""
    found = {f.name: f for f in path.iterdir() if f.suffix in STORAGE_SUFFIXES}
    listed = [name for name in _metadata_file_names(path / "metadata.yaml") if name in found]
    return [found[name] for name in listed] + [found[name] for name in sorted(set(found) - set(listed), key=natural_key)]


def _metadata_file_names(metadata: Path) -> list[str]:
    """The file names metadata.yaml lists (``relative_file_paths``, as rosbags reads them); [] when it is
    missing or unreadable."""
    try:
        info = yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]
        return [PurePath(str(name)).name for name in info["relative_file_paths"]]
    except Exception:  # noqa: BLE001 - missing, not YAML, or not a rosbag2 metadata file: natural order
        return []


def natural_key(name: str) -> list[Any]:
    """Sort key comparing the digit runs of ``name`` as numbers: ``rec_2`` before ``rec_10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _any_reader(path: Path, note: str | None) -> Any:
    """A rosbags AnyReader on ``path`` (a bag directory or one storage file), opened, with ``note`` set."""
    from rosbags.highlevel import AnyReader

    reader = AnyReader([path], default_typestore=typestore())
    reader.open()
    reader.note = note
    return reader


# ----------------------------------------------------------------------------- sequential mcap reading
MCAP_MAGIC = b"\x89MCAP0\r\n"
_OP_SCHEMA, _OP_CHANNEL, _OP_MESSAGE, _OP_CHUNK, _OP_DATA_END, _OP_FOOTER = 0x03, 0x04, 0x05, 0x06, 0x0F, 0x02


class McapDamage(Exception):
    """Where and why sequential mcap reading stopped."""


@dataclass
class PrefixConnection:
    """The parts of a rosbags Connection the replay uses."""

    id: int
    topic: str
    msgtype: str
    msgcount: int = 0


class _Cursor:
    """Little-endian field reader over one record's bytes; running past the end is McapDamage."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise McapDamage(f"{self.what} record is malformed (field of {n} bytes at {self.pos} of {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    def string(self) -> str:
        try:
            return self.take(self.uint(4)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise McapDamage(f"{self.what} record holds a non-UTF-8 string") from exc


def _records(data: bytes, start: int, end: int, where: str) -> Iterator[tuple[int, bytes, int]]:
    """(opcode, content, offset) of the records in ``data[start:end]``; McapDamage at the first bad one."""
    pos = start
    while pos < end:
        if pos + 9 > end:
            raise McapDamage(f"{where}: record header cut off at byte {pos}")
        opcode = data[pos]
        length = struct.unpack_from("<Q", data, pos + 1)[0]
        if opcode == _OP_CHUNK and pos + 9 + length > end:  # a cut-off chunk: its complete records still count
            yield opcode, data[pos + 9:end], pos
            return
        if opcode == 0 or pos + 9 + length > end:
            raise McapDamage(f"{where}: record at byte {pos} (opcode {opcode:#x}, {length} bytes) is cut off or invalid")
        yield opcode, data[pos + 9:pos + 9 + length], pos
        pos += 9 + length


ZSTD_MODULES = ("compression.zstd", "backports.zstd")  # what rosbags >= 0.11.7 decompresses with


def _zstd_decompress(blob: bytes, size: int) -> bytes:
    """``blob`` decompressed by the zstd module rosbags itself brings: the standard library's from Python 3.14,
    ``backports.zstd`` before (rosbags >= 0.11.7), ``zstandard`` with older rosbags (setup.py allows 0.11.0)."""
    for name in ZSTD_MODULES:
        try:
            zstd = importlib.import_module(name)
        except ImportError:
            continue
        return zstd.decompress(blob)
    import zstandard

    return zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)


def _decompress(compression: str, blob: bytes, size: int, crc: int) -> bytes:
    """A chunk's records; McapDamage where they do not decompress to ``size`` bytes or miss their CRC-32
    (rosbag2's mcap writer records one per chunk; 0 means none)."""
    if compression not in ("", "lz4", "zstd"):
        raise McapDamage(f"unknown chunk compression {compression!r}")
    try:
        if compression == "lz4":
            import lz4.frame

            records = lz4.frame.decompress(blob)
        else:
            records = _zstd_decompress(blob, size) if compression == "zstd" else blob
    except ImportError as exc:
        raise McapDamage(f"chunk compressed with {compression} needs the Python package for it ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt compressed chunk
        raise McapDamage(f"{compression} chunk does not decompress ({type(exc).__name__}: {exc})") from exc
    if len(records) != size:
        raise McapDamage(f"chunk holds {len(records)} bytes of records where its header says {size}")
    if crc and zlib.crc32(records) != crc:
        raise McapDamage("chunk checksum (CRC-32) mismatch: its bytes are damaged")
    return records


class McapPrefixReader:
    """Reads the messages of (possibly truncated or damaged) mcap files front to back, up to the damage.

    Same interface as the parts of rosbags' AnyReader the replay uses (``connections``, ``messages``,
    ``deserialize``, ``close``). Messages come in file order (rosbags and rosbag2 write them in time
    order; ``paths`` in recording order, see ``storage_files``). ``damage`` describes where reading stopped,
    ``messages_found`` counts what was read. An uncompressed chunk cut off in the middle still yields the
    complete messages it holds. A damaged file of a split bag ends the reading of that file only: the intact
    files after it are read too (each file of a split bag is a whole mcap, with its own schemas and channels),
    and ``gaps_crossed`` counts the damaged stretches the current ``messages`` iteration has passed, so that the
    replay interpolates no TF across one (``TfTree.mark_gap``).
    """

    def __init__(self, paths: list[Path], open_error: str = "") -> None:
        self.paths = [Path(p) for p in paths]
        self.store = typestore()
        self._schemas: dict[tuple[int, int], str] = {}
        self._conns: dict[tuple[int, int], PrefixConnection] = {}
        self.damage: str | None = None
        self.note: str | None = None  # as open_reader's AnyReader: nothing to add to the damage
        self.messages_found = 0
        self.gaps_crossed = 0
        damages: list[tuple[int, str]] = []  # (file index, where and why it stopped) of each damaged file
        read_after = 0  # messages of the files after the first damaged one
        for _ in self._scan(count=True, damages=damages):
            read_after += bool(damages)
        self.connections = list(self._conns.values())
        texts = [text for _, text in damages] or ([open_error] if open_error else [])
        if read_after:
            first = damages[0][0]
            after = len(self.paths) - 1 - first
            texts.append(f"reading went on with the {after} file{'s' if after > 1 else ''} after "
                         f"{self.paths[first].name} ({read_after} messages)")
        if texts:
            self.damage = f"bag damaged, read sequentially up to the damage: {'; '.join(texts)}"

    def _scan(self, count: bool, damages: list[tuple[int, str]] | None = None,
              ) -> Iterator[tuple[PrefixConnection, int, bytes]]:
        """The messages of every file in turn; a damaged file ends at its damage (noted in ``damages``)."""
        after_damage = False
        for file_no, path in enumerate(self.paths):
            if after_damage:
                self.gaps_crossed += 1
                after_damage = False
            data = path.read_bytes()
            try:
                if data[:8] != MCAP_MAGIC:
                    raise McapDamage(f"{path.name} does not start with the mcap magic")
                for opcode, content, offset in _records(data, 8, len(data), path.name):
                    if opcode == _OP_CHUNK:
                        yield from self._chunk(file_no, content, f"{path.name} chunk at byte {offset}", count)
                    elif opcode in (_OP_DATA_END, _OP_FOOTER):
                        break
                    else:
                        yield from self._record(file_no, opcode, content, count)
            except McapDamage as exc:
                after_damage = True
                if damages is not None:
                    damages.append((file_no, f"{exc} (after {self.messages_found} messages)"))

    def _chunk(self, file_no: int, content: bytes, where: str, count: bool) -> Iterator[tuple[PrefixConnection, int, bytes]]:
        cur = _Cursor(content, where)
        cur.take(16)
        size = cur.uint(8)
        crc = cur.uint(4)
        compression = cur.string()
        length = cur.uint(8)
        blob = cur.data[cur.pos:cur.pos + length]
        cut = len(blob) < length
        if cut and compression:
            raise McapDamage(f"{where} is cut off ({len(blob)} of {length} bytes, {compression}-compressed)")
        # a cut-off uncompressed chunk: its complete records are read, unchecked (the CRC covers all of them)
        records = blob if cut else _decompress(compression, blob, size, crc)
        try:
            for opcode, record, _ in _records(records, 0, len(records), where):
                yield from self._record(file_no, opcode, record, count)
        except McapDamage:
            if not cut:
                raise
        if cut:
            raise McapDamage(f"{where} is cut off ({len(blob)} of {length} bytes)")

    def _record(self, file_no: int, opcode: int, content: bytes, count: bool) -> Iterator[tuple[PrefixConnection, int, bytes]]:
        if opcode == _OP_SCHEMA:
            cur = _Cursor(content, "schema")
            sid, name, encoding = cur.uint(2), cur.string(), cur.string()
            text = cur.take(cur.uint(4))
            self._schemas[(file_no, sid)] = name
            if count and encoding == "ros2msg" and name not in self.store.types:
                self._register(name, text)
        elif opcode == _OP_CHANNEL:
            cur = _Cursor(content, "channel")
            cid, sid, topic = cur.uint(2), cur.uint(2), cur.string()
            if count and (file_no, cid) not in self._conns:
                msgtype = self._schemas.get((file_no, sid), "")
                self._conns[(file_no, cid)] = PrefixConnection(len(self._conns), topic, msgtype)
        elif opcode == _OP_MESSAGE:
            cur = _Cursor(content, "message")
            cid = cur.uint(2)
            cur.take(4)
            log_time = cur.uint(8)
            cur.take(8)
            conn = self._conns.get((file_no, cid))
            if conn is None:
                raise McapDamage(f"message on channel {cid}, which no channel record defined")
            if count:
                conn.msgcount += 1
                self.messages_found += 1
            yield conn, log_time, content[cur.pos:]

    def _register(self, name: str, text: bytes) -> None:
        from rosbags.typesys import get_types_from_msg

        try:
            self.store.register(get_types_from_msg(text.decode("utf-8"), name))
        except Exception:  # noqa: BLE001,S110 - a type we cannot parse is reported when its topic is read
            pass

    def messages(self, connections: Collection[Any] = ()) -> Iterator[tuple[PrefixConnection, int, bytes]]:
        """(connection, log time ns, raw CDR) of the readable messages on ``connections`` (all if empty)."""
        wanted = {c.id for c in connections}
        self.gaps_crossed = 0
        for conn, log_time, raw in self._scan(count=False):
            if not wanted or conn.id in wanted:
                yield conn, log_time, raw

    def deserialize(self, rawdata: bytes, typ: str) -> Any:
        return self.store.deserialize_cdr(rawdata, typ)

    def close(self) -> None:
        """Nothing stays open between reads."""


def pick_topic(reader: Any, wanted: str | None, types: tuple[str, ...], prefer: tuple[str, ...] = (),
               exclude_word: str | None = None, include_word: str | None = None) -> str | None:
    """Topic to read: ``wanted`` if given (must exist), else a preferred name, else the first of
    ``candidate_topics`` ("compressedDepth" counts as a depth topic)."""
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
    found = candidate_topics(reader, types, exclude_word, include_word)
    return found[0] if found else None


def candidate_topics(reader: Any, types: tuple[str, ...], exclude_word: str | None = None,
                     include_word: str | None = None) -> list[str]:
    """Topics of ``types`` whose name lacks ``exclude_word`` and contains ``include_word`` (either case), none
    of this package's own (ground truth, predictions, under ``OWN_NAMESPACE``), in
    the order ``pick_topic`` tries them: names with a colour word first (a RealSense's color stream before
    its infra1 one, depth aligned to color before raw depth), then by name."""
    found = {c.topic for c in reader.connections if c.msgtype in types and not c.topic.startswith(OWN_NAMESPACE)
             and not (exclude_word and exclude_word in c.topic.lower()) and (include_word or "") in c.topic.lower()}
    return sorted(found, key=lambda name: (not any(word in name.lower() for word in COLOUR_WORDS), name))


def colour_image_topics(reader: Any) -> list[str]:
    """The bag's colour image topics (Image or CompressedImage, not depth), in ``candidate_topics``' order."""
    return candidate_topics(reader, IMAGE_TYPES, exclude_word="depth")


def pick_image_topic(reader: Any, wanted: str | None) -> str | None:
    """The colour image topic: ``wanted``, else the default camera topic (raw, then compressed), else the
    first of ``colour_image_topics``."""
    return pick_topic(reader, wanted, IMAGE_TYPES, prefer=(IMAGE_TOPIC, COMPRESSED_TOPIC), exclude_word="depth")


def pick_depth_topic(reader: Any, wanted: str | None) -> str | None:
    """The depth topic: ``wanted`` (an Image, or a compressedDepth CompressedImage), else a raw depth Image
    (name containing "depth"), else image_transport's compressedDepth topic of one."""
    if wanted is not None:
        return pick_topic(reader, wanted, IMAGE_TYPES)
    return (pick_topic(reader, None, IMAGE_TYPES[:1], prefer=(DEPTH_TOPIC,), include_word="depth")
            or pick_topic(reader, None, IMAGE_TYPES[1:], prefer=(DEPTH_TOPIC + "/compressedDepth",),
                          include_word="compresseddepth"))


class TfTree:
    """Transforms from /tf (a time history per link, interpolated at a stamp) and /tf_static (timeless).

    ``lookup(target, source, stamp_ns)`` mirrors tf2: None when no chain of links joins the frames
    (the transform does not exist), TransformNotReadyError when it exists but a moving link has no
    transforms on both sides of the stamp (tf2's extrapolation), else the interpolated 4x4. A chain
    that exists only through links whose every transform was invalid is a TransformError naming the
    link: the transform is in the bag but unusable, which is not the same as absent (no fallback pose).
    """

    def __init__(self, history: int = 1000) -> None:
        self._static: dict[tuple[str, str], np.ndarray] = {}   # (parent, child) -> child->parent 4x4
        self._dynamic: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}  # sorted by stamp
        self._invalid: dict[tuple[str, str], str] = {}  # (parent, child) -> what was wrong with its last transform
        self._gaps: dict[tuple[str, str], set[int]] = {}  # moving link -> stamps after which the bag lost data
        self.history = history

    def add_message(self, msg: Any, static: bool = False) -> list[tuple[tuple[str, str], str]]:
        """Add every valid transform of a TFMessage; returns the invalid ones it dropped, as (link, problem).

        Invalid is what tf2's Buffer drops (:func:`msg_decode.transform_problem`); any other transform is kept
        as tf2 keeps it, its quaternion normalised. tf2 drops with a log line and keeps the link's valid ones, so
        a bad transform on one link costs no frame by itself: ``lookup`` refuses only a chain with a link that
        never had a valid transform (``_check_invalid``), as the node does."""
        dropped = []
        for tf in msg.transforms:
            parent, child = tf.header.frame_id.lstrip("/"), tf.child_frame_id.lstrip("/")
            problem = transform_problem(tf)
            if problem is not None:
                self._invalid[(parent, child)] = problem
                dropped.append(((parent, child), problem))
                continue
            self.add(parent, child, transform_to_matrix(tf), None if static else stamp_to_ns(tf.header.stamp))
        return dropped

    def add(self, parent: str, child: str, child_to_parent: np.ndarray, stamp_ns: int | None = None) -> None:
        """A link; ``stamp_ns`` None = static (valid at every time)."""
        m = np.asarray(child_to_parent, dtype=np.float64)
        if stamp_ns is None:
            self._static[(parent, child)] = m
            return
        samples = self._dynamic.setdefault((parent, child), [])
        samples.insert(bisect.bisect_right([t for t, _ in samples], stamp_ns), (int(stamp_ns), m))
        del samples[: max(len(samples) - self.history, 0)]

    def mark_gap(self) -> None:
        """The bag lost a stretch here (a damaged file of a split bag): no moving link is interpolated from its
        newest transform so far to the next one, which would invent poses for the time in between."""
        for key, samples in self._dynamic.items():
            if samples:
                self._gaps.setdefault(key, set()).add(samples[-1][0])

    def _link_at(self, key: tuple[str, str], stamp_ns: int | None) -> np.ndarray:
        if key in self._static:
            return self._static[key]
        samples = self._dynamic[key]
        if stamp_ns is None:  # latest, like tf2's Time(0)
            return samples[-1][1]
        stamps = [t for t, _ in samples]
        i = bisect.bisect_left(stamps, stamp_ns)
        if i < len(stamps) and stamps[i] == stamp_ns:
            return samples[i][1]
        if i == 0 or i == len(stamps):
            side = "before the first" if i == 0 else "after the newest"
            raise TransformNotReadyError(
                f"{key[0]} -> {key[1]} at {stamp_ns} ns is {side} transform in TF ({stamps[0]}..{stamps[-1]} ns)")
        (t0, m0), (t1, m1) = samples[i - 1], samples[i]
        if t0 in self._gaps.get(key, ()):
            raise TransformNotReadyError(f"{key[0]} -> {key[1]} at {stamp_ns} ns falls in a stretch the damaged bag "
                                         f"lost: no transform between {t0} and {t1} ns")
        return interpolate_transform(m0, m1, (stamp_ns - t0) / (t1 - t0))

    def _path(self, target: str, source: str) -> list[tuple[tuple[str, str], bool]] | None:
        """Links from ``source`` to ``target`` as ((parent, child), inverted) or None when not connected."""
        return link_path([*self._static, *self._dynamic], target, source)

    def lookup(self, target: str, source: str, stamp_ns: int | None = None) -> np.ndarray | None:
        """4x4 mapping ``source`` coordinates to ``target`` (camera->world for target=world) at ``stamp_ns``
        (None = latest); None when no chain joins the frames."""
        target, source = target.lstrip("/"), source.lstrip("/")
        if target == source:
            return np.eye(4)
        path = self._path(target, source)
        if path is None:
            self._check_invalid(target, source)
            return None
        out = np.eye(4)
        with np.errstate(invalid="ignore", over="ignore"):  # tf2 keeps an infinite translation: check_pose refuses
            for key, inverted in path:
                m = self._link_at(key, stamp_ns)
                out = (np.linalg.inv(m) if inverted else m) @ out
        return out

    def _check_invalid(self, target: str, source: str) -> None:
        """TransformError when ``target`` and ``source`` are joined only through links whose transforms
        were all invalid (the bag has the transform, unusable); nothing when they are not joined at all."""
        found = only_invalid_link([*self._static, *self._dynamic], self._invalid, target, source)
        if found is not None:
            (parent, child), problem = found
            raise TransformError(f"TF {target} -> {source} is in the bag but invalid: every transform "
                                 f"{parent} -> {child} so far was ({problem})")


def interpolate_transform(m0: np.ndarray, m1: np.ndarray, t: float) -> np.ndarray:
    """Rigid transform between ``m0`` (t=0) and ``m1`` (t=1): linear translation, slerp rotation."""
    q0 = np.array(matrix_to_quaternion(m0[:3, :3]))
    q1 = np.array(matrix_to_quaternion(m1[:3, :3]))
    dot = float(q0 @ q1)
    if dot < 0.0:  # the shorter way round
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + t * (q1 - q0)
    else:
        theta = math.acos(min(dot, 1.0))
        q = (math.sin((1 - t) * theta) * q0 + math.sin(t * theta) * q1) / math.sin(theta)
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(*q)
    out[:3, 3] = (1 - t) * m0[:3, 3] + t * m1[:3, 3]
    return out
