"""Renders of label grids and comparison panels (numpy + PIL only), for READMEs, evaluation and debugging.

``render_grid`` draws occupied voxels as shaded cubes in an oblique orthographic view (painter's
algorithm over exposed faces, standard class colours); ``render_panel`` puts the input image, its
depth, the ground truth and a prediction side by side with a class legend.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.classes import CLASS_COLORS, CLASS_NAMES, NUM_CLASSES
from models.geometry import VOXEL_SIZE, voxel_centers

from .occscannet import find_image, read_image, read_pickle
from .scene_format import DEPTH_SCALE, STORED_LAYOUT, from_stored

FACE_SHADE = (0.72, 0.86, 1.0)  # x faces, y faces, z faces (tops brightest)
BACKGROUND = (255, 255, 255)
_CORNERS = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)


def _view(azimuth_deg: float, elevation_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Orthographic view basis: (right, up, forward, to_viewer) for a viewer at azimuth/elevation."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    to_viewer = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    forward = -to_viewer
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return right, up, forward, to_viewer


def camera_azimuth(cam_pose: np.ndarray, offset_deg: float = 35.0) -> float:
    """Azimuth of a viewer behind the camera (looking where it looks), turned by ``offset_deg``."""
    forward = np.asarray(cam_pose, np.float64)[:3, 2]
    return float(np.degrees(np.arctan2(-forward[1], -forward[0])) + offset_deg)


def _exposed_faces(labels: np.ndarray, drawn: np.ndarray, to_viewer: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
    """(voxel indices (M,3), axis, sign) of faces that look at the viewer and have no drawn neighbour."""
    faces = []
    for axis in range(3):
        sign = 1 if to_viewer[axis] > 0 else -1
        if abs(to_viewer[axis]) < 1e-6:
            continue
        neighbour = np.zeros_like(drawn)
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        if sign > 0:
            src[axis], dst[axis] = slice(1, None), slice(None, -1)
        else:
            src[axis], dst[axis] = slice(None, -1), slice(1, None)
        neighbour[tuple(dst)] = drawn[tuple(src)]
        faces.append((np.argwhere(drawn & ~neighbour), axis, sign))
    return faces


def render_grid(labels: np.ndarray, size: tuple[int, int] = (480, 360), azimuth: float = -125.0,
                elevation: float = 40.0, hide: tuple[int, ...] = (1,), cam_pose: np.ndarray | None = None,
                voxel_origin: np.ndarray | None = None, supersample: int = 2,
                bounds: tuple[np.ndarray, np.ndarray] | None = None) -> Image.Image:
    """Render an (X,Y,Z) label grid (0 empty, 1..11, 255 unknown; ``hide`` labels skipped, default the
    ceiling) as shaded cubes. With cam_pose and voxel_origin the view is taken from behind the camera
    and the camera is marked. The view is fitted to ``bounds`` = (lo, hi) voxel corners (default: the
    drawn voxels, or the whole grid when none). Returns an RGB image of ``size`` = (width, height)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"render_grid expects an (X,Y,Z) label grid, got shape {labels.shape}")
    if cam_pose is not None:
        azimuth = camera_azimuth(cam_pose)
    right, up, forward, to_viewer = _view(azimuth, elevation)
    drawn = (labels > 0) & (labels <= NUM_CLASSES) & ~np.isin(labels, hide)
    width, height = size[0] * supersample, size[1] * supersample
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    # Fit the bounds (and the camera) into the image; panels pass shared bounds so renders compare.
    if bounds is None:
        bounds = occupied_bounds(drawn)
    lo, hi = np.asarray(bounds[0], np.float64), np.asarray(bounds[1], np.float64)
    box = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cam_vox = None
    if cam_pose is not None and voxel_origin is not None:
        cam_vox = (np.asarray(cam_pose, np.float64)[:3, 3] - np.asarray(voxel_origin, np.float64)) / VOXEL_SIZE
        box = np.vstack([box, cam_vox])
    sx, sy = box @ right, -(box @ up)
    scale = 0.92 * min(width / (sx.max() - sx.min()), height / (sy.max() - sy.min()))
    ox = width / 2 - scale * (sx.max() + sx.min()) / 2
    oy = height / 2 - scale * (sy.max() + sy.min()) / 2

    def project(points: np.ndarray) -> np.ndarray:
        return np.stack([ox + scale * (points @ right), oy - scale * (points @ up)], axis=-1)

    polys, depths, colours = [], [], []
    for idx, axis, sign in _exposed_faces(labels, drawn, to_viewer):
        if len(idx) == 0:
            continue
        b, c = (axis + 1) % 3, (axis + 2) % 3
        corners = np.repeat(idx[:, None, :].astype(np.float64), 4, axis=1)  # (M,4,3)
        corners[:, :, axis] += 1.0 if sign > 0 else 0.0
        corners[:, :, b] += _CORNERS[:, 0]
        corners[:, :, c] += _CORNERS[:, 1]
        polys.append(project(corners))
        depths.append((idx + 0.5) @ forward)
        rgb = CLASS_COLORS[labels[tuple(idx.T)]].astype(np.float64) * FACE_SHADE[axis]
        colours.append(rgb)
    if polys:
        polys_a, depths_a, colours_a = np.concatenate(polys), np.concatenate(depths), np.concatenate(colours)
        outline = scale >= 5.0  # voxel edges only where cubes are large enough to show them
        for i in np.argsort(-depths_a, kind="stable"):  # far to near
            fill = tuple(int(v) for v in colours_a[i])
            edge = tuple(int(v * 0.7) for v in colours_a[i]) if outline else None
            draw.polygon([tuple(p) for p in polys_a[i]], fill=fill, outline=edge)
    if cam_vox is not None:
        _draw_camera(draw, project, cam_vox, np.asarray(cam_pose, np.float64), scale)
    return image.resize(size, Image.LANCZOS) if supersample > 1 else image


