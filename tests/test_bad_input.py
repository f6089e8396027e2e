"""Issue 13, item by item: bad input never crashes, never publishes nonsense, never loses work.

(The seeded frame fuzz is tests/test_fuzz_frames.py.)
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import pickle
import resource
import shutil
import signal
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from rosbags.typesys import Stores, get_typestore
from test_fuzz_frames import _png_header_claiming
from test_ros_support import BlockBackend, pipeline_for
from test_trainer import tiny_config

from discene_ros import bag_io, msg_decode, msg_encode, replay
from discene_ros.errors import (
    CameraInfoError,
    DecodeError,
    ImageSizeError,
    NonFiniteOutputError,
    PoseError,
    TransformError,
)
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import FrameInput, FrameProcessor, check_outputs, checked_cloud, nonfinite_centers
from discene_ros.replay import ReplaySettings
from models import build_model, native_postprocess
from models.checkpoint import CheckpointError, load_checkpoint, load_model, save_model
from models.config import lite
from models.postprocess import OccupancyFrame
from training import evaluate, train
from training.data import worker_context
from training.occscannet import BadSampleError, OccScanNetDataset, read_pickle, safe_load_pickle
from training.scene_format import sample_paths
from training.trainer import Trainer

F = TypestoreFactory(get_typestore(Stores.ROS2_HUMBLE))
K = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])


def _compressed(data: bytes, fmt: str, stamp: int = 0) -> object:
    return F.new("sensor_msgs/msg/CompressedImage", header=msg_encode.make_header(F, stamp, "cam"), format=fmt,
                 data=np.frombuffer(data, np.uint8))


# ----------------------------------------------------------------------------- 1: decompression bombs
def test_compressed_header_claiming_20000_squared_is_refused_before_decoding():
    with pytest.raises(ImageSizeError, match="400000000 pixels"):
        msg_decode.compressed_to_rgb(_compressed(_png_header_claiming(20000, 20000), "png"))
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="JPEG")
    jpeg = bytearray(out.getvalue())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    with pytest.raises(ImageSizeError, match="limit"):
        msg_decode.compressed_to_rgb(_compressed(bytes(jpeg), "jpeg"))
    with pytest.raises(DecodeError, match="could not decode"):  # a header that parses, then too little image data
        msg_decode.compressed_to_rgb(_compressed(_png_header_claiming(16, 16), "png"))


# ----------------------------------------------------------------------------- 1, 5, 12: replay goes on
def _bag_with_bad_frames(path: Path) -> Path:
    """4 frames: good, PNG bomb, zero quaternion in TF, good."""
    rgb = np.full((48, 64, 3), 90, np.uint8)
    with bag_io.BagWriter(path, "mcap") as w:
        for i in range(4):
            t = 1_000_000_000 + i * 100_000_000
            tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "world", bag_io.CAMERA_FRAME, t)
            if i == 2:
                tf.transform.rotation.w = 0.0
            w.write(bag_io.TF_TOPIC, F.new("tf2_msgs/msg/TFMessage", transforms=[tf]), t)
            w.write(bag_io.CAMERA_INFO_TOPIC, msg_encode.k_to_camera_info(F, K, 48, 64, bag_io.CAMERA_FRAME, t), t)
            image = (_compressed(_png_header_claiming(20000, 20000), "png", t) if i == 1 else
                     msg_encode.rgb_to_compressed(F, rgb, bag_io.CAMERA_FRAME, t))
            image.header.frame_id = bag_io.CAMERA_FRAME
            w.write(bag_io.COMPRESSED_TOPIC, image, t)
    return path


def test_replay_skips_bomb_frame_drops_zero_quaternion_transform_and_exits_0(tmp_path, monkeypatch, capsys):
    bag = _bag_with_bad_frames(tmp_path / "bad_bag")
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    rc = replay.main(["--bag", str(bag), "--out", str(tmp_path / "out"), "--json", str(tmp_path / "s.json"),
                      "--no-progress", "--renders", "0"])
    s = json.loads((tmp_path / "s.json").read_text())
    assert rc == 0, capsys.readouterr().err
    assert s["images"] == 4 and s["frames"] == 3 and s["error"] is None
    assert s["skipped_by_reason"] == {"bad_image_size": 1}
    # the zero quaternion is dropped, as tf2 drops it: its frame takes the pose interpolated from the
    # transforms before and after it, as the node's lookup would, never the fallback pose
    assert s["invalid_transforms"][f"world -> {bag_io.CAMERA_FRAME}"]["count"] == 1
    assert s["fallback_pose_frames"] == 0
    assert s["first_frame_ms"] > 0 and s["fps_after_first_frame"] > 0  # warm-up reported apart (item 19)
    assert "one-off warm-up" in (tmp_path / "out" / "report.md").read_text()


def test_replay_failing_midway_keeps_previous_outputs_consistent(tmp_path, monkeypatch):
    """A replay that dies part-way leaves the previous run's outputs whole. (Ctrl-C instead publishes what
    it did: tests/test_replay.py.)"""
    bag = _bag_with_bad_frames(tmp_path / "bag")
    out = tmp_path / "out"
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert replay.main(["--bag", str(bag), "--out", str(out), "--no-progress", "--renders", "0"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("report.md") in before and any(p.suffix == ".mcap" for p in before)
    calls = {"n": 0}
    original = replay.FrameLoop.submit

    def dies_on_second(self, frame):  # a failure in the replay's main thread while it feeds the second frame
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(self, frame)

    monkeypatch.setattr(replay.FrameLoop, "submit", dies_on_second)
    assert replay.main(["--bag", str(bag), "--out", str(out), "--no-progress", "--renders", "0"]) == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous report and bag, untouched, and no staging folder left behind
    assert [p.name for p in out.iterdir()] and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_full_disk_ends_the_output_bag_not_the_replay(tmp_path, monkeypatch, capsys):
    """About 0.25 MB of clouds per frame: a long drive can fill the disk. The frames' metrics still count,
    the report says where the bag stopped, and the bag holds the frames before it."""
    out = tmp_path / "out"
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    original = bag_io.BagWriter.write

    def fills_up(self, topic, msg, stamp_ns):
        if self.count >= 3:
            raise OSError(28, "No space left on device")
        return original(self, topic, msg, stamp_ns)

    monkeypatch.setattr(bag_io.BagWriter, "write", fills_up)
    assert replay.main(["--out", str(out), "--no-progress", "--renders", "0", "--json", str(tmp_path / "s.json")]) == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == 4 and s["iou"] is not None
    assert "writing the output bag failed after 3 messages" in s["error"] and "No space left" in s["error"]
    assert "writing the output bag failed" in (out / "report.md").read_text()
    assert "the run is incomplete: writing the output bag failed" in capsys.readouterr().err
    reader = bag_io.open_reader(out / "occupancy_bag")
    try:
        assert sum(1 for _ in reader.messages()) == 3  # the clouds and grid poses written before the failure
    finally:
        reader.close()


def test_no_output_bag_gives_metrics_and_report_only(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert replay.main(["--out", str(out), "--no-progress", "--renders", "0", "--no-output-bag"]) == 0
    assert "output bag: none (--no-output-bag)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


# ----------------------------------------------------------------------------- 3: finite outputs only
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_non_finite_outputs_are_never_published():
    occ = OccupancyFrame(labels=np.zeros((60, 60, 36), np.uint8), voxel_indices=np.array([[1, 2, 3]], np.int32),
                         voxel_labels=np.array([2], np.uint8), voxel_scores=np.array([0.9], np.float32),
                         voxel_origin=np.array([1e300, 0.0, 0.0]), voxel_size=0.08)
    with pytest.raises(NonFiniteOutputError, match="1 voxel centres"):
        check_outputs(occ)
    occ.voxel_origin, occ.voxel_scores = np.zeros(3), np.array([np.nan], np.float32)
    with pytest.raises(NonFiniteOutputError, match="1 scores"):
        check_outputs(occ)
    occ.voxel_scores = np.array([0.9], np.float32)
    check_outputs(occ)
    # through the processor: a grid origin 1e300 away (a pose check cannot see it) is skipped, not published
    image = msg_encode.rgb_to_image(F, np.zeros((48, 64, 3), np.uint8), "cam", 0)
    frame = FrameInput(image=image, camera_info=msg_encode.k_to_camera_info(F, K, 48, 64, "cam", 0), cam_pose=np.eye(4),
                       voxel_origin=np.array([1e300, 1e300, 1e300]))
    with pytest.raises(NonFiniteOutputError) as info:
        FrameProcessor(pipeline_for(BlockBackend())).process(frame)
    assert info.value.reason == "non_finite_output"


def _check_frames() -> dict[str, OccupancyFrame]:
    """Frames of 300 voxels for the output check: all finite, or one origin, size or score that is not."""
    rng = np.random.default_rng(4)
    indices = rng.integers(0, 60, size=(300, 3)).astype(np.int32)
    indices[0] = (59, 59, 35)  # the far corner, which overflows first

    def frame(origin=(0.5, -1.0, 0.0), size=0.08, bad_score=None, scores_dtype=np.float32, n=300):
        scores = np.full(n, 0.75, scores_dtype)
        if bad_score is not None:
            scores[7] = bad_score
        return OccupancyFrame(labels=np.zeros((60, 60, 36), np.uint8), voxel_indices=indices[:n],
                              voxel_labels=np.ones(n, np.uint8), voxel_scores=scores,
                              voxel_origin=np.array(origin, np.float64), voxel_size=size)

    return {
        "finite": frame(),
        "NaN origin": frame(origin=(np.nan, 0.0, 0.0)),
        "origin 1e300": frame(origin=(0.0, 1e300, 0.0)),
        "far voxel past float32": frame(origin=(2.0**128 - 2.0**102 - 59.5e31, 0.0, 0.0), size=1e31),
        "NaN size": frame(size=np.nan),
        "NaN score": frame(bad_score=np.nan),
        "inf score": frame(bad_score=np.inf),
        "-inf score": frame(bad_score=-np.inf),
        "float64 score past float32": frame(bad_score=1e39, scores_dtype=np.float64),
        "empty": frame(n=0),
        "empty, inf origin": frame(origin=(0.0, 0.0, np.inf), n=0),
    }


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("native", [True, False], ids=["C rows", "numpy columns"])
def test_the_checked_cloud_refuses_what_the_full_check_refuses(native, monkeypatch):
    """``checked_cloud`` (the node's output check) trusts what the rows' writer saw: on every frame it raises
    exactly when the full check does, with its message, and otherwise returns the frame's cloud rows."""
    if native and not native_postprocess.available():
        pytest.skip(f"native kernel: {native_postprocess.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(native_postprocess, "_kernel", None)
    refused = 0
    for name, occ in _check_frames().items():
        try:
            check_outputs(occ)
            expected = None
        except NonFiniteOutputError as exc:
            expected, refused = str(exc), refused + 1
        try:
            cloud = checked_cloud(occ)
        except NonFiniteOutputError as exc:
            assert str(exc) == expected, name
            continue
        assert expected is None, name
        assert cloud.points.tobytes() == msg_encode.occupancy_points(occ).tobytes(), name
        assert (cloud.xyz_finite, cloud.scores_finite) == ((True, True) if native else (None, None)), name
    assert refused == 9


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_nonfinite_centers_counts_as_the_full_check():
    """The two-end shortcut of ``nonfinite_centers`` against every centre rounded to float32, including
    origins where only the far voxels overflow float32."""
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 60, size=(500, 3)).astype(np.int32)
    occ = OccupancyFrame(labels=np.zeros((60, 60, 36), np.uint8), voxel_indices=indices,
                         voxel_labels=np.ones(500, np.uint8), voxel_scores=np.ones(500, np.float32),
                         voxel_origin=np.zeros(3), voxel_size=0.08)
    f32_max = float(np.finfo(np.float32).max)
    partial = 0
    for origin, size in [((0.0, -3.0, 1.0), 0.08), ((1e300, 0.0, 0.0), 0.08), ((np.nan, 0.0, 0.0), 0.08),
                         ((0.0, -np.inf, 0.0), 0.08), ((f32_max - 2e32, 0.0, 0.0), 1e31),
                         ((0.0, 0.0, -f32_max + 3e32), -1e31), ((0.0, 0.0, 0.0), np.nan),
                         # the far centre just past half an ulp beyond the float32 maximum: it rounds to inf
                         ((2.0**128 - 2.0**102 - 59.5e31, 0.0, 0.0), 1e31)]:
        occ.voxel_origin, occ.voxel_size = np.array(origin), size
        full = int(np.sum(~np.isfinite(occ.centers_world().astype(np.float32)).all(axis=-1)))
        assert nonfinite_centers(occ) == full, (origin, size)
        partial += 0 < full < len(indices)
    assert partial == 3  # the float32-edge origins overflow some voxels, not all
    occ.voxel_indices = np.zeros((0, 3), np.int32)
    assert nonfinite_centers(occ) == 0


def test_is_dense_says_whether_the_cloud_is_finite():
    points = msg_encode.cloud_points(np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), np.array([1, 2]), np.array([0.5, 0.5]))
    assert msg_encode.points_to_pointcloud2(F, points, "world", 0).is_dense
    points["y"][1] = np.nan
    assert not msg_encode.points_to_pointcloud2(F, points, "world", 0).is_dense


