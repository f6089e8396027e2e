"""Pairing by stamp, TF at the image stamp, the mount fallback and undistortion (node and replay share them)."""
from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
from test_ros_support import BlockBackend, pipeline_for

from discene_ros import bag_io, msg_decode, msg_encode, replay
from discene_ros.camera_pose import TransformNotReadyError, mount_fallback_pose, mount_height_pitch
from discene_ros.errors import CameraInfoError, MissingCameraInfoError
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.pairing import DepthSyncError, FramePartners, StampedBuffer
from discene_ros.params import camera_info_topic_for
from discene_ros.replay import ReplaySettings
from discene_ros.undistort import Undistorter, distort_normalised, undistort_map

F = TypestoreFactory(bag_io.typestore())
K = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])
MS = 1_000_000


def _header_msg(stamp_ns):
    return msg_encode.k_to_camera_info(F, K, 48, 64, "cam", stamp_ns)


# ----------------------------------------------------------------------------- pairing
def test_buffer_takes_the_nearest_stamp_within_the_tolerance():
    buf = StampedBuffer()
    for t in (0, 33, 66):
        buf.add(_header_msg(t * MS))
    assert msg_decode.stamp_to_ns(buf.wait_nearest(34 * MS, 5 * MS, 0.0).header.stamp) == 33 * MS
    assert buf.wait_nearest(50 * MS, 5 * MS, 0.0) is None
    assert msg_decode.stamp_to_ns(buf.newest().header.stamp) == 66 * MS


def test_buffer_waits_for_a_partner_that_comes_later():
    buf = StampedBuffer()
    buf.add(_header_msg(0))  # the previous frame's
    timer = threading.Timer(0.05, lambda: buf.add(_header_msg(67 * MS)))
    timer.start()
    got = buf.wait_nearest(67 * MS, 5 * MS, timeout_s=10.0)
    timer.join()
    assert got is not None and msg_decode.stamp_to_ns(got.header.stamp) == 67 * MS


def test_buffer_stops_waiting_once_a_newer_message_shows_none_will_come():
    buf = StampedBuffer()
    buf.add(_header_msg(200 * MS))
    start = time.monotonic()
    assert buf.wait_nearest(67 * MS, 5 * MS, timeout_s=30.0) is None
    assert time.monotonic() - start < 25.0  # returned without the 30 s wait (generous: never a timing test)


def test_a_time_line_that_restarts_drops_the_old_one():
    """A bag played with --loop: depth stamped 100 s, then 5 s. The old messages look newer than every new
    frame, so they would end each wait at once and never match; they go at the first message of the new line."""
    partners = FramePartners(tolerance_s=0.005, wait_s=0.0, use_depth=True)
    for t in (100_000, 100_033, 100_066):
        partners.depth.add(_header_msg(t * MS))
        partners.info.add(_header_msg(t * MS))
    partners.depth.add(_header_msg(5_000 * MS))
    partners.info.add(_header_msg(5_000 * MS))
    info, depth = partners.match(5_000 * MS)
    assert msg_decode.stamp_to_ns(depth.header.stamp) == 5_000 * MS
    assert not partners.depth.settled(5_033 * MS, 5 * MS)  # its depth may still come: nothing newer is left
    partners.depth.add(_header_msg(4_500 * MS))  # 0.5 s back: out of order, not a new time line
    assert msg_decode.stamp_to_ns(partners.depth.wait_nearest(5_000 * MS, 5 * MS, 0.0).header.stamp) == 5_000 * MS


def test_partners_camera_info_falls_back_to_the_newest_and_depth_is_strict():
    partners = FramePartners(tolerance_s=0.005, wait_s=0.0, use_depth=True)
    with pytest.raises(MissingCameraInfoError):
        partners.match(0)
    partners.info.add(_header_msg(0))  # a driver stamping camera info on its own clock: intrinsics still hold
    partners.depth.add(msg_encode.depth_to_image(F, np.ones((48, 64), np.float32), "cam", 0))
    with pytest.raises(DepthSyncError, match="67.0 ms away"):
        partners.match(67 * MS)
    info, depth = partners.match(1 * MS)
    assert info is not None and depth is not None