def occupied_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) voxel-corner bounds of the True voxels of a mask (the whole grid when none)."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return np.zeros(3), np.asarray(mask.shape, np.float64)
    return idx.min(axis=0).astype(np.float64), idx.max(axis=0).astype(np.float64) + 1.0


def _draw_camera(draw: ImageDraw.ImageDraw, project, cam_vox: np.ndarray, cam_pose: np.ndarray, scale: float) -> None:
    """A small frustum marker at the camera position, pointing along its optical axis."""
    r = cam_pose[:3, :3]
    tip = cam_vox
    far = [cam_vox + 6.0 * (r[:, 2] + 0.5 * sx * r[:, 0] + 0.4 * sy * r[:, 1]) for sx, sy in
           ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    p_tip = project(tip[None])[0]
    p_far = project(np.array(far))
    width = max(1, int(scale * 0.15))
    foot = project(np.array([[cam_vox[0], cam_vox[1], 0.0]]))[0]  # a pole down to the floor shows the position
    draw.line([tuple(p_tip), tuple(foot)], fill=(200, 30, 30), width=width)
    for p in p_far:
        draw.line([tuple(p_tip), tuple(p)], fill=(20, 20, 20), width=width)
    draw.polygon([tuple(p) for p in p_far], outline=(20, 20, 20), width=width)


def project_labels(labels: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray, voxel_origin: np.ndarray,
                   size_hw: tuple[int, int], hide: tuple[int, ...] = ()) -> np.ndarray:
    """Label image (H,W) uint8 of the nearest occupied voxel along each pixel ray (0 = none).

    Voxel centres are projected with K (of an image of ``size_hw``) and splatted as squares of their
    projected size, z-buffered; comparing this with the RGB image shows the grid's axis convention.
    """
    labels = np.asarray(labels)
    h, w = size_hw
    occupied = (labels > 0) & (labels <= NUM_CLASSES) & ~np.isin(labels, hide)
    centers = voxel_centers(voxel_origin, VOXEL_SIZE, labels.shape)[occupied]
    lab = labels[occupied]
    world_to_cam = np.linalg.inv(np.asarray(cam_pose, np.float64))
    cam = centers @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    k = np.asarray(intrinsic, np.float64)[:3, :3]
    front = cam[:, 2] > 0.05
    cam, lab = cam[front], lab[front]
    z = cam[:, 2]
    u, v = k[0, 0] * cam[:, 0] / z + k[0, 2], k[1, 1] * cam[:, 1] / z + k[1, 2]
    radius = np.clip(np.ceil(0.5 * VOXEL_SIZE * k[0, 0] / z), 1, 12).astype(np.int64)
    out = np.zeros((h, w), np.uint8)
    if len(z) == 0:
        return out
    pix, depth, lbl = [], [], []
    for dy in range(-12, 13):
        for dx in range(-12, 13):
            sel = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
            uu, vv = np.round(u[sel]).astype(np.int64) + dx, np.round(v[sel]).astype(np.int64) + dy
            ok = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
            pix.append(vv[ok] * w + uu[ok])
            depth.append(z[sel][ok])
            lbl.append(lab[sel][ok])
    pix, depth, lbl = np.concatenate(pix), np.concatenate(depth), np.concatenate(lbl)
    order = np.lexsort((depth, pix))  # by pixel, nearest first
    pix, lbl = pix[order], lbl[order]
    first = np.ones(len(pix), bool)
    first[1:] = pix[1:] != pix[:-1]
    out.reshape(-1)[pix[first]] = lbl[first]
    return out


def colorize_depth(depth: np.ndarray, max_depth: float | None = None) -> np.ndarray:
    """(H,W) metres -> (H,W,3) uint8 with a perceptual ramp (near warm, far cool); invalid = black."""
    depth = np.asarray(depth, np.float64)
    valid = depth > 0
    if max_depth is None:
        max_depth = float(np.percentile(depth[valid], 99)) if valid.any() else 1.0
    t = np.clip(depth / max(max_depth, 1e-6), 0.0, 1.0)
    anchors = np.array([[253, 231, 37], [94, 201, 98], [33, 145, 140], [59, 82, 139], [68, 1, 84]], np.float64)
    pos = t * (len(anchors) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(anchors) - 2)
    frac = (pos - lo)[..., None]
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
    rgb[~valid] = 0
    return rgb.astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def legend(width: int, classes: tuple[int, ...] = tuple(range(1, NUM_CLASSES + 1)), font_size: int = 14) -> Image.Image:
    """A strip of colour swatches with class names."""
    font = _font(font_size)
    cell = max(110, font_size * 8)
    per_row = max(1, width // cell)
    rows = (len(classes) + per_row - 1) // per_row
    strip = Image.new("RGB", (width, rows * (font_size + 10) + 6), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for n, c in enumerate(classes):
        x, y = 8 + (n % per_row) * cell, 4 + (n // per_row) * (font_size + 10)
        draw.rectangle([x, y + 2, x + font_size, y + font_size + 2], fill=tuple(int(v) for v in CLASS_COLORS[c]),
                       outline=(60, 60, 60))
        draw.text((x + font_size + 6, y), CLASS_NAMES[c], fill=(20, 20, 20), font=font)
    return strip


def render_panel(rgb: np.ndarray, depth: np.ndarray | None, gt: np.ndarray | None, pred: np.ndarray | None = None,
                 cam_pose: np.ndarray | None = None, voxel_origin: np.ndarray | None = None,
                 tile: tuple[int, int] = (400, 300), title: str | None = None,
                 out_path: str | Path | None = None) -> Image.Image:
    """Input image | depth | ground truth | prediction (those given), with titles and a class legend.

    rgb (H,W,3) uint8; depth (H,W) metres; gt / pred (X,Y,Z) label grids. Saves a PNG if out_path.
    """
    font = _font(16)
    tiles: list[tuple[str, Image.Image]] = [("input image", Image.fromarray(np.asarray(rgb, np.uint8)).resize(tile))]
    if depth is not None:
        tiles.append(("depth", Image.fromarray(colorize_depth(depth)).resize(tile, Image.NEAREST)))
    grids = [(name, np.asarray(g)) for name, g in (("ground truth", gt), ("prediction", pred)) if g is not None]
    if grids:
        union = np.zeros(grids[0][1].shape, bool)
        for _, g in grids:
            union |= (g > 0) & (g <= NUM_CLASSES) & (g != 1)
        bounds = occupied_bounds(union)
        for name, g in grids:
            tiles.append((name, render_grid(g, tile, cam_pose=cam_pose, voxel_origin=voxel_origin, bounds=bounds)))
    head = 26 if title else 0
    label_h = 24
    strip = legend(tile[0] * len(tiles))
    panel = Image.new("RGB", (tile[0] * len(tiles), head + label_h + tile[1] + strip.height), BACKGROUND)
    draw = ImageDraw.Draw(panel)
    if title:
        draw.text((8, 4), title, fill=(0, 0, 0), font=font)
    for n, (name, im) in enumerate(tiles):
        draw.text((n * tile[0] + 8, head + 3), name, fill=(0, 0, 0), font=font)
        panel.paste(im, (n * tile[0], head + label_h))
    panel.paste(strip, (0, head + label_h + tile[1]))
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        panel.save(out_path)
    return panel


def render_sample(root: str | Path, sample_id: str, out_path: str | Path | None = None,
                  tile: tuple[int, int] = (400, 300)) -> Image.Image:
    """Panel (image, depth, ground truth) of one sample of an Occ-ScanNet-format dataset."""
    data = read_pickle(root, sample_id)
    rgb = read_image(sample_id, find_image(root, sample_id, data, "img"), "RGB")
    depth = read_image(sample_id, find_image(root, sample_id, data, "depth_gt"), "I").astype(np.float32) / DEPTH_SCALE
    gt = from_stored(np.asarray(data["target_1_4"]), STORED_LAYOUT)
    return render_panel(rgb, depth, gt, None, data["cam_pose"], data["voxel_origin"], tile, sample_id, out_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render image | depth | ground truth panels of dataset samples.")
    parser.add_argument("--root", required=True, help="Occ-ScanNet-format dataset root")
    parser.add_argument("--samples", nargs="+", required=True, help="sample ids <scene>/<frame>")
    parser.add_argument("--out", required=True, help="output PNG (panels stacked vertically)")
    parser.add_argument("--tile", type=int, nargs=2, default=(400, 300), metavar=("W", "H"))
    args = parser.parse_args(argv)
    panels = [render_sample(args.root, s, tile=tuple(args.tile)) for s in args.samples]
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), BACKGROUND)
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out, optimize=True)
    print(f"wrote {args.out} ({out.width}x{out.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
