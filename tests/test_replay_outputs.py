"""discene-replay's outputs and exit codes on bad input: previous outputs kept, bags without metadata,
arguments checked up front, invalid TF named, internal errors shown; discene-dataset-to-bag's checks."""
from __future__ import annotations

import io
import json
import math
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_fuzz_frames import _png_header_claiming
from test_ros_support import BlockBackend, OracleBackend, pipeline_for, wait_until

from discene_ros import bag_io, msg_decode, msg_encode, replay
from discene_ros.errors import CloudFormatError, TransformError
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import FrameInput, ProcessedFrame
from models.postprocess import OccupancyFrame

F = TypestoreFactory(bag_io.typestore())
K = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])


def _bag(path: Path, n: int = 2, encoding: str = "rgb8", tf_edit=None, storage: str = "mcap",
         other_tf=None) -> Path:
    """n colour frames (+ camera info, TF world -> cam); ``encoding`` overrides the image's encoding
    field, ``tf_edit(transform)`` edits each TF transform, ``other_tf(stamp_ns)`` gives more transforms
    for each TF message."""
    with bag_io.BagWriter(path, storage, F.typestore) as w:
        for i in range(n):
            t = 10**18 + i * 100_000_000
            tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "world", "cam", t)
            if tf_edit is not None:
                tf_edit(tf.transform)
            transforms = [tf, *(other_tf(t) if other_tf is not None else [])]
            w.write(bag_io.TF_TOPIC, F.new("tf2_msgs/msg/TFMessage", transforms=transforms), t)
            w.write(bag_io.CAMERA_INFO_TOPIC, msg_encode.k_to_camera_info(F, K, 48, 64, "cam", t), t)
            image = msg_encode.rgb_to_image(F, np.zeros((48, 64, 3), np.uint8), "cam", t)
            image.encoding = encoding
            w.write(bag_io.IMAGE_TOPIC, image, t)
    return path


@pytest.fixture()
def block_model(monkeypatch):
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(bag: Path | str, out: Path, *extra: str) -> int:
    return replay.main(["--bag", str(bag), "--out", str(out), "--no-progress", "--renders", "1", *extra])


# ----------------------------------------------------------------------------- a failed run keeps the outputs
def test_a_run_that_processes_no_frame_keeps_the_previous_outputs(tmp_path, block_model, capsys):
    good = _bag(tmp_path / "good")
    undecodable = _bag(tmp_path / "undecodable", encoding="8UC3")  # needs cv_bridge, absent here
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "metadata.yaml").write_text("not: [a bag")
    out, js = tmp_path / "out", tmp_path / "s.json"
    assert _run(good, out, "--json", str(js)) == 0
    before = _files(tmp_path)
    assert {Path("out/report.md"), Path("s.json")} <= set(before) and any(p.suffix == ".png" for p in before)
    assert any(p.suffix == ".mcap" and p.parts[1] == "occupancy_bag" for p in before)
    capsys.readouterr()
    for bag, rc in ((tmp_path / "nonexistent", 2), (unreadable, 2), (undecodable, 3)):
        assert _run(bag, out, "--json", str(js)) == rc
        err = capsys.readouterr().err
        after = _files(tmp_path)
        assert {p: after[p] for p in before} == before  # report, renders, output bag and JSON as they were
        assert set(after) - set(before) == {Path("out/report.failed.md"), Path("s.failed.json")}
        assert f"report: {out / 'report.failed.md'}" in err and "are as they were" in err
        assert f"summary JSON: {tmp_path / 's.failed.json'}" in err
        assert json.loads((tmp_path / "s.failed.json").read_text())["frames"] == 0
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    # a run that processes a frame replaces everything, the failed run's report and JSON included
    assert _run(good, out, "--json", str(js), "--max-frames", "1") == 0
    assert not (out / "report.failed.md").exists() and not (tmp_path / "s.failed.json").exists()
    assert json.loads(js.read_text())["frames"] == 1
    # into an empty folder a failed run writes its report where a report goes, and no empty bag
    assert _run(undecodable, tmp_path / "fresh") == 3
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["report.md"]
    assert "output bag: none (no frame was processed)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- no or broken metadata.yaml
