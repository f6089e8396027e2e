"""The native CPU post-processing kernel against the torch path: the same voxels, labels and scores, bit
for bit, on one thread and split with its helper thread, on random point sets, on the shipped model's outputs,
in batches and from several threads (and in a forked child); the inputs it leaves to the torch path, and its
own argument checks."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from discene_ros import msg_encode
from export.backends.torch_backend import TorchBackend
from export.pipeline import OccupancyPipeline
from models import native_postprocess
from models.checkpoint import load_model
from models.device_cloud import CloudFrame, cloud_frame_from_dense
from models.postprocess import frame_from_dense, labels_batch, occupied_labels, points_to_occupancy
from training.data import build_dataset, collate_frames, prepare_inputs

ROOT = Path(__file__).resolve().parents[1]
LITE = ROOT / "discene_ros" / "data" / "lite_distilled.pt"
SAMPLE = ROOT / "discene_ros" / "data" / "sample_dataset"


pytestmark = pytest.mark.usefixtures("native_kernel")  # every test here is of the kernel: failed where it is not built


def _case(seed: int, batch: int = 1, queries: int = 60, per_query: int = 16, classes: int = 11,
          spread: float = 0.04) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered point sets as the decoder makes them (some points outside the grid) and skewed scores."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.0, 1.0, (batch, queries, 1, 3))
    points = centers + rng.normal(0.0, spread, (batch, queries, per_query, 3))
    scores = rng.uniform(0.0, 1.0, (batch, queries, per_query, classes)) ** 3
    return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(scores.astype(np.float32))


def _assert_same(points: torch.Tensor, scores: torch.Tensor, config) -> int:
    """The kernel, on one thread and in halves with its helper, against the torch path; the voxel count."""
    ids, label, best = occupied_labels(points, scores, config, native=False)
    for threads in (1, 2):
        _assert_found(native_postprocess.occupied_labels(points, scores, config, threads=threads), ids, label, best,
                      points.shape[0], config)
    return len(ids)


def _assert_found(found, ids: torch.Tensor, label: torch.Tensor, best: torch.Tensor, batch: int, config) -> None:
    assert found is not None
    np.testing.assert_array_equal(found.ids, ids.numpy())
    np.testing.assert_array_equal(found.labels, label.numpy())
    # bit for bit, not within a tolerance
    np.testing.assert_array_equal(found.best.view(np.int32), best.numpy().view(np.int32))
    # the same voxels as grid indices and in the dense grids
    cells = int(np.prod(config.grid_shape))
    np.testing.assert_array_equal(found.indices, np.stack(np.unravel_index(found.ids % cells, config.grid_shape), -1))
    dense = np.zeros(batch * cells, np.uint8)
    dense[found.ids] = found.labels
    np.testing.assert_array_equal(found.dense.reshape(-1), dense)


@pytest.mark.parametrize("closing", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5])
@pytest.mark.parametrize("shape", [(60, 60, 36), (7, 5, 3), (1, 1, 1), (3, 1, 70), (5, 4, 64)])
def test_kernel_equals_the_torch_path_on_random_point_sets(lite_config, closing, threshold, shape):
    cfg = dataclasses.replace(lite_config, grid_shape=list(shape), closing=closing, score_threshold=threshold,
                              max_center_dist=0.3)
    occupied = [_assert_same(*_case(seed), cfg) for seed in range(4)]
    # the cases are not all empty (one voxel averages every point: its means stay below 0.3)
    assert max(occupied) > 0 or (shape == (1, 1, 1) and threshold > 0)


@pytest.mark.parametrize("shape", [(60, 60, 36), (9, 4, 5)])
def test_kernel_equals_the_torch_path_where_classes_tie(lite_config, shape):
    # scores on a coarse ladder: closed scores of different classes tie exactly, and the lower class must
    # win them in every x plane, as torch's max picks it
    cfg = dataclasses.replace(lite_config, grid_shape=list(shape), closing=True, score_threshold=0.3,
                              max_center_dist=0.3)
    for seed in range(3):
        points, scores = _case(seed, queries=150, spread=0.08)
        assert _assert_same(points, (scores * 4).round() / 4, cfg) > 0


def _room_with_holes(seed: int, shape: tuple[int, int, int], per_query: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A floor (class 1), two walls (2), a box (5) and low-scored clutter, one point inside each voxel,
    with a tenth of the surfaces left out: the holes the closing fills, in rows among others it does not."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    cells = [(x, y, 0, 1) for x in range(nx) for y in range(ny)]
    cells += [(1, y, z, 2) for y in range(ny) for z in range(1, nz)] + [(x, ny - 2, z, 2) for x in range(nx) for z in range(1, nz)]
    cells += [(x, y, z, 5) for x in range(nx // 3, nx // 2) for y in range(ny // 3, ny // 2) for z in range(1, nz // 3)
              if x in (nx // 3, nx // 2 - 1) or y in (ny // 3, ny // 2 - 1) or z == nz // 3 - 1]
    cells = [c for c in cells if rng.random() > 0.1]
    cells += [(int(rng.integers(nx)), int(rng.integers(ny)), int(rng.integers(nz)), -1) for _ in range(len(cells) // 20)]
    rng.shuffle(cells)
    cells = cells[:len(cells) // per_query * per_query]
    index = np.array([c[:3] for c in cells], np.float32)
    points = (index + rng.uniform(0.2, 0.8, index.shape)) / np.array(shape, np.float32)
    scores = rng.uniform(0.0, 0.25, (len(cells), 11))
    for row, (_, _, _, cls) in enumerate(cells):
        if cls >= 0:
            scores[row, cls] = rng.uniform(0.35, 0.95)
    return (torch.from_numpy(points.astype(np.float32)).view(1, -1, per_query, 3),
            torch.from_numpy(scores.astype(np.float32)).view(1, -1, per_query, 11))


@pytest.mark.parametrize("shape", [(60, 60, 36), (20, 12, 64), (9, 7, 70)])
def test_kernel_equals_the_torch_path_where_the_closing_fills_holes(lite_config, shape):
    # large flat classes with sparse holes: the kernel computes the closed scores only in the rows where the
    # closing fills a voxel (64 z voxels or fewer; above that every row), and must still agree bit for bit
    cfg = dataclasses.replace(lite_config, grid_shape=list(shape), closing=True, score_threshold=0.3,
                              max_center_dist=1e3)
    for seed in range(2):
        points, scores = _room_with_holes(seed, shape)
        filled = _assert_same(points, scores, cfg)
        assert filled > _assert_same(points, scores, dataclasses.replace(cfg, closing=False))


def test_kernel_equals_the_torch_path_in_a_batch(lite_config):
    points, scores = _case(7, batch=3, queries=120)
    points[1] = 5.0  # a frame with every point outside the grid
    assert _assert_same(points, scores, lite_config) > 0
    with_kernel = labels_batch(points, scores, lite_config)
    assert torch.equal(with_kernel[1], torch.zeros_like(with_kernel[1]))


def test_kernel_equals_the_torch_path_at_the_center_distance_limit(lite_config):
    # many points at almost exactly the limit: the squared distance must be the torch path's float32 steps
    points, scores = _case(3, queries=200, spread=0.05)
    d = (points - points.mean(dim=2, keepdim=True)) * torch.tensor(lite_config.grid_extent, dtype=torch.float32)
    limit = float(d.norm(dim=-1).median())
    assert _assert_same(points, scores, dataclasses.replace(lite_config, max_center_dist=limit)) > 0


@pytest.mark.skipif(not LITE.is_file() or not SAMPLE.is_dir(), reason="shipped lite checkpoint or sample missing")
def test_kernel_equals_the_torch_path_on_the_shipped_models_outputs():
    model, cfg = load_model(str(LITE))
    frames = build_dataset(str(SAMPLE), "val", cfg, max_frames=2)
    batch = prepare_inputs(collate_frames([frames[i] for i in range(len(frames))]), torch.device("cpu"), False)
    with torch.inference_mode():
        last = model.eval()(batch["image"], batch["grid2img"], None)["layers"][-1]
    points, scores = last["points"].float(), last["logits"].float().sigmoid()
    for closing in (True, False):
        assert _assert_same(points, scores, dataclasses.replace(cfg, closing=closing)) > 100


def test_kernel_nan_points_and_scores_are_dropped_like_the_torch_path(lite_config):
    points, scores = _case(11)
    points[0, 0, :4, 0] = float("nan")   # NaN points
    points[0, 1, 0] = float("nan")       # ... which also make their query's centre NaN
    scores[0, 2, :5, 3] = float("nan")   # a NaN score: torch's amax is NaN, the point is dropped
    assert _assert_same(points, scores, lite_config) > 0


def test_kernel_leaves_infinite_scores_to_the_torch_path(lite_config):
    points, scores = _case(12)
    ids, _, _ = occupied_labels(points, scores, lite_config, native=False)
    cell = ids[0].item()
    # an infinite score on a point that is kept: the kernel declines, the result is still the torch path's
    keep = (torch.floor(points[0] * torch.tensor(lite_config.grid_shape)).long()
            == torch.tensor(np.unravel_index(cell, lite_config.grid_shape))).all(dim=-1)
    q, r = (int(i) for i in keep.nonzero()[0])
    scores[0, q, r, 0] = float("inf")
    assert native_postprocess.occupied_labels(points, scores, lite_config) is None
    assert native_postprocess.occupied_labels(points, scores, lite_config, threads=2) is None
    scores[0, -1, -1, 0] = float("inf")  # a second one in the last chunk of queries, whichever half takes it
    assert native_postprocess.occupied_labels(points, scores, lite_config, threads=2) is None
    frame = points_to_occupancy(points, scores, np.zeros(3), lite_config)
    ref_ids, ref_label, _ = occupied_labels(points, scores, lite_config, native=False)
    np.testing.assert_array_equal(frame.voxel_labels, ref_label.numpy())
    assert len(frame.voxel_labels) == len(ref_ids)


def test_kernel_empty_inputs(lite_config):
    points, scores = _case(5)
    for found in (native_postprocess.occupied_labels(points, scores * 0, lite_config),
                  native_postprocess.occupied_labels(points + 3.0, scores, lite_config),  # outside the grid
                  native_postprocess.occupied_labels(points[:, :0], scores[:, :0], lite_config)):  # no points
        assert found is not None and len(found.ids) == len(found.indices) == 0 and not found.dense.any()


def test_kernel_runs_in_several_threads_at_once(lite_config):
    # per-thread scratch buffers, and the GIL released while it runs; the threads that ask for two share the
    # one helper: the call that holds it splits, the others run alone, with the same results
    cases = [(_case(seed, queries=200), dataclasses.replace(lite_config, grid_shape=shape))
             for seed, shape in enumerate([[60, 60, 36], [30, 20, 10], [60, 60, 36], [8, 8, 70]])]
    expected = [native_postprocess.occupied_labels(*case, cfg) for case, cfg in cases]
    errors: list[str] = []

    def work(index: int) -> None:
        case, cfg = cases[index]
        for _ in range(30):
            got = native_postprocess.occupied_labels(*case, cfg, threads=1 + index % 2 + index // 2)
            if not all(np.array_equal(a, b) for a, b in zip(got, expected[index], strict=True)):
                errors.append(f"thread {index} got another result")
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_kernel_checks_its_buffers():
    from models import _occupancy_native as kernel  # the extension itself (built: the module's mark)

    points = np.zeros((1, 2, 3, 3), np.float32)
    centers = np.zeros((1, 2, 3), np.float32)
    scores = np.zeros((1, 2, 3, 4), np.float32)
    cells = 2 * 2 * 2
    out = (np.empty(cells, np.int64), np.empty(cells, np.uint8), np.empty(cells, np.float32),
           np.empty((cells, 3), np.int32), np.zeros(cells, np.uint8))
    args = (1, 2, 3, 4, 2, 2, 2, True, 1.0, 1.0, 1.0, 1.0, 0.5, 1)
    assert kernel.occupied_labels(points, centers, scores, *out, *args) == 0
    assert kernel.occupied_labels(points, centers, scores, *out, *args[:-1], 2) == 0
    with pytest.raises(TypeError):  # the thread count is not optional
        kernel.occupied_labels(points, centers, scores, *out, *args[:-1])
    with pytest.raises(ValueError, match="scores"):
        kernel.occupied_labels(points, centers, np.ascontiguousarray(scores[..., :3]), *out, *args)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.occupied_labels(points, centers, scores[:, ::-1], *out, *args)
    with pytest.raises(ValueError, match="out_id"):
        kernel.occupied_labels(points, centers, scores, out[0][:4], *out[1:], *args)
    with pytest.raises(ValueError, match="out_index"):
        kernel.occupied_labels(points, centers, scores, *out[:3], out[3][:, :2].copy(), out[4], *args)
    with pytest.raises(ValueError, match="bad sizes"):
        kernel.occupied_labels(points, centers, scores, *out, *args[:3], 300, *args[4:])
    with pytest.raises(TypeError):  # read-only outputs
        kernel.occupied_labels(points, centers, scores, bytes(cells * 8), *out[1:], *args)


@pytest.mark.parametrize("shape, density", [((60, 60, 36), 0.09), ((60, 60, 36), 0.0), ((7, 5, 3), 1.0),
                                            ((3, 1, 70), 0.3), ((1, 1, 1), 1.0), ((9, 11, 13), 0.02)])
def test_dense_cloud_frame_equals_numpy(lite_config, shape, density):
    """The fused CUDA path's host step: the kernel's one pass over the copied grids (``cloud_frame_from_dense``)
    against numpy's flatnonzero, gathers and divmods (``frame_from_dense``) and the rows written from those, on
    random grids of every density (odd sizes: the eight-cell skip's tail) and on clustered runs of occupied cells."""
    rng = np.random.default_rng(int(density * 100) + len(shape))
    labels = np.where(rng.random(shape) < density, rng.integers(1, 12, shape), 0).astype(np.uint8)
    labels.reshape(-1)[5:40] = 3  # a run across several eight-cell words
    best = np.where(labels > 0, rng.random(shape, dtype=np.float32), 0).astype(np.float32)
    config = dataclasses.replace(lite_config, grid_shape=list(shape))
    native = cloud_frame_from_dense(labels, best, np.array([0.5, -1.0, 2.0]), config)
    reference = frame_from_dense(labels, best, np.array([0.5, -1.0, 2.0]), config)
    assert isinstance(native, CloudFrame)
    for field in ("labels", "voxel_indices", "voxel_labels", "voxel_scores"):
        got, want = getattr(native, field), getattr(reference, field)
        assert got.dtype == want.dtype and got.shape == want.shape, field
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=field)
    assert native.labels is not labels and native.labels.base is not labels  # the frame keeps its own grid
    rows, want_rows = msg_encode.occupancy_cloud(native), msg_encode.occupancy_cloud(reference)
    assert rows.points.tobytes() == want_rows.points.tobytes()
    assert (rows.xyz_finite, rows.scores_finite) == (want_rows.xyz_finite, want_rows.scores_finite)


