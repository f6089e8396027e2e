"""Vectorised numpy ray casting of box rooms (RGB + metric depth) and voxelisation of the ground truth."""
from __future__ import annotations

import numpy as np

from models.geometry import GRID_SHAPE, VOXEL_SIZE, voxel_centers

from .scene_layout import TEX_FABRIC, TEX_SCREEN, TEX_TILES, TEX_WINDOW, TEX_WOOD, Room

RAY_CHUNK = 32768
VOXEL_MARGIN = 0.02  # boxes are grown by this much when voxelised so 5-6 cm parts (legs) still land in the grid


def camera_rays(intrinsic: np.ndarray, height: int, width: int) -> np.ndarray:
    """Camera-frame ray directions with unit z (so ray parameter t = camera depth), shape (H*W, 3)."""
    k = np.asarray(intrinsic, np.float64)[:3, :3]
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    x = (u - k[0, 2] - k[0, 1] * (v - k[1, 2]) / k[1, 1]) / k[0, 0]
    y = (v - k[1, 2]) / k[1, 1]
    return np.stack([x, y, np.ones_like(x)], axis=-1).reshape(-1, 3)


def cast_rays(origin: np.ndarray, dirs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest box hit per ray by the slab method over all boxes at once (processed in ray chunks).

    origin (3,), dirs (R,3), lo/hi (N,3) -> (t (R,) float32, inf where no hit; box (R,) int; axis (R,)
    int of the face hit, 0/1/2).
    """
    lo_o = (lo - origin).astype(np.float32).T  # (3, N)
    hi_o = (hi - origin).astype(np.float32).T
    n_rays = dirs.shape[0]
    t_out = np.full(n_rays, np.inf, np.float32)
    box_out = np.zeros(n_rays, np.int64)
    axis_out = np.zeros(n_rays, np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for start in range(0, n_rays, RAY_CHUNK):
            d = dirs[start:start + RAY_CHUNK].astype(np.float32)
            inv = (1.0 / np.where(np.abs(d) < 1e-9, np.float32(1e-9), d)).T  # (3, C)
            near, far = [], []
            for a in range(3):  # per-axis slabs, each (C, N) contiguous
                t1 = inv[a][:, None] * lo_o[a][None, :]
                t2 = inv[a][:, None] * hi_o[a][None, :]
                near.append(np.minimum(t1, t2))
                far.append(np.maximum(t1, t2))
            t_enter = np.maximum(np.maximum(near[0], near[1]), near[2])
            t_exit = np.minimum(np.minimum(far[0], far[1]), far[2])
            t_enter = np.where((t_exit >= t_enter) & (t_enter > 1e-3), t_enter, np.inf)
            box = t_enter.argmin(axis=1)  # (C,)
            rows = np.arange(box.shape[0])
            sl = slice(start, start + len(box))
            t_out[sl] = t_enter[rows, box]
            box_out[sl] = box
            axis_out[sl] = np.stack([n[rows, box] for n in near], axis=1).argmax(axis=1)
    return t_out, box_out, axis_out


def _hash(*values: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) from integer arrays."""
    h = np.zeros(np.broadcast(*values).shape, np.uint64)
    for i, v in enumerate(values):
        h ^= (np.asarray(v).astype(np.int64).astype(np.uint64) + np.uint64(0x9E3779B9 + i)) * np.uint64(2654435761)
        h ^= h >> np.uint64(13)
    return (h % np.uint64(10007)).astype(np.float32) / 10007.0


def texture(kind: np.ndarray, box: np.ndarray, s: np.ndarray, t: np.ndarray, z: np.ndarray,
            edge: np.ndarray) -> np.ndarray:
    """Per-pixel brightness factor (~1) from the texture kind and face coordinates (s, t) in metres.

    ``edge`` is the distance (m) to the nearest edge of the face, used for window frames.
    """
    out = 1.0 + 0.04 * np.sin(2.1 * s + 6.0 * _hash(box)) * np.sin(1.7 * t + 3.0 * _hash(box, 1))
    wood = kind == TEX_WOOD
    plank = np.floor(s / 0.14)
    out = np.where(wood, 1.0 + 0.16 * (_hash(plank, box) - 0.5) + 0.05 * np.sin(40.0 * t + 3.0 * plank), out)
    tiles = kind == TEX_TILES
    ts, tt = s / 0.45, t / 0.45
    grout = (np.abs(ts - np.round(ts)) < 0.03) | (np.abs(tt - np.round(tt)) < 0.03)
    checker = (np.floor(ts) + np.floor(tt)) % 2
    out = np.where(tiles, np.where(grout, 0.7, 1.0 + 0.06 * checker), out)
    fabric = kind == TEX_FABRIC
    out = np.where(fabric, 1.0 + 0.06 * np.sin(90.0 * s) * np.sin(90.0 * t) + 0.05 * np.sin(3.0 * s + t), out)
    screen = kind == TEX_SCREEN
    out = np.where(screen, 1.0 + 1.5 * np.clip(np.sin(2.0 * s + 1.3 * t), 0, 1), out)
    window = kind == TEX_WINDOW
    out = np.where(window, np.where(edge < 0.05, 1.12, 0.85 + 0.25 * np.clip(z - 1.0, 0, 1.5)), out)
    return out.astype(np.float32)


def render_rgbd(room: Room, cam_pose: np.ndarray, intrinsic: np.ndarray, height: int, width: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render RGB (H,W,3) uint8 and metric depth (H,W) float32 (0 = invalid) of a room."""
    boxes = room.arrays()
    room_from_cam = np.linalg.inv(room.room_to_world()) @ np.asarray(cam_pose, np.float64)
    origin = room_from_cam[:3, 3]
    dirs = (camera_rays(intrinsic, height, width) @ room_from_cam[:3, :3].T).astype(np.float32)  # (R,3) room
    t, box, axis = cast_tiled(origin, dirs, boxes["lo"], boxes["hi"], room_from_cam, intrinsic, height, width)
    valid = np.isfinite(t)
    t = np.where(valid, t, 0.0).astype(np.float32)
    point = origin.astype(np.float32)[None] + dirs * t[:, None]  # (R,3)
    normal = np.where(axis[:, None] == np.arange(3)[None], -np.sign(dirs), 0.0).astype(np.float32)
    s_idx, t_idx = ((axis + 1) % 3)[:, None], ((axis + 2) % 3)[:, None]
    s_coord = np.take_along_axis(point, s_idx, 1)[:, 0]
    t_coord = np.take_along_axis(point, t_idx, 1)[:, 0]
    lo, hi = boxes["lo"][box], boxes["hi"][box]
    edge = np.minimum.reduce([s_coord - np.take_along_axis(lo, s_idx, 1)[:, 0],
                              np.take_along_axis(hi, s_idx, 1)[:, 0] - s_coord,
                              t_coord - np.take_along_axis(lo, t_idx, 1)[:, 0],
                              np.take_along_axis(hi, t_idx, 1)[:, 0] - t_coord])
    tex = texture(boxes["texture"][box], box, s_coord, t_coord, point[:, 2], edge)
    light = _light_direction(rng).astype(np.float32)
    shade = 0.55 + 0.45 * np.clip(normal @ light, 0, 1) + 0.08 * (normal[:, 2] > 0.5)
    shade = shade / (1.0 + 0.015 * t**2)
    gain = np.float32(rng.uniform(0.85, 1.15))
    rgb = boxes["color"][box] * (tex * shade * gain)[:, None]
    rgb += np.float32(0.015) * rng.standard_normal(rgb.shape, dtype=np.float32)
    rgb[~valid] = 0.0
    rgb8 = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(height, width, 3)
    depth = t * (1.0 + np.float32(0.002) * rng.standard_normal(t.shape, dtype=np.float32))
    depth = np.where(valid & (depth < 10.0), depth, 0.0).astype(np.float32).reshape(height, width)
    return rgb8, depth


def box_pixel_bounds(lo: np.ndarray, hi: np.ndarray, room_from_cam: np.ndarray, intrinsic: np.ndarray,
                     height: int, width: int) -> np.ndarray:
    """Pixel bounding rectangle (u0, v0, u1, v1) of each box's projection, (N, 4).

    Boxes entirely behind the camera get an empty rectangle; boxes crossing the camera plane get the
    whole image (their projection is unbounded).
    """
    corners = np.stack([np.where(np.array(bits)[None, :] == 1, hi, lo) for bits in np.ndindex(2, 2, 2)], 1)
    cam_from_room = np.linalg.inv(room_from_cam)
    cam = corners @ cam_from_room[:3, :3].T + cam_from_room[:3, 3]  # (N, 8, 3)
    k = np.asarray(intrinsic, np.float64)[:3, :3]
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = k[0, 0] * cam[..., 0] / z + k[0, 1] * cam[..., 1] / z + k[0, 2]
        v = k[1, 1] * cam[..., 1] / z + k[1, 2]
    rect = np.stack([u.min(1), v.min(1), u.max(1), v.max(1)], axis=1)
    crossing = (z <= 1e-3).any(axis=1)
    rect[crossing] = [-1, -1, width + 1, height + 1]
    rect[(z <= 1e-3).all(axis=1)] = [1, 1, -1, -1]
    return rect


def cast_tiled(origin: np.ndarray, dirs: np.ndarray, lo: np.ndarray, hi: np.ndarray, room_from_cam: np.ndarray,
               intrinsic: np.ndarray, height: int, width: int, tile: int = 48) -> tuple[np.ndarray, ...]:
    """``cast_rays`` per image tile against only the boxes whose projection overlaps the tile."""
    rect = box_pixel_bounds(lo, hi, room_from_cam, intrinsic, height, width)
    t = np.full(height * width, np.inf, np.float32)
    box = np.zeros(height * width, np.int64)
    axis = np.zeros(height * width, np.int64)
    pix = np.arange(height * width).reshape(height, width)
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            sel = np.nonzero((rect[:, 0] <= x1 + 1) & (rect[:, 2] >= x0 - 1) &
                             (rect[:, 1] <= y1 + 1) & (rect[:, 3] >= y0 - 1))[0]
            if len(sel) == 0:
                continue
            idx = pix[y0:y1, x0:x1].ravel()
            tt, bb, aa = cast_rays(origin, dirs[idx], lo[sel], hi[sel])
            t[idx], box[idx], axis[idx] = tt, sel[bb], aa
    return t, box, axis


def _light_direction(rng: np.random.Generator) -> np.ndarray:
    d = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), 1.0])
    return d / np.linalg.norm(d)


def voxelize(room: Room, voxel_origin: np.ndarray, voxel_size: float = VOXEL_SIZE,
             grid_shape: tuple[int, int, int] = GRID_SHAPE) -> np.ndarray:
    """Ground-truth labels (X,Y,Z) uint8 indexed (x, y, z): boxes by class (later boxes win), free space
    inside the room 0, everything outside the room's walls, floor and ceiling 255."""
    centers = voxel_centers(voxel_origin, voxel_size, grid_shape).reshape(-1, 3)
    room_from_world = np.linalg.inv(room.room_to_world())
    pts = centers @ room_from_world[:3, :3].T + room_from_world[:3, 3]
    lx, ly, h = room.size
    inside = (pts[:, 0] > 0) & (pts[:, 0] < lx) & (pts[:, 1] > 0) & (pts[:, 1] < ly) & (pts[:, 2] < h)
    labels = np.where(inside, 0, 255).astype(np.uint8)
    boxes = room.arrays()
    coords = [np.ascontiguousarray(pts[:, a], dtype=np.float32) for a in range(3)]
    grid_lo, grid_hi = pts.min(axis=0), pts.max(axis=0)
    for lo, hi, label in zip(boxes["lo"], boxes["hi"], boxes["label"], strict=True):
        lo_m, hi_m = lo - VOXEL_MARGIN, hi + VOXEL_MARGIN
        if np.any(hi_m < grid_lo) or np.any(lo_m > grid_hi):
            continue  # box entirely outside the grid's room-frame bounding box
        near = (coords[0] >= lo_m[0]) & (coords[0] <= hi_m[0]) & (coords[1] >= lo_m[1]) & \
            (coords[1] <= hi_m[1]) & (coords[2] >= lo_m[2]) & (coords[2] <= hi_m[2])
        labels[near] = label
    return labels.reshape(grid_shape)