@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_a_bag_folder_without_usable_metadata_is_read_from_its_storage_file(tmp_path, storage, block_model, capsys):
    bag = _bag(tmp_path / "bag", storage=storage)
    (bag / "metadata.yaml").unlink()  # what a killed `ros2 bag record` leaves
    (storage_file,) = [p for p in bag.iterdir() if p.suffix in (".mcap", ".db3")]
    for given in (bag, storage_file):
        assert _run(given, tmp_path / "out", "--json", str(tmp_path / "s.json")) == 0
        s = json.loads((tmp_path / "s.json").read_text())
        assert s["frames"] == 2 and s["error"] is None
        assert "metadata.yaml is missing" in s["bag_note"] and "ros2 bag reindex" in s["bag_note"]
        assert "metadata.yaml is missing" in capsys.readouterr().err
        assert "metadata.yaml is missing" in (tmp_path / "out" / "report.md").read_text()
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information: [broken")
    reader = bag_io.open_reader(bag)
    try:
        assert "metadata.yaml cannot be read" in reader.note and len(reader.connections) == 3
    finally:
        reader.close()
    shutil.copy(storage_file, bag / f"second{storage_file.suffix}")  # two files: which one is the bag's?
    (bag / "metadata.yaml").unlink()
    if storage == "mcap":  # read front to back as a split bag, and called damaged
        reader = bag_io.open_reader(bag)
        reader.close()
        assert "2 storage files and no metadata.yaml" in reader.damage and "reindex" in reader.damage
    else:
        with pytest.raises(bag_io.BagError, match="reindex"):
            bag_io.open_reader(bag)
    assert bag_io.open_reader(_bag(tmp_path / "whole", storage=storage)).note is None


# ----------------------------------------------------------------------------- --json checked up front
def test_an_unwritable_json_path_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(replay, "replay", lambda *a, **k: pytest.fail("the replay ran"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for given, said in ((tmp_path / "folder", f"--json {tmp_path / 'folder'} is a folder"),
                        (tmp_path / "file" / "s.json", f"{tmp_path / 'file'} is a file, not a folder"),
                        (Path("/proc/discene.json"), "folder /proc is not writable")):
        assert replay.main(["--out", str(tmp_path / "out"), "--json", str(given), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("discene-replay: error:") and said in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_any_work_and_a_failed_start_leaves_no_folder(tmp_path, capsys):
    """--out a file (or under one) said "[Errno 17] File exists"; a model that cannot be loaded left an empty
    --out folder behind."""
    (tmp_path / "file").write_text("")
    for given, said in ((tmp_path / "file", f"--out {tmp_path / 'file'} is a file, not a folder"),
                        (tmp_path / "file" / "sub", f"cannot make --out {tmp_path / 'file' / 'sub'}: "
                                                    f"{tmp_path / 'file'} is a file, not a folder")):
        assert replay.main(["--out", str(given), "--no-progress"]) == 2
        assert capsys.readouterr().err == f"discene-replay: error: {said}\n"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert replay.main(["--out", str(tmp_path / "out"), "--model", str(tmp_path / "bad.pt"), "--no-progress"]) == 2
    assert "bad.pt is corrupt" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- an invalid TF is not an absent one
@pytest.mark.parametrize(("edit", "said"), [
    (lambda t: setattr(t.rotation, "w", 0.0), "rotation quaternion [0.0, 0.0, 0.0, 0.0] is zero"),
    (lambda t: [setattr(t.translation, "x", float("nan")), setattr(t.rotation, "w", float("nan"))], "is not finite"),
])
def test_a_bag_whose_camera_tf_is_all_invalid_skips_its_frames_and_says_why(tmp_path, block_model, capsys, edit, said):
    bag = _bag(tmp_path / "bag", n=3, tf_edit=edit)
    assert _run(bag, tmp_path / "out", "--json", str(tmp_path / "s.json")) == 3
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["skipped_by_reason"] == {"bad_transform": 3} and s["fallback_pose_frames"] == 0  # no made-up pose
    assert s["fallback_pose_note"] is None
    err = capsys.readouterr().err
    assert "first bad_transform: frame at" in err and "TF world -> cam" in err and said in err
    assert "is not in TF" not in err
    assert "TF world -> cam" in (tmp_path / "out" / "report.md").read_text()


def test_a_non_unit_quaternion_is_normalised_and_used_as_tf2_does(tmp_path, block_model):
    """tf2 normalises any finite non-zero quaternion (Matrix3x3::setRotation divides by |q|^2), so the node gets
    a pose from it: the replay did not, skipping every frame as bad_transform ("not unit")."""
    bag = _bag(tmp_path / "bag", n=3, tf_edit=lambda t: setattr(t.rotation, "w", 2.0))
    s = replay.replay(bag, tmp_path / "out", replay.ReplaySettings(progress=False, n_renders=0)).summary
    assert s["frames"] == 3 and s["skipped"] == 0 and not s["invalid_transforms"]
    tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "world", "cam", 5)
    tf.transform.rotation.z, tf.transform.rotation.w = 0.3, 1.2
    tree = bag_io.TfTree()
    assert tree.add_message(F.new("tf2_msgs/msg/TFMessage", transforms=[tf])) == []
    angle = 2 * math.atan2(0.3, 1.2)
    np.testing.assert_allclose(tree.lookup("world", "cam", 5)[:3, :3], [[math.cos(angle), -math.sin(angle), 0],
                                                                         [math.sin(angle), math.cos(angle), 0],
                                                                         [0, 0, 1]], atol=1e-12)


def test_an_infinite_translation_is_kept_as_tf2_keeps_it_and_its_pose_refused(tmp_path, block_model):
    """tf2 checks a translation for NaN only: an infinite one is in the node's Buffer and the pose made from it is
    skipped as bad_pose; the replay keeps the link too, so both skip the frame for the same reason."""
    bag = _bag(tmp_path / "bag", n=2, tf_edit=lambda t: setattr(t.translation, "x", float("inf")))
    s = replay.replay(bag, tmp_path / "out", replay.ReplaySettings(progress=False, n_renders=0)).summary
    assert s["skipped_by_reason"] == {"bad_pose": 2} and not s["invalid_transforms"]
    far = np.eye(4)
    far[0, 3] = np.inf  # a camera mount made from it is no mount: the fixed fallback parameters, as in the node
    bag = _bag(tmp_path / "mount", n=2, other_tf=lambda t: [
        msg_encode.matrix_to_transform_stamped(F, far, "base_link", "cam", t)])
    s = replay.replay(bag, tmp_path / "out2", replay.ReplaySettings(progress=False, n_renders=0,
                                                                    world_frame="map")).summary
    assert s["frames"] == 2 and s["fallback_pose_frames"] == 2 and "fixed parameters" in s["fallback_pose_note"]


def test_one_invalid_transform_does_not_drop_the_others_of_its_message():
    good = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "base_link", "cam", 5)
    bad = msg_encode.matrix_to_transform_stamped(F, np.eye(4), "world", "base_link", 5)
    bad.transform.rotation.w = 0.0
    tree = bag_io.TfTree()
    dropped = tree.add_message(F.new("tf2_msgs/msg/TFMessage", transforms=[bad, good]))
    assert dropped == [(("world", "base_link"), "rotation quaternion [0.0, 0.0, 0.0, 0.0] is zero")]
    np.testing.assert_array_equal(tree.lookup("base_link", "cam", 5), np.eye(4))
    with pytest.raises(TransformError, match="TF world -> cam is in the bag but invalid: every transform world -> base_link"):
        tree.lookup("world", "cam", 5)
    assert tree.lookup("map", "cam", 5) is None  # absent, not invalid: the fallback pose's case


def _zero_quaternion(parent: str, child: str, stamp_ns: int):
    tf = msg_encode.matrix_to_transform_stamped(F, np.eye(4), parent, child, stamp_ns)
    tf.transform.rotation.w = 0.0
    return tf


def test_an_invalid_transform_off_the_camera_chain_is_dropped_and_counted_not_a_skip(tmp_path, block_model, capsys):
    """tf2 drops an invalid transform and keeps the rest: a broken wheel odometry costs the camera no frame.
    Before, any invalid transform skipped the next frame, so this bag lost every one of them."""
    bag = _bag(tmp_path / "bag", n=3, other_tf=lambda t: [_zero_quaternion("odom", "wheel_left", t)])
    assert _run(bag, tmp_path / "out", "--json", str(tmp_path / "s.json")) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == 3 and s["skipped"] == 0 and s["error"] is None
    said = "in the TF message at bag time 1000000000.000 s: rotation quaternion [0.0, 0.0, 0.0, 0.0] is zero"
    assert s["invalid_transforms"] == {"odom -> wheel_left": {"count": 3, "first": said}}
    err = capsys.readouterr().err
    assert "WARNING: 3 invalid TF transforms were dropped, as tf2 drops them" in err and "odom -> wheel_left: 3" in err
    assert "odom -> wheel_left: 3" in (tmp_path / "out" / "report.md").read_text()


def test_an_invalid_transform_between_valid_ones_of_the_camera_chain_is_dropped_as_tf2_drops_it(tmp_path, block_model):
    """The frame at the bad transform's stamp takes the pose interpolated from its link's valid transforms, as
    the node's tf2 lookup does; a chain whose link never had a valid one is skipped (the test above)."""
    bag = _bag(tmp_path / "bag", n=3, other_tf=lambda t: [
        msg_encode.matrix_to_transform_stamped(F, np.eye(4), "world", "odom", t) if t != 10**18 + 10**8
        else _zero_quaternion("world", "odom", t)])
    s = replay.replay(bag, tmp_path / "out", replay.ReplaySettings(progress=False, n_renders=0,
                                                                   world_frame="odom")).summary
    assert s["frames"] == 3 and s["skipped"] == 0 and s["fallback_pose_frames"] == 0
    assert s["invalid_transforms"]["world -> odom"]["count"] == 1


# ----------------------------------------------------------------------------- internal errors shown
class _MismatchedBackend(BlockBackend):
    """As an ONNX whose sidecar names another input size: onnxruntime refuses every frame."""

    def infer(self, inputs):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: image")


def test_frames_that_fail_unexpectedly_show_the_first_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(_MismatchedBackend()))
    assert _run(_bag(tmp_path / "bag"), tmp_path / "out", "--json", str(tmp_path / "s.json")) == 3
    said = "RuntimeError: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: image"
    err = capsys.readouterr().err
    assert "no frame was processed (internal_error: 2)" in err and "2 frames failed unexpectedly, first: frame" in err
    assert said in err and said in (tmp_path / "out" / "report.md").read_text()
    s = json.loads((tmp_path / "s.json").read_text())
    assert said in s["first_skip_by_reason"]["internal_error"] and said in s["error"]


# ----------------------------------------------------------------------------- in flight at Ctrl-C is not dropped
def test_frames_in_flight_at_ctrl_c_are_unfinished_not_dropped(tmp_path, monkeypatch, capsys):
    """Dropped means replaced by a newer frame (the full-speed replay drops none); a frame abandoned by
    Ctrl-C is counted apart."""
    loops = []
    real_loop = replay.FrameLoop

    def probe(*args, **kwargs):
        loops.append(real_loop(*args, **kwargs))
        return loops[-1]

    class HeldBackend(BlockBackend):
        def infer(self, inputs):  # the second frame is inferring when Ctrl-C comes, until the loop closes
            out = super().infer(inputs)
            if self.calls == 2:
                assert wait_until(lambda: loops[0].closed)
            return out

    backend = HeldBackend()
    read = replay.BagFrames.__iter__

    def interrupted_at_the_third(frames):
        for i, item in enumerate(read(frames)):
            if i == 2:
                assert wait_until(lambda: backend.calls == 2)
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(replay, "FrameLoop", probe)
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(backend))
    monkeypatch.setattr(replay.BagFrames, "__iter__", interrupted_at_the_third)
    assert _run(_bag(tmp_path / "bag", n=4), tmp_path / "out", "--json", str(tmp_path / "s.json")) == 130
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["images"], s["frames"], s["dropped"], s["unfinished"], s["skipped"]) == (2, 1, 0, 1, 0)
    assert "(skipped 0, dropped 0, unfinished 1)" in capsys.readouterr().out
    assert "1 frames were in flight when the run was interrupted" in (tmp_path / "out" / "report.md").read_text()


