"""The frame's geometry in C (``native_postprocess.rigid_pose``, ``grid_geometry``) against the Python functions it
replaces on the frame path: the same grid origin and grid2img bit for bit, the same verdict on camera poses, and
every input it leaves to Python decided there, with Python's errors."""
from __future__ import annotations

import importlib
import math
import re

import numpy as np
import pytest

from discene_ros import msg_decode
from discene_ros.errors import PoseError
from export.backends.torch_backend import TorchBackend
from export.pipeline import OccupancyPipeline
from models import geometry, native_postprocess
from models.preprocess import TensorPreprocessor, frame_geometry

preprocess_module = importlib.import_module("models.preprocess")  # ``models.preprocess``: the function
SIZE_HW = (240, 320)
GRID = (60, 60, 36)


pytestmark = pytest.mark.usefixtures("native_kernel")  # every test here is of the kernel: failed where it is not built


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _pose(rng: np.random.Generator, spread: float = 5.0) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _rotation(rng)
    pose[:3, 3] = rng.uniform(-spread, spread, 3)
    return pose


def _intrinsic(rng: np.random.Generator) -> np.ndarray:
    return np.array([[rng.uniform(200, 900), rng.uniform(-1, 1), rng.uniform(200, 440)],
                     [0.0, rng.uniform(200, 900), rng.uniform(150, 330)], [0.0, 0.0, 1.0]])


def _python_geometry(monkeypatch, *args, **kwargs):
    """``frame_geometry`` without the kernel: the Python floats' numbers, or their error."""
    with monkeypatch.context() as patch:
        patch.setattr(native_postprocess, "_kernel", None)
        return frame_geometry(*args, **kwargs)


def _looking_straight(direction: str) -> np.ndarray:
    """A camera looking straight down or up: no horizontal viewing direction, place_grid's fallbacks."""
    flip = -1.0 if direction == "down" else 1.0
    pose = np.eye(4)
    pose[:3, :3] = np.diag([1.0, flip, flip])
    pose[:3, 3] = (0.3, -1.2, 1.4)
    return pose


@pytest.mark.parametrize("seed", range(40))
def test_grid_geometry_equals_the_python_floats_bit_for_bit(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    pose, k = _pose(rng, spread=10.0 ** rng.uniform(-2, 4)), _intrinsic(rng)
    image_hw = (int(rng.integers(100, 1100)), int(rng.integers(100, 1500)))
    floor_z, size = float(rng.uniform(-1, 1)), float(rng.choice([0.04, 0.08, 0.1]))
    for origin in (None, rng.uniform(-50, 50, 3)):
        want = _python_geometry(monkeypatch, image_hw, k, pose, SIZE_HW, size, GRID, origin, floor_z)
        got = native_postprocess.grid_geometry(k, pose, image_hw, SIZE_HW, size, GRID, origin, floor_z,
                                               geometry.DEFAULT_FORWARD_DISTANCE)
        assert got is not None
        # bit for bit, not within a tolerance
        np.testing.assert_array_equal(got[0].view(np.uint64), want[0].view(np.uint64))
        np.testing.assert_array_equal(got[1].view(np.uint64), want[1].view(np.uint64))
        assert got[1] is not origin  # a frame's own origin, not the caller's array


@pytest.mark.parametrize("direction", ["down", "up"])
def test_grid_geometry_places_the_grid_for_a_camera_looking_straight_down_or_up(direction, monkeypatch):
    pose, k = _looking_straight(direction), _intrinsic(np.random.default_rng(0))
    want = _python_geometry(monkeypatch, (480, 640), k, pose, SIZE_HW, 0.08, GRID, None, -0.2)
    got = native_postprocess.grid_geometry(k, pose, (480, 640), SIZE_HW, 0.08, GRID, None, -0.2,
                                           geometry.DEFAULT_FORWARD_DISTANCE)
    assert got is not None
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1][2] == -0.2


def _with(array: np.ndarray, index: tuple, value: float) -> np.ndarray:
    out = array.copy()
    out[index] = value
    return out


_POSE, _K = _pose(np.random.default_rng(1)), _intrinsic(np.random.default_rng(1))
LEFT_TO_PYTHON = {  # (pose, K, origin)
    "nan pose": (_with(_POSE, (0, 3), np.nan), _K, None),
    "inf intrinsic": (_POSE, _with(_K, (0, 2), np.inf), None),
    "zero focal length": (_POSE, _with(_K, (1, 1), 0.0), None),
    "negative focal length": (_POSE, _with(_K, (0, 0), -500.0), None),
    "projective pose": (_with(_POSE, (3, 0), 0.5), _K, None),
    "singular rotation": (_with(_POSE, (slice(0, 3), 0), 0.0), _K, None),
    "nan origin": (_POSE, _K, np.array([0.0, np.nan, 0.0])),
    "float32 pose": (_POSE.astype(np.float32), _K, None),
    "3x4 intrinsic": (_POSE, np.hstack([_K, np.zeros((3, 1))]), None),
    "non-contiguous pose": (np.asfortranarray(_POSE), _K, None),
    "origin as a list": (_POSE, _K, [0.5, -1.0, 0.0]),
}


