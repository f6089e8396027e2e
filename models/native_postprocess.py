"""The CPU post-processing kernel (``models/_occupancy_native.c``): ``occupied_labels`` in a few loops.

On a 2-core CPU the torch path spends most of its 3-4 ms per lite frame dispatching about sixty small
ops; the kernel gives the same voxels, labels and scores, bit for bit, in a fraction of that. Four small
helpers (``dense_cloud``, ``cloud_words``, ``normalise_image``, ``resize_normalise``) do the host side of every
frame, GIL released; two more (``rigid_pose``, ``grid_geometry``) its geometry. It is an optional
extension built by ``pip install`` / ``colcon build``; where it is missing or stale (source changed, not
rebuilt), ``available()`` is False, ``unavailable_reason()`` says why, and ``models.postprocess`` and
``models.preprocess`` use torch ops (the geometry: Python floats). ``DISCENE_NATIVE_POSTPROCESS=0`` in the
environment switches it off (to compare, or to rule it out).
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig

ABI_VERSION = 14  # must match ABI_VERSION in _occupancy_native.c
SWITCHED_OFF = "switched off by DISCENE_NATIVE_POSTPROCESS=0"

try:
    from . import _occupancy_native as _kernel
except ImportError as exc:  # not built (no compiler when installed), or built for another Python
    _kernel, _REASON = None, f"not built ({exc}); reinstall with a C compiler (pip install -e . / colcon build)"
else:
    _REASON = None
    if os.environ.get("DISCENE_NATIVE_POSTPROCESS", "1") == "0":
        _kernel, _REASON = None, SWITCHED_OFF
    elif getattr(_kernel, "ABI_VERSION", None) != ABI_VERSION:
        _kernel, _REASON = None, (f"stale build (ABI {getattr(_kernel, 'ABI_VERSION', None)}, this code needs "
                                  f"{ABI_VERSION}); rebuild with pip install -e . / colcon build")


def available() -> bool:
    """True when the kernel is built and matches this code."""
    return _kernel is not None


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used (None when it can)."""
    return _REASON


def switched_off() -> bool:
    """True when ``DISCENE_NATIVE_POSTPROCESS=0`` turned a built kernel off (not a missing or stale build)."""
    return _REASON == SWITCHED_OFF


class NativeVoxels(NamedTuple):
    """The kernel's output: flat voxel ids (M,) int64 ascending, labels (M,) uint8 1..C, best scores (M,)
    float32, grid indices (M, 3) int32, and the dense label grids (B, X, Y, Z) uint8 (0 empty)."""

    ids: np.ndarray
    labels: np.ndarray
    best: np.ndarray
    indices: np.ndarray
    dense: np.ndarray


def occupied_labels(points: torch.Tensor, scores: torch.Tensor, config: ModelConfig,
                    threads: int = 1) -> NativeVoxels | None:
    """CPU (B,Q,R,3) normalised points and (B,Q,R,C) scores -> the occupied voxels as
    ``postprocess.occupied_labels`` finds them. None when the kernel cannot take the input: not built, or a
    kept point with a non-finite score (the torch path decides). ``threads`` 2: the kernel's loops in halves on
    this thread and a helper (the same results, bit for bit), for callers whose other cores are idle."""
    if _kernel is None or points.device.type != "cpu" or points.shape[:3] != scores.shape[:3]:
        return None  # the torch path raises the shape error
    nb, nq, nr, c = scores.shape
    nx, ny, nz = (int(n) for n in config.grid_shape)
    cells = nx * ny * nz
    if nb * cells >= 2**31:
        return None
    points, scores = _float32(points), _float32(scores)
    # the query centres by the very op of the torch path, so that the two agree bit for bit
    centers = points.mean(dim=2).contiguous()
    ids, labels, best, indices = (out[:nb * cells] for out in _outputs(nb * cells))
    dense = np.zeros((nb, nx, ny, nz), dtype=np.uint8)
    ex, ey, ez = (float(e) for e in config.grid_extent)
    count = _kernel.occupied_labels(
        points.numpy(), centers.numpy(), scores.numpy(), ids, labels, best, indices, dense, nb, nq, nr, c,
        nx, ny, nz, bool(config.closing), ex, ey, ez, float(config.max_center_dist) ** 2,
        float(config.score_threshold), int(threads))
    if count < 0:
        return None
    return NativeVoxels(ids[:count].copy(), labels[:count].copy(), best[:count].copy(), indices[:count].copy(), dense)


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor without grad; the frame path's already is, and then this
    dispatches no torch op (each costs tens of microseconds right after the inference)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.is_contiguous() else t.contiguous()