# ----------------------------------------------------------------------------- 4: degenerate K and poses
@pytest.mark.parametrize("edit, match", [
    ((2, 2, 0.0), "pinhole"), ((2, 2, 1e6), "pinhole"), ((0, 0, 1e-300), "focal"), ((0, 0, 1e300), "focal"),
    ((0, 1, 1e300), "skew"), ((0, 2, 1e5), "principal point"), ((1, 2, -400.0), "principal point"),
])
def test_degenerate_intrinsics_are_rejected(edit, match):
    k = K.copy()
    k[edit[0], edit[1]] = edit[2]
    with pytest.raises(CameraInfoError, match=match):
        msg_decode.camera_info_to_k(msg_encode.k_to_camera_info(F, k, 48, 64, "cam", 0), (48, 64))
    np.testing.assert_allclose(msg_decode.camera_info_to_k(msg_encode.k_to_camera_info(F, K, 48, 64, "cam", 0), (96, 128)), 2 * K
                               - np.diag([0, 0, 1]))


def _scaled(p):
    p[:3, :3] *= 1.01
    return p


def _sheared(p):
    p[0, 1] = 0.2
    return p


def _reflected(p):
    p[:3, 2] *= -1
    return p


def _projective(p):
    p[3, 0] = 0.1
    return p


