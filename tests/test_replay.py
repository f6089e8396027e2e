"""Dataset -> bag -> replay end to end, on mcap and sqlite3 bags; realtime dropping; corrupt bags; CLI."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ros_support import BlockBackend, OracleBackend, pipeline_for, wait_until

from discene_ros import bag_io, msg_decode, msg_encode, replay
from discene_ros.dataset_to_bag import dataset_to_bag
from discene_ros.dataset_to_bag import main as to_bag_main
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import post_threads_for
from discene_ros.replay import ReplaySettings
from models import native_postprocess

SUMMARY_KEYS = {"frames", "fps", "latency_ms", "iou", "miou", "per_class_iou", "skipped"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from training.occscannet import OccScanNetDataset
    from training.synth import generate

    root = tmp_path_factory.mktemp("occ") / "ds"
    generate(root, scenes=1, frames_per_scene=2, width=64, height=48, val_fraction=0.0, progress=False)
    ds = OccScanNetDataset(root, "train")
    frames = {}
    for sample_id in ds.ids:
        data = ds.read_pickle(sample_id)
        frames[sample_id] = (ds.read_target(sample_id, data), np.asarray(data["voxel_origin"], np.float64).reshape(3),
                             np.asarray(data["cam_pose"], np.float64), np.asarray(data["intrinsic"])[:3, :3])
    return root, frames


@pytest.fixture(scope="module")
def bags(dataset, tmp_path_factory):
    root, _ = dataset
    out = tmp_path_factory.mktemp("bags")
    assert to_bag_main(["--dataset", str(root), "--out", str(out / "raw_mcap")]) == 0
    assert dataset_to_bag(root, out / "jpeg_sqlite", storage="sqlite3", compressed=True) == 2
    return {"mcap": out / "raw_mcap", "sqlite3": out / "jpeg_sqlite"}


def _oracle(frames):
    return OracleBackend({tuple(np.round(origin, 6)): grid for grid, origin, _, _ in frames.values()})


def test_dataset_bag_contents(dataset, bags):
    _, frames = dataset
    (target, origin, pose, k), *_ = frames.values()
    reader = bag_io.open_reader(bags["mcap"])
    try:
        topics = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
        assert topics == {
            bag_io.IMAGE_TOPIC: ("sensor_msgs/msg/Image", 2), bag_io.CAMERA_INFO_TOPIC: ("sensor_msgs/msg/CameraInfo", 2),
            bag_io.DEPTH_TOPIC: ("sensor_msgs/msg/Image", 2), bag_io.TF_TOPIC: ("tf2_msgs/msg/TFMessage", 2),
            bag_io.GT_TOPIC: ("sensor_msgs/msg/PointCloud2", 2),
            bag_io.GT_LABELS_TOPIC: ("sensor_msgs/msg/CompressedImage", 2),
            bag_io.GT_POSE_TOPIC: ("geometry_msgs/msg/PoseStamped", 2)}
        first = {}
        for conn, _, raw in reader.messages():
            first.setdefault(conn.topic, reader.deserialize(raw, conn.msgtype))
    finally:
        reader.close()
    np.testing.assert_array_equal(msg_decode.png_to_label_grid(first[bag_io.GT_LABELS_TOPIC], target.shape), target)
    cloud_grid = msg_decode.cloud_to_label_grid(first[bag_io.GT_TOPIC], origin, 0.08, target.shape)
    np.testing.assert_array_equal(cloud_grid, np.where(target == 255, 0, target))
    np.testing.assert_allclose(msg_decode.grid_origin_from_pose(first[bag_io.GT_POSE_TOPIC]), origin)
    np.testing.assert_allclose(msg_decode.transform_to_matrix(first[bag_io.TF_TOPIC].transforms[0]), pose, atol=1e-9)
    np.testing.assert_allclose(msg_decode.camera_info_to_k(first[bag_io.CAMERA_INFO_TOPIC], (48, 64)), k)
    assert msg_decode.image_to_rgb(first[bag_io.IMAGE_TOPIC]).shape == (48, 64, 3)
    assert msg_decode.depth_to_metres(first[bag_io.DEPTH_TOPIC]).max() > 0.3
    # depth registered to the colour camera: the frame processor refuses depth in another frame
    assert {first[t].header.frame_id for t in (bag_io.IMAGE_TOPIC, bag_io.DEPTH_TOPIC, bag_io.CAMERA_INFO_TOPIC)} == {
        bag_io.CAMERA_FRAME}


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_replay_with_oracle_backend_scores_perfect(dataset, bags, tmp_path, storage):
    """Replaying ground truth as prediction must give IoU 1: checks topics, TF, grid origin, metrics."""
    _, frames = dataset
    result = replay.replay(bags[storage], out=tmp_path, pipeline=pipeline_for(_oracle(frames)),
                           settings=ReplaySettings(storage=storage, n_renders=1, progress=False))
    s = result.summary
    assert SUMMARY_KEYS <= set(s) and s["error"] is None
    assert s["frames"] == 2 and s["evaluated_frames"] == 2 and s["skipped"] == 0 and s["unknown_voxels_known"]
    assert s["iou"] == pytest.approx(1.0)
    present = {int(v) for grid, *_ in frames.values() for v in np.unique(grid) if 0 < v < 255}
    for i, name in enumerate(s["per_class_iou"], start=1):
        assert s["per_class_iou"][name] == pytest.approx(1.0 if i in present else 0.0, abs=1e-4)
    out_reader = bag_io.open_reader(s["output_bag"])
    try:
        counts = {c.topic: c.msgcount for c in out_reader.connections}
        assert counts == {bag_io.PRED_TOPIC: 2, bag_io.PRED_POSE_TOPIC: 2}
        assert len(list(Path(s["output_bag"]).glob("*.db3" if storage == "sqlite3" else "*.mcap"))) == 1
    finally:
        out_reader.close()
    from discene_ros.report import write_report

    report = write_report(tmp_path, s, result.renders)
    text = report.read_text()
    assert "IoU **100.00**" in text and "renders/frame_00_" in text
    assert f"- frame path: {s['pipeline']}" in text
    # the network alone on the CPU: the kernel with its helper where there are two cores, for raw images
    threads = post_threads_for(False, compressed=storage == "sqlite3")  # the JPEG bag
    post = f"native kernel, {threads} thread" if native_postprocess.available() else "torch ops; native kernel"
    assert f"post-processing on the CPU ({post}" in s["pipeline"]
    assert len(list((tmp_path / "renders").glob("*.png"))) == 1


def test_replay_decodes_jpeg_bags_on_a_thread_of_their_own(bags, tmp_path, monkeypatch):
    """As the node: a compressed image topic gets the decode thread in a pipelined loop, a raw one is
    decoded while preparing; where the network runs alone (auto, on the CPU) neither gets one, and the
    post-processing kernel gets its helper for the raw one only."""
    threads, post_threads = [], []
    real = replay.FrameLoop

    def probe(processor, *args, **kwargs):
        loop = real(processor, *args, **kwargs)
        threads.append(sorted(t.name for t in loop.runner._threads))
        post_threads.append(processor.pipeline.post_threads)
        return loop

    monkeypatch.setattr(replay, "FrameLoop", probe)
    for pipelining in ("on", "auto"):
        for name in ("mcap", "sqlite3"):
            s = replay.replay(bags[name], out=tmp_path / pipelining / name, pipeline=pipeline_for(BlockBackend()),
                              settings=ReplaySettings(n_renders=0, progress=False, pipelining=pipelining)).summary
            assert s["frames"] == 2 and s["skipped"] == 0
    two = ["frame_infer", "frame_prepare"]
    assert threads == [two, ["frame_decode", *two], two, two]
    # the kernel's helper where the network runs alone, beside a raw image's preprocessing only
    assert post_threads == [1, 1, post_threads_for(False), post_threads_for(False, compressed=True)]
    assert gc.get_freeze_count() > 10_000  # as the node: start-up objects frozen out of the garbage collector


def test_replay_feeds_depth_to_depth_models(bags, tmp_path):
    cfg = BlockBackend().config
    cfg.use_depth = True
    seen = []

    class DepthProbe(BlockBackend):
        def infer(self, inputs):
            seen.append(float(inputs.depth.max()))
            return super().infer(inputs)

    s = replay.replay(bags["sqlite3"], out=tmp_path, pipeline=pipeline_for(DepthProbe(cfg)),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert s["frames"] == 2 and s["skipped"] == 0 and len(seen) == 2 and min(seen) > 0.3


def _fast_bag(path, n=15, rate_hz=100.0):
    """A bag with n colour frames at rate_hz (+ camera info, TF) and no ground truth."""
    f = TypestoreFactory(bag_io.typestore())
    k = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])
    with bag_io.BagWriter(path, "mcap", f.typestore) as w:
        for i in range(n):
            t = 10**18 + int(i * 1e9 / rate_hz)
            w.write(bag_io.TF_TOPIC, f.new("tf2_msgs/msg/TFMessage", transforms=[
                msg_encode.matrix_to_transform_stamped(f, np.eye(4), "world", "cam", t)]), t)
            w.write(bag_io.CAMERA_INFO_TOPIC, msg_encode.k_to_camera_info(f, k, 48, 64, "cam", t), t)
            w.write(bag_io.IMAGE_TOPIC, msg_encode.rgb_to_image(f, np.zeros((48, 64, 3), np.uint8), "cam", t, "bgr8"), t)
    return path


def test_realtime_replay_drops_frames_like_the_node(tmp_path):
    bag = _fast_bag(tmp_path / "fast")
    backend = BlockBackend(delay_s=0.06)
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(backend),
                      settings=ReplaySettings(realtime=True, n_renders=0, progress=False)).summary
    assert s["images"] == 15 and s["frames"] == backend.calls
    assert s["dropped"] >= 5 and s["frames"] + s["dropped"] == 15
    assert s["iou"] is None and s["evaluated_frames"] == 0
    full = replay.replay(bag, out=tmp_path / "out2", pipeline=pipeline_for(BlockBackend()),
                         settings=ReplaySettings(n_renders=0, progress=False, max_frames=4)).summary
    assert full["frames"] == 4 and full["dropped"] == 0 and full["fps"] > 0
    # full speed with a slow model: the pipelined loop waits for room, so every frame is processed
    slow = replay.replay(bag, out=tmp_path / "out3", pipeline=pipeline_for(BlockBackend(delay_s=0.02)),
                         settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert slow["frames"] == 15 and slow["dropped"] == 0 and slow["skipped"] == 0


def test_mcap_truncated_before_any_message_gives_clear_error_and_report(bags, tmp_path, capsys):
    bad = tmp_path / "truncated"
    shutil.copytree(bags["mcap"], bad)
    (mcap,) = bad.glob("*.mcap")
    with open(mcap, "r+b") as fh:
        fh.truncate(200)  # header and the start of the first chunk: no complete message
    with pytest.raises(bag_io.BagError, match="truncated or corrupt"):
        replay.replay(bad, out=tmp_path / "o", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(progress=False))
    rc = replay.main(["--bag", str(bad), "--out", str(tmp_path / "o2"), "--json", str(tmp_path / "s.json"),
                      "--no-progress"])
    assert rc == 2 and "mcap recover" in capsys.readouterr().err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == 0 and "truncated or corrupt" in summary["error"]
    report = (tmp_path / "o2" / "report.md").read_text()
    assert "The run is incomplete" in report and "No frame was processed" in report
    assert "None" not in report and "No ground truth" not in report and "Latency runs" not in report


def test_missing_bag_report_names_what_was_not_reached(tmp_path, capsys):
    assert replay.main(["--bag", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    report = (tmp_path / "o" / "report.md").read_text()
    assert "image topic not chosen" in report and "- model: not loaded" in report and "None" not in report


def test_corrupt_sqlite_bag_reports_what_was_processed(bags, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(bags["sqlite3"], bad)
    (db,) = bad.glob("*.db3")
    # the bytes damaged below lie in the ground-truth clouds, which the replay reads only where a frame has no
    # label image: without the label images they are read, and the damage is met
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("DELETE FROM messages WHERE topic_id = (SELECT id FROM topics WHERE name = ?)",
                    (bag_io.GT_LABELS_TOPIC,))
    with open(db, "r+b") as fh:
        fh.seek(os.path.getsize(db) * 7 // 10)
        fh.write(b"\xff" * 4096)
    s = replay.replay(bad, out=tmp_path / "o", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert s["error"] and "malformed" in s["error"]
    assert s["frames"] <= 2 and s["images"] == s["frames"] + s["skipped"]


def test_cli_with_checkpoint_json_and_missing_model(bags, tmp_path, monkeypatch, capsys):
    from models import build_model
    from models.checkpoint import save_model
    from models.config import lite

    torch.manual_seed(0)
    ckpt = tmp_path / "lite.pt"
    save_model(ckpt, build_model(lite()), lite())
    out_json = tmp_path / "summary.json"
    rc = replay.main(["--bag", str(bags["mcap"]), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--json",
                      str(out_json), "--max-frames", "1", "--renders", "0", "--no-progress", "--storage", "sqlite3"])
    assert rc == 0
    s = json.loads(out_json.read_text())
    assert SUMMARY_KEYS <= set(s) and s["frames"] == 1 and set(s["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    assert 0.0 <= s["iou"] <= 1.0 and len(s["per_class_iou"]) == 11
    printed = capsys.readouterr().out
    assert "FPS" in printed and "report:" in printed and "IoU" in printed
    assert f"frame loop {s['frame_loop']}]" in printed and not s["pipelined"]  # the CPU: one frame at a time
    monkeypatch.setattr("discene_ros.processing.DEFAULT_MODEL", tmp_path / "lite_distilled.pt")  # shipped model absent
    rc = replay.main(["--bag", str(bags["mcap"]), "--out", str(tmp_path / "o3"), "--no-progress"])
    assert rc == 2 and "lite_distilled.pt is missing" in capsys.readouterr().err


def test_full_speed_replay_pipelined_or_one_frame_at_a_time(tmp_path, monkeypatch):
    """``pipelining``: auto runs the CPU test backend one frame at a time; both loops process every frame
    at full speed, and the report says which loop ran (and explains the latency of the pipelined one)."""
    bag = _fast_bag(tmp_path / "fast")
    for mode, pipelined in (("auto", False), ("on", True), ("off", False)):
        s = replay.replay(bag, out=tmp_path / mode, pipeline=pipeline_for(BlockBackend(delay_s=0.01)),
                          settings=ReplaySettings(n_renders=0, progress=False, pipelining=mode, report=True)).summary
        assert s["frames"] == 15 and s["dropped"] == 0 and s["skipped"] == 0 and s["pipelined"] is pipelined
        text = (tmp_path / mode / "report.md").read_text()
        assert f"- frame loop: {s['frame_loop']}" in text
        assert ("two or three frame times" in text) is pipelined
    seen = []
    monkeypatch.setattr(replay, "replay", lambda bag, out, settings: seen.append(settings.pipelining) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        replay.main(["--bag", str(bag), "--out", str(tmp_path / "cli"), "--pipelining", "on", "--no-progress"])
    assert seen == ["on"]


def test_cli_backend_options_reach_the_pipeline_builder(bags, tmp_path, monkeypatch):
    seen = []

    def build(model, backend, device, **kwargs):
        seen.append({"device": device, **kwargs})
        raise RuntimeError("stop here")

    monkeypatch.setattr(replay, "build_pipeline", build)
    args = ["--bag", str(bags["mcap"]), "--no-progress"]
    assert replay.main([*args, "--out", str(tmp_path / "a")]) == 2
    assert replay.main([*args, "--out", str(tmp_path / "b"), "--fp16", "--compile", "--tf32", "--no-cuda-graph",
                        "--tf32-convolutions", "--no-frame-graph", "--device", "cpu"]) == 2
    options = ("device", "fp16", "compile", "cuda_graph", "tf32", "tf32_convolutions", "frame_graph")
    # the defaults are the node's: CUDA when present, static buffers / CUDA graph and frame graph on, the rest off
    assert [{k: kw[k] for k in options} for kw in seen] == [
        {"device": None, "fp16": False, "compile": False, "cuda_graph": True, "tf32": False, "tf32_convolutions": False,
         "frame_graph": True},
        {"device": "cpu", "fp16": True, "compile": True, "cuda_graph": False, "tf32": True, "tf32_convolutions": True,
         "frame_graph": False}]


def test_shipped_sample_bag_is_small_and_complete():
    bag = replay.SAMPLE_BAG
    assert sum(p.stat().st_size for p in bag.iterdir()) < 3_000_000
    reader = bag_io.open_reader(bag)
    try:
        topics = {c.topic: c.msgcount for c in reader.connections}
        frames = {reader.deserialize(raw, conn.msgtype).header.frame_id for conn, _, raw in reader.messages()
                  if conn.topic in (bag_io.COMPRESSED_TOPIC, bag_io.DEPTH_TOPIC, bag_io.CAMERA_INFO_TOPIC)}
    finally:
        reader.close()
    assert topics[bag_io.COMPRESSED_TOPIC] >= 2
    assert frames == {bag_io.CAMERA_FRAME}  # depth registered to the colour camera
    for topic in (bag_io.CAMERA_INFO_TOPIC, bag_io.DEPTH_TOPIC, bag_io.TF_TOPIC, bag_io.GT_LABELS_TOPIC,
                  bag_io.GT_POSE_TOPIC, bag_io.GT_TOPIC):
        assert topics[topic] == topics[bag_io.COMPRESSED_TOPIC], topic


def test_dataset_to_bag_options_and_errors(dataset, tmp_path, capsys):
    root, _ = dataset
    out = tmp_path / "small"
    assert to_bag_main(["--dataset", str(root), "--out", str(out), "--compressed", "--resize", "24x32",
                        "--max-frames", "1", "--storage", "sqlite3"]) == 0
    reader = bag_io.open_reader(out)
    try:
        counts = {c.topic: c.msgcount for c in reader.connections}
        (conn,) = [c for c in reader.connections if c.topic == bag_io.DEPTH_TOPIC]
        depth = reader.deserialize(next(reader.messages(connections=[conn]))[2], conn.msgtype)
    finally:
        reader.close()
    assert counts[bag_io.COMPRESSED_TOPIC] == 1 and (depth.height, depth.width) == (24, 32)
    assert to_bag_main(["--dataset", str(root), "--out", str(out)]) == 2  # output exists
    assert "already exists" in capsys.readouterr().err
    assert to_bag_main(["--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # -3 used to slice three frames off the end, and 0 wrote an empty bag; a quality of 200 went through
    for flag, value in (("--max-frames", "-3"), ("--max-frames", "0"), ("--jpeg-quality", "200")):
        assert to_bag_main(["--dataset", str(root), "--out", str(tmp_path / f"bad{value}"), flag, value]) == 2
        assert f"{flag} must be" in capsys.readouterr().err and not (tmp_path / f"bad{value}").exists()


def test_dataset_to_bag_refuses_before_writing_and_leaves_no_bag(dataset, tmp_path, capsys):
    """Bad numbers are refused up front, and a conversion that writes no frame leaves no bag folder, so
    that a retry does not fail with "already exists"."""
    root, _ = dataset
    for flag, value, said in (("--rate", "nan", "--rate must be a positive number"),
                              ("--rate", "inf", "--rate must be a positive number"),
                              ("--resize", "0x0", "expected a positive HxW")):
        with pytest.raises(SystemExit) if flag == "--resize" else contextlib.nullcontext() as exit_:
            assert to_bag_main(["--dataset", str(root), "--out", str(tmp_path / "bag"), flag, value]) == 2
        assert exit_ is None or exit_.value.code == 2
        assert said in capsys.readouterr().err and not (tmp_path / "bag").exists()
    unreadable = tmp_path / "unreadable"
    shutil.copytree(root, unreadable)
    for image in unreadable.rglob("*.jpg"):
        image.write_bytes(b"not a jpeg")
    assert to_bag_main(["--dataset", str(unreadable), "--out", str(tmp_path / "bag")]) == 2
    err = capsys.readouterr().err
    assert "skipping sample" in err and "no readable sample among the 2" in err and not (tmp_path / "bag").exists()
    assert to_bag_main(["--dataset", str(root), "--out", str(tmp_path / "bag")]) == 0  # the retry


def test_shipped_sample_bag_matches_the_shipped_dataset():
    """The sample bag must be regenerated (discene-dataset-to-bag) whenever the sample dataset changes."""
    from training.occscannet import OccScanNetDataset

    root = replay.DATA_DIR / "sample_dataset"
    targets = {}
    for split in ("train", "val"):
        ds = OccScanNetDataset(root, split)
        for sample_id in ds.ids:
            data = ds.read_pickle(sample_id)
            targets[tuple(np.round(np.asarray(data["voxel_origin"], np.float64).reshape(3), 5))] = ds.read_target(
                sample_id, data)
    reader = bag_io.open_reader(replay.SAMPLE_BAG)
    try:
        gt = replay.read_ground_truth(reader, (60, 60, 36), 0.08, errors := [])
    finally:
        reader.close()
    assert not errors and len(gt) == len(targets)
    for item in gt.values():
        np.testing.assert_array_equal(item.label_grid(), targets[tuple(np.round(item.voxel_origin, 5))])


def test_replay_looks_up_each_frames_pose_once(tmp_path, monkeypatch):
    # TF before its image: the pose found when the frame is settled is the one it is processed with
    bag = _fast_bag(tmp_path / "fast")
    calls = []
    original = bag_io.TfTree.lookup
    monkeypatch.setattr(bag_io.TfTree, "lookup", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(n_renders=0, progress=False)).summary
    assert s["frames"] == 15 and len(calls) == 15


def test_ctrl_c_keeps_what_was_replayed(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) part-way through a long drive: the frames done so far are evaluated, reported
    and in the output bag; exit code 130. Before, the traceback took the staged outputs with it."""
    bag = _fast_bag(tmp_path / "drive", n=10)
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    read, record, recorded = replay.BagFrames.__iter__, replay.Replayer.record, []

    def counted(rep, frame, result):
        record(rep, frame, result)
        recorded.append(frame)

    def interrupted_after_four(frames):
        for i, item in enumerate(read(frames)):
            if i == 4:
                assert wait_until(lambda: len(recorded) >= 3)  # three frames delivered: they must be kept
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(replay.Replayer, "record", counted)

    monkeypatch.setattr(replay.BagFrames, "__iter__", interrupted_after_four)
    out = tmp_path / "out"
    code = replay.main(["--bag", str(bag), "--out", str(out), "--no-progress", "--json", str(tmp_path / "s.json"),
                        "--world-frame", "world"])
    assert code == replay.INTERRUPTED_EXIT == 130
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["interrupted"] and "interrupted after 4 of 10 colour images" in s["error"]
    assert s["images"] == 4 and s["frames"] >= 3 and s["frames"] + s["unfinished"] + s["skipped"] == 4
    assert s["dropped"] == 0  # full speed replaces no frame; those in flight at Ctrl-C are unfinished
    assert "interrupted after 4" in (out / "report.md").read_text()
    reader = bag_io.open_reader(out / "occupancy_bag")
    try:
        assert sum(c.msgcount for c in reader.connections if c.topic == bag_io.PRED_TOPIC) == s["frames"]
    finally:
        reader.close()
    assert "the run is incomplete: interrupted" in capsys.readouterr().err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_sigterm_is_handled_as_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        replay.interrupt_on_sigterm(15, None)


