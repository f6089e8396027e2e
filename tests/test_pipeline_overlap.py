"""FrameRunner (newest frame wins or lossless, exact counters) and the torch frame path of OccupancyPipeline."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from test_ros_support import run_frames, wait_until

from export.backends.torch_backend import TorchBackend
from export.onnx_export import example_camera
from export.pipeline import FrameRunner, OccupancyPipeline
from models.postprocess import points_to_occupancy
from models.preprocess import preprocess


class Gate:
    """Stage callbacks that block until the test opens them, recording what they saw."""

    def __init__(self) -> None:
        self.prepare_gate = threading.Event()
        self.finish_gate = threading.Event()
        self.prepared: list[int] = []
        self.finished: list[int] = []
        self.slots_in_use: set[int] = set()
        self.slot_of: dict[int, int] = {}
        self.dropped: list[int] = []
        self.slot_clash = False
        self.lock = threading.Lock()
        self.in_prepare = threading.Semaphore(0)
        self.in_finish = threading.Semaphore(0)

    def prepare(self, item: int, slot: int) -> tuple[int, int]:
        self.in_prepare.release()
        assert self.prepare_gate.wait(5)
        if item < 0:
            raise ValueError("bad frame")
        with self.lock:
            self.slot_clash |= slot in self.slots_in_use
            self.slots_in_use.add(slot)
            self.slot_of[item] = slot
            self.prepared.append(item)
        return item, slot

    def drop(self, item: int) -> None:
        """on_drop: a prepared frame's slot is free again (one never prepared had none)."""
        with self.lock:
            self.dropped.append(item)
            if item in self.slot_of:
                self.slots_in_use.discard(self.slot_of[item])

    def finish(self, item: int, prepared: tuple[int, int]) -> None:
        self.in_finish.release()
        assert self.finish_gate.wait(5)
        with self.lock:
            self.finished.append(item)
            self.slots_in_use.discard(prepared[1])


def test_newest_frame_wins_and_the_dropped_counter_is_exact():
    g = Gate()
    errors = []
    runner = FrameRunner(g.prepare, g.finish, on_error=lambda item, exc: errors.append((item, str(exc))))
    g.prepare_gate.set()
    runner.submit(0)
    assert g.in_prepare.acquire(timeout=5)
    assert g.in_finish.acquire(timeout=5)        # frame 0 is in stage 2, held there
    g.prepare_gate.clear()
    runner.submit(1)
    assert g.in_prepare.acquire(timeout=5)       # frame 1 is in stage 1, held there
    assert runner.submit(2) is False             # waits for stage 1
    assert runner.submit(3) is True              # replaces 2 before stage 1 took it: dropped
    g.prepare_gate.set()                         # 1 -> ready; stage 1 takes 3 -> replaces ready 1: dropped
    assert g.in_prepare.acquire(timeout=5)
    runner.submit(-1)                            # a bad frame fails in stage 1, counted, reported
    g.finish_gate.set()
    assert runner.wait_idle(timeout=5)
    runner.submit(4)
    runner.close()
    counts = runner.counts()
    assert g.finished == [0, 3, 4]
    assert counts == {"submitted": 6, "processed": 3, "failed": 1, "dropped": 2}
    assert counts["submitted"] == counts["processed"] + counts["failed"] + counts["dropped"]
    assert errors == [(-1, "bad frame")]
    assert not g.slot_clash


