"""Task loss of the sparse occupancy decoder (paper eq. 2, DESIGN.md section 3), batched.

Every decoder layer is supervised by a two-sided weighted Chamfer loss (SmoothL1, beta 0.04)
between its predicted points and the occupied ground-truth voxel centres, plus a sigmoid focal loss
where each predicted point takes the label of its nearest ground-truth voxel; the initial points get
the Chamfer loss too. Distances are in metres (grid-local: ``normalised * grid extent``).

Reference reductions (the public DiScene head): Chamfer sides are weighted sums over xyz and points
divided by the number of points of the batch (``loss_chamfer``); the focal loss is summed over
classes and points and divided by the number of predicted points (``loss_focal``). Both weights
(x5 beyond 0.04 m, rare classes floored at 10) and the N x C class-weight matrix times the distance
weight of the assigned GT point come from the reference. Every term is returned UNWEIGHTED; the
loss weights live in one table (``TaskLoss.weight_dict``) that the trainer applies once.

The whole batch and every layer are computed at once: ground truth is padded to the largest scene
with a mask, nearest neighbours come from one search per layer (chunks of squared distances, one
GEMM each, on GPU; scipy KD-trees on CPU; or, with ``nn_backend: fused``, one compiled reduction per
direction that never stores a distance), and the per-layer sums are segment sums over the
concatenated points.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from models.classes import NUM_CLASSES, UNKNOWN_LABEL
from models.geometry import GRID_SHAPE, VOXEL_SIZE

from .compiled import describe_failure, is_compile_error

# Largest number of float32 distances one search chunk may hold: 64 MiB on the CPU; on a GPU up to 4 GiB
# where the free memory allows (``cdist_budget``). Bounds memory at 15,360 points x tens of thousands
# of ground-truth voxels; bigger chunks on a GPU mean far fewer kernel launches per step (lite, batch 32,
# ~20k GT voxels a scene: 55 chunks of nine ops at 1 GiB, 16 at 4 GiB).
MAX_CDIST_ELEMENTS = 16 * 1024 * 1024
MAX_CDIST_ELEMENTS_GPU = 1024 * 1024 * 1024
FAR_SQUARED = 1.0e18  # squared metres given to padded ground truth: never nearest, no inf arithmetic in the GEMM
FAR_COORDINATE = 1.0e6  # metres, every coordinate of padded ground truth in the fused search (squares stay finite)
NN_BACKENDS = ("auto", "cdist", "kdtree", "fused")
log = logging.getLogger(__name__)
REFERENCE_RARE_CLASSES = (1, 4, 6, 9, 11)  # ceiling, window, bed, tv, objects (public DiScene config)


@dataclass
class TaskLossConfig:
    """Task-loss settings; defaults are the public OPUS/DiScene values."""

    chamfer_weight: float = 0.5
    chamfer_beta: float = 0.04          # metres, SmoothL1 beta
    focal_weight: float = 2.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    far_threshold: float = 0.04         # metres: a point whose nearest partner is farther gets x far_weight
    far_weight: float = 5.0
    rare_classes: list[int] = field(default_factory=lambda: list(REFERENCE_RARE_CLASSES))
    rare_min_weight: float = 10.0       # Chamfer weight floor of points of a rare class (both sides)
    init_points_weight: float = 1.0     # Chamfer on the initial points, relative to a layer's Chamfer
    nn_backend: str = "auto"            # nearest neighbours: "cdist" (chunks of squared distances, one GEMM each),
                                        # "kdtree" (scipy, CPU), "fused" (torch.compile'd reductions, no distance
                                        # stored) or "auto" (kdtree on CPU, cdist on GPU); all exact
    nn_chunk_elements: int | None = None  # distances one "cdist" chunk may hold; None: cdist_budget of the device
    class_frequencies: list[float] | str | None = None  # voxel counts of classes 1..C, or a name in
                                        # NAMED_CLASS_FREQUENCIES; None: uniform weights (the trainer counts them)


@dataclass
class GroundTruth:
    """Occupied voxels of one scene: centres in metres (M,3) and labels 1..C (M,)."""

    points: torch.Tensor
    labels: torch.Tensor


@dataclass
class PaddedGroundTruth:
    """Occupied voxels of a batch, padded to the largest scene: points (B,M,3) metres, labels (B,M), mask (B,M)."""

    points: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_list(cls, gts: Sequence[GroundTruth], device: torch.device | None = None) -> PaddedGroundTruth:
        device = device or (gts[0].points.device if gts else torch.device("cpu"))
        size = max([int(g.points.shape[0]) for g in gts] + [0])
        points = torch.zeros(len(gts), size, 3, device=device)
        labels = torch.ones(len(gts), size, dtype=torch.long, device=device)
        mask = torch.zeros(len(gts), size, dtype=torch.bool, device=device)
        for b, g in enumerate(gts):
            m = int(g.points.shape[0])
            points[b, :m] = g.points.to(device).float()
            labels[b, :m] = g.labels.to(device).long()
            mask[b, :m] = True
        return cls(points, labels, mask)


# Voxel counts of classes 1..11 over the whole Occ-ScanNet train split (45,755 frames), as the reference's
# Occ-ScanNet configs give them (their ``cls_freq`` after the empty class): the focal loss's class weights
# and the anchor sampling come from these in every reference run.
OCC_SCANNET_CLASS_FREQUENCIES = (700497, 44393812, 39153315, 3367920, 21860824, 10667655, 13832443, 23358785,
                                 263684, 30415451, 9338079)
NAMED_CLASS_FREQUENCIES = {"occ_scannet": OCC_SCANNET_CLASS_FREQUENCIES}


def resolve_class_frequencies(value: Sequence[float] | str | None) -> list[float] | None:
    """``loss.class_frequencies`` as counts: a name from NAMED_CLASS_FREQUENCIES, a list, or None."""
    if isinstance(value, str):
        if value not in NAMED_CLASS_FREQUENCIES:
            raise ValueError(f"loss.class_frequencies: unknown name {value!r}; use a list of voxel counts of "
                             f"classes 1..C, null (counted from the training frames) or one of {sorted(NAMED_CLASS_FREQUENCIES)}")
        return [float(c) for c in NAMED_CLASS_FREQUENCIES[value]]
    return None if value is None else [float(c) for c in value]


def class_weights_from_frequencies(frequencies: Sequence[float]) -> torch.Tensor:
    """OPUS class weights ``(1/ln(freq) - 0.05) * 400`` from voxel counts of classes 1..C.

    ``freq`` are raw voxel counts (not shares). Classes never seen (count <= 1) get the largest
    weight of the seen classes; weights are floored at 1 so a huge count never gives a negative weight.
    """
    freq = np.asarray(frequencies, dtype=np.float64)
    if freq.ndim != 1 or freq.size == 0 or np.any(~np.isfinite(freq)) or np.any(freq < 0):
        raise ValueError(f"class frequencies must be a non-empty list of non-negative counts, got {frequencies}")
    seen = freq > 1.0
    weights = np.ones_like(freq)
    if seen.any():
        weights[seen] = (1.0 / np.log(freq[seen]) - 0.05) * 400.0
        weights[~seen] = weights[seen].max()
    return torch.as_tensor(np.maximum(weights, 1.0), dtype=torch.float32)


def rare_class_mask(rare_classes: Sequence[int], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Boolean (C,) mask over classes 1..C of the listed rare classes."""
    bad = [c for c in rare_classes if not 1 <= int(c) <= num_classes]
    if bad:
        raise ValueError(f"loss.rare_classes must be labels in 1..{num_classes}, got {bad}")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[[int(c) - 1 for c in rare_classes]] = True
    return mask