def _two_camera_bag(path, n=3):
    """A RealSense-like bag whose topics are not the defaults: an infra1 stream (mono8, its own camera info
    with other intrinsics) and an rgb stream, each with its camera_info beside it."""
    f = TypestoreFactory(bag_io.typestore())
    k_rgb, k_ir = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]]), np.array([[45.0, 0, 30], [0, 45, 25], [0, 0, 1]])
    with bag_io.BagWriter(path, "mcap", f.typestore) as w:
        for i in range(n):
            t = 10**18 + i * 50_000_000
            w.write(bag_io.TF_TOPIC, f.new("tf2_msgs/msg/TFMessage", transforms=[
                msg_encode.matrix_to_transform_stamped(f, np.eye(4), "world", "cam", t)]), t)
            for name, k, encoding in (("infra1", k_ir, "mono8"), ("rgb", k_rgb, "rgb8")):
                w.write(f"/rs/{name}/camera_info", msg_encode.k_to_camera_info(f, k, 48, 64, "cam", t), t)
                w.write(f"/rs/{name}/image_raw", msg_encode.rgb_to_image(f, np.zeros((48, 64, 3), np.uint8), "cam", t,
                                                                        encoding), t)
    return path


def test_replay_reads_the_colour_stream_and_its_own_camera_info(tmp_path, monkeypatch, capsys):
    """Auto-picking by name order took the infra1 stream (and the alphabetically first camera info); a colour
    word now wins, and camera info comes from beside the image topic, as image_transport pairs them."""
    bag = _two_camera_bag(tmp_path / "rs")
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    common = ["--bag", str(bag), "--no-progress", "--world-frame", "world", "--renders", "0"]
    assert replay.main([*common, "--out", str(tmp_path / "a"), "--json", str(tmp_path / "a.json")]) == 0
    s = json.loads((tmp_path / "a.json").read_text())
    assert (s["image_topic"], s["info_topic"], s["other_image_topics"]) == (
        "/rs/rgb/image_raw", "/rs/rgb/camera_info", ["/rs/infra1/image_raw"])
    assert "other image topics too: /rs/infra1/image_raw (--image-topic chooses)" in capsys.readouterr().err
    assert "`/rs/infra1/image_raw`" in (tmp_path / "a" / "report.md").read_text()
    assert replay.main([*common, "--out", str(tmp_path / "b"), "--json", str(tmp_path / "b.json"),
                        "--image-topic", "/rs/infra1/image_raw"]) == 0
    s = json.loads((tmp_path / "b.json").read_text())
    assert (s["image_topic"], s["info_topic"], s["frames"]) == ("/rs/infra1/image_raw", "/rs/infra1/camera_info", 3)
    assert "other image topics" not in capsys.readouterr().err  # chosen, so nothing to point out


