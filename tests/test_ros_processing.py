"""The node's ROS-free logic, for real: newest-frame slot, stats, throttling, fallback pose, bad frames."""
from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore
from test_ros_support import BlockBackend, pipeline_for

from discene_ros import msg_decode, msg_encode
from discene_ros.errors import (
    CameraInfoError,
    DepthError,
    MissingCameraInfoError,
    MissingTransformError,
    UnsupportedEncodingError,
)
from discene_ros.msg_factory import TypestoreFactory
from discene_ros.processing import (
    FrameInput,
    FrameLoop,
    FrameProcessor,
    FrameStats,
    ProcessorSettings,
    WarnThrottle,
    build_outputs,
    decodes_on_decode_thread,
    fallback_camera_pose,
    frame_loop_mode,
    freeze_startup_objects,
    post_threads_for,
    uses_decode_thread,
    uses_prepare_thread,
)
from models.config import lite
from models.geometry import place_grid

F = TypestoreFactory(get_typestore(Stores.ROS2_JAZZY))
K = np.array([[120.0, 0, 64], [0, 120, 48], [0, 0, 1]])
STAMP = 5_000_000_000


def _frame(encoding="rgb8", hw=(96, 128), info_hw=(96, 128), pose=np.eye(4), depth=None, stamp=STAMP):
    rgb = np.full(hw + (3,), 100, np.uint8)
    image = msg_encode.rgb_to_image(F, rgb, "cam", stamp, "rgb8")
    image.encoding = encoding
    info = msg_encode.k_to_camera_info(F, K, info_hw[0], info_hw[1], "cam", stamp) if info_hw else None
    return FrameInput(image=image, camera_info=info, depth=depth, cam_pose=pose)


def test_stats_and_throttle_with_fake_clock():
    now = [100.0]
    stats = FrameStats(clock=lambda: now[0])
    for i in range(11):
        stats.on_received(dropped_previous=i % 2 == 1)
        stats.on_processed(10.0 + i)
        now[0] += 0.1
    stats.on_skipped("bad_image_size")
    snap = stats.snapshot()
    assert snap["fps"] == pytest.approx(10.0)
    assert snap["received"] == 11 and snap["processed"] == 11 and snap["dropped"] == 5
    assert snap["latency_ms"]["p50"] == pytest.approx(15.0) and snap["latency_ms"]["mean"] == pytest.approx(15.0)
    assert snap["skipped"] == {"bad_image_size": 1} and snap["window_skipped"] == 1
    assert stats.snapshot()["window_processed"] == 0  # window reset by the previous snapshot
    throttle = WarnThrottle(5.0, clock=lambda: now[0])
    assert throttle.allow("a") and not throttle.allow("a") and throttle.allow("b")
    now[0] += 5.0
    assert throttle.allow("a") and throttle.suppressed["a"] == 1


def test_throttle_lets_one_of_two_threads_through_when_both_find_the_key_expired():
    """Skips are reported from the decode, prepare and finish threads: two of them asking about one reason at
    once must not both log it. The first is held between its look at the key and its note of the time (a dict
    that waits there for the second to finish), which only a lock keeps the second from using."""
    first_looked, second_done = threading.Event(), threading.Event()

    class HeldOnFirstLook(dict):
        def get(self, key, default=None):
            value = super().get(key, default)
            if threading.current_thread().name == "first":
                first_looked.set()
                second_done.wait(0.2)  # without a lock the second thread's whole call fits in here
            return value

    throttle, allowed = WarnThrottle(5.0, clock=lambda: 100.0), []
    throttle._last = HeldOnFirstLook()
    first = threading.Thread(target=lambda: allowed.append(throttle.allow("bad_image_size")), name="first")
    first.start()
    first_looked.wait()
    second = threading.Thread(target=lambda: (allowed.append(throttle.allow("bad_image_size")), second_done.set()))
    second.start()
    first.join()
    second.join()
    assert sorted(allowed) == [False, True] and throttle.suppressed["bad_image_size"] == 1


def test_fallback_pose_geometry():
    pose = fallback_camera_pose(1.2, 30.0, floor_z=0.5)
    rot = pose[:3, :3]
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    np.testing.assert_allclose(pose[:3, 3], [0, 0, 1.7])
    np.testing.assert_allclose(rot[:, 2], [np.cos(np.pi / 6), 0, -0.5], atol=1e-12)  # forward, pitched down
    assert rot[2, 1] < 0 and rot[1, 0] == pytest.approx(-1.0)  # image down has a -z part; image right is -y
    origin = place_grid(pose, floor_z=0.5)
    assert origin[2] == 0.5 and origin[0] > -0.1  # grid on the floor, in front of the camera (+x)