def test_a_frame_waiting_to_enter_the_loop_at_ctrl_c_is_unfinished(tmp_path, monkeypatch):
    """Ctrl-C while the full-speed replay waits for the loop to take its next frame: that frame, counted as received,
    must end in a count too (it was in none: images 4, frames 1, unfinished 2)."""
    loops, main = [], threading.get_ident()
    real_loop = replay.FrameLoop

    def probe(*args, **kwargs):
        loops.append(real_loop(*args, **kwargs))
        return loops[-1]

    class HeldBackend(BlockBackend):
        def infer(self, inputs):  # the first frame infers until the loop closes: the frames behind it queue up
            out = super().infer(inputs)
            assert wait_until(lambda: loops[0].closed)
            return out

    backend = HeldBackend()

    def interrupt_the_waiting_submit() -> None:  # the main thread is in submit once it counted a frame not taken
        assert wait_until(lambda: loops and backend.calls == 1 and loops[0].runner._incoming is not None
                          and loops[0].stats.received == loops[0].runner.submitted + 1)
        signal.pthread_kill(main, signal.SIGINT)

    monkeypatch.setattr(replay, "FrameLoop", probe)
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(backend))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # SIG_IGN where the suite runs under nohup
    interrupter = threading.Thread(target=interrupt_the_waiting_submit)
    try:
        interrupter.start()
        code = _run(_bag(tmp_path / "bag", n=8), tmp_path / "out", "--json", str(tmp_path / "s.json"))
        interrupter.join()
    finally:
        signal.signal(signal.SIGINT, before)
    s = json.loads((tmp_path / "s.json").read_text())
    assert code == 130 and s["images"] > s["frames"] + s["skipped"]
    assert s["images"] == s["frames"] + s["skipped"] + s["dropped"] + s["unfinished"] and s["dropped"] == 0


