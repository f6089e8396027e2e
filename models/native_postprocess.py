"""The CPU post-processing kernel (``models/_occupancy_native.c``): ``occupied_labels`` in a few loops.

On a 2-core CPU the torch path spends most of its 3-4 ms per lite frame dispatching about sixty small
ops; the kernel gives the same voxels, labels and scores, bit for bit, in a fraction of that. It is an
optional extension built by ``pip install`` / ``colcon build``; where it is missing or stale (source
changed, not rebuilt), ``available()`` is False, ``unavailable_reason()`` says why, and
``models.postprocess`` uses the torch path. ``DISCENE_NATIVE_POSTPROCESS=0`` in the environment switches
it off (to compare, or to rule it out).
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig

ABI_VERSION = 3  # must match ABI_VERSION in _occupancy_native.c

try:
    from . import _occupancy_native as _kernel
except ImportError as exc:  # not built (no compiler when installed), or built for another Python
    _kernel, _REASON = None, f"not built ({exc}); reinstall with a C compiler (pip install -e . / colcon build)"
else:
    _REASON = None
    if os.environ.get("DISCENE_NATIVE_POSTPROCESS", "1") == "0":
        _kernel, _REASON = None, "switched off by DISCENE_NATIVE_POSTPROCESS=0"
    elif getattr(_kernel, "ABI_VERSION", None) != ABI_VERSION:
        _kernel, _REASON = None, (f"stale build (ABI {getattr(_kernel, 'ABI_VERSION', None)}, this code needs "
                                  f"{ABI_VERSION}); rebuild with pip install -e . / colcon build")


def available() -> bool:
    """True when the kernel is built and matches this code."""
    return _kernel is not None


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used (None when it can)."""
    return _REASON


_OUTPUTS = threading.local()
_OUTPUTS_KEPT = 1 << 20  # voxels (25 MB of buffers); larger batches allocate theirs per call


def _outputs(capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's output buffers for up to ``capacity`` voxels (ids, labels, best, (N, 3) indices), kept
    across frames: fresh ones would cost page faults on every frame (the (N, 3) one is 1.5 MB for lite)."""
    bufs = getattr(_OUTPUTS, "bufs", None)
    if bufs is None or len(bufs[0]) < capacity:
        bufs = (np.empty(capacity, np.int64), np.empty(capacity, np.uint8), np.empty(capacity, np.float32),
                np.empty((capacity, 3), np.int32))
        if capacity <= _OUTPUTS_KEPT:
            _OUTPUTS.bufs = bufs
    return tuple(b[:capacity] for b in bufs)


class NativeVoxels(NamedTuple):
    """The kernel's output: flat voxel ids (M,) int64 ascending, labels (M,) uint8 1..C, best scores (M,)
    float32, grid indices (M, 3) int32, and the dense label grids (B, X, Y, Z) uint8 (0 empty)."""

    ids: np.ndarray
    labels: np.ndarray
    best: np.ndarray
    indices: np.ndarray
    dense: np.ndarray


def occupied_labels(points: torch.Tensor, scores: torch.Tensor, config: ModelConfig) -> NativeVoxels | None:
    """CPU (B,Q,R,3) normalised points and (B,Q,R,C) scores -> the occupied voxels as
    ``postprocess.occupied_labels`` finds them. None when the kernel cannot take the input: not built, or a
    kept point with a non-finite score (the torch path decides)."""
    if _kernel is None or points.device.type != "cpu" or points.shape[:3] != scores.shape[:3]:
        return None  # the torch path raises the shape error
    nb, nq, nr, c = scores.shape
    nx, ny, nz = (int(n) for n in config.grid_shape)
    cells = nx * ny * nz
    if nb * cells >= 2**31:
        return None
    points = points.detach().float().contiguous()
    # the query centres by the very op of the torch path, so that the two agree bit for bit
    centres = points.mean(dim=2).contiguous()
    scores = scores.detach().float().contiguous()
    ids, labels, best, indices = _outputs(nb * cells)
    dense = np.zeros((nb, nx, ny, nz), dtype=np.uint8)
    ex, ey, ez = (float(e) for e in config.grid_extent)
    count = _kernel.occupied_labels(
        points.numpy(), centres.numpy(), scores.numpy(), ids, labels, best, indices, dense, nb, nq, nr, c,
        nx, ny, nz, bool(config.closing), ex, ey, ez, float(config.max_center_dist) ** 2,
        float(config.score_threshold))
    if count < 0:
        return None
    return NativeVoxels(ids[:count].copy(), labels[:count].copy(), best[:count].copy(), indices[:count].copy(), dense)
