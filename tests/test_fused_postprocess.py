"""The fused frame path: ``dense_occupancy`` (post-processing with fixed shapes, captured in the network's
CUDA graph) against ``occupied_voxels``, OccupancyPipeline launch/collect, and the runner's launch-ahead."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import threading
import types

import numpy as np
import pytest
import torch
from test_ros_support import run_frames, wait_until

from export.backends.torch_backend import TorchBackend
from export.onnx_export import example_camera
from export.pipeline import LAUNCH_AHEAD_SLOTS, FrameRunner, OccupancyPipeline, Prepared
from models import build_model
from models.postprocess import dense_occupancy, frame_from_dense, labels_batch, points_to_occupancy
from models.preprocess import FrameTensors, StagedFrame, TensorPreprocessor

ORIGIN = np.array([1.0, -2.0, 0.5])


def _query_sets(seed: int, config, b: int = 1, q: int = 120, r: int = 16, spread: float = 0.03):
    """Clustered query point sets with skewed class scores; some points fall outside the grid."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(b, q, 1, 3, generator=g) * 1.1 - 0.05
    points = centers + torch.randn(b, q, r, 3, generator=g) * spread
    scores = torch.rand(b, q, r, config.num_classes, generator=g) ** 3
    return points, scores


@pytest.mark.parametrize("closing", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_occupancy_equals_the_sparse_post_processing(lite_config, closing, threshold, seed):
    """Same labels, same best scores (bit for bit on the CPU: the same sums in the same order), same
    voxels; also with every point dropped (threshold 1.0) and points outside the grid."""
    cfg = dataclasses.replace(lite_config, closing=closing, score_threshold=threshold)
    points, scores = _query_sets(seed, cfg)
    ref = points_to_occupancy(points, scores, ORIGIN, cfg)
    labels, best = dense_occupancy(points, scores, cfg)
    assert labels.dtype == torch.uint8 and labels.shape == (1, *cfg.grid_shape) and best.shape == labels.shape
    got = frame_from_dense(labels[0].numpy(), best[0].numpy(), ORIGIN, cfg)
    assert np.array_equal(got.labels, ref.labels)
    assert np.array_equal(got.voxel_indices, ref.voxel_indices)
    assert np.array_equal(got.voxel_labels, ref.voxel_labels)
    assert np.array_equal(got.voxel_scores, ref.voxel_scores)
    assert np.array_equal(got.voxel_origin, ref.voxel_origin) and got.voxel_size == ref.voxel_size
    labels.fill_(7)  # the pipeline reuses its host grids for later frames: the frame must own its copy
    assert np.array_equal(got.labels, ref.labels)
    if threshold < 1.0:
        assert len(ref.voxel_labels) > 100
    else:
        assert len(got.voxel_labels) == 0 and not best.any()


def test_dense_occupancy_batches_like_the_batch_variant(lite_config):
    points, scores = _query_sets(5, lite_config, b=3)
    labels, _ = dense_occupancy(points, scores, lite_config)
    assert torch.equal(labels.long(), labels_batch(points, scores, lite_config))


def _frame(config, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    k, pose = example_camera(config)
    return image, k, pose


def _sized_frame(config, seed: int, h: int, w: int):
    """``_frame`` cropped to (h, w), K scaled with it (a 640-wide camera seen at width w)."""
    image, k, pose = _frame(config, seed)
    k = k.copy()
    k[:2] *= w / 640
    return np.ascontiguousarray(image[:h, :w]), k, pose


def _same_frames(ref, got, exact: bool) -> None:
    if exact:
        assert np.array_equal(ref.labels, got.labels) and np.array_equal(ref.voxel_scores, got.voxel_scores)
    else:  # CUDA: index_add_ sums with atomics in any order, so a voxel at a tie may flip
        assert (ref.labels == got.labels).mean() > 0.999


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the captured graph)"))])
def test_fused_pipeline_gives_the_frames_of_the_plain_path(lite_model, lite_config, device):
    """launch/collect (forced on the CPU) = complete of the plain static path, frame by frame, with two
    frames launched before either is collected (the pinned result ring), and a changed post-processing
    setting takes effect (its own fused function, so its own captured graph on CUDA)."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    model = lite_model if device == "cpu" else copy.deepcopy(lite_model)  # the backend moves it to CUDA
    backend = TorchBackend(model, cfg, device=device, cuda_graph=True)
    plain = OccupancyPipeline(backend, dataclasses.replace(cfg), fuse=False)
    fused = OccupancyPipeline(backend, cfg, fuse=True)
    assert not plain.fused and fused.fused and fused.launch_ahead and fused.slots == LAUNCH_AHEAD_SLOTS
    frames = [_frame(cfg, s) for s in (0, 1)]
    refs = [plain.complete(plain.prepare(*f, slot=i)) for i, f in enumerate(frames)]
    launched = [fused.launch(fused.prepare(*f, slot=i)) for i, f in enumerate(frames)]
    if device == "cpu":
        assert all(fused.launched_done(x) for x in launched)
    gots = [fused.collect(x) for x in launched]
    for ref, got in zip(refs, gots, strict=True):
        assert len(ref.voxel_labels) > 50
        _same_frames(ref, got, exact=device == "cpu")
    t = fused.last_timings
    assert t.infer_ms > 0 and t.postprocess_ms > 0 and t.total_ms >= t.postprocess_ms
    fused.config.score_threshold = plain.config.score_threshold = 0.45  # e.g. tune_postprocess
    ref = plain.complete(plain.prepare(*frames[0]))
    got = fused.complete(fused.prepare(*frames[0]))
    _same_frames(ref, got, exact=device == "cpu")
    assert len(got.voxel_labels) < len(gots[0].voxel_labels)
    assert len(backend._fused) == 2


@pytest.mark.parametrize("use_depth", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the captured graphs)"))])
def test_fused_prepare_stays_on_the_host_and_launch_fills_the_network_inputs(lite_config, device, use_depth,
                                                                             monkeypatch):
    """Fused: ``prepare`` only stages the frame (no device tensors, no event to wait for); ``launch`` writes
    the preprocessed frame straight into the network graph's static inputs (the network gets those very
    tensors, so nothing is copied), where the plain preprocessor's result is found, for several frames
    and slots in turn. Without frame graphs, so that the network graph is replayed on its own."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0, use_depth=use_depth)
    torch.manual_seed(0)
    backend = TorchBackend(build_model(cfg).eval(), cfg, device=device, cuda_graph=True)
    fused = OccupancyPipeline(backend, cfg, fuse=True, frame_graphs=False)
    given_static = []
    run_fused = backend.run_fused

    def spy(inputs, post):
        static = backend.fused_inputs(post)
        given_static.append(all(getattr(inputs, n).data_ptr() == t.data_ptr() for n, t in static.items()))
        return run_fused(inputs, post)

    monkeypatch.setattr(backend, "run_fused", spy)
    plain = TensorPreprocessor(cfg, device, graphs=False)
    rng = np.random.default_rng(3)
    for i in range(LAUNCH_AHEAD_SLOTS + 1):
        image, k, pose = _frame(cfg, 10 + i)
        view = image[..., ::-1] if i % 2 else image  # a bgr8 message seen as RGB, then RGB bytes
        depth = rng.uniform(0.3, 6.0, (240, 320)).astype(np.float32) if use_depth else None
        prepared = fused.prepare(view, k, pose, depth=depth, slot=i % LAUNCH_AHEAD_SLOTS)
        assert isinstance(prepared.inputs, StagedFrame) and prepared.ready is None
        launched = fused.launch(prepared)
        static = backend.fused_inputs(fused._post_fn())
        assert fused._fused_targets(fused._post_fn()).image is static["image"]
        ref = plain(view, k, pose, depth=depth)
        if device == "cuda":
            torch.cuda.synchronize()
        tol = {} if device == "cpu" else {"atol": 1e-4, "rtol": 0}  # CUDA: float resize, graph vs eager order
        torch.testing.assert_close(static["image"], ref.image, **tol)
        torch.testing.assert_close(static["grid2img"], ref.grid2img, atol=0, rtol=0)
        if use_depth:
            torch.testing.assert_close(static["depth"], ref.depth, atol=0, rtol=0)
        fused.collect(launched)
    assert given_static == [True] * (LAUNCH_AHEAD_SLOTS + 1)
    assert len(backend._fused) == 1 and len(next(iter(backend._fused.values())).entries) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (captures on one thread, staging on another)")
