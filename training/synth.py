"""Synthetic indoor scenes in the Occ-ScanNet format (``discene-synth``).

Each scene is a random furnished room (``scene_layout``); each frame is a camera at robot or human
height (0.4-1.7 m) looking into the room with a small pitch. RGB and metric depth come from numpy ray
casting (``synth_render``), the label grid from voxelising the room in a grid placed by
``models.geometry.place_grid(cam_pose, floor_z=0)``. Files follow ``training/scene_format.py``
(target grids written in the stored ``yxz`` layout, exactly like the public files).

Ground truth: box voxels by class (solid interiors), free space inside the room 0, everything beyond
the walls, floor and ceiling 255. Occluded voxels inside the room keep their true label (as the
public data, which voxelises the whole scanned mesh). Deterministic: scene ``i`` of seed ``S`` uses
``numpy.random.default_rng([S, i])``, independent of worker count.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from models.checkpoint import atomic_write, check_output_folder
from models.geometry import place_grid

from .data import worker_context
from .scene_format import (
    DEPTH_SCALE,
    GATHERED,
    IMAGES,
    SPLIT_FILES,
    downsample_labels,
    sample_paths,
    split_line,
    to_stored,
    write_pickle,
)
from .scene_layout import Room, build_room
from .synth_render import render_rgbd, voxelize

MIN_KNOWN_FRACTION = 0.35   # a frame's grid must be at least this much inside the room
MIN_OBJECT_VOXELS = 40      # and hold this many voxels of furniture classes (labels 5..11)
MAX_IMAGE_SIDE = 4096       # rendering takes ~170 bytes per pixel: 4096x4096 is ~3 GB
META_FILE = "synth_meta.json"


def default_intrinsic(width: int, height: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """4x4 K like ScanNet's (fx = fy ~ 577.9 at 640x480), with a small random focal jitter if rng is given."""
    f = 1.0 + (rng.normal(0.0, 0.02) if rng is not None else 0.0)
    k = np.eye(4)
    k[0, 0], k[1, 1] = 0.903 * width * f, 1.204 * height * f
    k[0, 2], k[1, 2] = (width - 1) / 2.0, (height - 1) / 2.0
    return k