def test_ground_truth_label_images_are_not_another_camera(bags):
    """The dataset bags carry ground-truth label images (sensor_msgs/Image under /discene/): neither a
    camera to pick nor one to point out."""
    reader = bag_io.open_reader(bags["mcap"])
    try:
        assert bag_io.GT_LABELS_TOPIC in {c.topic for c in reader.connections}
        topic = bag_io.pick_image_topic(reader, None)
        assert not topic.startswith("/discene/") and replay.other_cameras(reader, topic) == []
    finally:
        reader.close()


def test_replay_says_when_the_camera_looks_up_in_tf(tmp_path, monkeypatch, capsys):
    """_fast_bag's TF is the identity: the optical axis is the world's z, straight up, which is what a
    camera_link frame_id gives. The run goes on; the summary, report and stderr say so. An upright pose
    (looking ahead, 15 deg down) draws no note."""
    from discene_ros.processing import fallback_camera_pose

    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    bag = _fast_bag(tmp_path / "up", n=2)
    assert replay.main(["--bag", str(bag), "--out", str(tmp_path / "o"), "--no-progress", "--world-frame", "world",
                        "--renders", "0", "--json", str(tmp_path / "s.json")]) == 0
    note = json.loads((tmp_path / "s.json").read_text())["camera_orientation_note"]
    assert "looks 90 deg above the horizon" in note and "REP 103" in note
    assert "Camera orientation" in (tmp_path / "o" / "report.md").read_text() and note in capsys.readouterr().err
    f = TypestoreFactory(bag_io.typestore())
    k = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])
    with bag_io.BagWriter(tmp_path / "ahead", "mcap", f.typestore) as w:
        t = 10**18
        w.write(bag_io.TF_TOPIC, f.new("tf2_msgs/msg/TFMessage", transforms=[msg_encode.matrix_to_transform_stamped(
            f, fallback_camera_pose(1.0, 15.0, 0.0), "world", "cam", t)]), t)
        w.write(bag_io.CAMERA_INFO_TOPIC, msg_encode.k_to_camera_info(f, k, 48, 64, "cam", t), t)
        w.write(bag_io.IMAGE_TOPIC, msg_encode.rgb_to_image(f, np.zeros((48, 64, 3), np.uint8), "cam", t), t)
    s = replay.replay(tmp_path / "ahead", out=tmp_path / "o2", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(world_frame="world", n_renders=0, progress=False)).summary
    assert s["frames"] == 1 and s["camera_orientation_note"] is None