def test_many_frames_every_one_accounted_for():
    done = []
    runner = FrameRunner(lambda item, slot: (item, slot), lambda item, prep: done.append(item))
    for i in range(500):
        runner.submit(i)
    runner.close()
    c = runner.counts()
    assert c["submitted"] == 500 == c["processed"] + c["dropped"] and c["failed"] == 0
    assert done == sorted(done) and done[-1] == 499  # in order, and the newest frame is never lost
    with pytest.raises(RuntimeError, match="closed"):
        runner.submit(0)


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("lossless", [False, True])
@pytest.mark.parametrize("with_decode", [False, True])
@pytest.mark.parametrize("ahead", [False, True, "no_prepare_thread"])
def test_every_mode_accounts_for_every_frame_under_random_delays_and_failures(lossless, with_decode, ahead, serial):
    """Random short delays and a failure now and then in every stage: each frame is processed, failed
    or dropped exactly once (``on_drop``/``on_error`` see each one once), frames finish in order, no two
    frames share a buffer slot, and a lossless runner drops nothing. Launched frames (``ahead``) take a
    random time on a pretend device, which the finish stage polls (``no_prepare_thread``: and prepares each
    frame itself); ``finish`` reports its network done half way (serial: the next frame's host work overlaps
    the rest)."""
    if ahead == "no_prepare_thread" and serial:
        pytest.skip("a serial runner keeps its prepare thread")
    rng_lock = threading.Lock()
    rng = np.random.default_rng(7)
    fails = {"decode": {11, 57}, "prepare": {23, 88}, "launch": {40}, "finish": {66}}
    seen: dict[str, list[int]] = {"finished": [], "failed": [], "dropped": []}
    in_use: dict[int, int] = {}
    clash = []

    def pause() -> None:
        with rng_lock:
            delay = float(rng.uniform(0, 0.0015))
        threading.Event().wait(delay)

    def stage(name: str, item: int) -> None:
        pause()
        if item in fails[name]:
            raise ValueError(f"{name} failed")

    def prepare(payload: int, slot: int) -> tuple[int, int]:
        stage("prepare", payload)
        with rng_lock:
            clash.extend([slot] if slot in in_use.values() else [])
            in_use[payload] = slot
        return payload, slot

    def release(item: int) -> None:
        with rng_lock:
            in_use.pop(item, None)

    def launch(item: int, prepared: tuple[int, int]) -> tuple[tuple[int, int], threading.Event]:
        stage("launch", item)
        done = threading.Event()
        with rng_lock:
            threading.Timer(float(rng.uniform(0, 0.002)), done.set).start()  # the device's work
        return prepared, done

    def finish(item: int, handle) -> None:
        if ahead:
            assert handle[1].wait(5)  # collecting waits for the device's work
        pause()
        runner.network_done()  # serial: the next frame's host work may start beside this one's
        release(item)
        stage("finish", item)
        seen["finished"].append(item)

    def on_error(item: int, exc: BaseException) -> None:
        release(item)
        seen["failed"].append(item)

    def on_drop(item: int) -> None:
        release(item)
        seen["dropped"].append(item)

    extra = {"launch": launch, "launched_done": lambda handle: handle[1].is_set()} if ahead else {}
    runner = FrameRunner(prepare, finish, on_error=on_error, on_drop=on_drop, slots=4, lossless=lossless,
                         decode=(lambda item: stage("decode", item) or item) if with_decode else None,
                         serial=serial, prepare_thread=ahead != "no_prepare_thread", **extra)
    try:
        for item in range(120):
            runner.submit(item)
            if item % 4 == 0:
                pause()
        assert runner.wait_idle(20)
    finally:
        runner.close()
    c = runner.counts()
    assert c == {"submitted": 120, "processed": len(seen["finished"]), "failed": len(seen["failed"]),
                 "dropped": len(seen["dropped"])}
    assert sorted(seen["finished"] + seen["failed"] + seen["dropped"]) == list(range(120))  # each exactly once
    assert seen["finished"] == sorted(seen["finished"]) and not clash
    expected_failures = fails["prepare"] | fails["finish"] | (fails["decode"] if with_decode else set()) | (
        fails["launch"] if ahead else set())
    assert set(seen["failed"]) <= expected_failures
    if lossless:
        assert c["dropped"] == 0 and set(seen["failed"]) == expected_failures


def test_on_drop_sees_every_dropped_frame_and_close_discard_drops_what_waits():
    g = Gate()
    dropped = g.dropped
    runner = FrameRunner(g.prepare, g.finish, on_drop=g.drop)
    g.prepare_gate.set()
    runner.submit(0)
    assert g.in_finish.acquire(timeout=5)        # 0 held in stage 2
    runner.submit(1)                             # 1 prepared, waiting for stage 2
    assert wait_until(lambda: g.prepared == [0, 1])
    runner.submit(2)                             # 2 prepared, replaces 1 at the stage-2 hand-off
    assert wait_until(lambda: dropped == [1])
    g.prepare_gate.clear()
    while g.in_prepare.acquire(timeout=0):      # forget the entries of 0, 1 and 2
        pass
    runner.submit(3)
    assert g.in_prepare.acquire(timeout=5)       # 3 held in stage 1 (0 in stage 2, 2 waiting)
    runner.submit(4)                             # waits for stage 1
    assert dropped == [1]
    closer = threading.Thread(target=runner.close, kwargs={"discard": True})
    closer.start()
    assert wait_until(lambda: sorted(dropped) == [1, 2, 4])  # the waiting frames, dropped at once
    g.prepare_gate.set()                         # 3 finishes stage 1 after close: dropped too
    g.finish_gate.set()                          # 0 (already in stage 2) is finished
    closer.join(5)
    assert not runner.alive() and g.finished == [0] and sorted(dropped) == [1, 2, 3, 4]
    counts = runner.counts()
    assert counts == {"submitted": 5, "processed": 1, "failed": 0, "dropped": 4}
    assert not g.slot_clash