def test_fused_cuda_loop_survives_input_size_changes(lite_config):
    """The pipelined fused loop on CUDA (launch-ahead, lossless) through input size changes, as
    a bgr8 row then a half-size JPEG row of the benchmark: the prepare thread restages slots while the
    finish thread captures graphs for the new size. Every frame is processed and matches the plain path."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    torch.manual_seed(0)
    backend = TorchBackend(build_model(cfg).eval(), cfg, device="cuda", cuda_graph=True)
    fused, plain = OccupancyPipeline(backend, cfg, fuse=True), OccupancyPipeline(backend, dataclasses.replace(cfg),
                                                                                  fuse=False)
    frames = []
    for i, (h, w) in enumerate([(480, 640)] * 10 + [(240, 320)] * 10 + [(480, 640)] * 6):
        image, k, pose = _sized_frame(cfg, 30 + i, h, w)
        frames.append((image[..., ::-1] if h == 480 else image, k, pose))  # bgr8 views, then RGB
    results, errors = {}, []
    runner = FrameRunner(lambda i, slot: fused.prepare(*frames[i], slot=slot),
                         lambda i, launched: results.__setitem__(i, fused.collect(launched)),
                         on_error=lambda i, exc: errors.append(exc), slots=fused.slots,
                         launch=lambda i, prepared: fused.launch(prepared), launched_done=fused.launched_done,
                         lossless=True)
    run_frames(runner, len(frames), timeout=60)
    assert not errors and sorted(results) == list(range(len(frames)))
    for i, f in enumerate(frames):
        _same_frames(plain.complete(plain.prepare(*f)), results[i], exact=False)


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: each replay runs the captured body again."""

    def __init__(self, body) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


