"""Occ-ScanNet class names and the standard colours used by renders, PointCloud2 and RViz."""
from __future__ import annotations

import numpy as np

# Index 0 is "empty"; 1..11 are the semantic classes; 255 marks unknown voxels in ground truth.
CLASS_NAMES: tuple[str, ...] = (
    "empty", "ceiling", "floor", "wall", "window", "chair", "bed",
    "sofa", "table", "tv", "furniture", "objects",
)
NUM_CLASSES = len(CLASS_NAMES) - 1  # semantic classes predicted by the network (no empty class)
EMPTY_LABEL = 0
UNKNOWN_LABEL = 255

# RGB colours (uint8) per label, the palette of the ISO / EmbodiedOcc visualisations.
CLASS_COLORS: np.ndarray = np.array(
    [
        [22, 191, 206],   # empty (never drawn)
        [214, 38, 40],    # ceiling
        [43, 160, 4],     # floor
        [158, 216, 229],  # wall
        [114, 158, 206],  # window
        [204, 204, 91],   # chair
        [255, 186, 119],  # bed
        [147, 102, 188],  # sofa
        [30, 119, 181],   # table
        [188, 188, 33],   # tv
        [255, 127, 12],   # furniture
        [196, 175, 214],  # objects
    ],
    dtype=np.uint8,
)


def label_colors(labels: np.ndarray) -> np.ndarray:
    """Colour (uint8 RGB) for each label; unknown (255) is drawn grey."""
    labels = np.asarray(labels)
    out = np.full(labels.shape + (3,), 128, dtype=np.uint8)
    valid = labels <= NUM_CLASSES
    out[valid] = CLASS_COLORS[labels[valid]]
    return out


def _label_rgb_bits() -> np.ndarray:
    c = label_colors(np.arange(256, dtype=np.uint8)).astype(np.uint32)
    bits = ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).astype("<u4")
    bits.flags.writeable = False  # one table, shared by every cloud writer
    return bits


# (256,) uint32 ``r<<16 | g<<8 | b`` of every uint8 label's colour: the bits of a PointCloud2 ``rgb`` float (the
# PCL/RViz convention), one table lookup per point
LABEL_RGB_BITS = _label_rgb_bits()
