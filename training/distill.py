"""Multi-level Consistent Knowledge Distillation (paper section III-B, eq. 3-10).

Four levels, each its own function: ``encoder_alignment_loss`` (EFA, eq. 3), ``query_level_loss``
(Hungarian-matched queries, eq. 4-7, coarse CFD or fine FLD), ``prior_level_loss`` (student run from
the teacher's initial positions, eq. 8) and ``anchor_level_loss`` (queries started from anchors
sampled on occupied ground truth, eq. 9). Every term is returned UNWEIGHTED and split into its
centre and feature parts; ``Distiller.weight_dict`` holds the effective weights of eq. 10 multiplied
out (lambda x inner weight: EFA 1, query and prior 0.6 / 0.4, anchor 1.5 / 1.0), applied once by the
trainer. Reductions follow the reference and paper eq. 5: sum over the vector (xyz of a centre,
channels of a feature), mean over the items (queries, pixels); every layer contributes.
Point-set centres are compared (and matched) in metres.
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
    """Which levels run and their weights; defaults are the paper's (lambda = 1, 0.2, 0.2, 0.5).

    ``center_weight`` / ``feature_weight`` are the reference's inner weights (3.0 / 2.0 at every
    level); lambda multiplies them once, giving the effective weights of ``Distiller.weight_dict``.
    """

    efa: bool = True
    query: bool = True
    prior: bool = True
    anchor: bool = True
    lambdas: list[float] = field(default_factory=lambda: [1.0, 0.2, 0.2, 0.5])  # eq. 10: EFA, QL, PL, AL
    query_variant: str = "cfd"          # "cfd" (coarse feature-based, eq. 7) or "fld" (fine logit-based)
    center_weight: float = 3.0          # inner weight of the centre terms (query, prior, anchor)
    feature_weight: float = 2.0         # inner weight of the feature terms (query, prior, anchor)
    num_anchors: int | None = None      # None: the student's number of queries

    def validate(self) -> DistillConfig:
        if len(self.lambdas) != 4 or any(x < 0 for x in self.lambdas):
            raise ValueError(f"distill.lambdas must be 4 non-negative weights (EFA, QL, PL, AL), got {self.lambdas}")
        if self.query_variant not in ("cfd", "fld"):
            raise ValueError(f"distill.query_variant must be 'cfd' or 'fld', got {self.query_variant!r}")
        if self.num_anchors is not None and self.num_anchors <= 0:
            raise ValueError(f"distill.num_anchors must be positive, got {self.num_anchors}")
        if self.center_weight < 0 or self.feature_weight < 0:
            raise ValueError("distill.center_weight and feature_weight must be non-negative")
        return self

    @property
    def any_enabled(self) -> bool:
        return any(getattr(self, level) for level in LEVELS)

    @property
    def query_terms(self) -> tuple[str, str]:
        """Names of the query level's two terms: (centre, feature) for CFD, (points, logits) for FLD."""
        return ("query_points", "query_logits") if self.query_variant == "fld" else ("query_center", "query_feature")


def center_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L1 of paired centres (P,3) in metres: summed over xyz, averaged over the P pairs."""
    return (student.float() - teacher.float()).abs().sum(-1).mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Squared error of L2-normalised features, summed over ``dim`` (channels), averaged over the rest."""
    diff = F.normalize(student.float(), dim=dim) - F.normalize(teacher.float(), dim=dim)
    return diff.square().sum(dim).mean()