def test_cloud_words_checks_its_buffers():
    from models import _occupancy_native as kernel

    rows = np.empty((1, 6), np.uint32)
    args = (np.zeros((1, 3), np.int32), np.ones(1, np.uint8), np.ones(1, np.float32), np.zeros(256, np.uint32), rows)
    assert kernel.cloud_words(*args, 1, 0.0, 0.0, 0.0, 0.08) == (True, True)  # (x, y, z finite; scores finite)
    assert rows[0].view(np.float32)[:3].tolist() == [np.float32(0.04)] * 3 and rows[0, 4] == 1
    assert kernel.cloud_words(*args, 1, 0.0, np.inf, 0.0, 0.08) == (False, True)
    args[2][0] = np.nan
    assert kernel.cloud_words(*args, 1, 0.0, 0.0, 0.0, 0.08) == (True, False)
    args[2][0] = 1.0
    for count, match in ((2, "index"), (-1, "bad count"), (2**61, "bad count")):
        with pytest.raises(ValueError, match=match):
            kernel.cloud_words(*args, count, 0.0, 0.0, 0.0, 0.08)


def _torch_resize_normalise(image: np.ndarray, size_hw: tuple[int, int], order, scale, shift) -> np.ndarray:
    """The reference: torch's uint8 antialiased resize, then the channel reorder, mul and add_ in float32."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=size_hw, mode="bilinear", antialias=True, align_corners=False)
    out = torch.mul(y[:, list(order)], torch.tensor(scale).view(1, 3, 1, 1))
    return out.add_(torch.tensor(shift).view(1, 3, 1, 1)).numpy()


RESIZE_CASES = [((480, 640), (192, 256)), ((240, 320), (192, 256)), ((481, 643), (193, 255)),
                ((1080, 1920), (192, 256)), ((96, 128), (192, 256)), ((192, 256), (192, 256)),
                ((50, 71), (31, 17)), ((9, 9), (3, 4)), ((300, 7), (64, 6))]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("size_in", "size_out"), RESIZE_CASES)
def test_resize_normalise_equals_torch_bit_for_bit(size_in, size_out, threads):
    """Down, up and unchanged along each axis, sizes that split unevenly, and a camera-sized downscale: every
    float of the output is torch's (resize, reorder, multiply, add), in both row orders and thread counts."""
    rng = np.random.default_rng(sum(size_in) + threads)
    image = rng.integers(0, 256, (*size_in, 3), dtype=np.uint8)
    scale, shift = (0.017, 0.0175, 0.0174), (-2.1, -2.03, -1.8)
    for order in ((0, 1, 2), (2, 1, 0)):
        out = np.full((1, 3, *size_out), np.nan, np.float32)
        assert native_postprocess.resize_normalise(image, out, order, scale, shift, threads)
        ref = _torch_resize_normalise(image, size_out, order, scale, shift)
        np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_resize_normalise_scalar_loops_equal_torch_too(tmp_path):
    """``DISCENE_NATIVE_SIMD=0``: the scalar loops that CPUs without AVX2 (a Jetson's) run, on every row. The kernel
    reads the switch when it loads, so it runs in a child process: the kernel's file loaded alone, called with what
    ``native_postprocess.resize_normalise`` passes it, against torch's outputs made here (a child without torch
    starts in 0.3 s, not 4 s; under the sanitizers, 0.5 s, not 9 s)."""
    order, scale, shift = (2, 1, 0), (0.5, 0.25, 1.0), (1.0, -1.0, 0.0)
    cases = {}
    for i, (si, so) in enumerate(RESIZE_CASES):
        image = np.random.default_rng(7).integers(0, 256, (*si, 3), dtype=np.uint8)
        cases[f"image{i}"], cases[f"ref{i}"] = image, _torch_resize_normalise(image, so, order, scale, shift)
    np.savez(tmp_path / "cases.npz", **cases)
    code = ("import importlib.util, sys\n"
            "import numpy as np\n"
            "spec = importlib.util.spec_from_file_location('models._occupancy_native', sys.argv[1])\n"
            "kernel = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(kernel)\n"
            "cases = np.load(sys.argv[2])\n"
            f"for i in range({len(RESIZE_CASES)}):\n"
            "    image, ref = cases[f'image{i}'], cases[f'ref{i}']\n"
            "    out = np.empty_like(ref)\n"
            f"    assert kernel.resize_normalise(image, out, *image.shape[:2], *out.shape[-2:], {order}, {scale}, "
            f"{shift}, 2)\n"
            "    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), (image.shape, ref.shape)\n"
            "print('same')")
    env = {**os.environ, "DISCENE_NATIVE_SIMD": "0"}
    out = subprocess.run([sys.executable, "-c", code, native_postprocess._kernel.__file__, str(tmp_path / "cases.npz")],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "same", out.stderr[-2000:]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the helper needs a core of its own to win a half")
def test_a_late_helper_leaves_its_half_to_the_caller_and_the_results_stay_exact(lite_config):
    """A helper asleep when a call posts its half may start later than the caller finishes its own: the caller then
    runs the second half too (``helper_counts`` counts both ways). A tiny resize after a pause (the helper sleeps)
    is done before any helper wakes; back-to-back large ones find it spinning. Every output stays torch's, and
    the post-processing kernel's too, called with pauses between."""
    import time

    scale, shift = (0.5, 0.25, 1.0), (1.0, -1.0, 0.0)
    tiny = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    large = np.random.default_rng(1).integers(0, 256, (1080, 1440, 3), dtype=np.uint8)
    expected = {img.shape: _torch_resize_normalise(img, (4, 4) if img is tiny else (192, 256), (0, 1, 2), scale,
                                                   shift) for img in (tiny, large)}
    def calls(image: np.ndarray, out_hw: tuple[int, int], pause: float, counted: int) -> None:
        """Calls until ``helper_counts()[counted]`` grew (at least 20, at most 200: a busy machine may deschedule the
        helper for a while), each output checked."""
        before = native_postprocess.helper_counts()[counted]
        for i in range(200):
            time.sleep(pause)
            out = np.empty((1, 3, *out_hw), np.float32)
            assert native_postprocess.resize_normalise(image, out, (0, 1, 2), scale, shift, 2)
            np.testing.assert_array_equal(out.view(np.uint32), expected[image.shape].view(np.uint32))
            if i >= 19 and native_postprocess.helper_counts()[counted] > before:
                break
        assert native_postprocess.helper_counts()[counted] > before

    calls(tiny, (4, 4), 0.005, counted=1)  # taken back by the caller
    calls(large, (192, 256), 0.0, counted=0)  # run by the helper
    points, scores = _case(5, queries=300)
    want = native_postprocess.occupied_labels(points, scores, lite_config, threads=1)
    for pause in (0.0, 0.003, 0.0, 0.003):
        time.sleep(pause)
        got = native_postprocess.occupied_labels(points, scores, lite_config, threads=2)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_resize_normalise_leaves_what_it_does_not_take_to_torch():
    """An image smaller than the filter, or a downscale beyond 63x: False, and ``out`` untouched; arguments
    that make no sense raise."""
    kernel = native_postprocess._kernel
    out = np.zeros((1, 3, 4, 4), np.float32)
    for shape in ((3, 40, 3), (40, 3, 3), (400, 40, 3)):
        image = np.zeros(shape, np.uint8)
        small = np.zeros((1, 3, 4 if shape[0] < 400 else 2, 4), np.float32)
        assert not native_postprocess.resize_normalise(image, small, (0, 1, 2), (1.0,) * 3, (0.0,) * 3)
        assert not small.any()
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="channel order"):
        kernel.resize_normalise(image, out, 8, 8, 4, 4, (0, 1, 3), (1.0,) * 3, (0.0,) * 3, 1)
    with pytest.raises(ValueError, match="image"):
        kernel.resize_normalise(image, out, 9, 8, 4, 4, (0, 1, 2), (1.0,) * 3, (0.0,) * 3, 1)
    with pytest.raises(ValueError, match="out"):
        kernel.resize_normalise(image, out, 8, 8, 5, 4, (0, 1, 2), (1.0,) * 3, (0.0,) * 3, 1)
    assert not native_postprocess.resize_normalise(np.zeros((8, 8), np.uint8), out, (0, 1, 2), (1.0,) * 3,
                                                   (0.0,) * 3)


