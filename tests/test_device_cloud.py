"""``device_cloud``: the occupied voxels compacted into PointCloud2 rows on the device (models/device_cloud.py)
against the host's scan of the grids and its rows (``frame_from_dense`` + ``msg_encode.occupancy_cloud``), alone
and in the fused pipeline."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from test_fused_postprocess import _EagerGraph, _query_sets, _sized_frame

from discene_ros import msg_encode
from discene_ros.errors import NonFiniteOutputError
from discene_ros.processing import FrameProcessor, checked_cloud
from export.backends.torch_backend import TorchBackend
from export.pipeline import LAUNCH_AHEAD_SLOTS, OccupancyPipeline
from models import build_model, native_postprocess
from models.classes import LABEL_RGB_BITS
from models.device_cloud import (
    CloudBuffers,
    CloudFrame,
    DeviceCloud,
    cloud_frame_from_dense,
    read_frame,
)
from models.postprocess import dense_occupancy, frame_from_dense

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
FIELDS = ("labels", "voxel_indices", "voxel_labels", "voxel_scores", "voxel_origin")


def _same_frame(ref, got) -> None:
    """Every field of the host frame, dtypes included, and the cloud's bytes and finiteness."""
    assert isinstance(got, CloudFrame) and got.voxel_size == ref.voxel_size
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name  # NaN scores too
    want, have = msg_encode.occupancy_cloud(ref), msg_encode.occupancy_cloud(got)
    assert have.points.dtype == msg_encode.CLOUD_DTYPE and have.points.tobytes() == want.points.tobytes()
    if want.xyz_finite is not None:  # numpy's rows (no kernel) leave it to the output check: None
        assert (have.xyz_finite, have.scores_finite) == (want.xyz_finite, want.scores_finite)