def test_torch_frame_path_matches_the_numpy_path(lite_model, lite_config):
    """Device preprocessing + device post-processing give the labels of numpy preprocess + infer +
    post-processing; the input is at the network size so no resize tolerance enters."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)  # random weights: keep every point
    h, w = cfg.image_size
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    k, pose = example_camera(cfg)
    k = k.copy()
    k[:2] *= w / 640.0
    backend = TorchBackend(lite_model, cfg, device="cpu")
    pipe = OccupancyPipeline(backend)
    assert pipe.tensor_path and "device preprocessing" in pipe.describe()
    got = pipe.process(image, k, pose)
    ref_in = preprocess(image, k, pose, cfg)
    raw = backend.infer(ref_in)
    ref = points_to_occupancy(raw["points"], raw["scores"], ref_in.voxel_origin, cfg)
    assert len(ref.voxel_labels) > 50
    assert (got.labels == ref.labels).mean() > 0.999
    assert set(pipe.last_timings.as_dict()) == {"preprocess_ms", "infer_ms", "postprocess_ms", "total_ms"}


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_serial_loop_with_overlapped_host_work_gives_each_frame_its_own_result(lite_model, lite_config,
                                                                                 cuda_graph):
    """The real torch pipeline in the CPU loop (serial, ``network_done``): the next frame is preprocessed
    into its own buffer slot while this one is post-processed from the network's (static, with
    ``cuda_graph``) outputs, and every frame's occupancy is the one a lone ``process`` call gives."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)  # random weights: keep every point
    k, pose = example_camera(cfg)
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(6)]
    poses = [pose.copy() for _ in images]
    for i, p in enumerate(poses):  # each frame's grid somewhere else: an origin taken from another frame shows
        p[:3, 3] += [0.37 * i, -0.21 * i, 0.0]
    pipe = OccupancyPipeline(TorchBackend(lite_model, cfg, device="cpu", cuda_graph=cuda_graph))
    pipe.post_threads = 2
    got: dict[int, object] = {}
    runner: FrameRunner | None = None

    def finish(item: int, prepared) -> None:
        got[item] = pipe.complete(prepared, runner.network_done)

    runner = FrameRunner(lambda item, slot: pipe.prepare(images[item], k, poses[item], slot=slot), finish,
                         slots=pipe.slots, lossless=True, serial=True)
    run_frames(runner, len(images), timeout=60)
    assert sorted(got) == list(range(len(images)))
    for item, image in enumerate(images):
        alone = pipe.process(image, k, poses[item])
        assert np.array_equal(got[item].voxel_origin, alone.voxel_origin)
        assert np.array_equal(got[item].labels, alone.labels)
        assert np.array_equal(got[item].voxel_labels, alone.voxel_labels)
        assert np.array_equal(got[item].voxel_scores, alone.voxel_scores)
    assert not np.array_equal(got[0].labels, got[1].labels)  # the frames differ: a mix-up would show