def test_missing_stale_or_switched_off_kernel_falls_back_with_its_reason():
    """In a fresh process (one for the three cases: the wrapper is imported again under each)."""
    code = ("import importlib, os, sys, types\n"
            "for build in (None, types.SimpleNamespace(ABI_VERSION=0), 'the real one, switched off'):\n"
            "    if isinstance(build, str):\n"
            "        del sys.modules['models._occupancy_native']\n"
            "        os.environ['DISCENE_NATIVE_POSTPROCESS'] = '0'\n"
            "    else:\n"
            "        sys.modules['models._occupancy_native'] = build\n"
            "    sys.modules.pop('models.native_postprocess', None)\n"
            "    n = importlib.import_module('models.native_postprocess')\n"
            "    print(n.available(), n.unavailable_reason())\n")
    env = {k: v for k, v in os.environ.items() if k != "DISCENE_NATIVE_POSTPROCESS"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    missing, stale, switched_off = run.stdout.splitlines()
    assert missing.startswith("False not built (")
    assert stale.startswith(f"False stale build (ABI 0, this code needs {native_postprocess.ABI_VERSION})")
    assert switched_off.startswith("False switched off by DISCENE_NATIVE_POSTPROCESS=0")


def test_pipeline_says_which_cpu_post_processing_runs(lite_model, lite_config, monkeypatch):
    pipe = OccupancyPipeline(TorchBackend(lite_model, lite_config))
    assert "post-processing on the CPU (native kernel, 1 thread)" in pipe.describe()
    assert "uint8 antialiased resize in the native kernel" in pipe.describe()
    pipe.post_threads = 2
    assert "post-processing on the CPU (native kernel, 2 threads)" in pipe.describe()
    monkeypatch.setattr(native_postprocess, "_kernel", None)
    monkeypatch.setattr(native_postprocess, "_REASON", "not built (test)")
    assert "post-processing on the CPU (torch ops; native kernel not built (test))" in pipe.describe()
    assert "resize in the native kernel" not in pipe.describe()


def test_kernel_helper_works_in_a_forked_child(lite_config):
    """A child forked after the helper thread started has no helper thread: the kernel makes it a new one
    there (a fork handler resets its state) instead of waiting forever for the parent's. The child reports
    through a pipe; a hung child is killed and fails the test."""
    points, scores = _case(21, queries=200)
    expected = native_postprocess.occupied_labels(points, scores, lite_config, threads=2)  # helper running
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the answer
        try:
            got = native_postprocess.occupied_labels(points, scores, lite_config, threads=2)
            same = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
            os.write(write, b"same" if same else b"different")
        finally:
            os._exit(0)
    os.close(write)
    try:
        import select
        ready, _, _ = select.select([read], [], [], 60)
        answer = os.read(read, 16) if ready else b"hung"
    finally:
        os.close(read)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    assert answer == b"same"


@pytest.mark.parametrize("post_threads", [1, 2])
def test_pipeline_passes_its_post_threads_and_frees_the_inference_cores(lite_model, lite_config, monkeypatch,
                                                                        post_threads):
    """With two post-processing threads on the CPU, the torch inference's OpenMP workers are released after
    it (they would spin on the helper's core) and the kernel is asked for two; with one, neither."""
    import export.pipeline as pipeline_module

    released, asked = [], []
    monkeypatch.setattr(pipeline_module, "release_openmp_team", lambda: released.append(1) or True)
    real = native_postprocess.occupied_labels
    monkeypatch.setattr(native_postprocess, "occupied_labels",
                        lambda *a, threads=1, **k: asked.append(threads) or real(*a, threads=threads, **k))
    pipe = OccupancyPipeline(TorchBackend(lite_model, lite_config), post_threads=post_threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    k = np.array([[100.0, 0, 64], [0, 100.0, 48], [0, 0, 1]])
    for _ in range(2):
        pipe.process(image, k, np.eye(4))
    assert asked == [post_threads] * 2
    assert len(released) == (2 if post_threads == 2 else 0)


@pytest.mark.skipif(not LITE.is_file(), reason="shipped lite checkpoint missing")
def test_kernel_benchmark_takes_turns_with_thread_counts(tmp_path):
    """bench_postprocess_kernel.py --threads 1 2: both counts on the benchmark frame, the same voxels (it exits
    otherwise), a row each."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_postprocess_kernel

    build = native_postprocess._kernel.__file__
    out = tmp_path / "kernel.json"
    # (it sets torch's process-wide thread count: conftest's restore_torch_threads sets it back)
    assert bench_postprocess_kernel.main([build, "--threads", "1", "2", "--rounds", "1", "--calls", "2",
                                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["build"], r["threads"]) for r in result["rows"]] == [(build, 1), (build, 2)]
    assert result["voxels"] > 0 and all(r["median_ms"] > 0 for r in result["rows"])
