"""Camera and grid geometry shared by the model, the data generator, the loader and the ROS node.

Conventions (one place, used everywhere):
- World frame: gravity aligned, z up, metres. ``cam_pose`` is the 4x4 camera->world transform.
- Camera frame: OpenCV / ROS optical frame (x right, y down, z forward).
- Grid: 60 x 60 x 36 voxels of 0.08 m (4.8 x 4.8 x 2.88 m), axis aligned in the world frame; voxel
  (i, j, k) indexes (x, y, z) and its centre is ``voxel_origin + (idx + 0.5) * voxel_size``.
- Normalised grid coordinates: ``p in [0, 1]^3`` with ``world = voxel_origin + p * grid_extent``.
  The network predicts points in normalised grid coordinates.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

VOXEL_SIZE = 0.08
GRID_SHAPE = (60, 60, 36)
GRID_EXTENT = tuple(n * VOXEL_SIZE for n in GRID_SHAPE)  # (4.8, 4.8, 2.88) metres

# Grid placement rule (used when a sample has no voxel_origin: synthetic data and the robot).
# The grid is world-axis aligned; its bottom face lies at ``floor_z``; its x-y centre is
# ``forward_distance`` metres in front of the camera along the horizontal viewing direction.
DEFAULT_FORWARD_DISTANCE = 0.5 * GRID_EXTENT[0]

# a float64 of at least this magnitude rounds to inf in float32 (halfway past FLT_MAX, whose mantissa is odd)
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103

# torch.is_autocast_enabled(device_type) is torch 2.4's; before it, one query per device (JetPack 6.0 has 2.3)
AUTOCAST_QUERY_BY_DEVICE = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)


def place_grid(
    cam_pose: np.ndarray,
    floor_z: float = 0.0,
    forward_distance: float = DEFAULT_FORWARD_DISTANCE,
    voxel_size: float = VOXEL_SIZE,
    grid_shape: tuple[int, int, int] = GRID_SHAPE,
) -> np.ndarray:
    """World xyz of the grid corner (``voxel_origin``) for a camera pose, by the documented rule.

    The horizontal viewing direction is the camera z axis projected on the world x-y plane; when the
    camera looks straight up or down it falls back to the image "up" direction (minus camera y).
    On Python floats: it runs per frame on the robot, right after the inference, where each numpy call
    costs about ten times its warm time (0.05 against 0.15 ms there, docs/results/frame_path.md).
    """
    rows = _float_rows(cam_pose, 4, "cam_pose")
    fx, fy = rows[0][2], rows[1][2]
    norm = math.sqrt(fx * fx + fy * fy)  # not hypot: C's differs from Python's in the last bit (native_postprocess)
    if norm < 1e-6:
        fx, fy = -rows[0][1], -rows[1][1]
        norm = math.sqrt(fx * fx + fy * fy)
    if norm < 1e-6:
        fx, fy, norm = 1.0, 0.0, 1.0
    center_x = rows[0][3] + forward_distance * (fx / norm)
    center_y = rows[1][3] + forward_distance * (fy / norm)
    return np.array([center_x - grid_shape[0] * voxel_size / 2, center_y - grid_shape[1] * voxel_size / 2, floor_z])


def centers_finite_in_float32(voxel_origin: np.ndarray, voxel_size: float, lowest: Sequence[float],
                              highest: Sequence[float]) -> bool:
    """Whether every voxel centre ``origin + (index + 0.5) * size`` with per-axis indices from ``lowest`` to
    ``highest`` is finite once rounded to float32. The centres along an axis are monotonic in the index, and so is
    the rounding, so the two ends decide: six numbers instead of 3M, on Python floats (this runs per frame)."""
    origin = np.asarray(voxel_origin, dtype=np.float64).reshape(3).tolist()
    return all(abs(o + (e + 0.5) * voxel_size) < FLOAT32_OVERFLOW  # NaN compares False
               for o, lo, hi in zip(origin, lowest, highest, strict=True) for e in (lo, hi))


def finite_origin(voxel_origin: np.ndarray) -> np.ndarray:
    """``voxel_origin`` as a (3,) float64 array; ValueError unless it is 3 finite numbers (checked on Python
    floats: it runs per frame, like ``place_grid``)."""
    origin = np.asarray(voxel_origin, dtype=np.float64).reshape(-1)
    if origin.shape != (3,) or not all(map(math.isfinite, origin.tolist())):
        raise ValueError(f"voxel_origin must be 3 finite numbers, got {origin.tolist()}")
    return origin


def _float_rows(matrix: np.ndarray, n: int, name: str) -> list[list[float]]:
    """An n x n matrix as rows of Python floats; ValueError unless it is finite and n x n."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (n, n):
        raise ValueError(f"{name} must be a finite {n}x{n} matrix, got shape {m.shape}")
    rows = m.tolist()
    if not all(math.isfinite(v) for row in rows for v in row):
        raise ValueError(f"{name} must be a finite {n}x{n} matrix, got non-finite values")
    return rows