def _compacted(labels, best, origin, config, device, head=None) -> CloudFrame:
    cloud = DeviceCloud(config, device)
    out = cloud.buffers() if head is None else CloudBuffers(cloud.voxels, head, torch.device(device))
    cloud.origin.copy_(torch.as_tensor(origin, dtype=torch.float64))
    cloud(labels.to(device), best.to(device), out)
    if device == "cuda":
        torch.cuda.synchronize()
    return read_frame(out, origin, config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("closing", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
def test_device_rows_are_the_bytes_the_host_writes(lite_config, device, closing, threshold):
    """The compacted frame has the host frame's voxels in its order, and its rows are the native kernel's bytes,
    for a grid with every point dropped (threshold 1.0) too."""
    cfg = dataclasses.replace(lite_config, closing=closing, score_threshold=threshold)
    labels, best = dense_occupancy(*_query_sets(3, cfg), cfg)
    origin = np.array([1.25, -2.0, 0.1])
    ref = frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
    got = _compacted(labels, best, origin, cfg, device)
    _same_frame(ref, got)
    assert len(got.voxel_ids) == (0 if threshold == 1.0 else len(ref.voxel_labels)) and got.cloud_finite == (True, True)
    if threshold < 1.0:
        assert len(got.voxel_ids) > 100


@pytest.mark.parametrize("device", DEVICES)
def test_rows_beyond_the_pinned_head_come_from_the_device(lite_config, device):
    """A frame with more occupied voxels than the head holds reads the rest from the slot's device buffers: the
    same frame, whatever the head's size."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    labels, best = dense_occupancy(*_query_sets(4, cfg), cfg)
    origin = np.array([-0.5, 3.0, 0.0])
    ref = frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
    assert len(ref.voxel_labels) > 1000
    for head in (1, 999, len(ref.voxel_labels), len(ref.voxel_labels) + 1):
        _same_frame(ref, _compacted(labels, best, origin, cfg, device, head=head))


def test_non_finite_rows_are_reported_as_the_host_reports_them(lite_config):
    """Centres that overflow float32 and NaN scores: the device's summary says what the native kernel's rows say,
    and the node's output check refuses the frame with the same message."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    labels, best = dense_occupancy(*_query_sets(5, cfg), cfg)
    best.view(-1)[torch.nonzero(labels.view(-1))[:3, 0]] = float("nan")
    for origin in (np.array([1.0, 2.0, 3.0]), np.array([3.5e38, 0.0, -3.5e38])):
        ref = frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
        got = _compacted(labels, best, origin, cfg, "cpu")
        _same_frame(ref, got)
        assert got.cloud_finite == (bool(origin[0] < 1e38), False)
        messages = []
        for frame in (ref, got):
            with pytest.raises(NonFiniteOutputError) as err:
                checked_cloud(frame)
            messages.append(str(err.value))
        assert messages[0] == messages[1] and "3 scores" in messages[0]
        if origin[0] > 1e38:
            assert "voxel centres" in messages[0]


@pytest.mark.parametrize("closing", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
def test_host_compaction_of_copied_grids_is_the_frame_of_the_two_passes(lite_config, closing, threshold, native_kernel):
    """Copied grids turned into rows on the host in one pass of the kernel (``dense_cloud``): the frame and the cloud
    bytes of ``frame_from_dense`` and then ``occupancy_cloud``, for an empty grid too."""
    cfg = dataclasses.replace(lite_config, closing=closing, score_threshold=threshold)
    labels, best = dense_occupancy(*_query_sets(6, cfg), cfg)
    origin = np.array([0.75, -1.5, -0.2])
    ref = frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
    got = cloud_frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
    _same_frame(ref, got)
    assert got.cloud_finite == (True, True) and (len(got.voxel_ids) > 100) == (threshold < 1.0)


def test_host_compaction_reports_non_finite_rows_as_the_two_passes(lite_config, native_kernel):
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    labels, best = dense_occupancy(*_query_sets(7, cfg), cfg)
    best.view(-1)[torch.nonzero(labels.view(-1))[:2, 0]] = float("inf")
    for origin in (np.array([1.0, 2.0, 3.0]), np.array([3.5e38, 0.0, -3.5e38])):
        ref = frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
        got = cloud_frame_from_dense(labels[0].numpy(), best[0].numpy(), origin, cfg)
        _same_frame(ref, got)
        assert got.cloud_finite == (bool(origin[0] < 1e38), False)


def test_host_compaction_without_the_kernel_is_the_two_passes(lite_config, monkeypatch):
    labels, best = dense_occupancy(*_query_sets(8, lite_config), lite_config)
    monkeypatch.setattr(native_postprocess, "_kernel", None)
    got = cloud_frame_from_dense(labels[0].numpy(), best[0].numpy(), np.zeros(3), lite_config)
    assert not isinstance(got, CloudFrame) and len(got.voxel_labels) > 0


def test_dense_cloud_checks_its_buffers_and_capacity(native_kernel):
    kernel = native_postprocess._kernel
    labels, best = np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 6), np.float32)
    labels[1, 2, 3] = labels[3, 4, 5] = 7
    ids, rows = np.empty(2, np.int32), np.empty((2, 6), np.float32)
    assert kernel.dense_cloud(labels, best, LABEL_RGB_BITS, ids, rows, 4, 5, 6, 2, 0.0, 0.0, 0.0, 0.1) == (2, True, True)
    assert ids.tolist() == [1 * 30 + 2 * 6 + 3, 3 * 30 + 4 * 6 + 5]
    assert kernel.dense_cloud(labels, best, LABEL_RGB_BITS, ids[:1], rows[:1], 4, 5, 6, 1, 0.0, 0.0, 0.0, 0.1)[0] == -1
    with pytest.raises(ValueError, match="best: expected 480 bytes"):
        kernel.dense_cloud(labels, best[:2], LABEL_RGB_BITS, ids, rows, 4, 5, 6, 2, 0.0, 0.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="out_rows: expected 48 bytes"):
        kernel.dense_cloud(labels, best, LABEL_RGB_BITS, ids, rows[:1], 4, 5, 6, 2, 0.0, 0.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="bad grid shape"):
        kernel.dense_cloud(labels, best, LABEL_RGB_BITS, ids, rows, 0, 5, 6, 2, 0.0, 0.0, 0.0, 0.1)
    huge = (2**31 - 1,) * 3  # cells past 64 bits: refused before any buffer is sized from them
    with pytest.raises(ValueError, match="bad grid shape"):
        kernel.dense_cloud(labels, best, LABEL_RGB_BITS, ids, rows, *huge, 2, 0.0, 0.0, 0.0, 0.1)


def _pipelines(config, device, frame_graphs: bool, monkeypatch):
    """The fused pipeline with ``device_cloud`` and without (the grids), on one backend; on the CPU the frame graph
    is stood in for by a graph that runs its body at each replay."""
    torch.manual_seed(0)
    backend = TorchBackend(build_model(config).eval(), config, device=device, cuda_graph=True)
    rows = OccupancyPipeline(backend, config, fuse=True, device_cloud=True, frame_graphs=frame_graphs)
    grids = OccupancyPipeline(backend, dataclasses.replace(config), fuse=True, frame_graphs=frame_graphs)
    if frame_graphs and device == "cpu":
        preprocess = importlib.import_module("models.preprocess")  # the module (``models.preprocess`` is a function)
        monkeypatch.setattr(preprocess, "capture_graph", lambda body, dev, pool=None: _EagerGraph(body))
        rows.preprocessor.frame_graphs = grids.preprocessor.frame_graphs = True
    assert rows.device_cloud is not None and grids.device_cloud is None
    assert "compacted into cloud rows on the device" in rows.describe()
    return rows, grids


@pytest.mark.parametrize("frame_graphs", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_pipeline_with_device_rows_gives_the_frames_of_the_grids(lite_config, device, frame_graphs,
                                                                       monkeypatch):
    """Frame by frame through every slot twice, with a grid origin of its own per frame (staged with the frame),
    two frames launched before either is collected: the frames of the grids' path. A collected frame owns its
    rows: launching its slot again leaves them as they were."""
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    rows, grids = _pipelines(cfg, device, frame_graphs, monkeypatch)
    frames = []
    for i in range(2 * LAUNCH_AHEAD_SLOTS):
        image, k, pose = _sized_frame(cfg, 80 + i, 480, 640)
        frames.append((image[..., ::-1] if i % 2 else image, k, pose, np.array([0.1 * i, -1.0 - 0.3 * i, 0.05 * i])))
    kept = None
    for i in range(0, len(frames), 2):
        launched = []
        for j in (i, i + 1):
            image, k, pose, origin = frames[j]
            launched.append(rows.launch(rows.prepare(image, k, pose, voxel_origin=origin, slot=j % LAUNCH_AHEAD_SLOTS)))
        for j, handle in zip((i, i + 1), launched, strict=True):
            image, k, pose, origin = frames[j]
            ref = grids.complete(grids.prepare(image, k, pose, voxel_origin=origin, slot=j % LAUNCH_AHEAD_SLOTS))
            got = rows.collect(handle)
            assert handle.cloud is not None and len(ref.voxel_labels) > 50
            # the copied grids compacted on the host (``cloud_frame_from_dense``; without the kernel numpy's frame)
            assert isinstance(ref, CloudFrame) == native_postprocess.available()
            if device == "cpu":
                _same_frame(ref, got)
            else:  # CUDA: index_add_ sums with atomics in any order, so a voxel at a tie may flip
                assert (ref.labels == got.labels).mean() > 0.999
            if kept is None:
                kept = (got, got.cloud_words.copy())
    assert np.array_equal(kept[0].cloud_words, kept[1])
    assert rows.last_timings.postprocess_ms > 0


def test_processor_publishes_the_device_rows(lite_config, monkeypatch):
    """The node's frame path (``FrameProcessor``, ``build_outputs``) on a device-rows frame: its output check passes
    the rows through without writing them again, and the PointCloud2 carries the bytes the grids' path publishes.
    A non-finite grid origin is refused as on the grids' path."""
    from rosbags.typesys import Stores, get_typestore

    from discene_ros.msg_factory import TypestoreFactory
    from discene_ros.processing import FrameInput, ProcessorSettings, build_outputs

    factory = TypestoreFactory(get_typestore(Stores.ROS2_JAZZY))
    cfg = dataclasses.replace(lite_config, score_threshold=0.0)
    rows, grids = _pipelines(cfg, "cpu", True, monkeypatch)
    image, k, pose = _sized_frame(cfg, 90, 480, 640)
    frame = FrameInput(image=msg_encode.rgb_to_image(factory, image, "cam", 7, "rgb8"),
                       camera_info=msg_encode.k_to_camera_info(factory, k, 480, 640, "cam", 7), cam_pose=pose)
    ref, got = (FrameProcessor(pipe, ProcessorSettings(use_fallback_pose=False)).process(frame) for pipe in (grids, rows))
    assert isinstance(got.occupancy, CloudFrame) and np.shares_memory(got.cloud.points, got.occupancy.cloud_words)
    assert len(ref.occupancy.voxel_labels) > 50
    clouds = [build_outputs(factory, p, "odom", 7)["cloud"] for p in (ref, got)]
    assert bytes(clouds[1].data) == bytes(clouds[0].data) and clouds[1].is_dense and clouds[1].width == clouds[0].width
    markers = [build_outputs(factory, p, "odom", 7)["markers"] for p in (ref, got)]
    assert [len(m.markers) for m in markers[1:]] == [len(markers[0].markers)]
    occ = got.occupancy
    bad_origin = CloudFrame(occ.voxel_ids, occ.cloud_words, occ.cloud_finite[1], np.array([np.nan, 0.0, 0.0]), cfg)
    assert bad_origin.cloud_finite == (False, True)
    with pytest.raises(NonFiniteOutputError, match="1 grid origin"):
        checked_cloud(bad_origin)
