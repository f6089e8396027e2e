"""Occupied voxels compacted on the device into PointCloud2 rows (the fused path's ``device_cloud`` option).

Without it the fused path copies each frame's dense (X,Y,Z) label and score grids to the host (0.65 MB for the
60x60x36 grid). The frame loop then scans them for the occupied voxels and writes their PointCloud2 rows
(``cloud_frame_from_dense``: one pass of the native kernel, else ``frame_from_dense`` and then
``msg_encode.occupancy_cloud``), over memory the copy has just written, every frame.
Here the device does both after the post-processing, with fixed shapes and no host sync, so that the work can be
captured in the frame's CUDA graph:
- a stable partition puts the occupied voxels first, in flat order (the order the host's scan finds them);
- their rows (x, y, z float32, rgb, label, score: ``msg_encode.CLOUD_DTYPE``) are built with the native kernel's
  float64 arithmetic, so they are the same bytes;
- only a head of the rows, their flat ids and a summary (count, every score finite) are copied to pinned
  memory. A frame with more occupied voxels than the head holds reads the rest from its buffer slot's device
  rows, which no other slot's work writes.
Whether every centre is finite in float32 the host tells from the grid's corners and the origin.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from . import native_postprocess
from .classes import LABEL_RGB_BITS
from .config import ModelConfig
from .geometry import centers_finite_in_float32
from .postprocess import OccupancyFrame, frame_from_dense, voxel_grid_indices

ROW_WORDS = 6  # x, y, z, rgb, label, score: 4 bytes each (msg_encode.CLOUD_DTYPE)
HEAD_SHARE = 4  # the pinned head holds 1/HEAD_SHARE of the grid's voxels (the shipped lite's: about 1/13 occupied)


class CloudBuffers:
    """One buffer slot's rows and flat ids of all N voxels on the device (occupied first, ``DeviceCloud``), its
    summary, and the pinned head of each that is copied back every frame."""

    def __init__(self, voxels: int, head: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.rows = torch.empty((voxels, ROW_WORDS), dtype=torch.int32, device=device)
        self.ids = torch.empty(voxels, dtype=torch.int32, device=device)
        self.summary = torch.empty(2, dtype=torch.int32, device=device)  # count, every score finite
        self.host_rows = torch.empty((head, ROW_WORDS), dtype=torch.int32, pin_memory=pin)
        self.host_ids = torch.empty(head, dtype=torch.int32, pin_memory=pin)
        self.host_summary = torch.empty(2, dtype=torch.int32, pin_memory=pin)
        self._rows_np, self._ids_np = self.host_rows.numpy().view("<f4"), self.host_ids.numpy()
        self._summary_np = self.host_summary.numpy()
        self._side = torch.cuda.Stream(device) if pin else None  # reads the rest of a frame beyond the head

    @property
    def head(self) -> int:
        return len(self._ids_np)

    def take(self) -> None:
        """Queue the copies of the summary and the heads into pinned memory (stream order, no wait)."""
        self.host_summary.copy_(self.summary, non_blocking=True)
        self.host_rows.copy_(self.rows[:self.head], non_blocking=True)
        self.host_ids.copy_(self.ids[:self.head], non_blocking=True)

    def read(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """After the copies are done: the frame's own (M,) int32 flat ids, (M, 6) float32 row words, and whether
        every score is finite. Beyond the head, the rows come from the device (the slot's buffers stay as they are
        until the slot is launched again)."""
        count, scores_finite = self._summary_np.tolist()
        head = min(count, self.head)
        words, ids = np.empty((count, ROW_WORDS), dtype="<f4"), np.empty(count, dtype=np.int32)
        words[:head] = self._rows_np[:head]
        ids[:head] = self._ids_np[:head]
        if count > head:
            with torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext():
                words[head:] = self.rows[head:count].cpu().numpy().view("<f4")
                ids[head:] = self.ids[head:count].cpu().numpy()
        return ids, words, bool(scores_finite)


class DeviceCloud:
    """The compaction of one grid on one device: its constants (voxel centres relative to the grid origin in
    float64, the label colours, the voxel indices) and the device origin that each frame's staging writes."""

    def __init__(self, config: ModelConfig, device: torch.device | str) -> None:
        self.device = torch.device(device)
        grid_shape = tuple(int(n) for n in config.grid_shape)
        self.voxels = int(np.prod(grid_shape))
        index = np.indices(grid_shape).reshape(3, -1).T  # (N, 3) grid indices in flat order
        # ``(index + 0.5) * size`` in float64, as the native kernel's rows before the origin is added
        self.centers = torch.from_numpy((index + 0.5) * float(config.voxel_size)).to(self.device)
        # per label its rgb and label words, side by side as in a row
        labels = np.arange(256, dtype=np.int32)
        self.label_words = torch.from_numpy(np.stack([LABEL_RGB_BITS.view("<i4"), labels], axis=1)).to(self.device)
        self.index = torch.arange(self.voxels, device=self.device)
        self.index32 = self.index.to(torch.int32)
        self.origin = torch.zeros(3, dtype=torch.float64, device=self.device)  # the frame's, staged with it

    def buffers(self) -> CloudBuffers:
        """A buffer slot's rows, ids and pinned heads for this grid."""
        return CloudBuffers(self.voxels, -(-self.voxels // HEAD_SHARE), self.device)

    def __call__(self, labels: torch.Tensor, best: torch.Tensor, out: CloudBuffers) -> None:
        """(1,X,Y,Z) uint8 labels and float32 best scores, 0 where the label is (``dense_occupancy``) -> ``out``'s
        rows, ids and summary, then their copies back queued. About twenty kernels over the N voxels."""
        flat, scores = labels.reshape(-1), best.reshape(-1)
        occupied = flat != 0
        before = torch.cumsum(occupied, 0)  # (N,) int64: occupied voxels up to and including each one
        count = before[-1]
        # a permutation: occupied voxel v goes to row before[v] - 1, the others after them in their order
        out.ids.index_copy_(0, torch.where(occupied, before - 1, (self.index - before) + count), self.index32)
        words = out.rows.view(torch.float32)
        # x, y, z: one float64 sum, rounded once to float32 by the copy, as the native kernel's rows
        words[:, :3].copy_(self.centers.index_select(0, out.ids).add_(self.origin))
        out.rows[:, 3:5].copy_(self.label_words.index_select(0, flat.index_select(0, out.ids).int()))
        words[:, 5].copy_(scores.index_select(0, out.ids))
        # the empty voxels' scores are 0: all finite exactly when the occupied ones' are
        out.summary.copy_(torch.stack([count, torch.isfinite(scores).all().long()]))
        out.take()


class CloudFrame(OccupancyFrame):
    """An OccupancyFrame read back from ``CloudBuffers``: its PointCloud2 rows (``cloud_words``), as they are
    published, and ``cloud_finite`` as ``msg_encode.CloudRows`` carries it. The dense grid, grid indices, labels
    and scores are made from the rows and the flat ids on first use (the node's cloud needs none of them)."""

    def __init__(self, ids: np.ndarray, words: np.ndarray, scores_finite: bool, voxel_origin: np.ndarray,
                 config: ModelConfig, xyz_finite: bool | None = None) -> None:
        self.voxel_ids = ids               # (M,) int32 flat ids, ascending
        self.cloud_words = words           # (M, 6) float32 words of msg_encode.CLOUD_DTYPE rows
        self.voxel_origin = np.asarray(voxel_origin, dtype=np.float64).reshape(3)
        self.voxel_size = float(config.voxel_size)
        self.grid_shape = tuple(int(n) for n in config.grid_shape)
        # (every x, y, z finite, every score finite): where the rows' writer did not see the first (the device), the
        # grid's corner centres decide it (a frame whose occupied voxels are finite inside a grid that is not is
        # counted voxel by voxel by the output check)
        if xyz_finite is None:
            xyz_finite = centers_finite_in_float32(self.voxel_origin, self.voxel_size, (0, 0, 0),
                                                   [n - 1 for n in self.grid_shape])
        self.cloud_finite = (xyz_finite, scores_finite)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        dense = np.zeros(int(np.prod(self.grid_shape)), dtype=np.uint8)
        dense[self.voxel_ids] = self.voxel_labels
        return dense.reshape(self.grid_shape)

    @functools.cached_property
    def voxel_indices(self) -> np.ndarray:
        return voxel_grid_indices(self.voxel_ids, self.grid_shape)

    @functools.cached_property
    def voxel_labels(self) -> np.ndarray:
        return self.cloud_words.view("<u4")[:, 4].astype(np.uint8)

    @functools.cached_property
    def voxel_scores(self) -> np.ndarray:
        return np.ascontiguousarray(self.cloud_words[:, 5])


def read_frame(out: CloudBuffers, voxel_origin: np.ndarray, config: ModelConfig) -> CloudFrame:
    """The host frame of a slot whose compaction and copies are done."""
    ids, words, finite = out.read()
    return CloudFrame(ids, words, finite, voxel_origin, config)


def cloud_frame_from_dense(labels: np.ndarray, best: np.ndarray, voxel_origin: np.ndarray,
                           config: ModelConfig) -> OccupancyFrame:
    """The host frame of one frame's (X,Y,Z) label and best-score grids copied back from the device: a ``CloudFrame``
    of their occupied voxels' rows, as the device's compaction gives them, from one pass of the native kernel
    (``native_postprocess.dense_cloud``); without the kernel ``postprocess.frame_from_dense``."""
    found = native_postprocess.dense_cloud(labels, best, voxel_origin, config.voxel_size, LABEL_RGB_BITS)
    if found is None:
        return frame_from_dense(labels, best, voxel_origin, config)
    ids, words, (xyz_finite, scores_finite) = found
    return CloudFrame(ids, words, scores_finite, voxel_origin, config, xyz_finite)