def test_processor_good_frame_and_outputs():
    proc = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(use_fallback_pose=False))
    result = proc.process(_frame())
    assert not result.used_fallback_pose and len(result.occupancy.voxel_labels) == 40
    # the stages in their order; the frame's own total includes the output check
    assert list(result.timings_ms) == ["decode_ms", "preprocess_ms", "infer_ms", "postprocess_ms", "output_check_ms",
                                       "total_ms"]
    assert result.timings_ms["total_ms"] >= result.timings_ms["output_check_ms"] > 0
    assert result.timings_ms["total_ms"] >= sum(result.timings_ms[k] for k in ("infer_ms", "output_check_ms"))
    msgs = build_outputs(F, result, "odom", STAMP)
    assert msgs["cloud"].width == 40 and msgs["cloud"].header.frame_id == "odom"
    assert len(msgs["markers"].markers) == 2  # DELETEALL + one class
    np.testing.assert_allclose(msg_decode.grid_origin_from_pose(msgs["grid_pose"]), result.occupancy.voxel_origin)


def test_processor_rescales_camera_info_and_rejects_bad_frames():
    proc = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(use_fallback_pose=False))
    proc.process(_frame(info_hw=(192, 256)))  # info at twice the resolution: K is rescaled
    with pytest.raises(UnsupportedEncodingError):
        proc.process(_frame(encoding="8UC3"))  # needs cv_bridge, absent here
    with pytest.raises(CameraInfoError, match="does not match"):
        proc.process(_frame(info_hw=(96, 96)))
    with pytest.raises(MissingCameraInfoError):
        proc.process(_frame(info_hw=None))
    with pytest.raises(MissingTransformError):
        proc.process(_frame(pose=None))
    fallback = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(use_fallback_pose=True))
    assert fallback.process(_frame(pose=None)).used_fallback_pose


def test_processor_checks_each_calibration_once(monkeypatch):
    # a camera publishes the same CameraInfo (a new message object) with every image: its K is derived and
    # checked once; another calibration or image size is checked again, and a bad one raises every time
    calls = []
    real = msg_decode.camera_info_to_k
    monkeypatch.setattr(msg_decode, "camera_info_to_k", lambda *a, **kw: calls.append(a[1:]) or real(*a, **kw))
    proc = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(use_fallback_pose=False))
    for _ in range(3):
        decoded = proc.decode_frame(_frame())
    assert calls == [((96, 128),)]
    np.testing.assert_array_equal(decoded.k, real(_frame().camera_info, (96, 128)))
    assert not decoded.k.flags.writeable  # shared by the frames of this calibration
    proc.decode_frame(_frame(info_hw=(192, 256)))  # another calibration (K at twice the resolution)
    other = _frame()
    other.camera_info.k = np.array([[110.0, 0, 64], [0, 110, 48], [0, 0, 1]]).reshape(-1)
    assert proc.decode_frame(other).k[0, 0] == 110.0
    assert len(calls) == 3
    bad = _frame()
    bad.camera_info.k = np.zeros(9)
    for _ in range(2):
        with pytest.raises(CameraInfoError):
            proc.decode_frame(bad)
    assert len(calls) == 5
    distorted = _frame()
    distorted.camera_info.d = np.array([0.1, 0.0, 0.0, 0.0, 0.0])
    assert proc.decode_frame(distorted).rgb.shape == (96, 128, 3) and proc.undistort.maps_built == 1


def test_processor_depth_rules():
    cfg = lite()
    cfg.use_depth = True
    with pytest.raises(ValueError, match="use_depth"):
        FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(use_depth=False))
    proc = FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(use_depth=True))
    with pytest.raises(DepthError, match="no depth"):
        proc.process(_frame())
    nan_depth = msg_encode.depth_to_image(F, np.full((96, 128), np.nan), "cam", STAMP, "32FC1")
    with pytest.raises(DepthError, match="no valid pixel"):
        proc.process(_frame(depth=nan_depth))
    stale = msg_encode.depth_to_image(F, np.ones((96, 128)), "cam", STAMP - 500_000_000)
    with pytest.raises(DepthError, match="ms away"):
        proc.process(_frame(depth=stale))
    skewed = msg_encode.depth_to_image(F, np.ones((96, 96)), "cam", STAMP)
    with pytest.raises(DepthError, match="aligned"):
        proc.process(_frame(depth=skewed))
    partial = np.ones((48, 64))
    partial[:10] = np.nan  # NaN pixels are invalid (0), the frame is still used
    assert proc.process(_frame(depth=msg_encode.depth_to_image(F, partial, "cam", STAMP, "32FC1"))).occupancy is not None