def test_replay_checks_the_orientation_once_per_camera_frame_as_the_node_does(tmp_path):
    """An upright camera frame first, then images naming a body-style frame: the second is still noted
    (the replay used to check only the first pose of the run)."""
    from discene_ros.processing import fallback_camera_pose

    f = TypestoreFactory(bag_io.typestore())
    k = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])
    with bag_io.BagWriter(tmp_path / "two", "mcap", f.typestore) as w:
        t0 = 10**18
        w.write(bag_io.TF_STATIC_TOPIC, f.new("tf2_msgs/msg/TFMessage", transforms=[
            msg_encode.matrix_to_transform_stamped(f, fallback_camera_pose(1.0, 15.0, 0.0), "world", "cam", t0),
            msg_encode.matrix_to_transform_stamped(f, np.eye(4), "world", "camera_link", t0)]), t0)
        for i, frame in enumerate(("cam", "cam", "camera_link")):
            t = t0 + i * 10**8
            w.write(bag_io.CAMERA_INFO_TOPIC, msg_encode.k_to_camera_info(f, k, 48, 64, frame, t), t)
            w.write(bag_io.IMAGE_TOPIC, msg_encode.rgb_to_image(f, np.zeros((48, 64, 3), np.uint8), frame, t), t)
    s = replay.replay(tmp_path / "two", out=tmp_path / "o", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(world_frame="world", n_renders=0, progress=False)).summary
    assert s["frames"] == 3
    note = s["camera_orientation_note"]
    assert "camera 'camera_link' looks 90 deg above the horizon" in note and "'cam'" not in note