# ----------------------------------------------------------------------------- bad ground truth costs its score only
def _sample_with(path: Path, edit) -> Path:
    """The shipped sample bag (4 frames with ground truth) rewritten with ``edit(topic, msg, index)`` applied
    to each message (``index``: its number on its topic); None drops the message."""
    reader = bag_io.open_reader(replay.SAMPLE_BAG)
    counts: dict[str, int] = {}
    try:
        with bag_io.BagWriter(path, "mcap", F.typestore) as w:
            for conn, t, raw in reader.messages():
                counts[conn.topic] = counts.get(conn.topic, -1) + 1
                msg = edit(conn.topic, reader.deserialize(raw, conn.msgtype), counts[conn.topic])
                if msg is not None:
                    w.write(conn.topic, msg, t)
    finally:
        reader.close()
    return path


def test_a_ground_truth_label_image_is_checked_before_it_is_decoded():
    msg = msg_encode.label_grid_to_png(F, np.zeros((4, 3, 2), np.uint8), "world", 5)
    assert msg_decode.png_to_label_grid(msg, (4, 3, 2)).shape == (4, 3, 2)
    for data, said in ((_png_header_claiming(20000, 20000), "a header claiming 20000x20000, expected 6x4"),
                       (_png_header_claiming(6, 4), "not a readable PNG"),  # the right size, no image data
                       (b"GIF89a" + bytes(20), "not a PNG (26 bytes)")):
        msg.data = np.frombuffer(data, np.uint8)
        with pytest.raises(CloudFormatError, match=re.escape(said)):
            msg_decode.png_to_label_grid(msg, (4, 3, 2))