def test_depth_in_another_frame_than_the_image_is_refused_as_not_registered():
    """RealSense's depth/image_rect_raw is in camera_depth_optical_frame, not registered to the colour pixels;
    its aspect ratio may still pass (848x480 beside 1280x720). A leading "/" or an empty frame_id is no mismatch."""
    cfg = lite()
    cfg.use_depth = True
    proc = FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(use_depth=True))
    unaligned = msg_encode.depth_to_image(F, np.full((96, 128), 2.0), "cam_depth", STAMP)
    with pytest.raises(DepthError, match="in frame 'cam_depth', the colour image in 'cam': the depth must be "
                                         "registered to the colour camera .*align_depth.enable:=true.*"
                                         "check_depth_frame:=false"):
        proc.decode_frame(_frame(depth=unaligned))
    for depth_frame in ("/cam", ""):
        depth = msg_encode.depth_to_image(F, np.full((96, 128), 2.0), depth_frame, STAMP)
        assert proc.decode_frame(_frame(depth=depth)).depth.max() == pytest.approx(2.0)
    nameless = _frame(depth=unaligned)
    nameless.image.header.frame_id = ""  # not checked here (the node skips it as bad_frame_id before)
    assert proc.decode_frame(nameless).depth is not None
    trusting = FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(use_depth=True, check_depth_frame=False))
    assert trusting.decode_frame(_frame(depth=unaligned)).depth.max() == pytest.approx(2.0)


@pytest.mark.parametrize("codec", ["rvl", "png"])
def test_compressed_depth_claiming_far_more_pixels_than_the_image_is_refused_before_decoding(codec):
    """A few RVL bytes may claim a huge, nearly empty depth image of the colour image's aspect: it was decoded
    (64 Mpx: about 300 MB) and used. Up to 16x the colour image's pixels (4x each side) is decoded."""
    cfg = lite()
    cfg.use_depth = True
    proc = FrameProcessor(pipeline_for(BlockBackend(cfg)), ProcessorSettings(use_depth=True))

    def sparse(height: int, width: int) -> object:
        depth = np.zeros((height, width))
        depth[height // 2, width // 2] = 2.0
        return msg_encode.depth_to_compressed_depth(F, depth, "cam", STAMP, codec=codec)

    assert proc.decode_frame(_frame(depth=sparse(96 * 4, 128 * 4))).depth.shape == (384, 512)
    with pytest.raises(DepthError, match=f"{128 * 5}.{{1,2}}{96 * 5}.*{16 * 96 * 128} pixels"):
        proc.decode_frame(_frame(depth=sparse(96 * 5, 128 * 5)))


def test_slow_backend_drops_stale_frames_newest_wins():
    """A producer at ~100 Hz against a 50 ms backend, through the node's frame loop: most frames are
    dropped, never queued; bad frames from any stage are skipped by reason; all are counted."""
    backend = BlockBackend(delay_s=0.05)
    proc = FrameProcessor(pipeline_for(backend), ProcessorSettings(use_fallback_pose=False))
    stats, processed, skips = FrameStats(), [], []
    loop = FrameLoop(proc, stats, deliver=lambda frame, result: processed.append(frame.stamp_ns),
                     on_skip=lambda frame, reason, text: skips.append(reason))
    for i in range(30):
        loop.submit(_frame(stamp=STAMP + i))
        time.sleep(0.01)
    assert loop.wait_idle(timeout=10)
    no_pose = _frame(stamp=STAMP + 30)
    no_pose.cam_pose = None  # fallback disabled: the decode stage refuses it
    loop.submit(no_pose)
    loop.close()  # finishes what was submitted
    assert not loop.alive()
    snap = stats.snapshot()
    assert snap["received"] == 31 and skips == ["missing_tf"] and snap["skipped"] == {"missing_tf": 1}
    assert snap["dropped"] >= 10 and snap["processed"] == len(processed) == backend.calls
    assert snap["processed"] + snap["dropped"] == 30
    assert processed == sorted(processed) and processed[-1] == STAMP + 29  # the newest frame is processed


@pytest.mark.parametrize("pipelined, launch_ahead, compressed, locates, prepare, decode, decodes_there", [
    # the node on CUDA, raw images: TF may wait on the decode thread, which leaves the decode to the finish stage
    (True, True, False, True, False, True, False),
    (True, True, False, False, False, False, False),  # the replay on CUDA, raw images: one thread
    (True, True, True, False, False, True, True),     # compressed: the decode thread overlaps the decode
    (True, False, False, True, True, False, True),    # pipelined, not launch-ahead: the prepare stage decodes
    (True, False, True, True, True, True, True),
    (False, True, False, True, True, False, True),    # the network alone (serial): threads as before
    (False, False, True, True, True, False, True),
])
def test_frame_loop_threads_rules(pipelined, launch_ahead, compressed, locates, prepare, decode, decodes_there):
    assert uses_prepare_thread(pipelined, SimpleNamespace(launch_ahead=launch_ahead)) is prepare
    assert uses_decode_thread(compressed, pipelined, prepare, locates=locates) is decode
    assert decodes_on_decode_thread(compressed, prepare) is decodes_there


@pytest.mark.parametrize("decode_thread, decode_on_thread", [(True, True), (True, False), (False, True)])
def test_frame_loop_decodes_on_its_own_thread_or_in_the_prepare_stage(decode_thread, decode_on_thread):
    """``decode_thread``: a ``frame_decode`` thread, or none and the prepare stage locates and decodes;
    ``decode_on_thread`` off, that thread only locates and the prepare stage decodes. Either way every frame is
    located, decoded, processed in order, and a bad one skipped by reason."""
    proc = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(use_fallback_pose=False))
    stats, processed, located, skips, decoded = FrameStats(), [], [], [], []
    decode = proc.decode_frame
    proc.decode_frame = lambda frame: decoded.append(threading.current_thread().name) or decode(frame)
    loop = FrameLoop(proc, stats, deliver=lambda frame, result: processed.append(frame.stamp_ns),
                     locate=lambda frame: located.append(threading.current_thread().name),
                     on_skip=lambda frame, reason, text: skips.append(reason), lossless=True,
                     decode_thread=decode_thread, decode_on_thread=decode_on_thread)
    names = {t.name for t in loop.runner._threads}
    assert ("frame_decode" in names) is decode_thread and {"frame_prepare", "frame_infer"} <= names
    for i in range(12):  # every other frame refused by the decode: more of them than buffer slots
        frame = _frame(stamp=STAMP + i)
        frame.cam_pose = frame.cam_pose if i % 2 else None
        loop.submit(frame)
    loop.close()
    assert processed == [STAMP + i for i in range(1, 12, 2)] and skips == ["missing_tf"] * 6
    assert set(located) == {"frame_decode" if decode_thread else "frame_prepare"} and len(located) == 12
    assert set(decoded) == {"frame_decode" if decode_thread and decode_on_thread else "frame_prepare"}
    assert len(decoded) == 12
    snap = stats.snapshot()
    assert snap["received"] == 12 and snap["processed"] == 6 and snap["dropped"] == 0