def test_pre_and_post_processing_run_on_host_threads_without_touching_other_threads(lite_model, lite_config,
                                                                                      monkeypatch):
    """The pipeline's CPU-side torch work runs with ``host_threads`` intra-op threads for its own thread
    only: a thread that is inferring meanwhile keeps torch's count, and so does the caller afterwards."""
    import export.pipeline as pipeline_mod
    from export.host_threads import _openmp, intra_op_threads

    if _openmp() is None:
        pytest.skip("torch's intra-op backend is not OpenMP")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: dict[str, int] = {}
        other_ready, release = threading.Event(), threading.Event()

        def other() -> None:  # e.g. the inference stage: started before, busy during the block
            torch.get_num_threads()
            other_ready.set()
            release.wait(5)
            seen["other"] = torch.get_num_threads()

        thread = threading.Thread(target=other)
        thread.start()
        assert other_ready.wait(5)
        with intra_op_threads(1):
            seen["inside"] = torch.get_num_threads()
            release.set()
            thread.join(5)
        seen["after"] = torch.get_num_threads()
        assert seen == {"inside": 1, "other": 2, "after": 2}

        real = pipeline_mod.points_to_occupancy

        def spy(*args, **kwargs):
            seen["post"] = torch.get_num_threads()
            return real(*args, **kwargs)

        monkeypatch.setattr(pipeline_mod, "points_to_occupancy", spy)
        cfg = dataclasses.replace(lite_config, score_threshold=0.0)
        k, pose = example_camera(cfg)
        pipe = OccupancyPipeline(TorchBackend(lite_model, cfg, device="cpu"))
        image = np.zeros((*cfg.image_size, 3), np.uint8)
        pipe.process(image, k, pose)
        assert seen["post"] == 1 and torch.get_num_threads() == 2
        OccupancyPipeline(TorchBackend(lite_model, cfg, device="cpu"), host_threads=None).process(image, k, pose)
        assert seen["post"] == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("ahead", [False, True, "no_prepare_thread"])
@pytest.mark.parametrize("with_decode", [False, True])
def test_a_lossless_runner_drops_no_frame_and_overlaps_its_stages(ahead, with_decode):
    """A feeder faster than every stage, the stages slow, the finish stage slower (then the prepare stage
    slower, half way): every frame is processed, in order, none dropped; for every frame k the prepare
    stage begins frame k + 1 before finish(k) has ended, and the decode stage begins frame k + 1 before
    prepare(k) has ended (each callback waits for that, so a runner that serialises them fails here)."""
    n = 40
    finished: list[int] = []
    prepare_began = [threading.Event() for _ in range(n)]
    decode_began = [threading.Event() for _ in range(n)]
    overlapped = {"prepare": [], "decode": []}  # per frame k: the next stage-start came before k's end

    def wait_for(began: list[threading.Event], item: int, kind: str) -> None:
        if item + 1 < n and all(overlapped[kind]):  # after a first miss, no more waiting
            overlapped[kind].append(began[item + 1].wait(2))

    def decode(item: int) -> int:
        decode_began[item].set()
        threading.Event().wait(0.002)
        return item

    def prepare(item: int, slot: int) -> int:
        prepare_began[item].set()
        if with_decode:
            wait_for(decode_began, item, "decode")
        threading.Event().wait(0.005 if item >= 20 else 0.003)
        return item

    def finish(item: int, prepared: int) -> None:
        wait_for(prepare_began, item, "prepare")
        threading.Event().wait(0.001 if item >= 20 else 0.008)
        finished.append(item)

    extra = {"launch": lambda item, prepared: prepared} if ahead else {}
    runner = FrameRunner(prepare, finish, slots=4, lossless=True, decode=decode if with_decode else None,
                         prepare_thread=ahead != "no_prepare_thread", **extra)
    counts = run_frames(runner, n, timeout=10)  # each submit waits while the first stage has not taken the last
    assert counts == {"submitted": n, "processed": n, "failed": 0, "dropped": 0}
    assert finished == list(range(n))
    assert len(overlapped["prepare"]) == n - 1 and all(overlapped["prepare"])
    assert overlapped["decode"] == ([True] * (n - 1) if with_decode else [])