def test_a_ground_truth_png_bomb_costs_that_frames_score_only(tmp_path, block_model, capsys):
    """Before, PIL's DecompressionBombError ended the replay with a traceback and no output at all."""
    bag = _sample_with(tmp_path / "bag", lambda topic, msg, i: (
        setattr(msg, "data", np.frombuffer(_png_header_claiming(20000, 20000), np.uint8)) or msg
        if topic == bag_io.GT_LABELS_TOPIC and i == 1 else msg))
    assert _run(bag, tmp_path / "out", "--json", str(tmp_path / "s.json")) == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == 4 and s["evaluated_frames"] == 3 and s["iou"] is not None
    assert "ground truth at 1700000000200000000 ns unusable" in s["error"] and "20000x20000" in s["error"]
    assert "20000x20000" in capsys.readouterr().err and (tmp_path / "out" / "report.md").exists()


def _labels_png(flat: np.ndarray) -> np.ndarray:
    out = io.BytesIO()
    Image.fromarray(flat).save(out, format="PNG")
    return np.frombuffer(out.getvalue(), np.uint8).copy()


def _with_label_12(topic, msg, i):
    if topic == bag_io.GT_LABELS_TOPIC and i == 1:
        flat = np.array(Image.open(io.BytesIO(bytes(msg.data))))
        flat[0, 0] = 12
        msg.data = _labels_png(flat)
    return msg


def test_ground_truth_labels_beyond_the_classes_cost_that_frames_score_only(tmp_path, block_model, capsys):
    """Before, SSCMetrics refused label 12 after the frame's clouds were queued: the frame counted as skipped
    (internal_error) while its cloud was in the output bag."""
    bag = _sample_with(tmp_path / "bag", _with_label_12)
    assert _run(bag, tmp_path / "out", "--json", str(tmp_path / "s.json")) == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == 4 and s["skipped"] == 0 and s["evaluated_frames"] == 3
    said = "ground truth at 1700000000200000000 ns unusable: ground-truth labels [12] in 1 voxels are outside 0..11 and 255"
    assert said in s["error"] and said in capsys.readouterr().err
    reader = bag_io.open_reader(s["output_bag"])
    try:
        assert sum(c.msgcount for c in reader.connections if c.topic == bag_io.PRED_TOPIC) == 4
    finally:
        reader.close()
    cloud = msg_encode.occupancy_to_pointcloud2(F, OccupancyFrame(
        np.zeros((2, 2, 2), np.uint8), np.array([[0, 0, 0]], np.int32), np.array([3], np.uint8),
        np.ones(1, np.float32), np.zeros(3), 0.5), "world", 5)
    assert msg_decode.cloud_to_label_grid(cloud, np.zeros(3), 0.5, (2, 2, 2))[0, 0, 0] == 3
    label = next(f for f in cloud.fields if f.name == "label")
    label.datatype = 4  # uint16: label 3 + 256 * the padding byte after it
    data = np.array(cloud.data)
    data[label.offset + 1] = 1
    cloud.data = data
    with pytest.raises(CloudFormatError, match=r"1 cloud points have labels that are not whole numbers 0..255 "
                       r"\(label field uint16, e.g. 259.0\)"):  # the uint8 grid would have made it 3
        msg_decode.cloud_to_label_grid(cloud, np.zeros(3), 0.5, (2, 2, 2))


