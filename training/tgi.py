"""Teacher-Guided Initialisation (paper section III-C) and the frozen teacher.

TGI copies the teacher's decoder (``.decoder``: layers, heads, depth branch) into the student's;
the backbone, neck and learned initial positions (``.query_init``) stay the student's own. A student
with a depth branch under a teacher without one (the miniature DiScene-dagger: the robot's depth
sensor feeds the student only) keeps its own depth branch; every other decoder tensor is copied.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from models.checkpoint import state_dict_diff


def teacher_guided_init(student: nn.Module, teacher: nn.Module, keep_student_depth: bool = False) -> int:
    """Copy ``teacher.decoder`` weights into ``student.decoder`` exactly; returns the number of tensors copied.

    With ``keep_student_depth``, the student's depth-branch tensors, which a teacher without depth lacks,
    keep their initialisation. Raises ValueError naming every other missing, unexpected or mismatched key;
    the student is unchanged then.
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(getattr(model, "decoder", None), nn.Module):
            raise ValueError(f"TGI: the {name} has no .decoder module")
    src = teacher.decoder.state_dict()
    mine = student.decoder.state_dict()
    if keep_student_depth:
        mine = {k: v for k, v in mine.items() if "depth_branch." not in k or k in src}
    diff = state_dict_diff(mine, src)
    if diff:
        problems = []
        if diff.mismatched:
            problems.append(f"shape mismatch: {sorted(f'{k}: student {mine} vs teacher {theirs}' for k, mine, theirs in diff.mismatched)}")
        if diff.missing:
            problems.append(f"keys only in the student decoder: {sorted(diff.missing)}")
        if diff.unexpected:
            problems.append(f"keys only in the teacher decoder: {sorted(diff.unexpected)}")
        raise ValueError("TGI: teacher and student decoders differ; " + "; ".join(problems))
    copied = {k: v.detach().clone() for k, v in src.items()}
    student.decoder.load_state_dict({**student.decoder.state_dict(), **copied}, strict=True)
    return len(src)


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every teacher parameter (the public code's train-mode bug is not copied)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """no_grad plus autocast on CUDA (when a mixed-precision dtype is given) for teacher forward passes."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if device.type == "cuda" and dtype is not None:
        stack.enter_context(torch.autocast("cuda", dtype=dtype))
    return stack