def test_pose_check_agrees_with_the_matrix_formulas():
    """The pose check runs on Python floats; it accepts and rejects exactly as max |R^T R - I|, det R and
    |t| computed with numpy say, and reports those values, on rotations perturbed around the tolerance."""
    rng = np.random.default_rng(3)
    verdicts = set()
    for noise in np.repeat([1e-5, 3e-4, 1e-3, 3e-3, 1e-1], 40):
        q = rng.normal(size=4)
        pose = np.eye(4)
        pose[:3, :3] = msg_decode.quaternion_to_matrix(*(q / np.linalg.norm(q))) + rng.normal(0, noise, (3, 3))
        if rng.random() < 0.2:
            pose[:3, 2] *= -1
        pose[:3, 3] = rng.normal(0, 1, 3) * (1e5 if rng.random() < 0.1 else 3.0)
        rot = pose[:3, :3]
        ortho, det = np.max(np.abs(rot.T @ rot - np.eye(3))), np.linalg.det(rot)
        ok = (ortho <= msg_decode.ROTATION_TOL and abs(det - 1) <= msg_decode.ROTATION_TOL
              and np.linalg.norm(pose[:3, 3]) <= msg_decode.MAX_TRANSLATION_M)
        try:
            msg_decode.check_pose(pose)
            verdicts.add(True)
            assert ok
        except PoseError as exc:
            verdicts.add(False)
            assert not ok
            if "|R^T R - I|" in str(exc):
                assert f"{ortho:.3g}" in str(exc) and f"{det:.6g}" in str(exc)
    assert verdicts == {True, False}
    for bad in (np.nan, np.inf):
        pose = np.eye(4)
        pose[1, 3] = bad
        with pytest.raises(PoseError, match="non-finite"):
            msg_decode.check_pose(pose)


@pytest.mark.parametrize("edit, match", [(_scaled, "scaled or sheared"), (_sheared, "scaled or sheared"),
                                         (_reflected, "reflection"), (_projective, "projective")])
def test_non_rigid_poses_are_rejected(edit, match):
    with pytest.raises(PoseError, match=match):
        msg_decode.check_pose(edit(np.eye(4)))
    rot = msg_decode.quaternion_to_matrix(*(np.array([0.1, 0.2, 0.3, 0.9]) / np.linalg.norm([0.1, 0.2, 0.3, 0.9])))
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rot, [3.0, -2.0, 1.0]
    np.testing.assert_array_equal(msg_decode.check_pose(pose), pose)


