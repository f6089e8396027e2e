"""Check the axis layout of stored ``target_1_4`` grids against the depth images of a dataset.

For each sample, occupied voxels (floor and ceiling excluded: they look the same under an x/y swap)
are projected into the depth image with K and cam_pose. With the right layout, a voxel is either
near the observed surface (|z - depth| <= tol) or hidden behind it; voxels floating in front of the
observed surface (z < depth - tol) mean the camera sees through them, i.e. a wrong layout. The
score of a layout is ``near / (near + in_front)``; the stored layout of the loader should win.

    python -m training.check_axes --root DIR [--split val] [--n 20] [--tol 0.2] [--render DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from models.classes import label_colors
from models.geometry import scale_intrinsic, voxel_centers

from .occscannet import find_image, read_image, read_pickle
from .render import project_labels
from .scene_format import DEPTH_SCALE, LAYOUTS, STORED_LAYOUT, from_stored, read_split

IGNORED_LABELS = (1, 2)  # ceiling, floor: symmetric under a swap of the two horizontal axes


def _window_min_max(depth: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel min / max of valid depth in a (2r+1)^2 window (inf / -inf where none is valid)."""
    lo = np.where(depth > 0, depth, np.inf)
    hi = np.where(depth > 0, depth, -np.inf)
    size = 2 * radius + 1
    lo = sliding_window_view(np.pad(lo, radius, constant_values=np.inf), (size, size)).min(axis=(2, 3))
    hi = sliding_window_view(np.pad(hi, radius, constant_values=-np.inf), (size, size)).max(axis=(2, 3))
    return lo, hi


def depth_agreement(target_xyz: np.ndarray, depth: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
                    voxel_origin: np.ndarray, tol: float = 0.2, radius: int = 2) -> tuple[float, int]:
    """(score, n): share of projected occupied voxels that are near the depth surface rather than in front
    of it, among the n voxels that project onto valid depth and are not hidden behind the surface.

    ``intrinsic`` is the 3x3 K of the depth image; ``depth`` is (H, W) metres with 0 invalid.
    """
    occupied = (target_xyz > 0) & (target_xyz < 255) & ~np.isin(target_xyz, IGNORED_LABELS)
    centers = voxel_centers(voxel_origin)[occupied]  # (M, 3) world
    if len(centers) == 0:
        return float("nan"), 0
    world_to_cam = np.linalg.inv(np.asarray(cam_pose, np.float64))
    cam = centers @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    k = np.asarray(intrinsic, np.float64)[:3, :3]
    z = cam[:, 2]
    front = z > 0.1
    u = np.round(k[0, 0] * cam[front, 0] / z[front] + k[0, 2]).astype(np.int64)
    v = np.round(k[1, 1] * cam[front, 1] / z[front] + k[1, 2]).astype(np.int64)
    z = z[front]
    h, w = depth.shape
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    u, v, z = u[inside], v[inside], z[inside]
    d_min, d_max = _window_min_max(depth, radius)
    lo, hi = d_min[v, u], d_max[v, u]
    valid = np.isfinite(lo)
    in_front = valid & (z < lo - tol)
    near = valid & ~in_front & (z <= hi + tol)
    n = int(in_front.sum() + near.sum())
    return (float(near.sum()) / n if n else float("nan")), n


def layout_scores(stored: np.ndarray, depth: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
                  voxel_origin: np.ndarray, tol: float = 0.2) -> dict[str, tuple[float, int]]:
    """``depth_agreement`` of a stored grid read with each candidate layout."""
    return {layout: depth_agreement(from_stored(stored, layout), depth, intrinsic, cam_pose, voxel_origin, tol)
            for layout in LAYOUTS}


