"""TensorPreprocessor (the torch frame path) against the numpy/PIL reference ``preprocess``."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.onnx_export import example_camera
from models import native_postprocess
from models.preprocess import IMAGENET_STD, TensorPreprocessor, preprocess

GREY = 1.0 / (255.0 * min(IMAGENET_STD))  # one grey level in normalised units (largest channel)


def _images():
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(15, 20, 3)).astype(np.float32)
    blocky = np.clip(np.kron(coarse, np.ones((32, 32, 1), np.float32)) + rng.normal(0, 8, (480, 640, 3)), 0, 255)
    return {"blocky": blocky.astype(np.uint8), "noise": rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)}


@pytest.mark.parametrize("uint8_resize,max_grey,mean_grey", [(False, 1.0, 0.35), (True, 2.0, 0.1)])
@pytest.mark.parametrize("size", [(192, 256), (384, 512)])
def test_device_resize_matches_pil_within_the_stated_tolerance(lite_config, uint8_resize, max_grey, mean_grey, size):
    cfg = dataclasses.replace(lite_config, image_size=list(size))
    k, pose = example_camera(cfg)
    pre = TensorPreprocessor(cfg, "cpu", uint8_resize=uint8_resize)
    for name, img in _images().items():
        ref = preprocess(img, k, pose, cfg)
        got = pre(img, k, pose)
        diff = np.abs(got.image.numpy() - ref.image) / GREY
        assert diff.max() <= max_grey + 1e-3, (name, diff.max())
        assert diff.mean() <= mean_grey, (name, diff.mean())
        np.testing.assert_allclose(got.grid2img.numpy(), ref.grid2img, rtol=1e-6)
        np.testing.assert_array_equal(got.voxel_origin, ref.voxel_origin)


def test_same_size_input_is_only_normalised(lite_config):
    h, w = lite_config.image_size
    img = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    k, pose = example_camera(lite_config)
    for uint8_resize in (False, True):
        got = TensorPreprocessor(lite_config, uint8_resize=uint8_resize)(img, k, pose)
        np.testing.assert_allclose(got.image.numpy(), preprocess(img, k, pose, lite_config).image, atol=1e-5)


def test_bgr_view_depth_and_buffer_reuse(lite_config):
    k, pose = example_camera(lite_config)
    rng = np.random.default_rng(2)
    bgr = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    rgb_view = bgr[..., ::-1]  # what msg_decode.image_to_rgb returns for bgr8: a view, not a copy
    depth = rng.uniform(0.2, 5.0, (240, 320)).astype(np.float32)
    depth[0, :5] = [np.nan, np.inf, -1.0, 0.0, 2.0]
    pre = TensorPreprocessor(lite_config, slots=2)
    ref = preprocess(np.ascontiguousarray(rgb_view), k, pose, lite_config, depth=depth)
    first = pre(rgb_view, k, pose, depth=depth, slot=0)
    np.testing.assert_array_equal(first.depth.numpy(), ref.depth)  # nearest resize + cleaning: exact
    assert np.abs(first.image.numpy() - ref.image).max() <= 2 * GREY + 1e-4
    # BGR bytes (channels reordered after the resize) give exactly what the same bytes in RGB order give
    same = TensorPreprocessor(lite_config)(np.ascontiguousarray(rgb_view), k, pose, depth=depth)
    np.testing.assert_array_equal(first.image.numpy(), same.image.numpy())
    ptr = first.image.data_ptr()
    other = pre(np.zeros((480, 640, 3), np.uint8), k, pose, depth=depth, slot=1)
    assert other.image.data_ptr() != ptr  # slots are independent buffers
    again = pre(rgb_view, k, pose, depth=depth, slot=0)
    assert again.image.data_ptr() == ptr and again.depth.data_ptr() == first.depth.data_ptr()  # reused, not reallocated


def test_bad_inputs_raise_value_error(lite_config):
    k, pose = example_camera(lite_config)
    pre = TensorPreprocessor(lite_config)
    with pytest.raises(ValueError, match="uint8"):
        pre(np.zeros((48, 64, 3), np.float32), k, pose)
    with pytest.raises(ValueError, match="cam_pose"):
        pre(np.zeros((48, 64, 3), np.uint8), k, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="depth must be float"):
        pre(np.zeros((48, 64, 3), np.uint8), k, pose, depth=np.zeros((48, 64), np.uint16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned upload path)")
def test_cuda_path_matches_cpu_path(lite_config):
    k, pose = example_camera(lite_config)
    img = _images()["blocky"]
    got = TensorPreprocessor(lite_config, "cuda")(img, k, pose)
    ref = TensorPreprocessor(lite_config, "cpu", uint8_resize=False)(img, k, pose)
    torch.testing.assert_close(got.image.cpu(), ref.image, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (captured preprocessing)")
def test_cuda_graph_replay_reads_each_new_frame(lite_config):
    """The captured device work (graphs on by default on CUDA) gives eager launches' results for
    successive frames in the same slot, bgr and rgb, with depth, and after an input size change."""
    k, pose = example_camera(lite_config)
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(3)]
    frames.append(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    depth = rng.uniform(0.5, 5, (480, 640)).astype(np.float32)
    graphed, eager = TensorPreprocessor(lite_config, "cuda", slots=2), TensorPreprocessor(lite_config, "cuda", graphs=False)
    assert graphed.graphs and not eager.graphs
    for i, img in enumerate(frames):
        kk = k.copy()
        kk[:2] *= img.shape[1] / 640
        view = img[..., ::-1] if i == 1 else img  # a bgr8 message seen as RGB
        d = depth if img.shape[0] == 480 else None
        got, ref = graphed(view, kk, pose, depth=d, slot=0), eager(view, kk, pose, depth=d, slot=0)
        torch.cuda.synchronize()
        torch.testing.assert_close(got.image, ref.image, atol=0, rtol=0)
        torch.testing.assert_close(got.grid2img, ref.grid2img, atol=0, rtol=0)
        if d is not None:
            torch.testing.assert_close(got.depth, ref.depth, atol=0, rtol=0)
    assert graphed.graphs and len(graphed.slots[0].graphs) >= 1


def test_cpu_reads_the_frame_in_place_or_copies_it_with_the_same_result(lite_config):
    # writable bytes (row-padded ones too) are resized where they are; read-only and broadcast (mono8)
    # ones are copied first: the same tensors either way, and no slot keeps the frame afterwards
    k, pose = example_camera(lite_config)
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    padded = np.zeros((480, 700, 3), np.uint8)[:, :640]  # rows with a step, as a padded Image message
    padded[:] = bgr
    locked = bgr.copy()
    locked.flags.writeable = False
    grey = np.broadcast_to(bgr[..., :1], bgr.shape)  # mono8 seen as RGB: read-only, zero channel stride
    pre = TensorPreprocessor(lite_config)
    for view in (bgr[..., ::-1], bgr):
        inplace = pre(view, k, pose).image.clone()
        assert pre.slots[0].frame_rgb is None
        frozen = locked[..., ::-1] if view.strides[2] < 0 else locked
        np.testing.assert_array_equal(pre(frozen, k, pose).image.numpy(), inplace.numpy())
        np.testing.assert_array_equal(pre(np.ascontiguousarray(view), k, pose).image.numpy(), inplace.numpy())
    rgb_from_padded = pre(padded, k, pose).image.clone()
    np.testing.assert_array_equal(rgb_from_padded.numpy(), pre(bgr, k, pose).image.numpy())
    np.testing.assert_array_equal(pre(grey, k, pose).image.numpy(),
                                  pre(np.ascontiguousarray(grey), k, pose).image.numpy())


@pytest.mark.parametrize("bgr", [True, False])
def test_cpu_normalisation_kernel_equals_the_torch_ops_bit_for_bit(lite_config, monkeypatch, bgr, native_kernel):
    # the native one-pass normalisation (reorder, multiply, add) against torch's index_select, mul and add_
    k, pose = example_camera(lite_config)
    frame = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    view = frame[..., ::-1] if bgr else frame
    calls = []
    real = native_postprocess.normalise_image
    monkeypatch.setattr(native_postprocess, "normalise_image", lambda *a: calls.append(a[2]) or real(*a))
    monkeypatch.setattr(native_postprocess, "resize_normalise", lambda *a: False)  # torch's resize
    native = TensorPreprocessor(lite_config)(view, k, pose).image.clone()
    assert calls == [(2, 1, 0) if bgr else (0, 1, 2)]
    monkeypatch.setattr(native_postprocess, "normalise_image", lambda *a: False)  # no kernel: torch ops
    torch_ops = TensorPreprocessor(lite_config)(view, k, pose).image
    assert torch.equal(native, torch_ops)


@pytest.mark.parametrize("bgr", [True, False])
def test_cpu_native_resize_equals_the_torch_resize_bit_for_bit(lite_config, monkeypatch, bgr, native_kernel):
    # the native kernel's resize + normalisation in one call against torch's uint8 antialiased resize and the
    # torch ops, for a camera frame and a JPEG decoded at half size; a row-padded frame (not contiguous) goes
    # to torch
    k, pose = example_camera(lite_config)
    calls = []
    real = native_postprocess.resize_normalise
    monkeypatch.setattr(native_postprocess, "resize_normalise", lambda *a: calls.append((a[0].shape, a[2])) or real(*a))
    for shape in ((480, 640, 3), (240, 320, 3)):
        frame = np.random.default_rng(shape[0]).integers(0, 256, shape, dtype=np.uint8)
        view = frame[..., ::-1] if bgr else frame
        native = TensorPreprocessor(lite_config)(view, k, pose).image.clone()
        assert calls.pop() == (shape, (2, 1, 0) if bgr else (0, 1, 2))
        with monkeypatch.context() as torch_only:
            torch_only.setattr(native_postprocess, "resize_normalise", lambda *a: False)
            assert torch.equal(native, TensorPreprocessor(lite_config)(view, k, pose).image)
    padded = np.zeros((480, 700, 3), np.uint8)[:, :640]
    TensorPreprocessor(lite_config)(padded, k, pose)
    assert not calls


def test_resize_benchmark_compares_the_ways_on_equal_outputs(tmp_path, native_kernel):
    """bench_resize.py: torch's ops and the native call (one and two threads) on both frames, outputs checked
    equal before timing, and the two whole-frame preprocessings, a row each with its ratio to torch's resize in
    the same rounds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_resize

    out = tmp_path / "resize.json"
    # (it sets torch's process-wide thread count: conftest's restore_torch_threads sets it back)
    assert bench_resize.main(["--rounds", "1", "--calls", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["input"], r["way"]) for r in rows] == [
        (i, w) for i in ("bgr8 640x480", "jpeg 320x240")
        for w in ("torch", "native x1", "native x2", "frame: tensor", "frame: numpy + PIL")]
    assert all(r["median_ms"] > 0 for r in rows) and all(r["ratio_to_torch"] == 1.0 for r in rows if r["way"] == "torch")
