"""Hungarian matching of student and teacher queries on their point-set centres (paper eq. 4).

The cost of pairing student query i with teacher query j is the L2 distance of their point-set
centres, which the caller gives in metres (the grid is anisotropic in normalised units: 4.8 m in
x and y, 2.88 m in z); scipy's ``linear_sum_assignment`` gives the optimal one-to-one assignment.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


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
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _POOL = ThreadPoolExecutor(max(1, min(8, cpus)), thread_name_prefix="hungarian")
    return _POOL


_POOL: ThreadPoolExecutor | None = None


@torch.no_grad()
def match_batch(student_centers: torch.Tensor, teacher_centers: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample Hungarian matching of (B,N,3) student and (B,M,3) teacher centres (eq. 4).

    The B cost matrices come from one batched cdist and one copy to the host; the B assignments run
    on a thread pool. Same pairs as ``hungarian_match`` sample by sample.
    """
    if student_centers.dim() != 3 or teacher_centers.dim() != 3 or student_centers.shape[-1] != teacher_centers.shape[-1]:
        raise ValueError(f"match_batch needs (B,N,D) and (B,M,D) centres, got {tuple(student_centers.shape)} "
                         f"and {tuple(teacher_centers.shape)}")
    if student_centers.shape[0] != teacher_centers.shape[0]:
        raise ValueError(f"batch sizes differ: student {student_centers.shape[0]}, teacher {teacher_centers.shape[0]}")
    start = time.perf_counter()
    cost = torch.cdist(student_centers.detach().float(), teacher_centers.detach().float())  # (B,N,M)
    cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6).cpu().numpy()
    solved = list(_pool().map(linear_sum_assignment, cost)) if len(cost) > 1 else [linear_sum_assignment(c) for c in cost]
    stats.seconds += time.perf_counter() - start
    stats.calls += len(solved)
    if not solved:
        return []
    counts = [len(rows) for rows, _ in solved]  # one host-to-device copy for every sample's pairs
    both = torch.from_numpy(np.stack([np.concatenate([r for r, _ in solved]), np.concatenate([c for _, c in solved])]))
    rows, cols = both.to(device=student_centers.device, dtype=torch.long)
    return list(zip(rows.split(counts), cols.split(counts), strict=True))