@pytest.mark.parametrize("flag, value, said", [
    ("--max-frames", "0", "max_frames=0: give at least 1"), ("--renders", "-1", "must not be negative"),
    ("--sync-tolerance", "-1", "'sync_tolerance_s'=-1.0 is outside [0.0, 1.0]"),
    ("--sync-wait", "5", "'sync_wait_s'=5.0 is outside [0.0, 2.0]"),
    ("--score-threshold", "2", "'score_threshold'=2.0 is outside"), ("--score-threshold", "nan", "=nan is outside"),
    ("--score-threshold", "-0.5", "give 0 to 0.99")])
def test_replay_options_the_node_would_refuse_are_refused(tmp_path, capsys, flag, value, said):
    """Before, --max-frames 0 replayed one frame, a threshold of 2 or NaN scored IoU 0 without a word."""
    assert replay.main(["--out", str(tmp_path / "o"), "--no-progress", flag, value]) == 2
    assert said in capsys.readouterr().err


def test_dataset_to_bag_names_a_missing_dataset_folder_and_a_file_given_as_one(tmp_path):
    from discene_ros.dataset_to_bag import dataset_to_bag

    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="dataset directory .*missing does not exist"):
        dataset_to_bag(tmp_path / "missing", tmp_path / "bag")
    with pytest.raises(FileNotFoundError, match="dataset directory .*file is a file, not a folder"):
        dataset_to_bag(tmp_path / "file", tmp_path / "bag")