@pytest.mark.parametrize("case", LEFT_TO_PYTHON, ids=list(LEFT_TO_PYTHON))
def test_grid_geometry_leaves_what_it_does_not_take_to_python(case, monkeypatch):
    """The kernel returns None, and ``frame_geometry`` then gives Python's numbers or raises Python's error."""
    pose, k, origin = LEFT_TO_PYTHON[case]
    assert native_postprocess.grid_geometry(k, pose, (480, 640), SIZE_HW, 0.08, GRID, origin, 0.0,
                                            geometry.DEFAULT_FORWARD_DISTANCE) is None
    try:
        want = _python_geometry(monkeypatch, (480, 640), k, pose, SIZE_HW, 0.08, GRID, origin)
    except (ValueError, ZeroDivisionError) as exc:
        with pytest.raises(type(exc), match=re.escape(str(exc))):
            frame_geometry((480, 640), k, pose, SIZE_HW, 0.08, GRID, origin)
    else:
        got = frame_geometry((480, 640), k, pose, SIZE_HW, 0.08, GRID, origin)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_staging_uses_the_kernels_geometry_and_places_the_grid_on_the_floor(lite_config, monkeypatch):
    """``TensorPreprocessor.stage`` takes the kernel's numbers (a kernel that is not called fails it) and puts the
    grid's bottom at ``floor_z``, as the Python floats do."""
    calls = []
    real = native_postprocess.grid_geometry
    monkeypatch.setattr(native_postprocess, "grid_geometry", lambda *a: calls.append(a) or real(*a))
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pose, k = _pose(rng), _intrinsic(rng)
    pre = TensorPreprocessor(lite_config, "cpu", slots=1)
    staged = pre.stage(image, k, pose, floor_z=-0.25)
    assert len(calls) == 1 and staged.voxel_origin[2] == -0.25
    want = geometry.place_grid(pose, floor_z=-0.25, voxel_size=lite_config.voxel_size,
                               grid_shape=tuple(lite_config.grid_shape))
    np.testing.assert_array_equal(staged.voxel_origin, want)
    g2i = geometry.grid_to_image_matrix(geometry.scale_intrinsic(k, (480, 640), tuple(lite_config.image_size)),
                                        pose, want, lite_config.voxel_size, tuple(lite_config.grid_shape))
    np.testing.assert_array_equal(pre.slots[0].host_g2i.numpy()[0], g2i.astype(np.float32))


def test_staging_checks_the_image_and_depth_around_the_kernels_geometry(lite_config):
    pre = TensorPreprocessor(lite_config, "cpu", slots=1)
    rng = np.random.default_rng(4)
    pose, k = _pose(rng), _intrinsic(rng)
    with pytest.raises(ValueError, match="image_rgb must be a uint8"):
        pre.stage(np.zeros((480, 640, 3), np.float32), k, pose)
    with pytest.raises(ValueError, match="depth must be float metres"):
        pre.stage(np.zeros((480, 640, 3), np.uint8), k, pose, depth=np.zeros((480, 640), np.uint16))
    with pytest.raises(ValueError, match="intrinsic must be finite with positive focal lengths"):
        pre.stage(np.zeros((480, 640, 3), np.uint8), _with(k, (0, 0), 0.0), pose)


def _python_verdict(pose: np.ndarray, monkeypatch) -> str | None:
    with monkeypatch.context() as patch:
        patch.setattr(native_postprocess, "_kernel", None)
        try:
            msg_decode.check_pose(pose)
        except PoseError as exc:
            return str(exc)
    return None


def _poses_to_judge(rng: np.random.Generator) -> list[np.ndarray]:
    """Rigid poses, and each way of failing ``check_pose``, some right at a tolerance."""
    tol = msg_decode.ROTATION_TOL
    poses = [_pose(rng, spread=10.0 ** rng.uniform(-2, 4.5)) for _ in range(30)]
    rigid = _pose(rng)
    for scale in (1 + 0.4 * tol, 1 + 0.6 * tol, 1 + 2 * tol):  # R^T R - I about 2 (scale - 1)
        poses.append(_with(rigid, (slice(0, 3), 0), rigid[:3, 0] * scale))
    reflection = rigid.copy()
    reflection[:3, 2] *= -1
    poses += [reflection, _with(rigid, (3, 2), 1e-10), _with(rigid, (3, 2), 1e-8), _with(rigid, (1, 1), np.inf)]
    limit = msg_decode.MAX_TRANSLATION_M
    for distance in (0.5 * limit, 0.9989 * limit, 0.9995 * limit, limit, math.nextafter(limit, 0), 1.0005 * limit,
                     1.5 * limit):
        poses.append(_with(rigid, (slice(0, 3), 3), np.array([distance, 0.0, 0.0])))
    return poses


