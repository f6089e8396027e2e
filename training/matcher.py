"""Hungarian matching of student and teacher queries on their point-set centres (paper eq. 4).

The cost of pairing student query i with teacher query j is the L2 distance of their point-set
centres, which the caller gives in metres (the grid is anisotropic in normalised units: 4.8 m in
x and y, 2.88 m in z); scipy's ``linear_sum_assignment`` gives the optimal one-to-one assignment.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

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
    start = time.perf_counter()
    cost = torch.cdist(student_centers.detach().float(), teacher_centers.detach().float())
    cost = torch.nan_to_num(cost, nan=1e6, posinf=1e6).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    stats.seconds += time.perf_counter() - start
    stats.calls += 1
    device = student_centers.device
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long, device=device)


def match_batch(student_centers: torch.Tensor, teacher_centers: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample Hungarian matching of (B,N,3) student and (B,M,3) teacher centres."""
    if student_centers.shape[0] != teacher_centers.shape[0]:
        raise ValueError(f"batch sizes differ: student {student_centers.shape[0]}, teacher {teacher_centers.shape[0]}")
    return [hungarian_match(s, t) for s, t in zip(student_centers, teacher_centers, strict=True)]