class WatchedBackend(BlockBackend):
    """BlockBackend that notes whether the frame loop's prepare stage ran while it inferred."""

    def __init__(self, watch: dict) -> None:
        super().__init__(delay_s=0.002)
        self.watch = watch

    def infer(self, inputs):
        with self.watch["lock"]:
            self.watch["clash"] += self.watch["preparing"]
            self.watch["network"] = True
        try:
            return super().infer(inputs)
        finally:
            self.watch["network"] = False


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_cpu_frame_loop_prepares_the_next_frame_beside_the_post_processing_not_the_network(pipelined):
    """The CPU's loop (``pipelined=False``): the pipeline tells the runner when the network is done, and the
    next frame is decoded and prepared while the previous one is post-processed and delivered (each
    delivery waits for that: a loop that kept one frame at a time fails here), never while the network
    runs. A pipelined loop gets no such call (``network_done`` None): it overlaps anyway."""
    watch = {"lock": threading.Lock(), "preparing": 0, "network": False, "clash": 0}
    pipeline = pipeline_for(WatchedBackend(watch))
    proc = FrameProcessor(pipeline, ProcessorSettings(use_fallback_pose=False))
    prepare_decoded = proc.prepare_decoded
    began: list[threading.Event] = [threading.Event() for _ in range(8)]
    overlapped: list[bool] = []

    def watched_prepare(decoded, slot):
        with watch["lock"]:
            watch["clash"] += watch["network"]
            watch["preparing"] += 1
        try:
            return prepare_decoded(decoded, slot)
        finally:
            with watch["lock"]:
                watch["preparing"] -= 1

    def deliver(frame, result):
        k = frame.stamp_ns - STAMP
        if k + 1 < len(began):
            overlapped.append(began[k + 1].wait(5))

    proc.prepare_decoded = watched_prepare
    loop = FrameLoop(proc, FrameStats(), deliver=deliver, lossless=True, pipelined=pipelined, decode_thread=False,
                     locate=lambda frame: began[frame.stamp_ns - STAMP].set())
    assert (loop.network_done is None) is pipelined
    for i in range(len(began)):
        loop.submit(_frame(stamp=STAMP + i))
    loop.close()
    assert overlapped == [True] * (len(began) - 1)
    assert pipelined or watch["clash"] == 0