def test_a_frame_failing_in_record_leaves_nothing_in_the_output_bag_or_metrics():
    """The outputs are queued only once nothing can fail: a frame counted as skipped has no cloud in the bag."""
    stamp = 10**18
    rep = replay.Replayer(None, None, F, "world", {stamp: replay.GroundTruthGrid.from_grid(np.zeros((2, 2, 2), np.uint8),
                                                                                          np.zeros(3), True)},
                          replay.Evaluator(11), n_renders=1)
    occupancy = OccupancyFrame(np.zeros((60, 60, 36), np.uint8), np.zeros((0, 3), np.int32), np.zeros(0, np.uint8),
                               np.zeros(0, np.float32), np.zeros(3), 0.08)
    result = ProcessedFrame(occupancy, np.eye(4), False, np.zeros((4, 4, 3), np.uint8), {"total_ms": 1.0})
    frame = FrameInput(image=msg_encode.rgb_to_image(F, np.zeros((4, 4, 3), np.uint8), "cam", stamp))
    with pytest.raises(ValueError, match="differs from ground truth shape"):  # SSCMetrics: another grid
        rep.record(frame, result)
    assert rep.outbox.empty() and not rep.renders and not rep.stage_ms and rep.evaluator.frames == 0


def _gt_offset_1ms(topic, msg, i):
    if topic in (bag_io.GT_POSE_TOPIC, bag_io.GT_LABELS_TOPIC, bag_io.GT_TOPIC):
        msg.header.stamp.nanosec += 1_000_000
    return msg


@pytest.mark.parametrize(("edit", "rc", "status", "printed"), [
    (lambda topic, msg, i: msg, 0, "scored", "IoU "),
    (lambda topic, msg, i: None if topic == bag_io.GT_POSE_TOPIC and i == 2 else msg, 1, "scored",
     "over 3 frames (1 of the 4 processed frames had no usable ground truth at their stamp (not scored))"),
    (lambda topic, msg, i: None if topic in (bag_io.GT_LABELS_TOPIC, bag_io.GT_TOPIC) and i == 1 else msg, 1, "scored",
     "over 3 frames (1 of the 4 processed frames had no usable ground truth at their stamp (not scored))"),
    (_gt_offset_1ms, 1, "unmatched", "IoU/mIoU not computed: no processed frame has ground truth at its stamp"),
    (lambda topic, msg, i: None if topic == bag_io.CAMERA_INFO_TOPIC else msg, 3, "no_frame",
     "No frame was processed: IoU/mIoU not computed (the bag has 4 ground-truth grids)"),
    (lambda topic, msg, i: None if topic.startswith("/discene/") else msg, 0, "none",
     "No ground truth in the bag: IoU/mIoU not computed"),
])
def test_the_replay_says_why_nothing_was_scored(tmp_path, block_model, capsys, edit, rc, status, printed):
    """Ground truth is matched by header stamp: one stamped 1 ms off scored nothing, and the run said 'no ground
    truth in the bag' and exited 0, as it did for a run that processed no frame of a bag with ground truth."""
    bag = _sample_with(tmp_path / "bag", edit)
    assert _run(bag, tmp_path / "out", "--json", str(tmp_path / "s.json")) == rc
    s = json.loads(next(tmp_path.glob("s*.json")).read_text())
    out, err = capsys.readouterr()
    assert s["ground_truth"]["status"] == status and printed in out
    assert ("no ground truth in the bag" in out.lower()) == (status == "none")
    assert s["unknown_voxels_known"] is (True if status == "scored" else None)
    if rc == 1 and status == "scored":  # labels without their grid pose, or a pose without labels: that grid is
        said = ("labels (/discene/ground_truth/labels) without a grid pose (/discene/ground_truth/grid_pose) at their "
                "stamp", "a grid pose (/discene/ground_truth/grid_pose) without labels (/discene/ground_truth/labels) "
                "or a cloud (/discene/ground_truth/occupancy) at its stamp")  # unusable, and said so
        assert any(f"unusable: {line}" in s["error"] and f"unusable: {line}" in err for line in said)
    if status == "unmatched":
        said = ("the bag has 4 ground-truth grids (4 usable) but none of the 4 processed frames has one at its stamp: "
                "ground truth is matched to an image by header stamp, which must equal the image's exactly unless "
                "--gt-stamp-tolerance allows an offset (the first image at 1700000000000000000 ns, the nearest ground truth "
                "at 1700000000001000000 ns, +1.000 ms from it)")
        assert said in s["error"] and said in err and said in (tmp_path / "out" / "report.md").read_text()


# ----------------------------------------------------------------------------- ground truth kept small
def _read_ground_truth(bag: Path) -> tuple[dict, list[str], list[str]]:
    """read_ground_truth on ``bag``: (ground truth, errors, the types it deserialised)."""
    reader = bag_io.open_reader(bag)
    deserialize, types = reader.deserialize, []
    reader.deserialize = lambda raw, msgtype: types.append(msgtype) or deserialize(raw, msgtype)
    try:
        return replay.read_ground_truth(reader, (60, 60, 36), 0.08, errors := []), errors, types
    finally:
        reader.close()


