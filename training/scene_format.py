"""Occ-ScanNet on-disk format: paths, split lists, the stored axis layout of ``target_1_4``, downsampling.

One sample of a dataset root ``ROOT``::

    ROOT/gathered_data/<scene>/<frame>.pkl   dict: cam_pose (4,4) camera->world, intrinsic (4,4) ([:3,:3] valid,
                                             for the RGB image's resolution), voxel_origin (3,) world xyz of
                                             the grid corner, target_1_4 (60,60,36) uint8, target_1_16
                                             (15,15,9) uint8, img / depth_gt (paths relative to ROOT)
    ROOT/posed_images/<scene>/<frame>.jpg    RGB
    ROOT/posed_images/<scene>/<frame>.png    16-bit depth in millimetres (0 = invalid)
    ROOT/train_subscenes.txt, ROOT/val_subscenes.txt   one ``gathered_data/<scene>/<frame>.pkl`` per line

Axis layout of the stored label grids (the one fact the public code bases disagree on): the ISO
loader indexes ``target_1_4`` as stored, the EmbodiedOcc loader swaps the first two axes before
using it with (x, y, z) voxel coordinates. This project follows EmbodiedOcc, which places voxels
in world space as DiScene does: the stored array is indexed ``[y, x, z]`` (``STORED_LAYOUT =
"yxz"``) and the loader returns ``[x, y, z]``. The synthetic generator writes the same stored
layout, so real and synthetic files go through identical code. ``python -m training.check_axes``
measures on a user's real data which layout agrees with the depth images.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

STORED_LAYOUT = "yxz"
LAYOUTS = ("yxz", "xyz")
SPLIT_FILES = {"train": "train_subscenes.txt", "val": "val_subscenes.txt"}
GATHERED = "gathered_data"
IMAGES = "posed_images"
DEPTH_SCALE = 1000.0  # depth png units per metre (millimetres)
UNKNOWN = 255


def to_stored(grid_xyz: np.ndarray, layout: str = STORED_LAYOUT) -> np.ndarray:
    """Convert an (x, y, z)-indexed grid to the stored layout."""
    _check_layout(layout)
    return np.ascontiguousarray(np.swapaxes(grid_xyz, 0, 1) if layout == "yxz" else grid_xyz)


def from_stored(stored: np.ndarray, layout: str = STORED_LAYOUT) -> np.ndarray:
    """Convert a stored grid to (x, y, z) indexing (the inverse of ``to_stored``)."""
    _check_layout(layout)
    return np.ascontiguousarray(np.swapaxes(stored, 0, 1) if layout == "yxz" else stored)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"target layout must be one of {LAYOUTS}, got '{layout}'")


def downsample_labels(labels: np.ndarray, factor: int = 4, empty_ratio: float = 0.95) -> np.ndarray:
    """Block-downsample a label grid (0 empty, 1..254 classes, 255 unknown), SSC-style.

    A block whose empty + unknown voxels exceed ``empty_ratio`` of its size becomes empty when empty
    voxels outnumber unknown ones, else unknown; otherwise it takes its most frequent class label
    (the smallest on ties), as the SSC literature's 1:16 targets.
    """
    x, y, z = labels.shape
    if x % factor or y % factor or z % factor:
        raise ValueError(f"grid shape {labels.shape} is not divisible by {factor}")
    blocks = labels.reshape(x // factor, factor, y // factor, factor, z // factor, factor)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, factor**3).astype(np.int64)
    n_blocks, size = blocks.shape
    counts = np.zeros((n_blocks, 256), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_blocks), size), blocks.ravel()), 1)
    n_empty, n_unknown = counts[:, 0], counts[:, UNKNOWN]
    classes = counts[:, 1:UNKNOWN]
    out = (classes.argmax(axis=1) + 1).astype(np.uint8)
    mostly_free = (n_empty + n_unknown) > empty_ratio * size
    out[mostly_free] = np.where(n_empty[mostly_free] > n_unknown[mostly_free], 0, UNKNOWN)
    return out.reshape(x // factor, y // factor, z // factor)


def sample_paths(root: str | Path, sample_id: str) -> tuple[Path, Path, Path]:
    """(pkl, jpg, png) paths of a sample id ``<scene>/<frame>`` under ``root``."""
    root = Path(root)
    return (root / GATHERED / f"{sample_id}.pkl", root / IMAGES / f"{sample_id}.jpg",
            root / IMAGES / f"{sample_id}.png")


def split_line(sample_id: str) -> str:
    """The line a sample takes in a split list (as in the public lists)."""
    return f"{GATHERED}/{sample_id}.pkl"


def parse_split_line(line: str) -> str:
    """Sample id ``<scene>/<frame>`` from a split-list line (absolute or relative pkl path)."""
    parts = Path(line.strip()).parts
    if len(parts) < 2 or not parts[-1].endswith(".pkl"):
        raise ValueError(f"split line '{line.strip()}' is not a '<...>/<scene>/<frame>.pkl' path")
    return f"{parts[-2]}/{parts[-1][:-4]}"


def read_split(root: str | Path, split: str) -> list[str]:
    """Sample ids of a split: 'train', 'val' (files under root) or a path to a list file."""
    path = Path(root) / SPLIT_FILES[split] if split in SPLIT_FILES else Path(split)
    if path.is_dir():
        raise ValueError(f"split list '{path}' is a folder; give the list file (e.g. {SPLIT_FILES['val']} in it)")
    if not path.is_file():
        raise FileNotFoundError(f"split list '{path}' not found (expected {sorted(SPLIT_FILES.values())} "
                                f"under the dataset root, or a path to a list file)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:  # no read permission, a binary file
        raise ValueError(f"split list '{path}' cannot be read as text: {exc}") from exc
    try:
        return [parse_split_line(line) for line in lines if line.strip()]
    except ValueError as exc:
        raise ValueError(f"split list '{path}': {exc}") from exc


def write_pickle(path: Path, data: dict) -> None:
    """Write a sample dict (protocol 4, readable by the public code's Python versions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