def test_camera_info_slower_than_the_images_holds_no_frame_up_once_its_calibration_is_steady():
    """A camera publishing CameraInfo at 1 Hz: each image found no info within the tolerance and waited the whole
    sync_wait_s for one (the node topped out at 1/sync_wait_s FPS). Once two infos in a row had the same
    calibration, the newest one is used at once; a changed calibration is waited for again."""
    partners = FramePartners(tolerance_s=0.005, wait_s=2.0, use_depth=False)
    waits = []  # the timeouts the camera info lookup waited with
    lookup = partners.info.wait_nearest
    partners.info.wait_nearest = lambda stamp, tol, timeout: (waits.append(timeout), lookup(stamp, tol, timeout))[1]
    partners.add_info(_header_msg(0))
    partners.add_info(_header_msg(1_000 * MS))
    for t in (1_033, 1_066, 1_100):
        info, _ = partners.match(t * MS)
        assert msg_decode.stamp_to_ns(info.header.stamp) == 1_000 * MS
    assert waits == [0.0, 0.0, 0.0]
    other = msg_encode.k_to_camera_info(F, K * [[0.5], [0.5], [1]], 24, 32, "cam", 2_000 * MS)  # binned 2x2
    partners.add_info(other)
    partners.add_info(_header_msg(2_100 * MS))  # past the next image's window: it is not waited for
    info, _ = partners.match(2_033 * MS)
    assert waits[-1] == 2.0 and msg_decode.stamp_to_ns(info.header.stamp) == 2_100 * MS