def test_rigid_pose_gives_check_poses_verdict(monkeypatch):
    """Where the kernel says rigid, Python's checks pass; where it does not, ``check_pose`` raises Python's error
    or passes by Python's checks (near the translation limit)."""
    accepted = 0
    for pose in _poses_to_judge(np.random.default_rng(5)):
        verdict = _python_verdict(pose, monkeypatch)
        if native_postprocess.rigid_pose(pose, msg_decode.ROTATION_TOL, msg_decode.MAX_TRANSLATION_M):
            accepted += 1
            assert verdict is None
            assert msg_decode.check_pose(pose) is pose
        elif verdict is None:
            np.testing.assert_array_equal(msg_decode.check_pose(pose), pose)
        else:
            with pytest.raises(PoseError) as raised:
                msg_decode.check_pose(pose)
            assert str(raised.value) == verdict
    assert accepted >= 32  # the rigid ones and those just inside the rotation tolerance


def test_rigid_pose_rejects_each_failure_python_rejects(monkeypatch):
    """Every pose Python rejects, the kernel rejects too (a kernel that accepted one would skip the error)."""
    rejected = [p for p in _poses_to_judge(np.random.default_rng(6)) if _python_verdict(p, monkeypatch) is not None]
    assert len(rejected) == 7  # two rotations past the tolerance, a reflection, a bottom row, an inf, two too far
    for pose in rejected:
        assert not native_postprocess.rigid_pose(pose, msg_decode.ROTATION_TOL, msg_decode.MAX_TRANSLATION_M)


def test_geometry_kernels_check_their_buffers():
    kernel = native_postprocess._kernel
    with pytest.raises(ValueError, match="pose: expected 128 bytes"):
        kernel.rigid_pose(np.eye(3), 1e-3, 1e5)
    with pytest.raises(ValueError, match="k: expected 72 bytes"):
        kernel.grid_geometry(np.eye(4), np.eye(4), np.zeros(3), np.zeros(3), np.zeros(16), True, 480, 640, 240, 320,
                             GRID, 0.08, 0.0, 2.4)
    with pytest.raises(ValueError, match="out_g2i: expected 128 bytes"):
        kernel.grid_geometry(np.eye(3), np.eye(4), np.zeros(3), np.zeros(3), np.zeros(9), True, 480, 640, 240, 320,
                             GRID, 0.08, 0.0, 2.4)


def test_frame_geometry_without_the_kernel_is_the_python_module_path(monkeypatch):
    """With the kernel off (``DISCENE_NATIVE_POSTPROCESS=0``, not built) the preprocessing's own Python runs."""
    monkeypatch.setattr(native_postprocess, "_kernel", None)
    called = []
    real = preprocess_module.grid_to_image_matrix
    monkeypatch.setattr(preprocess_module, "grid_to_image_matrix", lambda *a: called.append(1) or real(*a))
    rng = np.random.default_rng(7)
    frame_geometry((480, 640), _intrinsic(rng), _pose(rng), SIZE_HW, 0.08, GRID)
    assert called == [1]


@pytest.mark.parametrize("fuse", [False, True])
def test_pipeline_places_the_grid_on_floor_z_on_either_cpu_path(lite_model, lite_config, fuse):
    """``OccupancyPipeline.prepare`` hands ``floor_z`` to the preprocessing, which places the grid (the unfused CPU
    path and the fused one alike), and a given origin is kept as it is."""
    backend = TorchBackend(lite_model, lite_config, device="cpu", cuda_graph=True)
    pipe = OccupancyPipeline(backend, fuse=True if fuse else None)
    assert pipe.fused == fuse
    rng = np.random.default_rng(8)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pose, k = _pose(rng), _intrinsic(rng)
    placed = pipe.prepare(image, k, pose, floor_z=-0.4).inputs.voxel_origin
    want = geometry.place_grid(pose, floor_z=-0.4, voxel_size=lite_config.voxel_size,
                               grid_shape=tuple(lite_config.grid_shape))
    np.testing.assert_array_equal(placed, want)
    given = np.array([1.5, -2.0, 0.3])
    np.testing.assert_array_equal(pipe.prepare(image, k, pose, voxel_origin=given, floor_z=-0.4).inputs.voxel_origin,
                                  given)