# ----------------------------------------------------------------------------- 5: quaternions
def tf2_stored_rotation(x: float, y: float, z: float, w: float) -> list[float] | None:
    """What tf2's BufferCore (Humble, Jazzy) stores for a message quaternion, transcribed from geometry2:
    setTransform builds a Transform, whose Matrix3x3::setRotation divides by |q|^2; setTransformImpl drops the
    transform when getRotation() of that matrix has a NaN (TF_NAN_INPUT) or is further than 0.01 from unit
    (TF_DENORMALIZED_QUATERNION). None = dropped."""
    d = x * x + y * y + z * z + w * w
    s = 2.0 / d if d != 0.0 else math.inf
    xs, ys, zs = x * s, y * s, z * s
    wx, wy, wz = w * xs, w * ys, w * zs
    xx, xy, xz = x * xs, x * ys, x * zs
    yy, yz, zz = y * ys, y * zs, z * zs
    m = [[1.0 - (yy + zz), xy - wz, xz + wy], [xy + wz, 1.0 - (xx + zz), yz - wx], [xz - wy, yz + wx, 1.0 - (xx + yy)]]
    trace, q = m[0][0] + m[1][1] + m[2][2], [0.0] * 4
    if trace > 0.0:
        r = math.sqrt(trace + 1.0)
        q[3], r = r * 0.5, 0.5 / r
        q[0], q[1], q[2] = (m[2][1] - m[1][2]) * r, (m[0][2] - m[2][0]) * r, (m[1][0] - m[0][1]) * r
    else:
        i = (2 if m[1][1] < m[2][2] else 1) if m[0][0] < m[1][1] else (2 if m[0][0] < m[2][2] else 0)
        j, k = (i + 1) % 3, (i + 2) % 3
        r = math.sqrt(m[i][i] - m[j][j] - m[k][k] + 1.0) if m[i][i] - m[j][j] - m[k][k] + 1.0 >= 0 else math.nan
        q[i], r = r * 0.5, (0.5 / r if r else math.inf)
        q[3], q[j], q[k] = (m[k][j] - m[j][k]) * r, (m[j][i] + m[i][j]) * r, (m[k][i] + m[i][k]) * r
    if any(map(math.isnan, q)) or abs(sum(v * v for v in q) - 1.0) >= 0.01:
        return None
    return q