# ----------------------------------------------------------------------------- TF at the image stamp
def _rot_z(deg, t=(0.0, 0.0, 0.0)):
    a = math.radians(deg)
    m = np.eye(4)
    m[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    m[:3, 3] = t
    return m


def test_tf_tree_interpolates_at_the_stamp_and_refuses_to_extrapolate():
    tree = bag_io.TfTree()
    tree.add("world", "base", _rot_z(0, (0, 0, 0)), 100)
    tree.add("world", "base", _rot_z(90, (2, 0, 0)), 200)
    tree.add("base", "cam", _rot_z(0, (0, 0, 1.0)))  # static mount
    mid = tree.lookup("world", "cam", 150)
    np.testing.assert_allclose(mid, _rot_z(45, (1, 0, 0)) @ _rot_z(0, (0, 0, 1.0)), atol=1e-9)
    np.testing.assert_allclose(tree.lookup("world", "cam", 200), _rot_z(90, (2, 0, 1.0)), atol=1e-9)
    np.testing.assert_allclose(tree.lookup("world", "cam"), _rot_z(90, (2, 0, 1.0)), atol=1e-9)  # latest
    with pytest.raises(TransformNotReadyError, match="after the newest"):
        tree.lookup("world", "cam", 250)
    with pytest.raises(TransformNotReadyError, match="before the first"):
        tree.lookup("world", "cam", 50)
    assert tree.lookup("odom", "cam", 150) is None  # no such frame: not an extrapolation
    np.testing.assert_allclose(tree.lookup("cam", "world", 200), np.linalg.inv(_rot_z(90, (2, 0, 1.0))), atol=1e-9)


def test_mount_height_and_pitch():
    pitch = math.radians(30)
    forward = np.array([math.cos(pitch), 0.0, -math.sin(pitch)])
    right = np.array([0.0, -1.0, 0.0])
    mount = np.eye(4)
    mount[:3, 0], mount[:3, 1], mount[:3, 2] = right, np.cross(forward, right), forward
    mount[:3, 3] = [0.2, 0.1, 0.45]
    assert mount_height_pitch(mount) == pytest.approx((0.45, 30.0))
    pose = mount_fallback_pose(mount, floor_z=0.1)
    assert pose[2, 3] == pytest.approx(0.55) and mount_height_pitch(pose)[1] == pytest.approx(30.0)


# ----------------------------------------------------------------------------- undistortion
def test_plumb_bob_map_matches_the_hand_computed_model():
    d = np.array([0.1, 0.0, 0.0, 0.0, 0.0])
    map_x, map_y = undistort_map(K, "plumb_bob", d, (48, 64))
    # output pixel u=62, v=24: x = (62-32)/60 = 0.5, y = 0 -> xd = 0.5 (1 + 0.1 * 0.25) = 0.5125
    assert map_x[24, 62] == pytest.approx(60 * 0.5125 + 32, abs=1e-4) and map_y[24, 62] == pytest.approx(24)
    x, y = np.array([0.3]), np.array([-0.2])
    p1, p2 = 0.01, -0.02
    xd, yd = distort_normalised(x, y, "plumb_bob", np.array([0, 0, p1, p2, 0]))
    r2 = 0.13
    assert xd[0] == pytest.approx(0.3 + 2 * p1 * 0.3 * -0.2 + p2 * (r2 + 2 * 0.09))
    assert yd[0] == pytest.approx(-0.2 + p1 * (r2 + 2 * 0.04) + 2 * p2 * 0.3 * -0.2)
    xd, _ = distort_normalised(np.array([0.5]), np.array([0.0]), "rational_polynomial",
                               np.array([0.1, 0, 0, 0, 0, 0.2, 0, 0]))
    assert xd[0] == pytest.approx(0.5 * (1 + 0.1 * 0.25) / (1 + 0.2 * 0.25))
    xd, _ = distort_normalised(np.array([1.0]), np.array([0.0]), "equidistant", np.array([0.05, 0, 0, 0]))
    theta = math.atan(1.0)
    assert xd[0] == pytest.approx(theta * (1 + 0.05 * theta**2))


def test_undistorter_remaps_images_and_caches_the_maps():
    info = msg_encode.k_to_camera_info(F, K, 48, 64, "cam", 0)
    info.d = np.array([-0.2, 0.05, 0.0, 0.0, 0.0])
    ramp = np.tile(np.arange(64, dtype=np.uint8), (48, 1))[..., None].repeat(3, axis=2)  # value = column
    undistort = Undistorter()
    out, _ = undistort(info, ramp, K)
    map_x, _ = undistort_map(K, "plumb_bob", info.d, (48, 64))
    inside = (map_x >= 0) & (map_x <= 63)
    np.testing.assert_allclose(out[..., 0][inside], np.rint(map_x[inside]), atol=1.0)  # bilinear on a ramp
    assert not np.array_equal(out, ramp)
    undistort(info, ramp, K)
    assert undistort.maps_built == 1
    info.d = np.zeros(5)
    same, _ = undistort(info, ramp, K)
    assert same is ramp  # rectified images pass through untouched


def test_coefficients_that_map_most_of_the_image_outside_are_refused_once():
    """Garbage D would give a mostly black image that the network reads as a scene: refused as bad camera
    info, once per calibration (not rebuilt per frame). Even a strong real pincushion keeps most of it."""
    info = msg_encode.k_to_camera_info(F, K, 48, 64, "cam", 0)
    info.d = np.array([1e6, 1e6, 0.0, 0.0, 1e6])
    ramp = np.zeros((48, 64, 3), np.uint8)
    undistort = Undistorter()
    raised = []
    for _ in range(2):
        with pytest.raises(CameraInfoError, match="map only 0 % of the 64x48 image") as caught:
            undistort(info, ramp, K)
        raised.append(caught.value)
    assert undistort.maps_built == 1
    assert raised[0] is not raised[1]  # one object raised per frame would grow its traceback frame by frame
    info.d = np.array([0.6, 0.4, 0.0, 0.0, 0.0])
    undistort(info, ramp, K)


# ----------------------------------------------------------------------------- replay: a driver's message order
def _driver_bag(path, n=4, depth_lag_ms=20, info_lag_ms=0.3, tf_lag_ms=30, world="odom", static_mount=False,
                mount_after=None, compressed_depth=None, image_frames=None, depth_frame="cam"):
    """Colour at 15 Hz; camera info a fraction of a ms later, aligned depth and TF tens of ms later (bag
    time), each with the colour image's header stamp, as RealSense + a SLAM node write them. The static
    camera mount comes first, or (``mount_after``) just before image ``mount_after``. ``image_frames``: the
    frame_id of each colour image (default "cam", as every other message names it)."""
    def mount(bag_t):
        w.write(bag_io.TF_STATIC_TOPIC, F.new("tf2_msgs/msg/TFMessage", transforms=[
            msg_encode.matrix_to_transform_stamped(F, _rot_z(0, (0, 0, 0.5)), "base_link", "cam", 0)]), bag_t)

    with bag_io.BagWriter(path, "mcap", F.typestore) as w:
        if static_mount:
            mount(10**18 - 1)
        for i in range(n):
            t = 10**18 + i * 66_666_667
            if i == mount_after:
                mount(t - 1)
            camera = "cam" if image_frames is None else image_frames[i]
            w.write(bag_io.IMAGE_TOPIC, msg_encode.rgb_to_image(F, np.zeros((48, 64, 3), np.uint8), camera, t), t)
            w.write(bag_io.CAMERA_INFO_TOPIC, _header_msg(t), t + int(info_lag_ms * MS))
            if compressed_depth:  # as `ros2 bag record` of image_transport's compressedDepth topic
                w.write(bag_io.DEPTH_TOPIC + "/compressedDepth",
                        msg_encode.depth_to_compressed_depth(F, np.full((48, 64), 2.0), depth_frame, t,
                                                             codec=compressed_depth),
                        t + depth_lag_ms * MS)
            else:
                w.write(bag_io.DEPTH_TOPIC, msg_encode.depth_to_image(F, np.full((48, 64), 2.0, np.float32), depth_frame, t),
                        t + depth_lag_ms * MS)
            if world:
                w.write(bag_io.TF_TOPIC, F.new("tf2_msgs/msg/TFMessage", transforms=[
                    msg_encode.matrix_to_transform_stamped(F, _rot_z(3 * i, (0.1 * i, 0, 1.0)), world, "cam", t)]),
                    t + tf_lag_ms * MS)
    return path


@pytest.mark.parametrize("compressed_depth", [None, "png", "rvl"])
def test_replay_pairs_late_depth_info_and_tf_by_stamp(tmp_path, compressed_depth):
    cfg = BlockBackend().config
    cfg.use_depth = True
    poses = []

    class Probe(BlockBackend):
        def infer(self, inputs):
            assert float(inputs.depth.max()) == pytest.approx(2.0)
            return super().infer(inputs)

    bag = _driver_bag(tmp_path / "drive", compressed_depth=compressed_depth)
    result = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(Probe(cfg)),
                           settings=ReplaySettings(world_frame="odom", n_renders=4, progress=False))
    s = result.summary
    assert s["frames"] == 4 and s["skipped"] == 0 and s["fallback_pose_frames"] == 0, s["skipped_by_reason"]
    poses = [r["cam_pose"] for r in result.renders]
    np.testing.assert_allclose(poses[2], _rot_z(6, (0.2, 0, 1.0)), atol=1e-9)  # TF of its own stamp
    rgb_only = replay.replay(bag, out=tmp_path / "out2", pipeline=pipeline_for(BlockBackend()),
                             settings=ReplaySettings(world_frame="odom", n_renders=0, progress=False,
                                                     use_depth=False)).summary
    assert rgb_only["frames"] == 4
    with pytest.raises(ValueError, match="no depth branch"):
        replay.replay(bag, out=tmp_path / "out3", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(use_depth=True, progress=False))