@pytest.mark.parametrize("lossless", [False, True])
@pytest.mark.parametrize("with_decode", [False, True])
def test_a_serial_runner_never_has_two_frames_in_its_stages(lossless, with_decode):
    """``serial``: at no moment do two stage callbacks run (one frame in the loop at a time); every frame
    is still accounted for, a lossless one drops none, and a live one always ends with the newest frame."""
    lock = threading.Lock()
    active, peak, finished = [0], [0], []

    def busy(item: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threading.Event().wait(0.001)
        with lock:
            active[0] -= 1
        return item

    def finish(item: int, prepared: int) -> None:
        busy(item)
        finished.append(item)

    runner = FrameRunner(lambda item, slot: busy(item), finish, slots=3, lossless=lossless, serial=True,
                         decode=busy if with_decode else None)
    c = run_frames(runner, 60, pause_s=0.0005)
    assert peak[0] == 1
    assert c["submitted"] == 60 == c["processed"] + c["dropped"] and c["failed"] == 0
    assert finished == sorted(finished) and finished[-1] == 59
    assert c["dropped"] == 0 if lossless else c["dropped"] > 0


@pytest.mark.parametrize("lossless", [False, True])
@pytest.mark.parametrize("with_decode", [False, True])
def test_a_serial_runner_keeps_the_network_alone_and_overlaps_the_host_work_after_it(lossless, with_decode):
    """``serial`` with ``network_done``: no other stage works while a frame is in the network (before its
    ``network_done``), and after it the stages before take the next frame: finish(k) waits until the
    first stage has begun frame k + 1 (lossless: each frame; live: whichever frame is newest), so a
    runner that kept one frame in the loop at a time fails here. Every frame is still accounted for."""
    n = 30
    lock = threading.Lock()
    active = {"upstream": 0, "network": 0}
    clashes: list[str] = []
    began: list[threading.Event] = [threading.Event() for _ in range(n)]
    overlapped: list[bool] = []
    finished: list[int] = []
    runner: FrameRunner | None = None

    def enter(kind: str) -> None:
        with lock:
            other = "network" if kind == "upstream" else "upstream"
            clashes.extend([kind] if active[other] else [])
            active[kind] += 1
        threading.Event().wait(0.001)
        with lock:
            active[kind] -= 1

    def upstream(item: int) -> int:
        began[item].set()
        enter("upstream")
        return item

    def finish(item: int, prepared: int) -> None:
        enter("network")
        runner.network_done()
        if item + 1 < n and all(overlapped):  # the next frame's host work starts beside this one's
            overlapped.append(began[item + 1].wait(5) if lossless
                              else wait_until(lambda: any(b.is_set() for b in began[item + 1:]), timeout=5))
        threading.Event().wait(0.001)
        finished.append(item)

    runner = FrameRunner(lambda item, slot: upstream(item) if not with_decode else item, finish, slots=3,
                         lossless=lossless, serial=True, decode=upstream if with_decode else None)
    c = run_frames(runner, n, pause_s=0.0005)
    assert not clashes and overlapped and all(overlapped)
    assert c["submitted"] == n == c["processed"] + c["dropped"] and c["failed"] == 0
    assert finished == sorted(finished) and finished[-1] == n - 1
    if lossless:
        assert c["dropped"] == 0


def test_with_a_decode_stage_the_newest_frame_wins_at_every_hand_off():
    """Decode, prepare and finish on three threads: a frame waiting at the decoded hand-off and one
    waiting at the prepared hand-off are each replaced by the newer one and counted; a frame that fails
    to decode is counted as failed and reported with the submitted item."""
    g = Gate()
    decode_gate = threading.Event()
    decoded: list[int] = []
    errors = []

    def decode(item: int) -> int:
        assert decode_gate.wait(5)
        if item == -2:
            raise ValueError("corrupt JPEG")
        decoded.append(item)
        return item

    runner = FrameRunner(g.prepare, g.finish, on_error=lambda item, exc: errors.append((item, str(exc))),
                         on_drop=g.drop, decode=decode)
    assert {t.name for t in runner._threads} == {"frame_decode", "frame_prepare", "frame_infer"}
    decode_gate.set()
    g.prepare_gate.set()
    runner.submit(0)
    assert g.in_finish.acquire(timeout=5)        # 0 held in the finish stage
    g.prepare_gate.clear()
    runner.submit(1)
    assert g.in_prepare.acquire(timeout=5)       # (0's entry)
    assert g.in_prepare.acquire(timeout=5)       # 1 held in the prepare stage
    runner.submit(2)
    assert wait_until(lambda: decoded == [0, 1, 2])  # 2 decoded, waiting for the prepare stage
    runner.submit(3)
    assert wait_until(lambda: g.dropped == [2])  # 3 decoded: replaces 2 there
    g.prepare_gate.set()                         # 1 -> ready; 3 prepared -> replaces 1 at the next hand-off
    assert wait_until(lambda: g.dropped == [2, 1])
    runner.submit(-2)                            # fails in the decode stage
    assert wait_until(lambda: len(errors) == 1)
    g.finish_gate.set()
    assert runner.wait_idle(timeout=5)
    runner.close()
    assert g.finished == [0, 3] and errors == [(-2, "corrupt JPEG")]
    assert runner.counts() == {"submitted": 5, "processed": 2, "failed": 1, "dropped": 2}
    assert not g.slot_clash


def test_close_waits_one_deadline_for_all_threads_and_names_those_still_running():
    """Three stage threads, the decode and finish stages stuck (and the prepare stage waiting for the decode
    stage's frame): close's timeout is one deadline for all of them (each thread joined for what is left of
    it; before, each for the whole timeout: three times it), and ``running_threads`` names those still running."""
    g = Gate()
    g.prepare_gate.set()
    decode_gate = threading.Event()
    runner = FrameRunner(g.prepare, g.finish, on_drop=g.drop,
                         decode=lambda item: item if item == 0 else decode_gate.wait(5) and item)
    runner.submit(0)
    assert g.in_finish.acquire(timeout=5)        # 0 held in the finish stage
    runner.submit(1)                             # 1 held in the decode stage
    assert wait_until(lambda: runner.counts()["submitted"] == 2 and runner._busy[0])
    asked: list[float] = []
    for thread in runner._threads:
        thread.join = lambda timeout=None, join=thread.join: (asked.append(timeout), join(timeout))[1]
    assert runner.close(timeout=0.2, discard=True) is False
    assert len(asked) == 3 and sum(asked) <= 0.2
    assert runner.running_threads() == ["frame_decode", "frame_prepare", "frame_infer"]
    decode_gate.set()
    g.finish_gate.set()
    assert runner.close(timeout=5) is True and runner.running_threads() == []


def test_a_lossless_runner_closed_with_discard_drops_what_waits_and_refuses_a_blocked_submit():
    """Lossless, finish stage held: one frame waits for it, the next one waits for the decode stage (which
    takes no frame while one waits after it), and a feeder blocks in ``submit``; ``close(discard=True)``
    drops the two waiting frames, the blocked submit raises, and the frame in the finish stage is finished."""
    g = Gate()
    g.prepare_gate.set()
    decoded: list[int] = []
    runner = FrameRunner(g.prepare, g.finish, on_drop=g.drop, decode=lambda item: decoded.append(item) or item,
                         lossless=True)
    for item in range(3):                        # 0 in finish, 1 prepared, 2 submitted
        runner.submit(item)
    assert g.in_finish.acquire(timeout=5)
    assert wait_until(lambda: g.prepared == [0, 1])
    blocked: list[BaseException] = []

    def feeder() -> None:
        try:
            runner.submit(3)
        except RuntimeError as exc:
            blocked.append(exc)

    thread = threading.Thread(target=feeder)
    thread.start()
    assert not wait_until(lambda: not thread.is_alive(), timeout=0.2)  # no room: submit waits
    assert decoded == [0, 1]                     # 2 is not decoded while 1 waits for the finish stage
    closer = threading.Thread(target=runner.close, kwargs={"discard": True})
    closer.start()
    assert wait_until(lambda: sorted(g.dropped) == [1, 2])
    thread.join(5)
    assert len(blocked) == 1 and "closed" in str(blocked[0])
    g.finish_gate.set()
    closer.join(5)
    assert not runner.alive() and g.finished == [0] and g.prepared == [0, 1] and decoded == [0, 1]
    assert runner.counts() == {"submitted": 3, "processed": 1, "failed": 0, "dropped": 2}


def test_a_frame_loop_frees_the_openmp_workers_of_the_thread_that_built_it():
    """The thread that starts a FrameRunner (the one that loaded the model) gives up its OpenMP
    worker threads, so the frame loop's inference does not share the cores with an idle pool (with
    more pool threads than cores every pool sleeps in the kernel between the ops of a forward)."""
    import os

    from export.host_threads import _openmp, release_openmp_team

    lib = _openmp()
    if lib is None or not hasattr(lib, "omp_pause_resource_all"):
        pytest.skip("torch's intra-op backend is not OpenMP with omp_pause_resource_all")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts the process's threads in /proc (Linux)")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def threads() -> set[str]:
            return set(os.listdir("/proc/self/task"))

        release_openmp_team()  # start without a pool of this thread's
        bare = threads()
        torch.relu(torch.ones(1_000_000))  # a parallel op: this thread now owns a worker thread
        workers = threads() - bare
        assert workers  # the pool's worker thread(s)
        runner = FrameRunner(lambda item, slot: item, lambda item, prepared: None)
        try:
            assert wait_until(lambda: not workers & threads(), timeout=5)  # the workers left
        finally:
            runner.close()
    finally:
        torch.set_num_threads(before)