def test_quaternions_follow_tf2s_normalisation_rule():
    """tf2 normalises any finite non-zero quaternion and drops only what its normalisation turns into NaN: the
    project refused |q|^2 further than 0.01 from 1, frames tf2 gives the node with a pose."""
    rng = np.random.default_rng(7)
    cases = [(0, 0, 0, 0), (0, 0, 0, 1.001), (0, 0, 0, 1.1), (0, 0, 0, 2.0), (0, 0, 0.3, 1.2), (0, 0, 0, 0.5),
             (0, 0, np.nan, 1), (0, 0, np.inf, 1), (-np.inf, 0, 0, 0), (1e-170, 0, 0, 0), (3e-150, 0, 0, 1e-150),
             *(tuple(rng.normal(size=4) * scale) for scale in (1e-3, 0.5, 1.0, 7.0, 1e6))]
    for q in cases:
        stored = tf2_stored_rotation(*map(float, q))
        if stored is None:
            assert msg_decode.quaternion_problem(*q) is not None, q
            with pytest.raises(TransformError):
                msg_decode.quaternion_to_matrix(*q)
            continue
        assert msg_decode.quaternion_problem(*q) is None, q
        x, y, z, w = stored  # unit: the rotation tf2 gives the node
        expected = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                             [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                             [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
        np.testing.assert_allclose(msg_decode.quaternion_to_matrix(*q), expected, atol=1e-12)
    assert "is zero" in msg_decode.quaternion_problem(0.0, 0.0, 0.0, 0.0)
    assert "not finite" in msg_decode.quaternion_problem(0.0, 0.0, np.inf, 1.0)


# ----------------------------------------------------------------------------- 2, 6, 8: datasets
@pytest.fixture()
def sample_root(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(Path(replay.DATA_DIR) / "sample_dataset", root)
    return root


def _edit_sample(root: Path, **changes) -> str:
    ds = OccScanNetDataset(root, "train", image_size=(48, 64))
    sample_id = ds.ids[0]
    pkl = sample_paths(root, sample_id)[0]
    data = safe_load_pickle(pkl)
    data.update(changes)
    pkl.write_bytes(pickle.dumps(data, protocol=4))
    return sample_id


@pytest.mark.parametrize("changes, match", [
    ({"cam_pose": np.array([["a"] * 4] * 4)}, "cam_pose has dtype"),
    ({"cam_pose": [[1, 0, 0, 0], [0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}, "cam_pose is not a regular numeric array"),
    ({"target_1_4": np.full((60, 36, 60), None, dtype=object)}, "target_1_4 has dtype object"),
    ({"voxel_origin": np.array([np.nan, 0.0, 0.0])}, "voxel_origin has non-finite"),
])
def test_bad_sample_arrays_name_the_sample(sample_root, changes, match):
    sample_id = _edit_sample(sample_root, **changes)
    with pytest.raises(BadSampleError, match=f"sample {sample_id}: {match}"):
        read_pickle(sample_root, sample_id)
    ds = OccScanNetDataset(sample_root, "train", image_size=(48, 64), skip_bad=True, load_depth=False)
    assert ds[0]["sample_id"] != sample_id and sample_id in ds.skipped


def test_evaluation_scores_each_frame_once_empty_ones_included_and_counts_bad_ones(sample_root, capsys):
    """As the reference's test phase: a frame with no occupied voxel is scored (false positives only), a bad
    one (here a non-finite pose) is counted and named, and neither is replaced by its neighbour, which scored
    that neighbour twice."""
    from models.postprocess import labels_batch
    from training.data import collate_frames, prepare_inputs
    from training.metrics import SSCMetrics

    ids = [line.strip() for name in ("train", "val") for line in (sample_root / f"{name}_subscenes.txt").open()]
    (sample_root / "all.txt").write_text("\n".join(ids) + "\n")
    cfg = lite()
    cfg.image_size = [64, 96]
    dataset = OccScanNetDataset(sample_root, str(sample_root / "all.txt"), config=cfg, skip_bad=True, load_depth=False)
    empty_id, bad_id = dataset.ids[0], dataset.ids[2]
    pkl = safe_load_pickle(sample_paths(sample_root, empty_id)[0])
    _write_pickle(sample_root, empty_id, dict(pkl, target_1_4=np.zeros_like(np.asarray(pkl["target_1_4"]))))
    _write_pickle(sample_root, bad_id, dict(pkl, cam_pose=np.full((4, 4), np.nan)))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cfg.score_threshold = 0.0  # random weights: every point counts
    result = evaluate.evaluate_model(model, dataset, cfg)
    assert result["frames"] == 3 and result["skipped_frames"] == 1 and list(result["skipped"]) == [bad_id]
    expected = SSCMetrics(num_classes=cfg.num_classes + 1)
    with torch.no_grad():
        for sample_id in (dataset.ids[0], dataset.ids[1], dataset.ids[3]):
            inputs = prepare_inputs(collate_frames([dataset.load(sample_id, allow_empty=True)]), torch.device("cpu"), False)
            last = model(inputs["image"], inputs["grid2img"])["layers"][-1]
            expected.add_batch(labels_batch(last["points"], last["logits"].sigmoid(), cfg).numpy(), inputs["target"].numpy())
    assert result["iou"] == expected.compute()["iou"] and result["miou"] == expected.compute()["miou"]
    with pytest.raises(BadSampleError, match="no occupied voxel"):
        dataset.load(empty_id)  # training still refuses it
    save_model(sample_root / "m.pt", model, cfg)
    assert evaluate.main(["--checkpoint", str(sample_root / "m.pt"), "--data", str(sample_root),
                          "--split", str(sample_root / "all.txt")]) == 0
    out, err = capsys.readouterr()
    assert "3 frames" in out and f"1 bad frames not scored; first: {bad_id}: sample {bad_id}: cam_pose" in err


def test_evaluation_names_a_readable_frame_with_a_bad_pose_by_its_reason_not_unreadable(sample_root, tmp_path, capsys):
    """A frame whose file reads fine but whose pose is a reflection is a bad frame, and says so: discene-eval's
    line, its JSON and the val-split check before training give that reason; none calls it unreadable."""
    cfg = lite()
    cfg.image_size = [64, 96]
    ids = OccScanNetDataset(sample_root, "val", config=cfg).ids
    pose = np.asarray(safe_load_pickle(sample_paths(sample_root, ids[0])[0])["cam_pose"], dtype=np.float64)
    mirrored = pose @ np.diag([-1.0, 1.0, 1.0, 1.0])
    for sample_id in ids:
        data = safe_load_pickle(sample_paths(sample_root, sample_id)[0])
        _write_pickle(sample_root, sample_id, dict(data, cam_pose=mirrored if sample_id == ids[0] else data["cam_pose"]))
    save_model(tmp_path / "m.pt", build_model(cfg), cfg)
    out_json = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "m.pt"), "--data", str(sample_root), "--split", "val",
                          "--json", str(out_json)]) == 0
    err = capsys.readouterr().err
    reason = f"sample {ids[0]}: cam_pose is a reflection"
    assert f"1 bad frames not scored; first: {ids[0]}: {reason}" in err and "unreadable" not in err
    result = json.loads(out_json.read_text())
    assert result["frames"] == 1 and result["skipped_frames"] == 1 and result["skipped"][ids[0]].startswith(reason)
    _write_pickle(sample_root, ids[1], dict(safe_load_pickle(sample_paths(sample_root, ids[1])[0]), cam_pose=mirrored))
    with pytest.raises(ValueError, match="no validation frame can be scored: all 2 frames are bad; first: ") as info:
        evaluate.check_scorable(OccScanNetDataset(sample_root, "val", config=cfg, load_depth=False))
    assert reason in str(info.value) and "unreadable" not in str(info.value)


def test_bad_validation_frames_during_training_are_logged_once_not_at_every_evaluation(data_root, tmp_path, caplog):
    """The trainer's evaluations count the val frames they cannot score (val/skipped_frames) and name them in
    one line; later evaluations meet the same frames and say nothing more."""
    from training.trainer import Trainer

    root = tmp_path / "ds"
    shutil.copytree(data_root, root)
    cfg = tiny_config(root, tmp_path / "run", max_steps=3, eval_every=1)
    model_cfg = cfg.model_config()
    val = OccScanNetDataset(root, "val", config=model_cfg, load_depth=False)
    bad_id = val.ids[0]
    data = safe_load_pickle(sample_paths(root, bad_id)[0])
    _write_pickle(root, bad_id, dict(data, cam_pose=np.asarray(data["cam_pose"]) @ np.diag([-1.0, 1.0, 1.0, 1.0])))
    train_set = OccScanNetDataset(root, "train", config=model_cfg, load_depth=False)
    trainer = Trainer(cfg, train_set, OccScanNetDataset(root, "val", config=model_cfg, load_depth=False))
    evaluations = []
    evaluate_and_keep_best = trainer.evaluate_and_keep_best
    trainer.evaluate_and_keep_best = lambda: evaluations.append(evaluate_and_keep_best())
    with caplog.at_level("WARNING", logger="training.trainer"):
        trainer.fit()
    assert len(evaluations) >= 3 and all(result["skipped_frames"] == 1 for result in evaluations)
    lines = [r.getMessage() for r in caplog.records if "validation:" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert lines[0].startswith(f"step 1: validation: 1 bad frames not scored; first: {bad_id}: sample {bad_id}: "
                               "cam_pose is a reflection")


def _write_pickle(root: Path, sample_id: str, data: dict) -> None:
    sample_paths(root, sample_id)[0].write_bytes(pickle.dumps(data, protocol=4))


@pytest.mark.parametrize("value, match", [(np.nan, "non-finite"), (-1, r"labels \[-1\]"), (300, r"labels \[300\]"),
                                          (2.5, "non-integer")])
def test_bad_target_labels_are_rejected_with_their_value(sample_root, value, match):
    ds = OccScanNetDataset(sample_root, "train", image_size=(48, 64))
    target = np.asarray(safe_load_pickle(sample_paths(sample_root, ds.ids[0])[0])["target_1_4"]).astype(np.float64)
    target[0, 0, 0] = value
    sample_id = _edit_sample(sample_root, target_1_4=target if np.isnan(value) or value == 2.5 else target.astype(np.int64))
    with pytest.raises(BadSampleError, match=f"sample {sample_id}: .*{match}"):
        ds.read_target(sample_id)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dataset_pickles_cannot_run_code(sample_root, tmp_path):
    marker = tmp_path / "pwned"
    sample_id = _edit_sample(sample_root, extra=_RunsCode(marker))
    with pytest.raises(BadSampleError, match=r"references the global (os|posix)\.system"):
        read_pickle(sample_root, sample_id)
    assert not marker.exists()
    assert str(sample_paths(sample_root, sample_id)[0]) in str(pytest.raises(BadSampleError, read_pickle, sample_root,
                                                                             sample_id).value)


def test_numpy_1x_and_protocol_5_pickles_still_load(tmp_path):
    data = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "s": np.float64(2.5), "n": np.int64(3), "t": "x",
            "l": [1.0, (2, 3)], "b": b"raw"}
    for protocol in (2, 4, 5):
        raw = pickle.dumps(data, protocol=protocol)
        if protocol == 2:  # what numpy 1.x writes: numpy.core instead of numpy._core (GLOBAL opcodes are text)
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray" in raw
        (tmp_path / "s.pkl").write_bytes(raw)
        loaded = safe_load_pickle(tmp_path / "s.pkl")
        np.testing.assert_array_equal(loaded["a"], data["a"])
        assert loaded["s"] == 2.5 and loaded["n"] == 3 and loaded["l"] == [1.0, (2, 3)] and loaded["b"] == b"raw"


# ----------------------------------------------------------------------------- 7, 9, 13: checkpoints
def test_checkpoints_with_nan_weights_string_configs_or_code_are_refused(tmp_path):
    cfg = lite()
    model = build_model(cfg)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    save_model(tmp_path / "nan.pt", model, cfg)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(tmp_path / "nan.pt")
    torch.save({"config": "lite", "model": {}}, tmp_path / "str.pt")
    with pytest.raises(CheckpointError, match="'config' is a str"):
        load_checkpoint(tmp_path / "str.pt")
    marker = tmp_path / "pwned"
    torch.save({"config": {}, "model": {}, "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(info.value) and "system" in str(info.value) and not marker.exists()
    assert info.value.__cause__ is None  # PyTorch's advice does not come back through the chained exception


# ----------------------------------------------------------------------------- 10, 13: broken mcap bags
@pytest.mark.parametrize("fraction", [0.35, 0.6, 0.9, 0.999])
def test_truncated_sample_bag_is_read_up_to_the_damage(tmp_path, fraction):
    bag = tmp_path / "bag"
    shutil.copytree(replay.SAMPLE_BAG, bag)
    (mcap,) = bag.glob("*.mcap")
    data = mcap.read_bytes()
    mcap.write_bytes(data[: int(len(data) * fraction)])
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert s["error"] and "read sequentially up to the damage" in s["error"]
    assert s["frames"] + s["skipped"] == s["images"] >= (4 if fraction > 0.99 else 1)
    assert (tmp_path / "out" / "occupancy_bag").is_dir()


def test_truncated_zstd_bag_is_read_up_to_the_damage(tmp_path):
    """``ros2 bag record`` often compresses chunks (zstd); a recording cut by a power loss is then read with
    the decompressor rosbags itself brings, up to the cut chunk."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

    bag, store = tmp_path / "bag", bag_io.typestore()
    writer = Writer(bag, version=8, storage_plugin=StoragePlugin.MCAP)
    writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    writer.open()
    connections = {}
    with AnyReader([replay.SAMPLE_BAG], default_typestore=store) as reader:
        for conn, stamp, raw in reader.messages():
            if conn.topic not in connections:
                connections[conn.topic] = writer.add_connection(conn.topic, conn.msgtype, typestore=store)
            writer.write(connections[conn.topic], stamp, raw)
    writer.close()
    (mcap,) = bag.glob("*.mcap")
    mcap.write_bytes(mcap.read_bytes()[: int(mcap.stat().st_size * 0.8)])
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert "read sequentially up to the damage" in s["error"] and "zstd-compressed" in s["error"]
    assert 1 <= s["frames"] < 4 and s["skipped"] == 0


def test_zstd_chunks_decompress_with_zstandard_where_rosbags_brings_that(monkeypatch):
    """rosbags before 0.11.7 depends on zstandard, not backports.zstd: with it alone, the sequential reader
    still reads zstd chunks (it refused them as needing a package)."""
    zstandard = pytest.importorskip("zstandard")
    records = bytes(range(256)) * 40
    for name in ("compression.zstd", "backports.zstd"):  # neither the standard library's nor the backport
        monkeypatch.setitem(sys.modules, name, None)
    chunk = zstandard.ZstdCompressor().compress(records)
    assert bag_io._decompress("zstd", chunk, len(records), zlib.crc32(records)) == records
    with pytest.raises(bag_io.McapDamage, match="does not decompress"):
        bag_io._decompress("zstd", chunk[:-8], len(records), 0)


def test_truncated_lz4_bag_is_read_up_to_the_damage(tmp_path):
    """lz4 chunks (rosbags cannot write them): the sample's chunks recompressed by hand, then cut."""
    import lz4.frame

    bag = tmp_path / "bag"
    shutil.copytree(replay.SAMPLE_BAG, bag)
    (mcap,) = bag.glob("*.mcap")
    data, out, chunk_ends = mcap.read_bytes(), bytearray(bag_io.MCAP_MAGIC), []
    for opcode, content, _ in bag_io._records(data, 8, len(data), "sample"):
        if opcode == bag_io._OP_DATA_END:
            break
        if opcode == bag_io._OP_CHUNK:
            assert struct.unpack_from("<I", content, 28)[0] == 0  # the sample's chunks are uncompressed
            packed = lz4.frame.compress(content[40:])
            content = content[:28] + struct.pack("<I", 3) + b"lz4" + struct.pack("<Q", len(packed)) + packed
        out += bytes([opcode]) + struct.pack("<Q", len(content)) + content
        if opcode == bag_io._OP_CHUNK:
            chunk_ends.append(len(out))
    mcap.write_bytes(bytes(out[: chunk_ends[-1] - 100]))  # the last chunk cut off
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert "lz4-compressed" in s["error"] and 1 <= s["frames"] < 4


def _split_recording(root: Path, files: dict[str, list[tuple[int, bool]]]) -> Path:
    """A killed, split ``ros2 bag record``: one mcap per name, no metadata.yaml; each file holds frames
    (stamp, with_tf), each written image first, then its camera info, then its TF (as drivers publish)."""
    root.mkdir()
    rgb = np.full((48, 64, 3), 90, np.uint8)
    for name, frames in files.items():
        with bag_io.BagWriter(root / "part", "mcap", F.typestore) as w:
            for t, with_tf in frames:
                w.write(bag_io.COMPRESSED_TOPIC, msg_encode.rgb_to_compressed(F, rgb, bag_io.CAMERA_FRAME, t), t)
                w.write(bag_io.CAMERA_INFO_TOPIC, msg_encode.k_to_camera_info(F, K, 48, 64, bag_io.CAMERA_FRAME, t), t)
                if with_tf:
                    tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "world", bag_io.CAMERA_FRAME, t)
                    w.write(bag_io.TF_TOPIC, F.new("tf2_msgs/msg/TFMessage", transforms=[tf]), t)
        (mcap,) = (root / "part").glob("*.mcap")
        mcap.rename(root / name)
        shutil.rmtree(root / "part")
    return root


def test_split_bag_files_are_read_in_recording_order(tmp_path):
    """rosbag2 numbers its splits rec_0 .. rec_11: as text rec_10 came before rec_2. metadata.yaml's order
    wins where it is readable; files it does not list follow in natural order."""
    for i in (10, 2, 0, 11, 1, 9):
        (tmp_path / f"rec_{i}.mcap").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert [p.name for p in bag_io.storage_files(tmp_path)] == [f"rec_{i}.mcap" for i in (0, 1, 2, 9, 10, 11)]
    info = {"rosbag2_bagfile_information": {"relative_file_paths": ["bag/rec_9.mcap", "rec_1.mcap", "gone.mcap"]}}
    (tmp_path / "metadata.yaml").write_text(yaml.safe_dump(info))
    assert [p.name for p in bag_io.storage_files(tmp_path)] == [f"rec_{i}.mcap" for i in (9, 1, 0, 2, 10, 11)]
    (tmp_path / "metadata.yaml").write_text("rosbag2_bagfile_information: [broken")
    assert [p.name for p in bag_io.storage_files(tmp_path)] == [f"rec_{i}.mcap" for i in (0, 1, 2, 9, 10, 11)]


def test_a_damaged_file_of_a_split_bag_loses_only_its_own_frames(tmp_path):
    """rec_10 is cut inside the TF of its second image: the files after it are read on. The frame whose TF was
    lost, and one stamped after the gap before any TF after it, are skipped (tf_not_ready): never a pose
    interpolated across the lost stretch. Before, rec_10 was read first (text order) and reading stopped there."""
    step = 100_000_000
    t = [1_700_000_000_000_000_000 + i * step for i in range(8)]
    root = _split_recording(tmp_path / "rec", {
        "rec_9.mcap": [(t[0], True), (t[1], True)],
        "rec_10.mcap": [(t[2], True), (t[3], True)],
        "rec_11.mcap": [(t[4] + step // 2, False), (t[5], True), (t[6], True)]})
    damaged = root / "rec_10.mcap"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: data.rindex(b"world")])  # inside the second TF message
    s = replay.replay(root, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert s["images"] == 7 and s["frames"] == 5 and s["skipped_by_reason"] == {"tf_not_ready": 2}
    assert "rec_10.mcap chunk" in s["error"] and "reading went on with the 1 file after rec_10.mcap (8 messages)" in s["error"]
    assert s["fallback_pose_frames"] == 0
    reader = bag_io.open_reader(s["output_bag"])
    try:
        stamps = [stamp for conn, stamp, _ in reader.messages() if conn.topic == bag_io.PRED_TOPIC]
    finally:
        reader.close()
    assert stamps == [t[0], t[1], t[2], t[5], t[6]]


def test_a_chunk_that_fails_its_crc_ends_sequential_reading_there(tmp_path):
    """rosbag2's mcap writer records a CRC-32 per chunk: a damaged chunk is refused, not decoded into frames."""
    bag = tmp_path / "bag"
    shutil.copytree(replay.SAMPLE_BAG, bag)
    (mcap,) = bag.glob("*.mcap")
    data = bytearray(mcap.read_bytes())
    chunks, end = [], None
    for opcode, content, offset in bag_io._records(bytes(data), 8, len(data), "sample"):
        if opcode == bag_io._OP_CHUNK:
            chunks.append(offset)
            records = content[40 + struct.unpack_from("<I", content, 28)[0]:]  # after the compression name, length
            struct.pack_into("<I", data, offset + 9 + 24, zlib.crc32(records))  # as rosbag2 writes it
        elif opcode == bag_io._OP_DATA_END:
            end = offset
            break
    assert len(chunks) == 2 and end is not None  # the sample's layout, which this test relies on
    data[chunks[1] + 9 + 200] ^= 0xFF  # one byte of the second chunk's records
    mcap.write_bytes(bytes(data[:end]))  # no summary or footer: rosbags refuses, the sequential reader reads
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert "checksum (CRC-32) mismatch" in s["error"]
    assert 1 <= s["frames"] < 4


def test_mcap_with_valid_magic_and_garbage_inside_gives_a_clear_error(tmp_path):
    bag = tmp_path / "bag"
    shutil.copytree(replay.SAMPLE_BAG, bag)
    (mcap,) = bag.glob("*.mcap")
    rng = np.random.default_rng(0)
    mcap.write_bytes(bag_io.MCAP_MAGIC + rng.bytes(5000) + bag_io.MCAP_MAGIC)
    with pytest.raises(bag_io.BagError, match="cut off or invalid") as info:
        bag_io.open_reader(bag)
    assert "OverflowError" not in str(info.value) or "sequential reading found no message" in str(info.value)


def test_garbage_onnx_is_named_as_such(tmp_path, capsys):
    from export.cli import main as export_main

    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        replay.build_pipeline(onnx_file, backend="onnxruntime")
    upper = tmp_path / "MODEL.ONNX"  # the suffix in any case
    upper.write_bytes(onnx_file.read_bytes())
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        replay.build_pipeline(upper, backend="onnxruntime")
    assert export_main(["check", "--onnx", str(onnx_file)]) == 2
    assert "cannot read" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 11, 16, 17: training CLIs
def test_train_refuses_to_replace_a_run_and_resumes_from_the_checkpoints_own_config(data_root, tmp_path, capsys):
    cfg = tiny_config(data_root, tmp_path / "run", max_steps=2).to_dict()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["--config", str(tmp_path / "cfg.yaml"), "--set", "distill.prior=false"]
    assert train.main(args) == 0
    last = tmp_path / "run" / "last.pt"
    stamp = last.stat().st_mtime_ns
    assert train.main(args) == 2 and "--resume" in capsys.readouterr().err and last.stat().st_mtime_ns == stamp
    assert train.main(["--resume", str(last), "--steps", "1"]) == 2
    assert "below the step 2" in capsys.readouterr().err
    # the YAML a user would pass names another data root: resume takes the run's own root and budget
    broken = dict(cfg, data=dict(cfg["data"], root=str(tmp_path / "nowhere")), max_steps=99)
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(broken))
    assert train.main(["--config", str(tmp_path / "other.yaml"), "--resume", str(last), "--steps", "3"]) == 0
    assert torch.load(last, weights_only=True)["step"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["data"]["root"] == str(data_root) and saved["max_steps"] == 3
    assert train.main(args + ["--overwrite"]) == 0 and torch.load(last, weights_only=True)["step"] == 2
    # 17: a short run scores nothing at the default threshold; --score-threshold makes the CLI usable
    final = str(tmp_path / "run" / "final.pt")
    assert evaluate.main(["--checkpoint", final, "--data", str(data_root), "--json", str(tmp_path / "a.json"),
                          "--score-threshold", "0.0"]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["iou"] > 0
    assert evaluate.main(["--checkpoint", final, "--data", str(data_root), "--score-threshold", "1.5"]) == 2


def _train_until_the_disk_is_full(config: str, stderr: str) -> None:
    """discene-train in a child process whose file-size limit drops to half a checkpoint once the first is written:
    the next write fails part-way as on a full disk (EFBIG there, ENOSPC here; SIGXFSZ ignored so the write returns
    the error), and torch.save reports it as RuntimeError("unexpected pos ...") over the OSError. Its standard error
    goes to the file ``stderr``."""
    with open(stderr, "w") as err:
        os.dup2(err.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - descriptor 2, flushed when the process ends
    torch.set_num_threads(1)
    original, limited = Trainer.save, []

    def save(self, name):
        path = original(self, name)
        if not limited:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, resource.RLIM_INFINITY))
            limited.append(path)
        return path

    Trainer.save = save
    sys.exit(train.main(["--config", config]))


def test_a_full_disk_stops_training_cleanly_and_keeps_the_last_checkpoint(data_root, tmp_path):
    """A real failed write, not a faked OSError: exit code 4 and its one line, the checkpoint before it whole. The
    child comes from the loader workers' fork server (torch and the training modules imported there once): a fresh
    interpreter spent 5 of the test's 8 s importing them."""
    cfg = tiny_config(data_root, tmp_path / "run", max_steps=2)
    cfg.ckpt_every = 1  # checkpoints at steps 1 and 2
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    child = (worker_context() or multiprocessing.get_context("spawn")).Process(
        target=_train_until_the_disk_is_full, args=(str(tmp_path / "cfg.yaml"), str(tmp_path / "stderr.txt")))
    child.start()
    child.join(300)
    if child.exitcode is None:
        child.kill()
        child.join()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert child.exitcode == 4, stderr
    assert "File too large" in stderr and "free space, then continue with --resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    last = tmp_path / "run" / "last.pt"
    assert load_checkpoint(last)["step"] == 1  # the checkpoint before the failure, whole
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- 19: help texts
def test_options_named_in_the_issue_have_help_texts(capsys):
    from training.synth import main as synth_main

    for main, options in ((synth_main, ("--scenes", "--seed")), (evaluate.main, ("--split", "--max-frames")),
                          (replay.main, ("--max-frames", "--world-frame", "--out"))):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        for option in options:
            line = text[text.index(option):].split("\n  -")[0]
            assert len(line.split()) > 3, (option, line)
    with pytest.raises(SystemExit):
        replay.main(["--help"])
    assert "./discene_replay" in capsys.readouterr().out


def test_write_failure_advice_says_free_space_only_when_space_ran_out(tmp_path):
    """discene-train's exit-4 line: 'free space' for a full disk, quota or size limit; a folder where the
    checkpoint goes (a real IsADirectoryError) is not a matter of space."""
    import errno

    from training.train import write_failure_advice

    with pytest.raises(OSError) as folder:
        (tmp_path / "last.pt").mkdir()
        (tmp_path / "last.pt").write_bytes(b"x")
    assert write_failure_advice(folder.value) == "fix what the error names"
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        assert write_failure_advice(OSError(code, "no room")) == "free space"