def test_replay_skips_depth_in_another_frame_unless_told_not_to_check(tmp_path, capsys, monkeypatch):
    cfg = BlockBackend().config
    cfg.use_depth = True
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend(cfg)))
    bag = _driver_bag(tmp_path / "unaligned", depth_frame="cam_depth_optical_frame")
    args = ["--bag", str(bag), "--no-progress", "--world-frame", "odom"]
    assert replay.main([*args, "--out", str(tmp_path / "checked")]) != 0
    err = capsys.readouterr().err
    assert "no frame was processed (bad_depth: 4)" in err
    assert replay.main([*args, "--out", str(tmp_path / "trusted"), "--no-check-depth-frame",
                        "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == 4 and summary["skipped"] == 0
    assert ReplaySettings().check_depth_frame


def test_replay_without_world_frame_uses_the_mount_or_refuses(tmp_path, capsys, monkeypatch):
    bag = _driver_bag(tmp_path / "nodom", world=None, static_mount=True)
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(world_frame="odom", n_renders=0, progress=False)).summary
    assert s["frames"] == 4 and s["fallback_pose_frames"] == 4
    assert "0.50 m above the floor" in s["fallback_pose_note"] and "base_link -> cam" in s["fallback_pose_note"]
    assert "--no-fallback-pose to skip" in s["fallback_pose_note"] and ":=" not in s["fallback_pose_note"]  # an option here
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    code = replay.main(["--bag", str(bag), "--out", str(tmp_path / "cli"), "--no-progress", "--world-frame", "odom",
                        "--no-fallback-pose", "--camera-info-topic", bag_io.CAMERA_INFO_TOPIC, "--no-depth"])
    err = capsys.readouterr().err
    assert code != 0 and "no frame was processed (missing_tf: 4)" in err


def test_replay_switches_from_the_fixed_fallback_to_a_mount_that_comes_later(tmp_path):
    bag = _driver_bag(tmp_path / "late", world=None, mount_after=2)
    result = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                           settings=ReplaySettings(world_frame="odom", n_renders=4, progress=False, sync_wait_s=0.0))
    s = result.summary
    assert s["frames"] == 4 and s["fallback_pose_frames"] == 4
    heights = [round(mount_height_pitch(r["cam_pose"])[0], 6) for r in result.renders]
    assert heights == [1.0, 1.0, 0.5, 0.5]  # the fixed fallback_camera_height, then the mount's
    assert "base_link -> cam" in s["fallback_pose_note"] and "the images before it used the fixed" in s["fallback_pose_note"]


