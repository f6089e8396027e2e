"""Hungarian matching of student and teacher queries on their point-set centres (paper eq. 4).

The cost of pairing student query i with teacher query j is the L2 distance of their point-set
centres, which the caller gives in metres (the grid is anisotropic in normalised units: 4.8 m in
x and y, 2.88 m in z); scipy's ``linear_sum_assignment`` gives the optimal one-to-one assignment.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .distributed import usable_cpus


@dataclass
class MatchStats:
    """Wall time spent in Hungarian matching (for logs and benchmarks)."""

    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


stats = MatchStats()


@torch.no_grad()
def hungarian_match(student_centers: torch.Tensor, teacher_centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal assignment between student (N,3) and teacher (M,3) centres by L2 cost (eq. 4).

    Returns (student_idx, teacher_idx), both (min(N,M),) long tensors on the inputs' device.
    """
    if student_centers.dim() != 2 or teacher_centers.dim() != 2 or student_centers.shape[-1] != teacher_centers.shape[-1]:
        raise ValueError(f"hungarian_match needs (N,D) and (M,D) centres, got {tuple(student_centers.shape)} "
                         f"and {tuple(teacher_centers.shape)}")
    return match_batch(student_centers[None], teacher_centers[None])[0]


def _pool() -> ThreadPoolExecutor:
    """Threads for the per-sample assignments: scipy's solver releases the GIL, so samples run in parallel."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, min(8, usable_cpus())), thread_name_prefix="hungarian")
    return _POOL


_POOL: ThreadPoolExecutor | None = None


class FlatPairs(NamedTuple):
    """Every sample's pairs of a batched matching, concatenated: ``sample`` (K,) the pair's sample, ``rows``
    (K,) student and ``cols`` (K,) teacher indices, on the centres' device; ``counts`` the pairs per sample."""

    sample: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    counts: list[int]


@torch.no_grad()
def match_flat(student_centers: torch.Tensor, teacher_centers: torch.Tensor) -> FlatPairs:
    """Per-sample Hungarian matching of (B,N,3) student and (B,M,3) teacher centres (eq. 4), as flat pairs.

    The B cost matrices come from one batched cdist and one copy to the host; the B assignments run
    on a thread pool; the pairs come back in one copy. Same pairs as ``hungarian_match`` sample by sample.
    """
    if student_centers.dim() != 3 or teacher_centers.dim() != 3 or student_centers.shape[-1] != teacher_centers.shape[-1]:
        raise ValueError(f"batched matching needs (B,N,D) and (B,M,D) centres, got {tuple(student_centers.shape)} "
                         f"and {tuple(teacher_centers.shape)}")
    if student_centers.shape[0] != teacher_centers.shape[0]:
        raise ValueError(f"batch sizes differ: student {student_centers.shape[0]}, teacher {teacher_centers.shape[0]}")
    start = time.perf_counter()
    cost = torch.cdist(student_centers.detach().float(), teacher_centers.detach().float())  # (B,N,M)
    cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6).cpu().numpy()
    solved = list(_pool().map(linear_sum_assignment, cost)) if len(cost) > 1 else [linear_sum_assignment(c) for c in cost]
    stats.seconds += time.perf_counter() - start
    stats.calls += len(solved)
    counts = [len(rows) for rows, _ in solved]
    sample = np.repeat(np.arange(len(solved)), counts)
    rows = np.concatenate([r for r, _ in solved]) if solved else np.zeros(0, np.int64)
    cols = np.concatenate([c for _, c in solved]) if solved else np.zeros(0, np.int64)
    flat = torch.from_numpy(np.stack([sample, rows, cols]).astype(np.int64))
    sample_t, rows_t, cols_t = flat.to(student_centers.device)  # one host-to-device copy for every pair
    return FlatPairs(sample_t, rows_t, cols_t, counts)


def match_batch(student_centers: torch.Tensor, teacher_centers: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``match_flat`` as one (student_idx, teacher_idx) pair of tensors per sample."""
    pairs = match_flat(student_centers, teacher_centers)
    return list(zip(pairs.rows.split(pairs.counts), pairs.cols.split(pairs.counts), strict=True))