def encoder_alignment_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                           adapters: nn.ModuleList | None = None) -> torch.Tensor:
    """EFA (eq. 3): per FPN level, squared error of per-pixel L2-normalised features summed over channels
    and averaged over pixels; summed over levels.

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
        total = total + feature_loss(fs, ft, dim=1)
    return total


def fld_loss(s_points: torch.Tensor, t_points: torch.Tensor, s_logits: torch.Tensor, t_logits: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine logit-based distillation of paired queries (eq. 6): (L1 on all R points, KL on class logits).

    Points (P,R,3) metres (summed over xyz, averaged over points); logits (P,R,C): KL(teacher || student)
    of the class distributions, summed over classes and averaged over points.
    """
    if s_points.shape != t_points.shape:
        raise ValueError(f"FLD needs the same points per query in student and teacher, got {tuple(s_points.shape)} "
                         f"and {tuple(t_points.shape)}")
    l1 = center_loss(s_points.reshape(-1, 3), t_points.reshape(-1, 3))
    kl = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                  log_target=True, reduction="none").sum(-1).mean()
    return l1, kl


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

    def weight_dict(self) -> dict[str, float]:
        """Effective weight of every term ``forward`` can return: lambda x inner weight (eq. 10 multiplied out)."""
        cfg = self.config
        lam_efa, lam_query, lam_prior, lam_anchor = cfg.lambdas
        weights = {"efa": lam_efa}
        for (center, feature), lam in ((cfg.query_terms, lam_query), (("prior_center", "prior_feature"), lam_prior),
                                       (("anchor_center", "anchor_feature"), lam_anchor)):
            weights[center] = lam * cfg.center_weight
            weights[feature] = lam * cfg.feature_weight
        return weights

    def metres(self, points: torch.Tensor) -> torch.Tensor:
        return points.float() * self.extent

    def _pairs(self, s: dict, t: dict, s_idx: tuple | None = None, t_idx: tuple | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre loss, feature loss) of the queries of one layer, paired by index or by (s_idx, t_idx)."""
        s_c, t_c = self.metres(s["centers"]), self.metres(t["centers"])
        s_f, t_f = self.project(s["query_features"]), t["query_features"]
        if s_idx is not None:
            s_c, s_f, t_c, t_f = s_c[s_idx], s_f[s_idx], t_c[t_idx], t_f[t_idx]
        return (center_loss(s_c.reshape(-1, 3), t_c.reshape(-1, 3)),
                feature_loss(s_f.reshape(-1, s_f.shape[-1]), t_f.reshape(-1, t_f.shape[-1])))

    def query_level_loss(self, student_layers: Sequence[dict], teacher_layers: Sequence[dict]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """QL (eq. 4-7): per layer, Hungarian matching on centres in metres, then (centre, feature) losses
        of the pairs (CFD) or (points, logits) losses (FLD); summed over layers."""
        center, feature = 0.0, 0.0
        layers = _paired_layers(student_layers, teacher_layers)
        # every layer's matching in one batch: (L*B, N, 3) against (L*B, M, 3), its pairs layer after layer
        every = matcher.match_flat(torch.cat([self.metres(s["centers"]) for s, _ in layers]),
                                   torch.cat([self.metres(t["centers"]) for _, t in layers]))
        end = 0
        for index, (s, t) in enumerate(layers):
            batch = s["centers"].shape[0]
            start, end = end, end + sum(every.counts[index * batch:(index + 1) * batch])
            b_s = every.sample[start:end] - index * batch  # the pair's sample within the layer's batch
            s_idx, t_idx = (b_s, every.rows[start:end]), (b_s, every.cols[start:end])
            if self.config.query_variant == "fld":
                c, f = fld_loss(self.metres(s["points"][s_idx]), self.metres(t["points"][t_idx]),
                                s["logits"][s_idx], t["logits"][t_idx])
            else:
                c, f = self._pairs(s, t, s_idx, t_idx)
            center, feature = center + c, feature + f
        return center, feature

    def prior_level_loss(self, prior_layers: Sequence[dict], teacher_layers: Sequence[dict]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """PL (eq. 8): student queries started from the teacher's initial positions vs the teacher's main
        queries, index by index; (centre, feature) summed over layers."""
        parts = [self._pairs(s, t) for s, t in _paired_layers(prior_layers, teacher_layers)]
        return sum(c for c, _ in parts), sum(f for _, f in parts)

    def anchor_level_loss(self, student_anchor_layers: Sequence[dict], teacher_anchor_layers: Sequence[dict]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """AL (eq. 9): both decoders started from the same GT anchors, index by index; (centre, feature)."""
        parts = [self._pairs(s, t) for s, t in _paired_layers(student_anchor_layers, teacher_anchor_layers)]
        return sum(c for c, _ in parts), sum(f for _, f in parts)

    def forward(self, student: dict, teacher: dict) -> dict[str, torch.Tensor]:
        """Unweighted terms of the enabled levels, from the outputs of both models.

        student: ``features``, ``layers``, and where enabled ``prior_layers`` and ``anchor_layers``;
        teacher: ``features``, ``layers`` and ``anchor_layers``. Anchor terms are skipped when no scene
        of the batch had an occupied voxel (``anchor_layers`` None). Returns ``efa``, ``query_center``,
        ``query_feature`` (``query_points``, ``query_logits`` for FLD), ``prior_*``, ``anchor_*`` as present.
        """
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if cfg.efa:
            terms["efa"] = encoder_alignment_loss(student["features"], teacher["features"], self.adapters)
        if cfg.query:
            terms.update(zip(cfg.query_terms, self.query_level_loss(student["layers"], teacher["layers"]), strict=True))
        if cfg.prior:
            terms["prior_center"], terms["prior_feature"] = self.prior_level_loss(student["prior_layers"],
                                                                                  teacher["layers"])
        if cfg.anchor and student.get("anchor_layers") is not None:
            terms["anchor_center"], terms["anchor_feature"] = self.anchor_level_loss(student["anchor_layers"],
                                                                                    teacher["anchor_layers"])
        return terms


def sample_anchors(target: torch.Tensor, num_anchors: int, class_weights: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Anchor positions for eq. 9, drawn from occupied GT voxels with class-rebalanced weights.

    target (B,X,Y,Z) labels (0 empty, 1..C, 255 unknown); a voxel of class c is drawn with probability
    proportional to ``class_weights[c-1]``. Scenes with fewer occupied voxels than ``num_anchors`` are
    sampled with replacement; scenes with none are skipped. Returns (anchors (B',N,3) normalised voxel
    centres or None when every scene is empty, keep (B',) indices of the scenes used). The whole batch
    is drawn at once on the target's device (``generator`` must be on that device) from one padded row
    of occupied voxels per scene; only the per-scene counts come to the host.
    """
    if target.dim() != 4:
        raise ValueError(f"sample_anchors needs (B,X,Y,Z) targets, got shape {tuple(target.shape)}")
    device, dims = target.device, target.shape[1:]
    labels = target.reshape(target.shape[0], -1).long()  # (B, X*Y*Z)
    occupied = (labels > 0) & (labels != UNKNOWN_LABEL) & (labels <= class_weights.numel())
    scene, voxel = occupied.nonzero(as_tuple=True)  # scene-major, so each scene's voxels are consecutive
    counts = torch.bincount(scene, minlength=labels.shape[0]).tolist()
    keep = [b for b, count in enumerate(counts) if count > 0]
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    if not keep:
        return None, keep_t
    # each kept scene's occupied voxels in one padded row: weights (B', most) zero-padded, and their indices
    sizes = torch.tensor([counts[b] for b in keep], device=device)
    total = voxel.numel()  # known on the host since nonzero: repeat_interleave needs no sync for its size
    row = torch.repeat_interleave(torch.arange(len(keep), device=device), sizes, output_size=total)
    column = torch.arange(total, device=device) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes,
                                                                           output_size=total)
    flat = torch.zeros(len(keep), max(counts), dtype=torch.long, device=device)
    flat[row, column] = voxel
    weights = torch.zeros(len(keep), max(counts), device=device)
    weights[row, column] = class_weights.float().to(device)[labels[scene, voxel] - 1]
    picks = torch.empty(len(keep), num_anchors, dtype=torch.long, device=device)  # columns of those rows
    for replacement in (False, True):
        rows = [j for j, b in enumerate(keep) if (counts[b] < num_anchors) == replacement]
        if rows:
            rows_t = torch.tensor(rows, dtype=torch.long, device=device)
            picks[rows_t] = torch.multinomial(weights[rows_t], num_anchors, replacement=replacement, generator=generator)
    picks = flat.gather(1, picks)  # flat voxel indices
    ijk = torch.stack([picks // (dims[1] * dims[2]), picks // dims[2] % dims[1], picks % dims[2]], dim=-1)
    return (ijk.float() + 0.5) / torch.tensor(dims, dtype=torch.float32, device=device), keep_t