def test_replay_skips_images_naming_no_frame_and_reads_ros1_style_ones(tmp_path):
    """As the node: "/cam" is tf2's "cam"; an empty frame_id is skipped (bad_frame_id), not given the
    fallback pose as if the world frame were missing."""
    bag = _driver_bag(tmp_path / "ids", image_frames=["cam", "/cam", "", "cam"])
    s = replay.replay(bag, out=tmp_path / "out", pipeline=pipeline_for(BlockBackend()),
                      settings=ReplaySettings(world_frame="odom", n_renders=0, progress=False, use_depth=False)).summary
    assert s["frames"] == 3 and s["fallback_pose_frames"] == 0 and s["skipped_by_reason"] == {"bad_frame_id": 1}
    assert ReplaySettings(world_frame="/odom", base_frame="/base_link").world_frame == "odom"
    with pytest.raises(ValueError, match="'world_frame' names no TF frame"):
        ReplaySettings(world_frame="/")


def test_replay_topic_options_must_exist(tmp_path, capsys, monkeypatch):
    bag = _driver_bag(tmp_path / "drive", n=1)
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    assert replay.main(["--bag", str(bag), "--out", str(tmp_path / "o"), "--no-progress",
                        "--depth-topic", "/nope", "--use-depth"]) != 0
    assert replay.main(["--bag", str(bag), "--out", str(tmp_path / "o2"), "--no-progress",
                        "--camera-info-topic", "/nope"]) != 0
    assert "/nope is not in the bag" in capsys.readouterr().err


def test_frame_processor_undistorts_raw_images_before_the_network():
    from discene_ros.processing import FrameInput, FrameProcessor

    info = msg_encode.k_to_camera_info(F, K, 48, 64, "cam", 0)
    info.d = np.array([-0.2, 0.05, 0.001, 0.0, 0.0])
    ramp = np.tile(np.arange(64, dtype=np.uint8), (48, 1))[..., None].repeat(3, axis=2)
    image = msg_encode.rgb_to_image(F, ramp, "cam", 0)
    processor = FrameProcessor(pipeline_for(BlockBackend()))
    result = processor.process(FrameInput(image=image, camera_info=info, cam_pose=np.eye(4)))
    expected, _ = Undistorter()(info, ramp, K)
    np.testing.assert_array_equal(result.rgb, expected)
    assert not np.array_equal(result.rgb, ramp)