def look_pose(position: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    """4x4 camera->frame pose of an OpenCV camera at ``position`` (z up frame), heading yaw, pitch (+ up)."""
    forward = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, forward, position
    return pose


def _free_distance(room: Room, pos: np.ndarray, yaw: float) -> float:
    """Horizontal distance from pos to the room's wall along heading yaw."""
    d = np.array([np.cos(yaw), np.sin(yaw)])
    dist = []
    for axis in range(2):
        if abs(d[axis]) > 1e-9:
            bound = room.size[axis] if d[axis] > 0 else 0.0
            dist.append((bound - pos[axis]) / d[axis])
    return float(min(dist))


def sample_view(room: Room, rng: np.random.Generator, tries: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A camera pose (world) looking into the room, its voxel_origin and its (x,y,z) label grid."""
    lx, ly, _ = room.size
    best = None
    for _ in range(tries):
        pos = np.array([rng.uniform(0.4, lx - 0.4), rng.uniform(0.4, ly - 0.4), rng.uniform(0.4, 1.7)])
        if any(x0 - 0.25 < pos[0] < x1 + 0.25 and y0 - 0.25 < pos[1] < y1 + 0.25 and pos[2] < top + 0.15
               for x0, y0, x1, y1, top in room.footprints):
            continue
        target = room.size[:2] / 2 + rng.normal(0.0, 0.25, 2) * room.size[:2]
        yaw = float(np.arctan2(target[1] - pos[1], target[0] - pos[0]) + rng.normal(0.0, 0.3))
        if _free_distance(room, pos, yaw) < 1.5:
            continue
        pitch = float(rng.uniform(-0.35, 0.08) - 0.12 * (pos[2] - 0.4))
        cam_pose = room.room_to_world() @ look_pose(pos, yaw, pitch)
        origin = place_grid(cam_pose, floor_z=0.0)
        labels = voxelize(room, origin)
        known = float(np.mean(labels != 255))
        objects = int(np.count_nonzero((labels >= 5) & (labels <= 11)))
        score = known + min(objects, 2000) / 2000
        if best is None or score > best[0]:
            best = (score, cam_pose, origin, labels)
        if known >= MIN_KNOWN_FRACTION and objects >= MIN_OBJECT_VOXELS:
            break
    if best is None:
        raise RuntimeError("could not place a camera in the room (all tries inside furniture or facing a wall)")
    return best[1], best[2], best[3]


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_depth_png(depth_m: np.ndarray) -> bytes:
    """16-bit PNG in millimetres (0 = invalid), as ScanNet (zlib level 3: 5x faster than 6, 2% larger)."""
    mm = np.clip(np.round(depth_m * DEPTH_SCALE), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def make_frame(room: Room, rng: np.random.Generator, width: int, height: int) -> dict:
    """One frame: pose, K, origin, (x,y,z) labels, RGB uint8, depth metres."""
    intrinsic = default_intrinsic(width, height, rng)
    cam_pose, origin, labels = sample_view(room, rng)
    rgb, depth = render_rgbd(room, cam_pose, intrinsic, height, width, rng)
    return {"cam_pose": cam_pose, "intrinsic": intrinsic, "voxel_origin": origin, "labels": labels,
            "rgb": rgb, "depth": depth}


def write_frame(root: Path, sample_id: str, frame: dict, jpeg_quality: int = 90) -> None:
    """Write one frame in the Occ-ScanNet format (pkl + jpg + 16-bit png)."""
    pkl, jpg, png = sample_paths(root, sample_id)
    jpg.parent.mkdir(parents=True, exist_ok=True)
    jpg.write_bytes(encode_jpeg(frame["rgb"], jpeg_quality))
    png.write_bytes(encode_depth_png(frame["depth"]))
    write_pickle(pkl, {
        "cam_pose": frame["cam_pose"].astype(np.float64),
        "intrinsic": frame["intrinsic"].astype(np.float64),
        "voxel_origin": frame["voxel_origin"].astype(np.float64),
        "target_1_4": to_stored(frame["labels"]),
        "target_1_16": to_stored(downsample_labels(frame["labels"], 4)),
        "img": str(jpg.relative_to(root)),
        "depth_gt": str(png.relative_to(root)),
    })


def scene_name(index: int) -> str:
    return f"scene{index:04d}_00"


def generate_scene(args: tuple, on_frame=None) -> list[str]:
    """Generate all frames of scene ``index``; returns the sample ids written (``on_frame()`` after each)."""
    root, seed, index, frames, width, height, quality = args
    rng = np.random.default_rng([seed, index])
    room = build_room(rng)
    ids = []
    for f in range(frames):
        sample_id = f"{scene_name(index)}/{f:05d}"
        write_frame(Path(root), sample_id, make_frame(room, rng, width, height), quality)
        ids.append(sample_id)
        if on_frame is not None:
            on_frame()
    return ids


def split_scenes(n_scenes: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Scene indices of train and val: the last ``round(n * val_fraction)`` scenes (>= 1 when n >= 2)."""
    n_val = int(round(n_scenes * val_fraction))
    if val_fraction > 0 and n_scenes >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n_scenes - 1) if n_scenes > 1 else 0
    return list(range(n_scenes - n_val)), list(range(n_scenes - n_val, n_scenes))


def generate(out: str | Path, scenes: int, frames_per_scene: int, seed: int = 0, width: int = 640,
             height: int = 480, val_fraction: float = 0.2, workers: int = 1, jpeg_quality: int = 90,
             progress: bool = True, overwrite: bool = False) -> dict[str, list[str]]:
    """Write a synthetic Occ-ScanNet-format dataset under ``out``; returns {split: sample ids}.

    ``out`` must be absent or empty; with ``overwrite`` it may hold an earlier discene-synth dataset, whose
    files are deleted first (see ``remove_dataset``). ValueError for bad arguments and any other folder.
    """
    if scenes < 1 or frames_per_scene < 1:
        raise ValueError(f"need at least one scene and one frame, got scenes={scenes}, frames={frames_per_scene}")
    if width < 32 or height < 32:
        raise ValueError(f"image size {width}x{height} is too small (--width and --height at least 32)")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ValueError(f"image size {width}x{height} is too large (--width and --height at most {MAX_IMAGE_SIDE})")
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg quality must be 1..100, got {jpeg_quality}")
    root = Path(out)
    prepare_output(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, i, frames_per_scene, width, height, jpeg_quality) for i in range(scenes)]
    bar = tqdm(total=scenes * frames_per_scene, unit="frame", desc="discene-synth", disable=not progress)
    ids_per_scene: dict[int, list[str]] = {}
    if workers > 1:
        # from the loader workers' fork server (device_run trains next, in this process): never a fork of this
        # process while its other threads run
        with (worker_context() or multiprocessing).Pool(workers) as pool:
            for i, ids in enumerate(pool.imap(generate_scene, jobs)):
                ids_per_scene[i] = ids
                bar.update(len(ids))
    else:
        for i, job in enumerate(jobs):
            ids_per_scene[i] = generate_scene(job, on_frame=lambda: bar.update(1))
    bar.close()
    train, val = split_scenes(scenes, val_fraction)
    splits = {"train": [s for i in train for s in ids_per_scene[i]], "val": [s for i in val for s in ids_per_scene[i]]}
    for split, ids in splits.items():
        _write_text(root / SPLIT_FILES[split], "".join(split_line(s) + "\n" for s in ids))
    meta = {"generator": "discene-synth", "seed": seed, "scenes": scenes, "frames_per_scene": frames_per_scene,
            "width": width, "height": height, "target_layout": "yxz", "train": len(splits["train"]),
            "val": len(splits["val"])}
    _write_text(root / META_FILE, json.dumps(meta, indent=1) + "\n")  # last: marks the dataset complete
    return splits


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def prepare_output(root: Path, overwrite: bool) -> None:
    """Check that ``root`` may receive a new dataset: absent, an empty folder, or (``overwrite``) an earlier
    discene-synth dataset, which is then removed. ValueError otherwise, before anything is written."""
    check_output_folder(root, "--out")
    if not root.is_dir() or not any(root.iterdir()):
        return
    entries = ", ".join(sorted(p.name for p in root.iterdir())[:5])
    if not overwrite:
        raise ValueError(f"--out {root} is not empty (holds {entries}); choose a new folder, or --overwrite to "
                         "replace the discene-synth dataset there")
    remove_dataset(root)