_SCRATCH = threading.local()
KEPT_VOXELS_MAX = 1 << 22  # voxels of output buffers kept between calls (about 100 MB)


def _outputs(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This thread's output buffers for up to ``size`` voxels (ids, labels, best, (size, 3) indices), reused
    across frames: fresh grid-size arrays would cost page faults every frame."""
    bufs = getattr(_SCRATCH, "outputs", None)
    if bufs is None or len(bufs[0]) < size:
        bufs = (np.empty(size, np.int64), np.empty(size, np.uint8), np.empty(size, np.float32),
                np.empty((size, 3), np.int32))
        if size <= KEPT_VOXELS_MAX:  # larger ones (big batches) are not kept
            _SCRATCH.outputs = bufs
    return bufs


def dense_cloud(labels: np.ndarray, best: np.ndarray, origin: np.ndarray, size: float,
                rgb_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[bool, bool]] | None:
    """The occupied voxels of one dense (X,Y,Z) uint8 label grid and its float32 best-score grid as (M,) int32 flat
    ids and (M, 6) float32 PointCloud2 rows (``cloud_words``' layout and arithmetic, the score ``best[id]``), with
    (every x, y and z finite, every score finite): ``postprocess.frame_from_dense`` and then ``cloud_words`` in one
    GIL-free pass. None without the kernel."""
    if _kernel is None or labels.ndim != 3 or best.shape != labels.shape:
        return None
    labels, best = _contiguous(labels, np.uint8), _contiguous(best, np.float32)
    m = int(np.count_nonzero(labels))  # exact-size outputs: no copy out of a grid-size buffer
    ids, words = np.empty(m, np.int32), np.empty((m, 6), "<f4")
    ox, oy, oz = np.asarray(origin, dtype=np.float64).reshape(3).tolist()
    found, *finite = _kernel.dense_cloud(labels, best, _contiguous(rgb_bits, np.uint32), ids, words, *labels.shape, m,
                                         ox, oy, oz, float(size))
    if found != m:
        raise RuntimeError("dense_cloud: the grid changed while it was read")  # another thread wrote it
    return ids, words, tuple(finite)


def cloud_words(indices: np.ndarray, labels: np.ndarray, scores: np.ndarray, rgb_bits: np.ndarray,
                origin: np.ndarray, size: float, out: np.ndarray) -> tuple[bool, bool] | None:
    """Fill ``out`` (M, 6) 4-byte words with point rows x, y, z, rgb, label, score (the PointCloud2 layout
    of ``discene_ros.msg_encode``): each centre the float64 ``origin + (index + 0.5) * size`` rounded to
    float32, the colour ``rgb_bits[label]``. GIL released. Returns (every x, y and z finite, every score
    finite), seen on the way (the cloud's ``is_dense``, and the node's output check), or None without the
    kernel (the caller uses numpy)."""
    if _kernel is None:
        return None
    ox, oy, oz = np.asarray(origin, dtype=np.float64).reshape(3).tolist()
    return _kernel.cloud_words(_contiguous(indices, np.int32), _contiguous(labels, np.uint8),
                               _contiguous(scores, np.float32), _contiguous(rgb_bits, np.uint32), out, len(out),
                               ox, oy, oz, float(size))


def _contiguous(array: np.ndarray, dtype: type) -> np.ndarray:
    """``array`` itself when it already is C-contiguous, aligned ``dtype`` (the frame path's are: no numpy call), else
    such a copy."""
    if isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous and array.flags.aligned:
        return array
    return np.require(array, dtype=dtype, requirements=("C", "A"))


def normalise_image(planes: np.ndarray, out: np.ndarray, order: tuple[int, int, int],
                    scale: tuple[float, float, float], shift: tuple[float, float, float]) -> bool:
    """Write ``out`` (3, h, w) float32 = ``planes[order[c]] * scale[c] + shift[c]`` for the contiguous
    (3, h, w) uint8 ``planes``, in one GIL-free pass: bit for bit torch's channel reorder, ``mul`` and
    ``add_``, which right after an inference cost 0.26 against 0.10 ms here. False without the kernel."""
    if _kernel is None:
        return False
    _kernel.normalise_image(planes, out, planes.size // 3, order, scale, shift)
    return True


def resize_normalise(image: np.ndarray, out: np.ndarray, order: tuple[int, int, int],
                     scale: tuple[float, float, float], shift: tuple[float, float, float], threads: int = 1) -> bool:
    """Write ``out`` ((1,) 3, h, w) float32 from the C-contiguous (H, W, 3) uint8 ``image``: torch's uint8
    antialiased bilinear resize to (h, w), bit for bit, then ``normalise_image``'s arithmetic, in one GIL-free
    call, 0.5-0.85x torch's time for the frame path's 640x480 and 320x240 frames (``bench_resize.py``).
    ``threads`` 2: its rows in halves with the kernel's helper thread, which pays only where that thread is awake
    (back-to-back calls), not in the frame loop. False without the kernel, or for sizes it leaves to torch (an image smaller than the
    filter, or a downscale by more than 63x)."""
    if _kernel is None or image.ndim != 3 or image.shape[2] != 3 or out.shape[-3] != 3:
        return False
    return bool(_kernel.resize_normalise(image, out, image.shape[0], image.shape[1], out.shape[-2], out.shape[-1],
                                         order, scale, shift, int(threads)))


def _float64(array: object, shape: tuple[int, ...]) -> bool:
    """Whether ``array`` is a C-contiguous, aligned float64 ndarray of ``shape``: what the geometry kernels read as
    it is."""
    return (isinstance(array, np.ndarray) and array.dtype == np.float64 and array.shape == shape
            and array.flags.c_contiguous and array.flags.aligned)


def rigid_pose(pose: np.ndarray, tol: float, max_translation: float) -> bool:
    """True when the 4x4 float64 ``pose`` passes ``msg_decode.check_pose`` (tolerance ``tol``, |t| up to
    ``max_translation``), checked in C. False without the kernel, for other arrays, and for poses that fail or lie
    too close to the translation limit: the caller's Python checks decide those, and say what is wrong."""
    return _kernel is not None and _float64(pose, (4, 4)) and _kernel.rigid_pose(pose, tol, max_translation)


def grid_geometry(intrinsic: np.ndarray, cam_pose: np.ndarray, image_hw: tuple[int, int], size_hw: tuple[int, int],
                  voxel_size: float, grid_shape: tuple[int, int, int], voxel_origin: np.ndarray | None,
                  floor_z: float, forward: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(grid2img 4x4, voxel_origin (3,)) float64 of one frame, as ``models.preprocess`` computes them in Python
    (``place_grid`` with ``floor_z`` and ``forward`` where ``voxel_origin`` is None, ``scale_intrinsic`` from
    ``image_hw`` to ``size_hw``, ``grid_to_image_matrix``), bit for bit, in one C call. None without the kernel,
    for inputs other than a 3x3 and a 4x4 (and a (3,)) float64 array, and where the Python geometry decides (a
    non-finite input, a projective or singular pose, a non-positive focal length)."""
    place = voxel_origin is None
    if (_kernel is None or not _float64(intrinsic, (3, 3)) or not _float64(cam_pose, (4, 4))
            or not (place or _float64(voxel_origin, (3,)))):
        return None
    g2i, origin = np.empty((4, 4)), np.empty(3)
    done = _kernel.grid_geometry(intrinsic, cam_pose, origin if place else voxel_origin, origin, g2i, place,
                                 image_hw[0], image_hw[1], size_hw[0], size_hw[1], grid_shape, voxel_size, floor_z,
                                 forward)
    return (g2i, origin) if done else None


def helper_counts() -> tuple[int, int] | None:
    """(second halves the kernel's helper thread ran, second halves their caller ran itself because the helper had
    not started them yet) since the process started; None without the kernel. A helper asleep on an idle core
    can take longer to start than the caller's half (about 0.5 ms on the build machine's VM): its caller then
    takes the half back, so that a late helper costs a call little more than one thread would."""
    return None if _kernel is None else tuple(_kernel.helper_counts())