def _frame_graph_frames(cfg, use_depth: bool):
    """Two rounds of the slots at 640x480 (bgr8 views, then RGB), then slot 0 at 320x240: its staging is
    reallocated, so its frame graph is captured again."""
    rng = np.random.default_rng(4)
    frames = []
    for i, (h, w) in enumerate([(480, 640)] * (2 * LAUNCH_AHEAD_SLOTS) + [(240, 320)]):
        image, k, pose = _sized_frame(cfg, 50 + i, h, w)
        depth = rng.uniform(0.3, 6.0, (h // 2, w // 2)).astype(np.float32) if use_depth else None
        frames.append(((image[..., ::-1] if i % 2 else image), k, pose, depth))
    return frames


@pytest.mark.parametrize("use_depth", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the captured graphs)"))])
def test_frame_graph_per_slot_gives_the_frames_of_the_two_graph_path(lite_config, device, use_depth, monkeypatch):
    """With frame graphs ``launch`` replays one graph per slot (upload, preprocessing, network, post-processing,
    copies back), captured at the slot's first frame and again after its input size changed, and never runs
    the network's own graph; its frames equal those of the two-graph path. On the CPU the capture is stood in
    for by a graph that runs its body eagerly at each replay."""
    preprocess = importlib.import_module("models.preprocess")  # the module (``models.preprocess`` is a function)
    cfg = dataclasses.replace(lite_config, score_threshold=0.0, use_depth=use_depth)
    torch.manual_seed(0)
    backend = TorchBackend(build_model(cfg).eval(), cfg, device=device, cuda_graph=True)
    graphed = OccupancyPipeline(backend, cfg, fuse=True)
    two = OccupancyPipeline(backend, dataclasses.replace(cfg), fuse=True, frame_graphs=False)
    assert not two.preprocessor.frame_graphs
    assert graphed.preprocessor.frame_graphs == (device == "cuda")  # on by default where graphs are
    captured, real_capture = [], preprocess.capture_graph

    def capture(body, dev, pool=None):
        captured.append(pool)
        return real_capture(body, dev, pool) if device == "cuda" else _EagerGraph(body)

    monkeypatch.setattr(preprocess, "capture_graph", capture)
    graphed.preprocessor.frame_graphs = True
    network_replays = []
    run_fused = backend.run_fused
    monkeypatch.setattr(backend, "run_fused", lambda inputs, post: network_replays.append(post) or run_fused(inputs, post))
    for i, (image, k, pose, depth) in enumerate(_frame_graph_frames(cfg, use_depth)):
        slot = i % LAUNCH_AHEAD_SLOTS
        ref = two.complete(two.prepare(image, k, pose, depth=depth, slot=slot))
        got = graphed.complete(graphed.prepare(image, k, pose, depth=depth, slot=slot))
        assert len(ref.voxel_labels) > 50
        _same_frames(ref, got, exact=device == "cpu")
        assert graphed.last_timings.infer_ms > 0
    # on CUDA the frame graphs go into the network graph's pool, the two-graph path's preprocessing graphs not
    frame_pools = [p for p in captured if device == "cpu" or p is not None]
    assert len(frame_pools) == LAUNCH_AHEAD_SLOTS + 1  # one per slot, and slot 0's again at the new size
    assert set(frame_pools) == {backend.fused_pool(graphed._post_fn())}
    assert set(network_replays) == {two._post_fn()}  # the graphed pipeline never replays the network alone


def test_frame_graph_capture_failure_falls_back_to_two_graphs(lite_model, lite_config, monkeypatch, caplog):
    """A frame graph that cannot be captured is logged once and ``launch`` goes on with the two-graph path,
    with the same frames."""
    preprocess = importlib.import_module("models.preprocess")  # the module (``models.preprocess`` is a function)
    def refuse(body, dev, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(preprocess, "capture_graph", refuse)
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    backend = TorchBackend(lite_model, cfg, device="cpu", cuda_graph=True)
    graphed, two = OccupancyPipeline(backend, cfg, fuse=True), OccupancyPipeline(backend, cfg, fuse=True,
                                                                                  frame_graphs=False)
    graphed.preprocessor.frame_graphs = True
    with caplog.at_level("WARNING", logger="models.preprocess"):
        for i in range(3):
            frame = _frame(cfg, 70 + i)
            _same_frames(two.complete(two.prepare(*frame, slot=i)), graphed.complete(graphed.prepare(*frame, slot=i)),
                         exact=True)
    assert not graphed.preprocessor.frame_graphs
    (record,) = [r for r in caplog.records if "frame graph" in r.getMessage()]
    assert "capture failed" in record.getMessage() and "two graphs" in record.getMessage()


def test_result_sets_wait_for_their_copy_on_a_sleeping_event(monkeypatch):
    """On CUDA the results' copy-done event is blocking (its wait sleeps: a spinning one cost a core per frame
    on H200, session 23) and the two timing events time; checked with torch's CUDA calls stood in for."""
    made = []

    class Event:
        def __init__(self, enable_timing=False, blocking=False, interprocess=False):
            made.append((enable_timing, blocking))

    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    pipe = object.__new__(OccupancyPipeline)
    pipe._results, pipe.device_cloud = [], None
    pipe.slots = LAUNCH_AHEAD_SLOTS
    pipe.backend = type("B", (), {"torch_device": torch.device("cuda")})()
    pipe.config = type("C", (), {"grid_shape": (4, 4, 2)})()
    sets = pipe._result_sets()  # one per slot; the copy-done event times too: the frame graph's end
    assert len(sets) == LAUNCH_AHEAD_SLOTS and made == [(True, False), (True, False), (True, True)] * LAUNCH_AHEAD_SLOTS
    assert sets[0].labels.shape == (1, 4, 4, 2) and sets[0].best.dtype == torch.float32


def test_unfused_cuda_path_waits_for_the_network_on_a_sleeping_event(monkeypatch, lite_config):
    """Without the fused graph (``cuda_graph: false``, compile without graphs) the finish stage waits for the
    network on a blocking event recorded on the inference stream, not with ``torch.cuda.synchronize`` (which
    spins a core and also waits for the next frame's upload); checked with torch's CUDA calls stood in for."""
    calls = []

    class Event:
        def __init__(self, enable_timing=False, blocking=False, interprocess=False):
            self.blocking = blocking

        def record(self, stream=None):
            calls.append(("record", stream, self.blocking))

        def synchronize(self):
            calls.append(("wait", self.blocking))

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            calls.append(("stream waits", event))

    cuda = torch.device("cuda")
    points, scores = torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)

    class Backend(TorchBackend):  # what the pipeline asks of the torch backend on CUDA, without a model
        def __init__(self, config):
            self.config, self.torch_device = config, cuda

        can_fuse = False

        def run(self, inputs):
            calls.append(("run", inputs))
            return points, scores

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    inference_stream = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: inference_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("device sync",)))
    monkeypatch.setattr("export.pipeline.TensorPreprocessor", lambda *a, **k: types.SimpleNamespace(frame_graphs=True))
    monkeypatch.setattr("export.pipeline.points_to_occupancy", lambda p, s, origin, config, threads=1: ("frame", p, s))
    pipe = OccupancyPipeline(Backend(lite_config))
    assert not pipe.fused and pipe.upload_stream is not None
    ready = Event()
    frame = pipe.complete(Prepared(FrameTensors(None, None, None, np.zeros(3)), 1.0, ready))
    assert frame == ("frame", points, scores)
    assert calls == [("stream waits", ready), ("run", calls[1][1]), ("record", inference_stream, True),
                     ("wait", True)]
    assert pipe.last_timings.preprocess_ms == 1.0


