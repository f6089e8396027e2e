"""Multi-level Consistent Knowledge Distillation (paper section III-B, eq. 3-10).

Four levels, each its own function: ``encoder_alignment_loss`` (EFA, eq. 3), ``query_level_loss``
(Hungarian-matched queries, eq. 4-7, coarse CFD or fine FLD), ``prior_level_loss`` (student run from
the teacher's initial positions, eq. 8) and ``anchor_level_loss`` (queries started from anchors
sampled on occupied ground truth, eq. 9); ``distillation_loss`` combines them (eq. 10).
Point-set centres are compared in metres (normalised * grid extent), like the task loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.classes import UNKNOWN_LABEL
from models.geometry import GRID_EXTENT

from . import matcher

LEVELS = ("efa", "query", "prior", "anchor")


@dataclass
class DistillConfig:
    """Which levels run and their weights; defaults are the paper's (lambda = 1, 0.2, 0.2, 0.5)."""

    efa: bool = True
    query: bool = True
    prior: bool = True
    anchor: bool = True
    lambdas: list[float] = field(default_factory=lambda: [1.0, 0.2, 0.2, 0.5])  # eq. 10: EFA, QL, PL, AL
    query_variant: str = "cfd"          # "cfd" (coarse feature-based, eq. 7) or "fld" (fine logit-based)
    center_weight: float = 0.6          # CFD weights for query and prior level
    feature_weight: float = 0.4
    anchor_center_weight: float = 1.5   # CFD weights for anchor level
    anchor_feature_weight: float = 1.0
    num_anchors: int | None = None      # None: the student's number of queries

    def validate(self) -> DistillConfig:
        if len(self.lambdas) != 4 or any(x < 0 for x in self.lambdas):
            raise ValueError(f"distill.lambdas must be 4 non-negative weights (EFA, QL, PL, AL), got {self.lambdas}")
        if self.query_variant not in ("cfd", "fld"):
            raise ValueError(f"distill.query_variant must be 'cfd' or 'fld', got {self.query_variant!r}")
        if self.num_anchors is not None and self.num_anchors <= 0:
            raise ValueError(f"distill.num_anchors must be positive, got {self.num_anchors}")
        return self

    @property
    def any_enabled(self) -> bool:
        return any(getattr(self, level) for level in LEVELS)