def ground_truth_from_voxels(target: torch.Tensor, voxel_size: float = VOXEL_SIZE,
                             num_classes: int = NUM_CLASSES) -> PaddedGroundTruth:
    """Occupied voxel centres (metres, grid-local) and labels of (B,X,Y,Z) label grids, padded per batch.

    Occupied = labels 1..C; 0 (empty) and 255 (unknown) are left out. Scenes may have no occupied voxel.
    """
    if target.dim() == 3:
        target = target.unsqueeze(0)
    if target.dim() != 4:
        raise ValueError(f"target must be (B,X,Y,Z) or (X,Y,Z) labels, got shape {tuple(target.shape)}")
    grid = target.long()
    bad = (grid > num_classes) & (grid != UNKNOWN_LABEL)
    occupied = (grid > 0) & (grid != UNKNOWN_LABEL)
    counts = occupied.flatten(1).sum(1)  # (B,)
    any_bad, size = torch.stack([bad.any().long(), counts.max()]).tolist() if counts.numel() else (0, 0)  # one read
    if any_bad:
        raise ValueError(f"target holds labels {grid[bad].unique().tolist()}: expected 0..{num_classes} or 255")
    idx = occupied.nonzero()  # (K, 4), sorted by batch index
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(idx.shape[0], device=grid.device) - starts[idx[:, 0]]
    b = grid.shape[0]
    points = torch.zeros(b, size, 3, device=grid.device)
    labels = torch.ones(b, size, dtype=torch.long, device=grid.device)
    mask = torch.zeros(b, size, dtype=torch.bool, device=grid.device)
    points[idx[:, 0], slot] = (idx[:, 1:].float() + 0.5) * voxel_size
    labels[idx[:, 0], slot] = grid[occupied]
    mask[idx[:, 0], slot] = True
    return PaddedGroundTruth(points, labels, mask)