def test_run_fused_needs_the_static_mode(lite_model, lite_config):
    backend = TorchBackend(lite_model, lite_config, device="cpu")
    assert not backend.can_fuse and not OccupancyPipeline(backend, fuse=True).fused
    with pytest.raises(RuntimeError, match="static-buffer"):
        backend.run_fused(None, lambda p, s: (p, s))


class Device:
    """Launch/finish callbacks around a pretend device: a launched frame's work is 'running' until the
    test completes it, so the test decides when launch-ahead may happen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int]] = []
        self.running: dict[int, threading.Event] = {}
        self.slots: dict[int, int] = {}
        self.clash = False

    def prepare(self, item: int, slot: int) -> int:
        with self.lock:
            self.clash |= slot in self.slots.values()
            self.slots[item] = slot
        return item

    def launch(self, item: int, prepared: int) -> int:
        if item < 0:
            raise ValueError("bad frame")
        with self.lock:
            self.running[item] = threading.Event()
            self.events.append(("launch", item))
        return item

    def release(self, item: int) -> None:
        """A frame that ended without finishing (dropped, or its launch failed): its slot is free again."""
        with self.lock:
            self.slots.pop(item, None)

    def done(self, handle: int) -> bool:
        return self.running[handle].is_set()

    def finish(self, item: int, handle: int) -> None:
        assert self.running[handle].wait(5)
        with self.lock:
            self.events.append(("finish", item))
            del self.slots[item]
        if item == 13:
            raise RuntimeError("publishing failed")

    def complete(self, item: int) -> None:
        wait_until(lambda: item in self.running)
        self.running[item].set()


def test_launch_ahead_queues_the_next_frame_behind_a_running_one():
    dev = Device()
    runner = FrameRunner(dev.prepare, dev.finish, slots=LAUNCH_AHEAD_SLOTS, launch=dev.launch,
                         launched_done=dev.done)
    try:
        runner.submit(1)
        wait_until(lambda: ("launch", 1) in dev.events)
        runner.submit(2)  # frame 1 still on the device: 2 is launched behind it before 1 is finished
        wait_until(lambda: ("launch", 2) in dev.events)
        assert dev.events == [("launch", 1), ("launch", 2)]
        dev.complete(1)
        wait_until(lambda: ("finish", 1) in dev.events)
        dev.complete(2)  # nothing waits: 2 is finished as soon as its work is done, not held for a newer one
        assert runner.wait_idle(5)
        assert dev.events == [("launch", 1), ("launch", 2), ("finish", 1), ("finish", 2)]
        assert runner.counts() == {"submitted": 2, "processed": 2, "failed": 0, "dropped": 0}
    finally:
        runner.close()


def test_launch_ahead_counts_every_frame_and_keeps_order():
    dev = Device()
    errors: list[int] = []
    runner = FrameRunner(dev.prepare, dev.finish, slots=LAUNCH_AHEAD_SLOTS, launch=dev.launch,
                         launched_done=dev.done, on_drop=dev.release,
                         on_error=lambda item, exc: (errors.append(item), dev.release(item)))
    stop = threading.Event()

    def device_loop() -> None:  # completes launched work in launch order, like one CUDA stream
        n = 0
        while not stop.is_set():
            with dev.lock:
                launched = [i for kind, i in dev.events if kind == "launch"]
            for item in launched[n:]:
                dev.running[item].set()
            n = len(launched)
            stop.wait(0.0005)

    worker = threading.Thread(target=device_loop, daemon=True)
    worker.start()
    items = [*range(1, 40), -1, *range(40, 60)]  # -1: launch fails; 13: finish fails
    try:
        for item in items:
            runner.submit(item)
            if item % 3 == 0 or item in (-1, 13):  # the others may be replaced by the next one (dropped)
                assert runner.wait_idle(5)
        assert runner.wait_idle(10)
    finally:
        stop.set()
        runner.close()
        worker.join(5)
    c = runner.counts()
    assert c["submitted"] == len(items) == c["processed"] + c["failed"] + c["dropped"]
    assert c["failed"] == 2 and sorted(errors) == [-1, 13]
    finished = [i for kind, i in dev.events if kind == "finish"]
    assert finished == sorted(finished) and not dev.clash and not dev.slots
    assert c["processed"] == len(finished) - 1  # 13 reached finish and failed there


def test_launch_ahead_without_a_prepare_thread_prepares_on_the_finish_stage():
    """``prepare_thread=False``: no ``frame_prepare`` thread; the finish stage's thread prepares frame 2 and
    launches it behind frame 1 before finishing 1, a frame whose prepare fails is counted and reported while
    frame 2 is on the device, and every frame is accounted for."""
    dev = Device()
    prepared_on, errors = [], []

    def prepare(item: int, slot: int) -> int:
        prepared_on.append(threading.current_thread().name)
        if item == 3:
            raise ValueError("bad image")
        with dev.lock:
            dev.events.append(("prepare", item))
        return dev.prepare(item, slot)

    runner = FrameRunner(prepare, dev.finish, slots=LAUNCH_AHEAD_SLOTS, launch=dev.launch, launched_done=dev.done,
                         on_error=lambda item, exc: errors.append((item, str(exc))), prepare_thread=False)
    try:
        assert sorted(t.name for t in runner._threads) == ["frame_infer"]
        runner.submit(1)
        wait_until(lambda: ("launch", 1) in dev.events)
        runner.submit(2)
        wait_until(lambda: ("launch", 2) in dev.events)
        assert dev.events == [("prepare", 1), ("launch", 1), ("prepare", 2), ("launch", 2)]
        dev.complete(1)  # the finish stage collects frame 1 now
        wait_until(lambda: ("finish", 1) in dev.events)
        runner.submit(3)  # fails in prepare: counted, while frame 2 is still on the device
        wait_until(lambda: errors)
        dev.complete(2)
        assert runner.wait_idle(5)
        assert dev.events[4:] == [("finish", 1), ("finish", 2)]
        assert errors == [(3, "bad image")] and set(prepared_on) == {"frame_infer"}
        assert runner.counts() == {"submitted": 3, "processed": 2, "failed": 1, "dropped": 0}
        assert not dev.slots and not dev.clash
    finally:
        runner.close()


def test_only_a_launch_ahead_runner_goes_without_a_prepare_thread():
    with pytest.raises(ValueError, match="prepare_thread=False needs a launch-ahead runner"):
        FrameRunner(lambda i, s: i, lambda i, p: None, slots=4, prepare_thread=False)
    with pytest.raises(ValueError, match="prepare_thread=False needs a launch-ahead runner"):
        FrameRunner(lambda i, s: i, lambda i, p: None, slots=4, launch=lambda i, p: p, serial=True,
                    prepare_thread=False)


def test_launch_ahead_needs_a_fourth_slot():
    with pytest.raises(ValueError, match="needs 4 buffer slots"):
        FrameRunner(lambda i, s: i, lambda i, p: None, slots=3, launch=lambda i, p: p)


@pytest.mark.parametrize("prepare_thread", [True, False])
def test_node_frame_loop_uses_launch_ahead_with_a_fused_pipeline(lite_model, lite_config, prepare_thread):
    """The node's and replay's loop (FrameLoop) takes the launch/collect path when the pipeline
    offers it, and delivers the frames the plain path gives, with a prepare thread or without (the finish
    stage prepares); a bad frame is skipped and counted."""
    from rosbags.typesys import Stores, get_typestore

    from discene_ros import msg_encode
    from discene_ros.msg_factory import TypestoreFactory
    from discene_ros.processing import FrameInput, FrameLoop, FrameProcessor, FrameStats, ProcessorSettings

    factory = TypestoreFactory(get_typestore(Stores.ROS2_JAZZY))
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    backend = TorchBackend(lite_model, cfg, device="cpu", cuda_graph=True)
    fused, plain = OccupancyPipeline(backend, cfg, fuse=True), OccupancyPipeline(backend, dataclasses.replace(cfg))

    def frame(seed: int, encoding: str = "rgb8") -> FrameInput:
        image, k, pose = _frame(cfg, seed)
        msg = msg_encode.rgb_to_image(factory, image, "cam", seed, "rgb8")
        msg.encoding = encoding
        return FrameInput(image=msg, camera_info=msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", seed),
                          depth=None, cam_pose=pose)

    proc = FrameProcessor(fused, ProcessorSettings(use_fallback_pose=False))
    stats, delivered, skipped = FrameStats(), {}, []
    loop = FrameLoop(proc, stats, deliver=lambda f, result: delivered.setdefault(f.stamp_ns, result),
                     on_skip=lambda f, reason, text: skipped.append(reason), lossless=True,
                     prepare_thread=prepare_thread)
    assert loop.runner._launch is not None
    assert ("frame_prepare" in {t.name for t in loop.runner._threads}) is prepare_thread
    for seed in (0, 1, 2):
        loop.submit(frame(seed, "bogus" if seed == 1 else "rgb8"))
    assert loop.wait_idle(20)
    loop.close()
    assert sorted(delivered) == [0, 2] and skipped == ["unsupported_encoding"]
    snap = stats.snapshot()
    assert snap["received"] == 3 and snap["processed"] == 2 and sum(snap["skipped"].values()) == 1
    ref = FrameProcessor(plain, ProcessorSettings(use_fallback_pose=False)).process(frame(2))
    assert np.array_equal(delivered[2].occupancy.labels, ref.occupancy.labels)
    assert delivered[2].timings_ms["infer_ms"] > 0