def test_ground_truth_keeps_a_few_kb_per_frame_and_reads_clouds_only_where_labels_are_missing(tmp_path):
    """Before, every 300 kB cloud was deserialised and kept to the end beside the label images, and all grids
    (130 kB each) decoded at once: about 420 kB per frame at the peak, 8 GB for the val split's 19,764 frames."""
    gt, errors, types = _read_ground_truth(replay.SAMPLE_BAG)
    assert not errors and len(gt) == 4 and "sensor_msgs/msg/PointCloud2" not in types
    for item in gt.values():
        assert set(vars(item)) == {"png", "grid_shape", "voxel_origin", "has_unknown"} and item.has_unknown
        assert isinstance(item.png, bytes) and len(item.png) < 2_000  # the labels topic's own PNG, kept as it is
        assert item.label_grid().shape == (60, 60, 36) and (item.label_grid() == 255).any()
    # the second frame's label image missing: its cloud alone is read in, kept as the PNG of its grid
    bag = _sample_with(tmp_path / "bag", lambda topic, msg, i: None if topic == bag_io.GT_LABELS_TOPIC and i == 1
                       else msg)
    mixed, errors, types = _read_ground_truth(bag)
    assert not errors and types.count("sensor_msgs/msg/PointCloud2") == 4  # each one read, one kept
    (stamp,) = [s for s, item in mixed.items() if not item.has_unknown]
    assert stamp == 1_700_000_000_200_000_000 and len(mixed[stamp].png) < 3_000
    with_unknown = gt[stamp].label_grid()
    np.testing.assert_array_equal(mixed[stamp].label_grid(), np.where(with_unknown == 255, 0, with_unknown))


def test_unusable_ground_truth_is_said_once_per_reason(tmp_path):
    """One error entry per unusable stamp made the summary's error as long as the drive."""
    stamps = [10**18 + i * 10**8 for i in range(10)]
    claims = [(20000, 20000)] * 4 + [(i, i) for i in range(1, 7)]  # one reason 4 times, then 6 more reasons
    with bag_io.BagWriter(tmp_path / "bag", "mcap", F.typestore) as w:
        for t, claim in zip(stamps, claims, strict=True):
            w.write(bag_io.GT_POSE_TOPIC, msg_encode.grid_pose_msg(F, np.zeros(3), "world", t), t)
            labels = msg_encode.label_grid_to_png(F, np.zeros((1, 1, 1), np.uint8), "world", t)
            labels.data = np.frombuffer(_png_header_claiming(*claim), np.uint8)
            w.write(bag_io.GT_LABELS_TOPIC, labels, t)
    gt, errors, _ = _read_ground_truth(tmp_path / "bag")
    assert not gt and len(errors) == 6
    assert errors[0] == (f"ground truth at 4 stamps unusable ({stamps[0]}, {stamps[1]}, {stamps[2]}, ... ns): "
                         "ground-truth label image has a header claiming 20000x20000, expected 2160x60 for a "
                         "60x60x36 grid")
    assert errors[1] == (f"ground truth at {stamps[4]} ns unusable: ground-truth label image has a header claiming "
                         "1x1, expected 2160x60 for a 60x60x36 grid")
    assert errors[5] == "ground truth at 2 more stamps unusable for 2 other reasons"


# ----------------------------------------------------------------------------- ground truth stamped apart from its image
def test_ground_truth_goes_to_the_nearest_image_within_the_tolerance_once():
    """Each grid to one image at most: the nearest unused one within the tolerance (0: the image's own stamp)."""
    grids = {stamp: replay.GroundTruthGrid.from_grid(np.full((2, 2, 2), i, np.uint8), np.zeros(3), True)
             for i, stamp in enumerate((100, 110, 200))}
    exact = replay.GroundTruthMatcher(grids)
    assert exact.match(100) is grids[100] and exact.match(100) is None and exact.match(105) is None
    near = replay.GroundTruthMatcher(grids, tolerance_ns=6)
    assert near.match(104) is grids[100] and near.match(104) is grids[110]  # the nearer one was taken
    assert near.match(110) is None and near.match(195) is grids[200] and near.unmatched() == 0
    assert replay.GroundTruthMatcher(grids, tolerance_ns=6).unmatched() == 3


def _gt_offset(ns):
    def edit(topic, msg, i):
        if topic in (bag_io.GT_POSE_TOPIC, bag_io.GT_LABELS_TOPIC, bag_io.GT_TOPIC):
            msg.header.stamp.nanosec += ns
        return msg
    return edit


