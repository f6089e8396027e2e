"""Projection against hand-computed pixels, the grid placement rule, and frame preprocessing."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CAM_POSE, IMAGE_HW, INTRINSIC

from models import geometry
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize_image, preprocess


def test_projection_matches_hand_computed_pixels(lite_grid2img):
    # grid origin (-2.4, 0, 0); network K: fx = fy = 100, cx = 128, cy = 96; camera at z = 1.5 looking +y
    points = torch.tensor([[[0.5, 0.5, 0.5], [0.75, 0.25, 0.0]]])
    # (0.5,0.5,0.5) -> world (0, 2.4, 1.44) -> camera (0, 0.06, 2.4) -> (128, 96 + 100*0.06/2.4)
    # (0.75,0.25,0) -> world (1.2, 1.2, 0) -> camera (1.2, 1.5, 1.2) -> (128 + 100, 96 + 125)
    uv, depth = geometry.project_points(lite_grid2img, points)
    torch.testing.assert_close(uv, torch.tensor([[[128.0, 98.5], [228.0, 221.0]]]))
    torch.testing.assert_close(depth, torch.tensor([[[2.4], [1.2]]]))


def _pose(position, yaw_deg, pitch_down_deg):
    """Camera->world pose looking along yaw (from world +x, counter-clockwise), pitched down."""
    y, p = math.radians(yaw_deg), math.radians(pitch_down_deg)
    z_axis = np.array([math.cos(p) * math.cos(y), math.cos(p) * math.sin(y), -math.sin(p)])
    x_axis = np.array([math.sin(y), -math.cos(y), 0.0])
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x_axis, np.cross(z_axis, x_axis), z_axis], axis=1)
    pose[:3, 3] = position
    return pose


def test_grid_placement_rule():
    pose = _pose([1.0, 2.0, 1.5], yaw_deg=30.0, pitch_down_deg=20.0)
    assert np.isclose(np.linalg.det(pose[:3, :3]), 1.0)
    origin = geometry.place_grid(pose)
    center = np.array([1.0, 2.0]) + 2.4 * np.array([math.cos(math.radians(30)), math.sin(math.radians(30))])
    np.testing.assert_allclose(origin, [center[0] - 2.4, center[1] - 2.4, 0.0], atol=1e-9)
    assert geometry.place_grid(pose, floor_z=-0.3)[2] == -0.3
    # looking straight down: the horizontal direction falls back to the image "up" direction
    down = _pose([0.0, 0.0, 2.0], yaw_deg=90.0, pitch_down_deg=90.0)
    up_in_world = -down[:3, 1]
    np.testing.assert_allclose(geometry.place_grid(down)[:2], 2.4 * up_in_world[:2] - 2.4, atol=1e-9)


def test_preprocess_builds_network_inputs(lite_config, lite_grid2img):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    frame = preprocess(image, INTRINSIC, CAM_POSE, lite_config)
    h, w = lite_config.image_size
    assert frame.image.shape == (1, 3, h, w) and frame.image.dtype == np.float32
    assert frame.grid2img.shape == (1, 4, 4) and frame.grid2img.dtype == np.float32
    assert frame.depth is None
    np.testing.assert_allclose(frame.voxel_origin, [-2.4, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(frame.grid2img, lite_grid2img.numpy(), rtol=1e-6, atol=1e-5)
    given = preprocess(image, INTRINSIC, CAM_POSE, lite_config, voxel_origin=[0.5, 1.0, -0.1])
    np.testing.assert_allclose(given.voxel_origin, [0.5, 1.0, -0.1])
    assert not np.allclose(given.grid2img, frame.grid2img)


def test_normalisation_matches_imagenet_statistics_and_torch_helper(lite_config):
    h, w = lite_config.image_size
    image = np.full((h, w, 3), (200, 50, 0), dtype=np.uint8)
    frame = preprocess(image, INTRINSIC, CAM_POSE, lite_config)
    expected = (np.array([200, 50, 0]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(frame.image[0, :, 0, 0], expected, rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(1)
    same_size = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    batch = torch.from_numpy(same_size).permute(2, 0, 1)[None]
    ref = preprocess(same_size, INTRINSIC, CAM_POSE, lite_config).image
    np.testing.assert_allclose(normalize_image(batch).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(normalize_image(batch.float() / 255.0).numpy(), ref, atol=1e-5)


def test_depth_is_cleaned_and_resized_without_blending(lite_config):
    image = np.zeros((*IMAGE_HW, 3), dtype=np.uint8)
    depth = np.arange(IMAGE_HW[0] * IMAGE_HW[1], dtype=np.float32).reshape(IMAGE_HW) / 1000.0
    depth[1, 1], depth[1, 3], depth[3, 1] = np.nan, np.inf, -2.0
    frame = preprocess(image, INTRINSIC, CAM_POSE, lite_config, depth=depth)
    h, w = lite_config.image_size
    assert frame.depth.shape == (1, 1, h, w) and frame.depth.dtype == np.float32
    # nearest neighbour at pixel centres: output (i, j) reads input (2i+1, 2j+1)
    assert frame.depth[0, 0, 0, 0] == 0.0 and frame.depth[0, 0, 0, 1] == 0.0 and frame.depth[0, 0, 1, 0] == 0.0
    np.testing.assert_array_equal(frame.depth[0, 0, 5:, 5:], depth[11::2, 11::2])
    # depth at another resolution than the image (same field of view)
    small = preprocess(image, INTRINSIC, CAM_POSE, lite_config, depth=np.ones((96, 128), np.float32))
    assert small.depth.shape == (1, 1, h, w) and np.all(small.depth == 1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_rgb": np.zeros((*IMAGE_HW, 3), np.float32)}, "uint8"),
        ({"image_rgb": np.zeros(IMAGE_HW, np.uint8)}, "HxWx3"),
        ({"intrinsic": np.zeros((3, 3))}, "focal"),
        ({"intrinsic": np.eye(2)}, "intrinsic must be 3x3"),
        ({"cam_pose": np.eye(3)}, "cam_pose"),
        ({"depth": np.zeros(IMAGE_HW, np.uint16)}, "float metres"),
        ({"depth": np.zeros((2, *IMAGE_HW), np.float32)}, "HxW"),
        ({"voxel_origin": [0.0, 1.0]}, "voxel_origin"),
    ],
)
def test_bad_frames_are_rejected(lite_config, kwargs, message):
    args = {"image_rgb": np.zeros((*IMAGE_HW, 3), np.uint8), "intrinsic": INTRINSIC, "cam_pose": CAM_POSE,
            "config": lite_config, **kwargs}
    with pytest.raises(ValueError, match=message):
        preprocess(**args)


def test_grid_to_image_matrix_equals_the_numpy_product():
    # the float path (affine poses) against K4 @ inv(pose) @ G: rigid, sheared, and a projective pose
    rng = np.random.default_rng(5)
    k = np.array([[500.0, 0.3, 320.0], [0.0, 480.0, 240.0], [0.0, 0.0, 1.0]])
    for case in range(200):
        pose = _pose(rng.uniform(-5, 5, 3), rng.uniform(0, 360), rng.uniform(-89, 89))
        if case % 2:
            pose[:3, :3] += rng.normal(0, 0.05, (3, 3))
        if case == 199:
            pose[3] = [0.01, 0.0, 0.0, 1.0]
        origin = rng.uniform(-3, 3, 3)
        k4, grid = np.eye(4), np.diag([4.8, 4.8, 2.88, 1.0])
        k4[:3, :3], grid[:3, 3] = k, origin
        expected = k4 @ np.linalg.inv(pose) @ grid
        got = geometry.grid_to_image_matrix(k, pose, origin)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9 * np.abs(expected).max())
    # and the placement rule on floats against its numpy statement
    for _ in range(200):
        pose = _pose(rng.uniform(-5, 5, 3), rng.uniform(0, 360), rng.uniform(-89, 89))
        forward = pose[:3, 2] * [1.0, 1.0, 0.0]
        center = pose[:2, 3] + 2.4 * forward[:2] / np.linalg.norm(forward)
        np.testing.assert_allclose(geometry.place_grid(pose, floor_z=0.2), [*(center - 2.4), 0.2], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="finite 4x4"):
        geometry.place_grid(np.full((4, 4), np.nan))


@pytest.mark.filterwarnings("ignore:torch.is_autocast_cpu_enabled:DeprecationWarning")  # the old API, on new torch
@pytest.mark.parametrize("query_by_device", [True, False])  # torch >= 2.4, and the per-device queries before it
def test_autocast_enabled_answers_per_device_on_both_torch_apis(monkeypatch, query_by_device):
    if query_by_device and not geometry.AUTOCAST_QUERY_BY_DEVICE:
        pytest.skip(f"torch {torch.__version__} has no torch.is_autocast_enabled(device_type) (2.4 added it)")
    monkeypatch.setattr(geometry, "AUTOCAST_QUERY_BY_DEVICE", query_by_device)
    assert not geometry.autocast_enabled("cpu") and not geometry.autocast_enabled("cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert geometry.autocast_enabled("cpu") and not geometry.autocast_enabled("cuda")