def voxel_centers(
    voxel_origin: np.ndarray, voxel_size: float = VOXEL_SIZE, grid_shape: tuple[int, int, int] = GRID_SHAPE
) -> np.ndarray:
    """World coordinates of every voxel centre, shape (X, Y, Z, 3), indexed [i, j, k] = (x, y, z)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in grid_shape], indexing="ij"), axis=-1)
    return np.asarray(voxel_origin, dtype=np.float64) + (idx + 0.5) * voxel_size


def grid_to_image_matrix(
    intrinsic: np.ndarray,
    cam_pose: np.ndarray,
    voxel_origin: np.ndarray,
    voxel_size: float = VOXEL_SIZE,
    grid_shape: tuple[int, int, int] = GRID_SHAPE,
) -> np.ndarray:
    """4x4 matrix mapping homogeneous normalised grid coordinates to ``[u*z, v*z, z, 1]``.

    ``grid2img = K4 @ inv(cam_pose) @ G`` where ``G`` scales [0,1]^3 to metres and adds voxel_origin.
    ``intrinsic`` is the 3x3 K already scaled to the image the pixels refer to. An affine ``cam_pose``
    (bottom row 0 0 0 1, as every camera pose) is inverted on Python floats through the adjugate of its
    3x3 part, like ``place_grid`` for the frame loop's sake: the same matrix as the numpy product to
    about 1e-15 relative (a test compares them).
    """
    pose = np.asarray(cam_pose, dtype=np.float64)
    (a, b, c, tx), (d, e, f, ty), (g, h, i, tz), bottom = pose.tolist()
    if bottom != [0.0, 0.0, 0.0, 1.0]:  # projective: the general inverse
        k4 = np.eye(4)
        k4[:3, :3] = np.asarray(intrinsic, dtype=np.float64)[:3, :3]
        grid = np.diag([float(n) * voxel_size for n in grid_shape] + [1.0])
        grid[:3, 3] = np.asarray(voxel_origin, dtype=np.float64)
        return k4 @ np.linalg.inv(pose) @ grid
    k = np.asarray(intrinsic, dtype=np.float64)[:3, :3].tolist()
    ox, oy, oz = np.asarray(voxel_origin, dtype=np.float64).reshape(3).tolist()
    # inv(R) = adj(R) / det(R); camera coordinates of the grid axes (columns of inv(R)) and corner
    adj = ((e * i - f * h, c * h - b * i, b * f - c * e),
           (f * g - d * i, a * i - c * g, c * d - a * f),
           (d * h - e * g, b * g - a * h, a * e - b * d))
    det = a * adj[0][0] + b * adj[1][0] + c * adj[2][0]
    px, py, pz = ox - tx, oy - ty, oz - tz
    cam = [[r[0] / det, r[1] / det, r[2] / det, (r[0] * px + r[1] * py + r[2] * pz) / det] for r in adj]
    scale = [float(n) * voxel_size for n in grid_shape] + [1.0]
    rows = [[(kr[0] * cam[0][j] + kr[1] * cam[1][j] + kr[2] * cam[2][j]) * scale[j] for j in range(4)] for kr in k]
    return np.array([*rows, [0.0, 0.0, 0.0, 1.0]])


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ('cuda' or 'cpu'), on torch before and after 2.4."""
    if AUTOCAST_QUERY_BY_DEVICE:
        return torch.is_autocast_enabled(device_type)
    return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def project_points(grid2img: torch.Tensor, points: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Project normalised grid points to pixels.

    grid2img: (B, 4, 4); points: (B, ..., 3) in [0, 1].
    Returns (uv (B, ..., 2) in pixels, depth (B, ..., 1) camera z in metres). Points behind the
    camera get depth <= eps; callers mask them with ``depth > eps``.

    Always float32, also under FP16 autocast: ``grid2img`` entries and ``u*z``, ``v*z`` run into the
    hundreds and thousands, where half precision (11-bit mantissa) moves pixels by whole units.
    """
    device_type = points.device.type
    if device_type in ("cuda", "cpu") and autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return project_points(grid2img.float(), points.float(), eps)
    b = points.shape[0]
    flat = points.reshape(b, -1, 3)
    homo = torch.cat([flat, torch.ones_like(flat[..., :1])], dim=-1)  # (B, N, 4)
    cam = torch.einsum("bij,bnj->bni", grid2img, homo)  # (B, N, 4)
    depth = cam[..., 2:3]
    uv = cam[..., :2] / depth.clamp(min=eps)
    return uv.reshape(*points.shape[:-1], 2), depth.reshape(*points.shape[:-1], 1)


def scale_intrinsic(intrinsic: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Scale a 3x3 K from an image of size src_hw=(H, W) to dst_hw (resize without crop)."""
    (a, b, c), (d, e, f), last = np.asarray(intrinsic, dtype=np.float64)[:3, :3].tolist()  # floats: per frame
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return np.array([[a * sx, b * sx, c * sx], [d * sy, e * sy, f * sy], last])