def test_ground_truth_stamped_off_its_image_is_scored_within_gt_stamp_tolerance(tmp_path, block_model, capsys):
    """Ground truth published by another node, or whose stamps went through float seconds, is a little off
    its image's stamp: matched only exactly, no frame of such a drive was scored."""
    exact = tmp_path / "exact.json"
    assert _run(replay.SAMPLE_BAG, tmp_path / "o0", "--json", str(exact)) == 0
    bag = _sample_with(tmp_path / "bag", _gt_offset(3_000_000))  # 3 ms after each image
    for tolerance, rc, scored in (("0.002", 1, 0), ("0.005", 0, 4)):
        assert _run(bag, tmp_path / tolerance, "--json", str(tmp_path / f"{tolerance}.json"),
                    "--gt-stamp-tolerance", tolerance) == rc
        s = json.loads(next(tmp_path.glob(f"{tolerance}*.json")).read_text())
        assert s["evaluated_frames"] == scored and s["ground_truth"]["unmatched_grids"] == 4 - scored
        assert ("by header stamp, within 0.002 s of the image's (--gt-stamp-tolerance)" in (s["error"] or "")) == (
            not scored)
    assert s["iou"] == json.loads(exact.read_text())["iou"] and s["error"] is None
    with pytest.raises(ValueError, match="gt_stamp_tolerance_s"):
        replay.ReplaySettings(gt_stamp_tolerance_s=-0.001)


def test_ground_truth_no_image_read_matched_is_counted(tmp_path, block_model, capsys):
    """Ground truth after the last image read, or stamped apart from every image, was not counted anywhere."""
    assert _run(replay.SAMPLE_BAG, tmp_path / "o", "--json", str(tmp_path / "s.json"), "--max-frames", "3") == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["evaluated_frames"] == 3 and s["ground_truth"]["unmatched_grids"] == 1
    assert "1 of the 4 usable ground-truth grids matched no image read" in capsys.readouterr().out
    assert "1 of the 4 usable ground-truth grids matched no image read" in (tmp_path / "o" / "report.md").read_text()


# ----------------------------------------------------------------------------- frames on the fallback pose scored apart
def _unmounted_first_two(topic, msg, i):
    """Images 0 and 1 (with their camera info and depth) in a camera frame TF does not have: the fallback pose."""
    if topic in (bag_io.COMPRESSED_TOPIC, bag_io.CAMERA_INFO_TOPIC, bag_io.DEPTH_TOPIC) and i < 2:
        msg.header.frame_id = "unmounted_cam"
    return msg


def test_frames_on_the_fallback_pose_are_left_out_of_the_headline_metrics(tmp_path, monkeypatch, capsys):
    """A frame without a TF pose is placed where the camera was assumed to be: its score measures that guess, yet it
    counted in the headline IoU/mIoU while the report called it not meaningful. Here the model is perfect on the
    frames with a TF pose and predicts nothing on the two without."""
    gt, errors, _ = _read_ground_truth(replay.SAMPLE_BAG)
    first_two = sorted(gt)[:2]
    grids = {tuple(np.round(item.voxel_origin, 6)): item.label_grid() * (stamp not in first_two)
             for stamp, item in gt.items()}
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(OracleBackend(grids)))
    bag = _sample_with(tmp_path / "bag", _unmounted_first_two)
    assert _run(bag, tmp_path / "o", "--json", str(tmp_path / "s.json")) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    out = capsys.readouterr().out
    assert s["fallback_pose_frames"] == 2 and s["evaluated_frames"] == 2 and s["ground_truth"]["scored_frames"] == 4
    assert s["iou"] == pytest.approx(1.0) and "over 2 frames with a TF pose" in out
    every = s["all_frames"]
    assert every["frames"] == 4 and every["fallback_pose_frames"] == 2 and every["iou"] < 0.8
    said = (f"2 of the 4 scored frames used the fallback camera pose and are left out of IoU/mIoU (all 4: IoU "
            f"{100 * every['iou']:.2f} mIoU {100 * every['miou']:.2f})")
    assert said in out and said in (tmp_path / "o" / "report.md").read_text()
    assert not errors and "## Occupancy metrics (2 frames with a TF pose" in (tmp_path / "o" / "report.md").read_text()


def test_a_run_scored_only_on_the_fallback_pose_has_no_headline_metrics(tmp_path, block_model, capsys):
    """A world frame that is not in TF (odom given for world, say) put every frame on the fallback pose, and the run
    printed their IoU/mIoU as the evaluation's."""
    assert _run(replay.SAMPLE_BAG, tmp_path / "o", "--json", str(tmp_path / "s.json"), "--world-frame", "odom") == 1
    s = json.loads((tmp_path / "s.json").read_text())
    out = capsys.readouterr().out
    assert s["fallback_pose_frames"] == 4 and s["iou"] is None and s["evaluated_frames"] == 0
    assert s["ground_truth"]["status"] == "fallback_pose" and s["all_frames"]["frames"] == 4
    said = "all 4 scored frames used the fallback camera pose: IoU/mIoU not computed (over them IoU "
    assert "A" + said[1:] in out and said in s["error"] and said in (tmp_path / "o" / "report.md").read_text()