def test_bag_tools_say_how_to_install_rosbags_where_it_is_missing(tmp_path, monkeypatch, capsys):
    """rosdep installs no rosbags (it has no apt package), so a robot that built the package with colcon
    lacks it: both bag tools end in one line with the pip command, not a traceback."""
    for name in ["rosbags", *(m for m in sys.modules if m.startswith("rosbags."))]:
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ModuleNotFoundError
    assert replay.main(["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "pip install 'rosbags>=0.11' tqdm" in capsys.readouterr().err
    sample = Path(replay.__file__).parent / "data" / "sample_dataset"
    assert to_bag_main(["--dataset", str(sample), "--out", str(tmp_path / "b")]) == 2
    assert "pip install 'rosbags>=0.11' tqdm" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["0.10.11", "0.9.23"])
def test_bag_tools_say_to_upgrade_a_rosbags_older_than_0_11(tmp_path, monkeypatch, capsys, version):
    """An older rosbags imports but fails later and obscurely: 0.10.0's lacks ``StoragePlugin`` (an ImportError whose
    "pip install rosbags" advice changes nothing), and no 0.10 release reads a damaged bag
    (docs/results/distro_stacks.md). The tools refuse it first, with the installed version and the upgrade."""
    monkeypatch.setattr(bag_io, "installed_rosbags", lambda: version)
    assert replay.main(["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"rosbags {version} is installed; the bag tools need rosbags>=0.11: pip install -U 'rosbags>=0.11'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    sample = Path(replay.__file__).parent / "data" / "sample_dataset"
    assert to_bag_main(["--dataset", str(sample), "--out", str(tmp_path / "b")]) == 2
    assert f"rosbags {version} is installed" in capsys.readouterr().err and not (tmp_path / "b").exists()
    monkeypatch.setattr(bag_io, "installed_rosbags", lambda: "0.11.0")
    bag_io.check_rosbags()  # the floor itself is enough
