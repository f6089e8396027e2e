"""Frame preprocessing shared by the ROS node, replay, benchmarks and export checks.

Resizes the RGB image (and optional depth) to the network input size, scales K accordingly,
places the grid when no ``voxel_origin`` is given, and builds ``grid2img``; all numpy, batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .geometry import grid_to_image_matrix, place_grid, scale_intrinsic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FrameInputs:
    """Network inputs of one frame (numpy): image (1,3,h,w) f32, grid2img (1,4,4) f32,
    depth (1,1,h,w) f32 metres (0 = invalid) or None, voxel_origin (3,) f64."""

    image: np.ndarray
    grid2img: np.ndarray
    depth: np.ndarray | None
    voxel_origin: np.ndarray


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB, uint8 0..255 or float in [0,1] -> float32 normalised with ImageNet mean/std."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"normalize_image expects (B,3,H,W), got {tuple(image.shape)}")
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_image(image_rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 HxWx3 image with PIL."""
    from PIL import Image

    h, w = size_hw
    if image_rgb.shape[:2] == (h, w):
        return image_rgb
    return np.asarray(Image.fromarray(image_rgb).resize((w, h), Image.BILINEAR))


def resize_depth(depth: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (never blends valid with invalid depth); pixel centres aligned."""
    h, w = size_hw
    rows = np.minimum(((np.arange(h) + 0.5) * depth.shape[0] / h).astype(np.int64), depth.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * depth.shape[1] / w).astype(np.int64), depth.shape[1] - 1)
    return depth[rows[:, None], cols[None, :]]


def clean_depth(depth: np.ndarray) -> np.ndarray:
    """Float32 metres with NaN, inf and negative values set to 0 (invalid)."""
    d = depth.astype(np.float32, copy=True)
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d


def _check_inputs(image_rgb: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray, depth: np.ndarray | None) -> None:
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb must be a uint8 numpy array, got {getattr(image_rgb, 'dtype', type(image_rgb))}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or min(image_rgb.shape[:2]) < 1:
        raise ValueError(f"image_rgb must be HxWx3 (RGB), got shape {image_rgb.shape}")
    if intrinsic.shape[0] < 3 or intrinsic.shape[1] < 3 or intrinsic.ndim != 2:
        raise ValueError(f"intrinsic must be 3x3 (or 3x4 / 4x4 with K top-left), got shape {intrinsic.shape}")
    k = intrinsic[:3, :3]
    if not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError(f"intrinsic must be finite with positive focal lengths, got fx={k[0, 0]}, fy={k[1, 1]}")
    if cam_pose.shape != (4, 4) or not np.all(np.isfinite(cam_pose)):
        raise ValueError(f"cam_pose must be a finite 4x4 camera->world matrix, got shape {cam_pose.shape}")
    if depth is not None:
        if depth.ndim == 3 and depth.shape[2] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2:
            raise ValueError(f"depth must be HxW metres, got shape {depth.shape}")
        if not np.issubdtype(depth.dtype, np.floating):
            raise ValueError(f"depth must be float metres, got dtype {depth.dtype} (convert 16-bit millimetres first)")


def preprocess(
    image_rgb: np.ndarray,
    intrinsic: np.ndarray,
    cam_pose: np.ndarray,
    config: ModelConfig,
    depth: np.ndarray | None = None,
    voxel_origin: np.ndarray | None = None,
) -> FrameInputs:
    """uint8 HxWx3 RGB + 3x3 K (of that image) + 4x4 camera->world [+ HxW depth metres] -> FrameInputs.

    The grid is placed by ``geometry.place_grid`` when ``voxel_origin`` is None. Depth may have
    another resolution than the image (same field of view); it is resized nearest-neighbour.
    """
    intrinsic = np.asarray(intrinsic, dtype=np.float64)
    cam_pose = np.asarray(cam_pose, dtype=np.float64)
    depth = None if depth is None else np.asarray(depth)
    _check_inputs(image_rgb, intrinsic, cam_pose, depth)
    size_hw = (int(config.image_size[0]), int(config.image_size[1]))
    grid_shape = tuple(int(n) for n in config.grid_shape)
    if voxel_origin is None:
        voxel_origin = place_grid(cam_pose, voxel_size=config.voxel_size, grid_shape=grid_shape)
    voxel_origin = np.asarray(voxel_origin, dtype=np.float64).reshape(-1)
    if voxel_origin.shape != (3,) or not np.all(np.isfinite(voxel_origin)):
        raise ValueError(f"voxel_origin must be 3 finite numbers, got {voxel_origin}")

    k = scale_intrinsic(intrinsic[:3, :3], image_rgb.shape[:2], size_hw)
    grid2img = grid_to_image_matrix(k, cam_pose, voxel_origin, config.voxel_size, grid_shape)
    rgb = resize_image(image_rgb, size_hw).astype(np.float32) / 255.0
    image = (rgb - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    depth_out = None
    if depth is not None:
        depth2d = depth[..., 0] if depth.ndim == 3 else depth
        depth_out = resize_depth(clean_depth(depth2d), size_hw)[None, None]
    return FrameInputs(
        image=np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32),
        grid2img=grid2img[None].astype(np.float32),
        depth=None if depth_out is None else np.ascontiguousarray(depth_out, dtype=np.float32),
        voxel_origin=voxel_origin,
    )