def _rectify_calibration(info):
    """The raw lens's D (non-zero, as image_proc leaves it on the CameraInfo beside image_rect) and a P != K."""
    info.d = np.array([-0.2, 0.05, 0.001, 0.0, 0.0])
    info.p = np.array([50.0, 0, 31, 0, 0, 52, 23, 0, 0, 0, 1, 0])
    return info


def test_rectified_images_are_not_undistorted_again_and_take_p():
    from discene_ros.processing import FrameInput, FrameProcessor, ProcessorSettings

    info = _rectify_calibration(msg_encode.k_to_camera_info(F, K, 48, 64, "cam", 0))
    ramp = np.tile(np.arange(64, dtype=np.uint8), (48, 1))[..., None].repeat(3, axis=2)
    frame = FrameInput(image=msg_encode.rgb_to_image(F, ramp, "cam", 0), camera_info=info, cam_pose=np.eye(4))
    rectified = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(rectified=True))
    decoded = rectified.decode_frame(frame)
    np.testing.assert_array_equal(decoded.rgb, ramp)  # not remapped
    np.testing.assert_allclose(decoded.k, [[50, 0, 31], [0, 52, 23], [0, 0, 1]])
    assert rectified.undistort.maps_built == 0
    raw = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(rectified=False))
    decoded = raw.decode_frame(frame)
    np.testing.assert_array_equal(decoded.rgb, Undistorter()(info, ramp, K)[0])
    np.testing.assert_allclose(decoded.k, K)
    info.p = np.zeros(12)
    with pytest.raises(CameraInfoError, match="P is all zero.*rectified:=false"):
        rectified.decode_frame(frame)
    np.testing.assert_allclose(raw.decode_frame(frame).k, K)


def _rect_bag(path, topic="/camera/color/image_rect", n=2):
    """A bag of rectified images beside the raw calibration's CameraInfo (non-zero D, P != K), with TF."""
    info_topic = camera_info_topic_for(topic)
    with bag_io.BagWriter(path, "mcap", F.typestore) as w:
        for i in range(n):
            t = 10**18 + i * 66_666_667
            w.write(bag_io.TF_TOPIC, F.new("tf2_msgs/msg/TFMessage", transforms=[
                msg_encode.matrix_to_transform_stamped(F, np.eye(4), "odom", "cam", t)]), t)
            w.write(info_topic, _rectify_calibration(msg_encode.k_to_camera_info(F, K, 48, 64, "cam", t)), t)
            w.write(topic, msg_encode.rgb_to_image(F, np.zeros((48, 64, 3), np.uint8), "cam", t), t)
    return path


@pytest.mark.parametrize("option, rectified", [([], True), (["--rectified", "false"], False),
                                               (["--rectified", "true"], True)])
def test_replay_applies_the_rectified_rule_to_its_image_topic(tmp_path, monkeypatch, option, rectified):
    monkeypatch.setattr(replay, "build_pipeline", lambda *a, **k: pipeline_for(BlockBackend()))
    bag = _rect_bag(tmp_path / "rect")
    assert replay.main(["--bag", str(bag), "--out", str(tmp_path / "o"), "--no-progress", "--world-frame", "odom",
                        "--json", str(tmp_path / "s.json"), *option]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["frames"] == 2 and summary["rectified"] is rectified
    said = "rectified auto: /camera/color/image_rect is an image_rect topic" if not option else f"rectified {option[1]}"
    assert said in summary["images_note"]
    assert ("intrinsics from CameraInfo P" in summary["images_note"]) is rectified
    assert "- images: " + summary["images_note"] in (tmp_path / "o" / "report.md").read_text()


def test_replay_rectified_setting_is_checked():
    with pytest.raises(ValueError, match="rectified='yes' is not one of auto, true, false"):
        ReplaySettings(rectified="yes")
    assert ReplaySettings().rectified == "auto"