def load_raw(root: str | Path, sample_id: str) -> dict:
    """The pkl dict plus depth (H,W metres) and the 3x3 K scaled to the depth resolution."""
    data = read_pickle(root, sample_id)
    with Image.open(find_image(root, sample_id, data, "img")) as im:
        rgb_hw = (im.height, im.width)
    depth = read_image(sample_id, find_image(root, sample_id, data, "depth_gt"), "I").astype(np.float32) / DEPTH_SCALE
    data["depth"] = depth
    data["depth_intrinsic"] = scale_intrinsic(np.asarray(data["intrinsic"])[:3, :3], rgb_hw, depth.shape)
    return data


def render_layouts(root: str | Path, sample_id: str, data: dict, out_path: Path) -> None:
    """PNG: the RGB image next to the grid projected into it with each candidate layout."""
    rgb = read_image(sample_id, find_image(root, sample_id, data, "img"), "RGB")
    scale = 320 / rgb.shape[1]
    hw = (max(1, round(rgb.shape[0] * scale)), 320)
    k = scale_intrinsic(np.asarray(data["intrinsic"])[:3, :3], rgb.shape[:2], hw)
    tiles = [np.asarray(Image.fromarray(rgb).resize(hw[::-1]))]
    for layout in LAYOUTS:
        labels = project_labels(from_stored(np.asarray(data["target_1_4"]), layout), k, data["cam_pose"],
                                data["voxel_origin"], hw, hide=(1,))
        colours = label_colors(labels)
        colours[labels == 0] = 255
        tiles.append(colours)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out_path)


def check_dataset(root: str | Path, split: str = "val", n: int = 20, tol: float = 0.2, seed: int = 0,
                  render_dir: str | Path | None = None) -> dict:
    """Score both layouts on n random samples of a split; returns per-sample and mean scores.

    With ``render_dir``, also writes one PNG per sample: image | grid projected as 'yxz' | as 'xyz'.
    """
    ids = read_split(root, split)
    rng = np.random.default_rng(seed)
    chosen = [ids[i] for i in sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))]
    rows = []
    for sample_id in chosen:
        data = load_raw(root, sample_id)
        scores = layout_scores(np.asarray(data["target_1_4"]), data["depth"], data["depth_intrinsic"],
                               data["cam_pose"], data["voxel_origin"], tol)
        rows.append((sample_id, scores))
        if render_dir is not None:
            render_layouts(root, sample_id, data, Path(render_dir) / (sample_id.replace("/", "_") + ".png"))
    means = {layout: float(np.nanmean([s[layout][0] for _, s in rows])) if rows else float("nan")
             for layout in LAYOUTS}
    best = max(LAYOUTS, key=lambda k: -1.0 if np.isnan(means[k]) else means[k])
    return {"rows": rows, "mean": means, "best": best}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check which axis layout of target_1_4 matches the depth images.")
    parser.add_argument("--root", required=True, help="Occ-ScanNet-format dataset root")
    parser.add_argument("--split", default="val", help="train, val or a split-list path")
    parser.add_argument("--n", type=int, default=20, help="samples to check")
    parser.add_argument("--tol", type=float, default=0.2, help="metres between voxel centre and depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", default=None, metavar="DIR",
                        help="write image | projected grid (yxz) | projected grid (xyz) PNGs here")
    args = parser.parse_args(argv)
    try:
        report = check_dataset(args.root, args.split, args.n, args.tol, args.seed, args.render)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"check_axes: error: {exc}", file=sys.stderr)
        return 2
    print(f"{'sample':<28}" + "".join(f"{layout:>16}" for layout in LAYOUTS))
    for sample_id, scores in report["rows"]:
        print(f"{sample_id:<28}" + "".join(f"{scores[k][0]:>10.3f} n={scores[k][1]:<4d}" for k in LAYOUTS))
    print("mean" + " " * 24 + "".join(f"{report['mean'][k]:>16.3f}" for k in LAYOUTS))
    best = report["best"]
    if best == STORED_LAYOUT:
        print(f"OK: the loader's layout '{STORED_LAYOUT}' agrees best with the depth images.")
        return 0
    print(f"MISMATCH: layout '{best}' agrees better than the loader's default '{STORED_LAYOUT}'; "
          f"pass target_layout='{best}' to OccScanNetDataset for this data.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