def _normalised_mse(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    return F.mse_loss(F.normalize(a.float(), dim=dim), F.normalize(b.float(), dim=dim))


def encoder_alignment_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                           adapters: nn.ModuleList | None = None) -> torch.Tensor:
    """EFA (eq. 3): per FPN level MSE of per-pixel L2-normalised features, summed over levels.

    A student level is first mapped by its adapter (1x1 conv when channel counts differ); teacher maps
    of another spatial size are resized bilinearly to the student's.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"EFA needs as many FPN levels in student ({len(student_features)}) as in teacher "
                         f"({len(teacher_features)})")
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for level, (fs, ft) in enumerate(zip(student_features, teacher_features, strict=True)):
        if adapters is not None:
            fs = adapters[level](fs)
        if fs.shape[1] != ft.shape[1]:
            raise ValueError(f"EFA level {level}: student has {fs.shape[1]} channels, teacher {ft.shape[1]}; "
                             "give adapters")
        if ft.shape[-2:] != fs.shape[-2:]:
            ft = F.interpolate(ft.float(), size=fs.shape[-2:], mode="bilinear", align_corners=False)
        total = total + _normalised_mse(fs, ft, dim=1)
    return total


def cfd_loss(s_centers: torch.Tensor, t_centers: torch.Tensor, s_features: torch.Tensor, t_features: torch.Tensor,
             center_weight: float, feature_weight: float) -> torch.Tensor:
    """Coarse feature-based distillation of paired queries (eq. 6): L1 on centres + MSE of normalised features.

    Centres (P,3) in metres, features (P,D); means over the P pairs.
    """
    l1 = F.l1_loss(s_centers.float(), t_centers.float())
    return center_weight * l1 + feature_weight * _normalised_mse(s_features, t_features, dim=-1)


def fld_loss(s_points: torch.Tensor, t_points: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
    """Fine logit-based distillation of paired queries (eq. 6): L1 on all R points + KL on class logits.

    Points (P,R,3) metres, logits (P,R,C); KL(teacher || student) of the class distributions per point.
    """
    if s_points.shape != t_points.shape:
        raise ValueError(f"FLD needs the same points per query in student and teacher, got {tuple(s_points.shape)} "
                         f"and {tuple(t_points.shape)}")
    l1 = F.l1_loss(s_points.float(), t_points.float())
    kl = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                  log_target=True, reduction="none").sum(-1).mean()
    return l1 + kl


def _paired_layers(student_layers: Sequence[dict], teacher_layers: Sequence[dict]) -> list[tuple[dict, dict]]:
    """Pair layers from the last one backwards (equal depth in the paper; tolerant of a shallower student)."""
    offset = len(teacher_layers) - len(student_layers)
    if offset < 0:
        raise ValueError(f"student has {len(student_layers)} decoder layers, more than the teacher's {len(teacher_layers)}")
    return [(s, teacher_layers[i + offset]) for i, s in enumerate(student_layers)]


class Distiller(nn.Module):
    """Owns the trainable glue of distillation: EFA 1x1 conv adapters and the query feature projection.

    Identity modules where dimensions agree, so identical teacher and student give zero loss.
    """

    def __init__(self, config: DistillConfig, student_channels: int, teacher_channels: int, num_levels: int,
                 student_dims: int, teacher_dims: int, extent: Sequence[float] = GRID_EXTENT) -> None:
        super().__init__()
        self.config = config.validate()
        if config.efa and student_channels != teacher_channels:
            self.adapters = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))
        else:
            self.adapters = None
        self.project = nn.Linear(student_dims, teacher_dims) if student_dims != teacher_dims else nn.Identity()
        self.register_buffer("extent", torch.tensor(list(extent), dtype=torch.float32), persistent=False)

    def metres(self, points: torch.Tensor) -> torch.Tensor:
        return points.float() * self.extent.to(points.device)

    def _cfd(self, s: dict, t: dict, center_w: float, feature_w: float,
             s_idx: torch.Tensor | None = None, t_idx: torch.Tensor | None = None) -> torch.Tensor:
        s_c, t_c = self.metres(s["centers"]), self.metres(t["centers"])
        s_f, t_f = self.project(s["query_features"]), t["query_features"]
        if s_idx is not None:
            s_c, s_f, t_c, t_f = s_c[s_idx], s_f[s_idx], t_c[t_idx], t_f[t_idx]
        return cfd_loss(s_c.reshape(-1, 3), t_c.reshape(-1, 3), s_f.reshape(-1, s_f.shape[-1]),
                        t_f.reshape(-1, t_f.shape[-1]), center_w, feature_w)

    def query_level_loss(self, student_layers: Sequence[dict], teacher_layers: Sequence[dict]) -> torch.Tensor:
        """QL (eq. 5-7): per layer and sample, Hungarian matching on centres then CFD (or FLD) on the pairs."""
        cfg = self.config
        total = 0.0
        for s, t in _paired_layers(student_layers, teacher_layers):
            pairs = matcher.match_batch(s["centers"], t["centers"])
            b_s = torch.cat([torch.full_like(si, b) for b, (si, _) in enumerate(pairs)])
            s_idx = (b_s, torch.cat([si for si, _ in pairs]))
            t_idx = (b_s, torch.cat([ti for _, ti in pairs]))
            if cfg.query_variant == "fld":
                total = total + fld_loss(self.metres(s["points"][s_idx]), self.metres(t["points"][t_idx]),
                                         s["logits"][s_idx], t["logits"][t_idx])
            else:
                total = total + self._cfd(s, t, cfg.center_weight, cfg.feature_weight, s_idx, t_idx)
        return total

    def prior_level_loss(self, prior_layers: Sequence[dict], teacher_layers: Sequence[dict]) -> torch.Tensor:
        """PL (eq. 8): student queries started from the teacher's initial positions vs the teacher's, index by index."""
        cfg = self.config
        return sum(self._cfd(s, t, cfg.center_weight, cfg.feature_weight)
                   for s, t in _paired_layers(prior_layers, teacher_layers))

    def anchor_level_loss(self, student_anchor_layers: Sequence[dict], teacher_anchor_layers: Sequence[dict]) -> torch.Tensor:
        """AL (eq. 9): both decoders started from the same GT anchors, compared index by index."""
        cfg = self.config
        return sum(self._cfd(s, t, cfg.anchor_center_weight, cfg.anchor_feature_weight)
                   for s, t in _paired_layers(student_anchor_layers, teacher_anchor_layers))

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        """Loss terms of the enabled levels, from the outputs of both models.

        student: ``features``, ``layers``, and where enabled ``prior_layers`` and ``anchor_layers``;
        teacher: ``features``, ``layers`` and ``anchor_layers``. Anchor terms are skipped when no scene
        of the batch had an occupied voxel (``anchor_layers`` None). Returns ``efa``, ``query``,
        ``prior``, ``anchor`` as present and ``distill`` (eq. 10).
        """
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if cfg.efa:
            terms["efa"] = encoder_alignment_loss(student["features"], teacher["features"], self.adapters)
        if cfg.query:
            terms["query"] = self.query_level_loss(student["layers"], teacher["layers"])
        if cfg.prior:
            terms["prior"] = self.prior_level_loss(student["prior_layers"], teacher["layers"])
        if cfg.anchor and student.get("anchor_layers") is not None:
            terms["anchor"] = self.anchor_level_loss(student["anchor_layers"], teacher["anchor_layers"])
        terms["distill"] = distillation_loss(terms, cfg.lambdas)
        return terms


def distillation_loss(terms: dict[str, torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """Eq. 10: lambda1 L_EFA + lambda2 L_QL + lambda3 L_PL + lambda4 L_AL over the terms present."""
    parts = [lam * terms[level].float() for level, lam in zip(LEVELS, lambdas, strict=True) if level in terms]
    if not parts:
        raise ValueError("distillation_loss: no distillation level is enabled")
    return torch.stack(parts).sum()


def sample_anchors(target: torch.Tensor, num_anchors: int, class_weights: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Anchor positions for eq. 9, drawn from occupied GT voxels with class-rebalanced weights.

    target (B,X,Y,Z) labels (0 empty, 1..C, 255 unknown); a voxel of class c is drawn with probability
    proportional to ``class_weights[c-1]``. Scenes with fewer occupied voxels than ``num_anchors`` are
    sampled with replacement; scenes with none are skipped. Returns (anchors (B',N,3) normalised voxel
    centres or None when every scene is empty, keep (B',) indices of the scenes used).
    """
    if target.dim() != 4:
        raise ValueError(f"sample_anchors needs (B,X,Y,Z) targets, got shape {tuple(target.shape)}")
    shape = torch.tensor(target.shape[1:], dtype=torch.float32)
    anchors, keep = [], []
    for b, grid in enumerate(target.cpu().long()):
        occupied = (grid > 0) & (grid != UNKNOWN_LABEL) & (grid <= class_weights.numel())
        idx = occupied.nonzero()
        if idx.shape[0] == 0:
            continue
        weights = class_weights.cpu().float()[grid[occupied] - 1]
        pick = torch.multinomial(weights, num_anchors, replacement=idx.shape[0] < num_anchors, generator=generator)
        anchors.append((idx[pick].float() + 0.5) / shape)
        keep.append(b)
    keep_t = torch.tensor(keep, dtype=torch.long, device=target.device)
    if not anchors:
        return None, keep_t
    return torch.stack(anchors).to(target.device), keep_t