def remove_dataset(root: Path) -> None:
    """Delete the files of the discene-synth dataset in ``root`` (per its synth_meta.json: split lists, meta,
    the scene folders it wrote), leaving anything else; ValueError if ``root`` holds no such dataset."""
    meta_path = root / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        scenes = int(meta["scenes"]) if meta.get("generator") == "discene-synth" else None
    except (OSError, ValueError, TypeError, KeyError):
        scenes = None
    if scenes is None:
        raise ValueError(f"--overwrite: {root} holds no discene-synth dataset (no readable {META_FILE}); "
                         "only such a dataset is replaced: remove the folder's contents yourself or choose another --out")
    for i in range(scenes):
        for folder in (GATHERED, IMAGES):
            shutil.rmtree(root / folder / scene_name(i), ignore_errors=True)
    for name in (*SPLIT_FILES.values(), META_FILE):
        (root / name).unlink(missing_ok=True)
    for folder in (GATHERED, IMAGES):
        if (root / folder).is_dir() and not any((root / folder).iterdir()):
            (root / folder).rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discene-synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--scenes", type=int, default=10, help="number of synthetic scenes (rooms) to generate")
    parser.add_argument("--frames-per-scene", type=int, default=10, help="camera frames rendered per scene")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same dataset")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of scenes in val_subscenes.txt")
    parser.add_argument("--workers", type=int, default=1, help="processes (scenes are split across them)")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the discene-synth dataset already in --out (its files are deleted first)")
    args = parser.parse_args(argv)
    try:
        splits = generate(args.out, args.scenes, args.frames_per_scene, args.seed, args.width, args.height,
                          args.val_fraction, args.workers, args.jpeg_quality, overwrite=args.overwrite)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"discene-synth: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(splits['train'])} train and {len(splits['val'])} val frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