@pytest.mark.full_startup_collection
def test_frame_loop_freezes_what_its_first_frame_made():
    """The first processed frame compiles and captures the network (torch.compile made 344k objects for
    lite): the loop then freezes everything alive out of the garbage collector, once; a refused frame
    before it does not count."""
    gc.unfreeze()
    proc = FrameProcessor(pipeline_for(BlockBackend()), ProcessorSettings(use_fallback_pose=False))
    loop = FrameLoop(proc, FrameStats(), deliver=lambda frame, result: None, lossless=True)
    refused = _frame(stamp=STAMP)
    refused.cam_pose = None
    loop.submit(refused)
    assert loop.wait_idle(timeout=10)
    assert not loop.warm and gc.get_freeze_count() == 0
    loop.submit(_frame(stamp=STAMP + 1))
    assert loop.wait_idle(timeout=10)
    frozen = gc.get_freeze_count()
    assert loop.warm and frozen > 10_000
    loop.submit(_frame(stamp=STAMP + 2))
    loop.close()
    assert gc.get_freeze_count() <= frozen  # not again: frozen objects only leave (freed), none are added


@pytest.mark.full_startup_collection
def test_start_up_garbage_is_collected_before_the_rest_is_frozen():
    """Cyclic garbage left by start-up (a model load's temporaries) is freed, not frozen for the node's life."""
    class Cycle:
        pass

    gc.unfreeze()
    gc.disable()  # no automatic collection (another thread's allocations) frees the cycle before the freeze does
    switch = sys.getswitchinterval()
    # nor does another thread (one an earlier test left) free a frozen object between the freeze and the count
    # read here: it takes the GIL only when this thread waits, and this thread does not wait until then
    sys.setswitchinterval(1000.0)
    try:
        garbage, alive = Cycle(), Cycle()
        garbage.me, alive.me = garbage, alive
        gone = weakref.ref(garbage)
        del garbage
        assert gone() is not None  # only the cyclic collector frees it
        frozen = freeze_startup_objects()
        count = gc.get_freeze_count()
    finally:
        sys.setswitchinterval(switch)
        gc.enable()
    assert gone() is None and frozen == count > 0
    assert not any(o is alive for o in gc.get_objects())  # frozen: out of what a full collection scans


@pytest.mark.parametrize("device, on_gpu", [("cpu fp32", False), ("CPUExecutionProvider", False),
                                            ("cuda:0 fp16", True), ("CUDAExecutionProvider", True),
                                            ("cuda (NVIDIA H200, TensorRT 10.0)", True)])
def test_frame_loop_mode_overlaps_frames_only_where_the_network_runs_on_a_gpu(device, on_gpu):
    """auto: pipelined on a GPU (the backends' ``device`` strings), one frame at a time on the CPU."""
    pipeline = SimpleNamespace(backend=SimpleNamespace(device=device))
    pipelined, why = frame_loop_mode("auto", pipeline)
    assert pipelined is on_gpu
    assert (device in why) if on_gpu else ("the CPU" in why)
    assert frame_loop_mode("on", pipeline) == (True, "pipelining on")
    assert frame_loop_mode("off", pipeline) == (False, "pipelining off")
    with pytest.raises(ValueError, match="auto, on or off"):
        frame_loop_mode("yes", pipeline)


@pytest.mark.parametrize("cores, pipelined, threads", [(2, False, 2), (16, False, 2), (1, False, 1), (2, True, 1),
                                                       (16, True, 1), (None, False, 1)])
def test_post_threads_for_raw_images_where_the_network_runs_alone(monkeypatch, cores, pipelined, threads):
    """The kernel's helper only where the network runs alone, a second core exists and the next frame's
    host work beside the kernel is a raw image's (a compressed one's decode takes that core)."""
    monkeypatch.setattr("discene_ros.processing.os.cpu_count", lambda: cores)
    assert post_threads_for(pipelined) == post_threads_for(pipelined, compressed=False) == threads
    assert post_threads_for(pipelined, compressed=True) == 1