@torch.no_grad()
def nearest_neighbours(src: torch.Tensor, dst: torch.Tensor, max_elements: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest neighbours both ways between src (N,3) and dst (M,3), from one ``nearest_neighbours_padded`` search.

    Returns (src->dst distance (N,), index (N,), dst->src distance (M,), index (M,)); at most
    ``max_elements`` distances exist at once (default: ``cdist_budget``). Both sets must be non-empty.
    """
    if src.shape[0] == 0 or dst.shape[0] == 0:
        raise ValueError(f"nearest_neighbours needs non-empty sets, got {src.shape[0]} and {dst.shape[0]} points")
    mask = torch.ones(1, dst.shape[0], dtype=torch.bool, device=dst.device)
    s_idx, d_idx = nearest_neighbours_padded(src[None], [src.shape[0]], dst[None], mask, max_elements)
    s_idx, d_idx = s_idx[0], d_idx[0, 0]
    src, dst = src.detach().float(), dst.detach().float()
    return (src - dst[s_idx]).norm(dim=-1), s_idx, (dst - src[d_idx]).norm(dim=-1), d_idx


def cdist_budget(device: torch.device) -> int:
    """Distances one chunk of the nearest-neighbour search may hold on ``device``: 16 Mi on the CPU; on
    CUDA an eighth of the free memory in float32 distances, within 16 Mi .. 1 Gi."""
    if device.type != "cuda":
        return MAX_CDIST_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(MAX_CDIST_ELEMENTS_GPU, max(MAX_CDIST_ELEMENTS, free // 32)))


def _augmented(points: torch.Tensor, side: str) -> torch.Tensor:
    """(...,3) -> (...,5) so that a product of the two sides is a squared distance (one GEMM per chunk):
    pred side ``[-2x, |x|^2, 1]``, ground-truth side ``[g, 1, |g|^2]``."""
    sq = points.pow(2).sum(-1, keepdim=True)
    one = torch.ones_like(sq)
    return torch.cat([-2 * points, sq, one] if side == "pred" else [points, one, sq], dim=-1)


def _zero_padded(p2g: torch.Tensor, g2p: torch.Tensor, gt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index 0 for the predictions of a scene without GT and for padded GT points, as every search returns them."""
    return p2g.masked_fill_(~gt_mask.any(dim=1, keepdim=True), 0), g2p.masked_fill_(~gt_mask, 0)


@torch.no_grad()
def nearest_neighbours_padded(pred: torch.Tensor, sizes: Sequence[int], gt: torch.Tensor, gt_mask: torch.Tensor,
                              max_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched nearest neighbours between predicted segments and padded ground truth, by squared-distance chunks.

    pred (B,P,3) holds S consecutive segments of ``sizes`` points (the initial points and each layer);
    gt (B,M,3) with gt_mask (B,M). Returns p2g (B,P): index of the nearest valid GT point of each
    prediction (0 in a scene without GT), and g2p (S,B,M): index (into the P rows) of the nearest prediction
    of each segment for each GT point (0 where padded). At most ``max_elements`` distances exist at once
    (default: ``cdist_budget`` of the device).

    Each chunk is one float32 GEMM of augmented points (the expansion ``torch.cdist`` uses for large
    inputs) read by two reductions, with padded GT pushed far away through its norm: three passes over
    the chunk where cdist + mask took nine (the H200 profile of session 18: ~89 % of a lite training
    step's GPU time). Coordinates are centred first, which halves the expansion's rounding.
    """
    b, p = pred.shape[:2]
    m = gt.shape[1]
    p2g = torch.zeros(b, p, dtype=torch.long, device=pred.device)
    g2p = torch.zeros(len(sizes), b, m, dtype=torch.long, device=pred.device)
    if m == 0:
        return p2g, g2p
    with torch.autocast(pred.device.type, enabled=False):  # distances stay float32 under bf16/fp16 training
        pred = pred.detach().float()
        center = pred.mean(dim=(0, 1))
        x = _augmented(pred - center, "pred")  # (B,P,5)
        g = _augmented(gt.detach().float() - center, "gt")  # (B,M,5)
        g[..., 4].masked_fill_(~gt_mask, FAR_SQUARED)
        g = g.mT.contiguous()  # (B,5,M)
        rows = max(1, (max_elements or cdist_budget(pred.device)) // (b * m))
        start = 0
        for seg, size in enumerate(sizes):
            best = g.new_full((b, m), float("inf"))
            for lo in range(start, start + size, rows):
                hi = min(lo + rows, start + size)
                d2 = torch.bmm(x[:, lo:hi], g)  # (B, rows, M) squared distances
                p2g[:, lo:hi] = d2.argmin(dim=2)
                col_best, col_arg = d2.min(dim=1)
                better = col_best < best
                best = torch.where(better, col_best, best)
                g2p[seg] = torch.where(better, col_arg + lo, g2p[seg])
            start += size
    return _zero_padded(p2g, g2p, gt_mask)


def _squared_distances(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B,P,3), (B,M,3) -> (B,P,M) squared distances, as one elementwise expression: compiled, it is computed
    inside the reduction that reads it and never stored."""
    return sum((pred[:, :, None, k] - gt[:, None, :, k]) ** 2 for k in range(3))


def _nearest_gt(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return _squared_distances(pred, gt).argmin(dim=2)  # (B,P)


def _nearest_pred(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    return _squared_distances(pred, gt).argmin(dim=1)  # (B,M)


class FusedSearch:
    """``nearest_neighbours_padded``'s result from two ``torch.compile``'d reductions (dynamic shapes: the
    padded GT size changes every batch). The distance chunks of the GEMM search are written to memory and
    read back by two reductions; here each (point, GT) distance is computed where it is compared, in
    registers. Eagerly the same expressions would store the whole (B,P,M) volume, so a compile failure
    turns this search off (logged once) and the caller falls back to the chunked GEMM."""

    def __init__(self) -> None:
        self.usable = True
        self._compiled: tuple | None = None  # (nearest_gt, nearest_pred), compiled at the first search

    def _functions(self) -> tuple:
        if self._compiled is None:
            self._compiled = tuple(torch.compile(fn, dynamic=True, fullgraph=True) for fn in (_nearest_gt, _nearest_pred))
        return self._compiled

    @staticmethod
    def _no_silent_eager():
        """Past its recompile limit dynamo may run a function eagerly, which here would store the whole distance
        volume: make that an error, a compile failure, so the GEMM search takes over (torch 2.13 raises there
        for fullgraph functions anyway; this holds it on versions that do not)."""
        import torch._dynamo  # here, not at the top: a 1.6 s import that only the compiled search needs

        if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, sizes: Sequence[int], gt: torch.Tensor, gt_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(p2g (B,P), g2p (S,B,M)) as ``nearest_neighbours_padded`` returns them; None once compiling failed, and
        for this call under a Python dispatch mode (an op counter), where dynamo compiles nothing."""
        if _get_current_dispatch_mode() is not None:
            return None
        b, p = pred.shape[:2]
        m = gt.shape[1]
        if m == 0:
            return (torch.zeros(b, p, dtype=torch.long, device=pred.device),
                    torch.zeros(len(sizes), b, 0, dtype=torch.long, device=pred.device))
        try:
            nearest_gt, nearest_pred = self._functions()
            with self._no_silent_eager(), torch.autocast(pred.device.type, enabled=False):  # float32 under autocast
                pred = pred.detach().float()
                center = pred.mean(dim=(0, 1))
                x = (pred - center).contiguous()
                g = (gt.detach().float() - center).masked_fill(~gt_mask[..., None], FAR_COORDINATE).contiguous()
                p2g = nearest_gt(x, g)
                starts = np.cumsum([0, *sizes[:-1]]).tolist()
                g2p = torch.stack([nearest_pred(x[:, lo:lo + size].contiguous(), g) + lo
                                   for lo, size in zip(starts, sizes, strict=True)])
        except Exception as exc:  # noqa: BLE001 - only compile failures are caught, the rest re-raised
            if not is_compile_error(exc):
                raise
            self.usable = False
            log.warning("loss.nn_backend fused is off from now on (%s); the chunked GEMM search runs instead",
                        describe_failure(exc))
            return None
        return _zero_padded(p2g, g2p, gt_mask)


FUSED_SEARCH = FusedSearch()


@torch.no_grad()
def nearest_neighbours_kdtree(pred: torch.Tensor, sizes: Sequence[int], gt: torch.Tensor, gt_mask: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``nearest_neighbours_padded`` from scipy KD-trees (faster on CPU tensors).

    One tree per scene's ground truth serves every segment; one tree per segment answers the GT side.
    """
    from scipy.spatial import cKDTree  # scipy: the [train] extra

    b, p = pred.shape[:2]
    m = gt.shape[1]
    # a diverged network's NaN/inf positions (which scipy refuses) match anything: the loss stays non-finite,
    # and the trainer stops on it as it does with the other backends
    pts = np.nan_to_num(pred.detach().float().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    gts = gt.detach().float().cpu().numpy()
    counts = gt_mask.sum(1).tolist()
    p2g = np.zeros((b, p), dtype=np.int64)
    g2p = np.zeros((len(sizes), b, m), dtype=np.int64)
    for i in range(b):
        n = int(counts[i])
        if n == 0:
            continue
        valid = gt_mask[i].cpu().numpy()
        kept = np.flatnonzero(valid)
        _, near = cKDTree(gts[i][kept]).query(pts[i])
        p2g[i] = kept[near]
        start = 0
        for seg, size in enumerate(sizes):
            _, near = cKDTree(pts[i, start:start + size]).query(gts[i][kept])
            g2p[seg, i, kept] = near + start
            start += size
    return torch.from_numpy(p2g).to(pred.device), torch.from_numpy(g2p).to(pred.device)


def sigmoid_focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss (mmdet formula); logits (...,C), labels (...) in 1..C. Returns (...,C)."""
    # a comparison, not F.one_hot, which reads the labels' min and max on the host (two device syncs a step)
    classes = torch.arange(1, logits.shape[-1] + 1, device=labels.device)
    target = (labels.unsqueeze(-1) == classes).to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    one_minus_pt = prob * (1 - target) + (1 - prob) * target
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * one_minus_pt.pow(gamma) * ce


class TaskLoss(torch.nn.Module):
    """Chamfer + focal loss over every decoder layer plus Chamfer on the initial points (eq. 2).

    ``forward`` returns the unweighted terms ``chamfer_init``, ``chamfer_<l>``, ``focal_<l>``;
    ``weight_dict`` gives their effective weights.
    """

    def __init__(self, config: TaskLossConfig | None = None, num_classes: int = NUM_CLASSES,
                 grid_shape: Sequence[int] = GRID_SHAPE, voxel_size: float = VOXEL_SIZE) -> None:
        super().__init__()
        self.config = config or TaskLossConfig()
        self.num_classes = num_classes
        self.voxel_size = float(voxel_size)
        freq = resolve_class_frequencies(self.config.class_frequencies)
        if self.config.nn_backend not in NN_BACKENDS:
            raise ValueError(f"loss.nn_backend must be one of {', '.join(NN_BACKENDS)}, got {self.config.nn_backend!r}")
        if self.config.nn_chunk_elements is not None and self.config.nn_chunk_elements < 1:
            raise ValueError(f"loss.nn_chunk_elements must be positive (or null), got {self.config.nn_chunk_elements}")
        if freq is not None and len(freq) != num_classes:
            raise ValueError(f"class_frequencies needs {num_classes} counts (classes 1..{num_classes}), got {len(freq)}")
        weights = class_weights_from_frequencies(freq) if freq is not None else torch.ones(num_classes)
        extent = torch.tensor([n * voxel_size for n in grid_shape], dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("rare", rare_class_mask(self.config.rare_classes, num_classes), persistent=False)
        self.register_buffer("extent", extent, persistent=False)
        self.register_buffer("center_xy", extent[:2] / 2, persistent=False)
        self.diagonal_xy = float(extent[:2].norm())  # full x-y diagonal: distance weights run 1 .. 1.5
        self._segments: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def ground_truth(self, target: torch.Tensor) -> PaddedGroundTruth:
        """(B,X,Y,Z) label grids -> this loss's ground truth: voxel centres in metres at its voxel size,
        labels checked against its class count."""
        return ground_truth_from_voxels(target, self.voxel_size, self.num_classes)

    def weight_dict(self, num_layers: int) -> dict[str, float]:
        """Effective weight of every term ``forward`` returns (the reference's loss_weight values)."""
        cfg = self.config
        weights = {"chamfer_init": cfg.chamfer_weight * cfg.init_points_weight}
        for layer in range(num_layers):
            weights[f"chamfer_{layer}"] = cfg.chamfer_weight
            weights[f"focal_{layer}"] = cfg.focal_weight
        return weights

    def distance_weight(self, points: torch.Tensor) -> torch.Tensor:
        """``1 + |xy - grid centre xy| / |grid diagonal in xy|`` of points (...,3) in metres: 1 .. 1.5."""
        return 1.0 + (points[..., :2] - self.center_xy).norm(dim=-1) / self.diagonal_xy

    def segment_index(self, sizes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(row -> segment index (P,), segment sizes (S,)) cached per layout, built once on the device."""
        key = (sizes, device)
        if key not in self._segments:
            counts = torch.tensor(sizes, dtype=torch.long)
            index = torch.repeat_interleave(torch.arange(len(sizes)), counts)
            self._segments[key] = (index.to(device), counts.to(device=device, dtype=torch.float32))
        return self._segments[key]

    def _search(self, pred: torch.Tensor, sizes: Sequence[int], gt: PaddedGroundTruth) -> tuple[torch.Tensor, torch.Tensor]:
        backend = self.config.nn_backend
        if backend == "kdtree" or (backend == "auto" and pred.device.type == "cpu"):
            return nearest_neighbours_kdtree(pred, sizes, gt.points, gt.mask)
        if backend == "fused" and FUSED_SEARCH.usable:
            found = FUSED_SEARCH(pred, sizes, gt.points, gt.mask)
            if found is not None:
                return found
        return nearest_neighbours_padded(pred, sizes, gt.points, gt.mask, self.config.nn_chunk_elements)

    def _point_weight(self, dist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Chamfer weights: x far_weight beyond far_threshold, floored at rare_min_weight for rare classes."""
        cfg = self.config
        w = torch.where(dist > cfg.far_threshold, cfg.far_weight, 1.0)
        return torch.where(self.rare[labels - 1], w.clamp(min=cfg.rare_min_weight), w)

    def loss_chamfer(self, pred: torch.Tensor, sizes: tuple[int, ...], gt: PaddedGroundTruth,
                     p2g: torch.Tensor, g2p: torch.Tensor) -> torch.Tensor:
        """Two-sided weighted SmoothL1 Chamfer per segment (S,): pred (B,P,3) metres, segments of ``sizes`` rows.

        Prediction side: sum over xyz and the segment's points of the batch, divided by their number;
        GT side: the same over the GT points of the batch. Scenes without GT add nothing.
        """
        cfg = self.config
        seg, seg_size = self.segment_index(sizes, pred.device)
        scene = gt.mask.any(dim=1)  # (B,)
        idx3 = p2g.unsqueeze(-1).expand(-1, -1, 3)
        matched_gt = torch.gather(gt.points, 1, idx3)  # (B,P,3)
        with torch.no_grad():
            w_pred = self._point_weight((pred - matched_gt).norm(dim=-1), torch.gather(gt.labels, 1, p2g))
            w_pred = w_pred * scene[:, None]
        per_row = F.smooth_l1_loss(pred, matched_gt, beta=cfg.chamfer_beta, reduction="none").sum(-1) * w_pred
        pred_side = torch.zeros_like(seg_size).index_add(0, seg, per_row.sum(0))
        pred_side = pred_side / (seg_size * scene.sum()).clamp(min=1)
        s, b, m = g2p.shape
        matched_pred = torch.gather(pred.unsqueeze(0).expand(s, -1, -1, -1), 2,
                                    g2p.unsqueeze(-1).expand(-1, -1, -1, 3))  # (S,B,M,3)
        with torch.no_grad():
            w_gt = self._point_weight((gt.points - matched_pred).norm(dim=-1), gt.labels.expand(s, -1, -1))
            w_gt = w_gt * gt.mask
        per_gt = F.smooth_l1_loss(matched_pred, gt.points.expand(s, -1, -1, -1), beta=cfg.chamfer_beta,
                                  reduction="none").sum(-1) * w_gt
        gt_side = per_gt.flatten(1).sum(1) / gt.mask.sum().clamp(min=1)
        return pred_side + gt_side

    def loss_focal(self, logits: torch.Tensor, sizes: tuple[int, ...], gt: PaddedGroundTruth,
                   p2g: torch.Tensor) -> torch.Tensor:
        """Sigmoid focal loss per layer (L,): logits (B,P,C) of the layers' points, p2g (B,P) their nearest GT.

        Every logit column c is weighted by ``class_weights[c]`` times the distance weight of the
        assigned GT point (an N x C matrix); summed over classes and the layer's points of the batch,
        divided by their number.
        """
        cfg = self.config
        seg, seg_size = self.segment_index(sizes, logits.device)
        scene = gt.mask.any(dim=1)
        labels = torch.gather(gt.labels, 1, p2g)
        with torch.no_grad():
            assigned = torch.gather(gt.points, 1, p2g.unsqueeze(-1).expand(-1, -1, 3))
            row_weight = self.distance_weight(assigned) * scene[:, None]  # (B,P)
        focal = sigmoid_focal_loss(logits, labels, cfg.focal_gamma, cfg.focal_alpha)  # (B,P,C)
        per_row = (focal * self.class_weights).sum(-1) * row_weight
        total = torch.zeros_like(seg_size).index_add(0, seg, per_row.sum(0))
        return total / (seg_size * scene.sum()).clamp(min=1)

    def forward(self, outputs: dict, gts: PaddedGroundTruth | Sequence[GroundTruth]) -> dict[str, torch.Tensor]:
        """Unweighted terms ``chamfer_init``, ``chamfer_<l>``, ``focal_<l>``.

        outputs: the network dict (``init_points`` (B,N,3), ``layers`` with ``points`` (B,N,R,3) and
        ``logits`` (B,N,R,C)); gts: padded ground truth (or one GroundTruth per sample), centres in metres.
        """
        init = outputs["init_points"]
        device = init.device
        if not isinstance(gts, PaddedGroundTruth):
            gts = PaddedGroundTruth.from_list(list(gts), device)
        batch = init.shape[0]
        if gts.points.shape[0] != batch:
            raise ValueError(f"got {gts.points.shape[0]} ground-truth scenes for a batch of {batch}")
        layers = outputs["layers"]
        points = [init.float()] + [layer["points"].flatten(1, 2).float() for layer in layers]
        sizes = tuple(int(p.shape[1]) for p in points)
        pred = torch.cat(points, dim=1) * self.extent  # (B, P, 3) metres
        gt = PaddedGroundTruth(gts.points.to(device).float(), gts.labels.to(device).long(), gts.mask.to(device))
        if gt.points.shape[1] == 0:  # no occupied voxel in the batch: zero terms that keep the graph (DDP)
            zero = pred.sum() * 0.0 + sum(layer["logits"].sum() for layer in layers) * 0.0
            return {key: zero for key in self.weight_dict(len(layers))}
        p2g, g2p = self._search(pred, sizes, gt)
        chamfer = self.loss_chamfer(pred, sizes, gt, p2g, g2p)
        logits = torch.cat([layer["logits"].flatten(1, 2).float() for layer in layers], dim=1)
        focal = self.loss_focal(logits, sizes[1:], gt, p2g[:, sizes[0]:])
        terms = {"chamfer_init": chamfer[0]}
        for index in range(len(layers)):
            terms[f"chamfer_{index}"] = chamfer[index + 1]
            terms[f"focal_{index}"] = focal[index]
        return terms


def class_frequencies_from_targets(targets, num_classes: int = NUM_CLASSES) -> list[float]:
    """Voxel counts of classes 1..C over an iterable of label grids (numpy or torch)."""
    counts = np.zeros(num_classes + 1, dtype=np.float64)
    for grid in targets:
        arr = np.asarray(grid.cpu() if isinstance(grid, torch.Tensor) else grid).reshape(-1).astype(np.int64)
        arr = arr[(arr > 0) & (arr <= num_classes)]
        counts += np.bincount(arr, minlength=num_classes + 1)[: num_classes + 1]
    return counts[1:].tolist()
