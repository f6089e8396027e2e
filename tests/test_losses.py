"""Task loss: every term computed by hand with the reference's reductions and weights, and the batched
loss against a straightforward per-sample, per-layer computation."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from training import losses
from training.losses import (
    FUSED_SEARCH,
    MAX_CDIST_ELEMENTS,
    REFERENCE_RARE_CLASSES,
    GroundTruth,
    PaddedGroundTruth,
    TaskLoss,
    TaskLossConfig,
    cdist_budget,
    class_frequencies_from_targets,
    class_weights_from_frequencies,
    ground_truth_from_voxels,
    nearest_neighbours,
    nearest_neighbours_kdtree,
    nearest_neighbours_padded,
    rare_class_mask,
)

EXTENT = torch.tensor([4.8, 4.8, 2.88])


def outputs_from(points_norm, logits, init=None):
    """A network-like output dict with one layer; points (B,N,R,3), logits (B,N,R,C)."""
    init = points_norm[:, :, 0] if init is None else init
    return {"init_points": init, "layers": [{"points": points_norm, "logits": logits}]}


def smooth_l1(x, beta=0.04):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def test_class_weights_formula_and_floor():
    w = class_weights_from_frequencies([1e4, 1e6, 0.0])
    assert math.isclose(w[0].item(), (1 / math.log(1e4) - 0.05) * 400, rel_tol=1e-5)
    assert math.isclose(w[1].item(), (1 / math.log(1e6) - 0.05) * 400, rel_tol=1e-5)
    assert w[2] == w[0]  # unseen class gets the largest seen weight
    assert class_weights_from_frequencies([1e12])[0] == 1.0  # floored, never negative


def test_rare_classes_are_the_reference_list():
    assert list(REFERENCE_RARE_CLASSES) == [1, 4, 6, 9, 11]
    assert TaskLossConfig().rare_classes == [1, 4, 6, 9, 11]
    mask = rare_class_mask([1, 4, 6, 9, 11])
    assert [c + 1 for c in range(11) if mask[c]] == [1, 4, 6, 9, 11]
    with pytest.raises(ValueError, match="rare_classes"):
        rare_class_mask([0, 12])


def test_ground_truth_from_voxels_centers_labels_and_padding():
    grid = torch.zeros(3, 4, 4, 4, dtype=torch.uint8)
    grid[0, 1, 2, 3] = 5
    grid[0, 0, 0, 0] = 255
    grid[2, 0, 1, 0] = 2
    grid[2, 3, 3, 3] = 11
    gt = ground_truth_from_voxels(grid)
    assert gt.points.shape == (3, 2, 3) and gt.mask.tolist() == [[True, False], [False, False], [True, True]]
    assert gt.labels[0, 0].item() == 5 and gt.labels[2].tolist() == [2, 11]
    torch.testing.assert_close(gt.points[0, 0], torch.tensor([1.5, 2.5, 3.5]) * 0.08)
    torch.testing.assert_close(gt.points[2, 1], torch.tensor([3.5, 3.5, 3.5]) * 0.08)
    assert class_frequencies_from_targets(grid[:1])[4] == 1.0
    with pytest.raises(ValueError, match="labels"):
        ground_truth_from_voxels(torch.full((1, 2, 2, 2), 40))


def test_weight_table_holds_the_reference_loss_weights():
    assert TaskLoss().weight_dict(2) == {"chamfer_init": 0.5, "chamfer_0": 0.5, "focal_0": 2.0,
                                         "chamfer_1": 0.5, "focal_1": 2.0}


# Hand-computed case (metres): GT g0 wall, g1 window (rare), g2 floor; predictions p0 1 cm from g0,
# p1 10 cm from g1. Pred side: p0 -> g0 (1 cm, weight 1), p1 -> g1 (10 cm: x5, rare floor -> 10).
# GT side: g0 -> p0 (weight 1), g1 -> p1 (10), g2 -> p0 (2 m away: x5).
GT_POINTS = [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (1.0, 3.0, 1.0)]
GT_LABELS = [3, 4, 2]
PRED_POINTS = [(1.01, 1.0, 1.0), (2.0, 1.1, 1.0)]


def hand_case(logits=None):
    gt = GroundTruth(torch.tensor(GT_POINTS), torch.tensor(GT_LABELS))
    pts = (torch.tensor(PRED_POINTS) / EXTENT).view(1, 2, 1, 3)
    logits = torch.zeros(1, 2, 1, 11) if logits is None else logits
    return outputs_from(pts, logits), [gt]


def test_chamfer_by_hand():
    pred_side = (smooth_l1(0.01) * 1 + smooth_l1(0.1) * 10) / 2
    g2_err = smooth_l1(0.01) + smooth_l1(2.0)  # g2 - p0 = (-0.01, 2.0, 0)
    gt_side = (smooth_l1(0.01) * 1 + smooth_l1(0.1) * 10 + g2_err * 5) / 3
    expected = pred_side + gt_side  # no distance weight on the Chamfer terms
    for cfg in (TaskLossConfig(nn_backend="cdist"), TaskLossConfig(nn_backend="kdtree"), TaskLossConfig(nn_backend="fused"),
                TaskLossConfig(nn_backend="cdist", nn_chunk_elements=3)):  # chunks of one prediction row
        terms = TaskLoss(cfg)(*hand_case())
        assert terms["chamfer_0"].item() == pytest.approx(expected, rel=1e-5)
        assert terms["chamfer_init"].item() == pytest.approx(expected, rel=1e-5)  # same points as the init
    with pytest.raises(ValueError, match="nn_chunk_elements must be positive"):
        TaskLoss(TaskLossConfig(nn_chunk_elements=0))
    # without the rare list, the window's weight is only the x5 of the far threshold
    plain = TaskLoss(TaskLossConfig(rare_classes=[]))(*hand_case())["chamfer_0"].item()
    expected_plain = (smooth_l1(0.01) + smooth_l1(0.1) * 5) / 2 + (smooth_l1(0.01) + smooth_l1(0.1) * 5 + g2_err * 5) / 3
    assert plain == pytest.approx(expected_plain, rel=1e-5)


def test_occ_scannet_class_weights_are_the_reference_runs_weights():
    """``class_frequencies: occ_scannet`` gives the weights the reference's Occ-ScanNet configs give (their
    cls_freq, empty class dropped): worked out by hand to 4 decimals from (1/ln f - 0.05) * 400."""
    weights = TaskLoss(TaskLossConfig(class_frequencies="occ_scannet")).class_weights
    by_hand = [9.7187, 2.7162, 2.8794, 6.6138, 3.6683, 4.7177, 4.3272, 3.5759, 12.0448, 3.2147, 4.9227]
    assert weights.tolist() == pytest.approx(by_hand, abs=1e-4)
    with pytest.raises(ValueError, match="unknown name 'scannet'"):
        TaskLoss(TaskLossConfig(class_frequencies="scannet"))


def test_counted_class_frequencies_spread_over_the_split():
    """Counting the first frames would count the first scenes only (2000 frames: 29 of 681 Occ-ScanNet
    scenes); frames are picked evenly over the split instead, and scaled to the reference's frame count."""
    from training.data import REFERENCE_FRAMES, class_frequencies

    frames = []
    for label in range(1, 6):  # frame i holds one voxel of class i + 1
        target = torch.zeros(4, 4, 4, dtype=torch.uint8)
        target[0, 0, 0] = label
        frames.append({"target": target})
    counts = class_frequencies(frames, 3)  # frames 0, 2, 4
    assert counts[:5] == [REFERENCE_FRAMES / 3, 0.0, REFERENCE_FRAMES / 3, 0.0, REFERENCE_FRAMES / 3]


def test_focal_by_hand_with_class_weight_matrix_and_distance_weight():
    freq = [1e3 * (c + 2) ** 3 for c in range(11)]
    cls_w = [(1 / math.log(f) - 0.05) * 400 for f in freq]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 1, 11, generator=g)
    terms = TaskLoss(TaskLossConfig(class_frequencies=freq))(*hand_case(logits))
    diag = math.hypot(4.8, 4.8)
    total = 0.0
    for point, label in ((0, GT_LABELS[0]), (1, GT_LABELS[1])):  # p0 -> g0, p1 -> g1
        gx, gy, _ = GT_POINTS[point]
        dist_w = 1 + math.hypot(gx - 2.4, gy - 2.4) / diag
        for c in range(11):
            x = logits[0, point, 0, c].item()
            p = 1 / (1 + math.exp(-x))
            if c == label - 1:
                elem = 0.25 * (1 - p) ** 2 * -math.log(p)
            else:
                elem = 0.75 * p ** 2 * -math.log(1 - p)
            total += cls_w[c] * dist_w * elem  # every column weighted by its own class weight
    assert terms["focal_0"].item() == pytest.approx(total / 2, rel=1e-5)


def test_distance_weight_is_xy_over_the_full_diagonal():
    loss = TaskLoss()
    assert loss.distance_weight(torch.tensor([[2.4, 2.4, 0.0]])).item() == pytest.approx(1.0)
    assert loss.distance_weight(torch.tensor([[0.0, 0.0, 2.88]])).item() == pytest.approx(1.5)
    assert loss.distance_weight(torch.tensor([[4.8, 2.4, 2.0]])).item() == pytest.approx(1 + 2.4 / math.hypot(4.8, 4.8))


def reference_task_loss(outputs, gts, cfg, class_weights):
    """Straightforward per-layer, per-sample computation (full cdist, Python loops), batch reductions
    of the reference: sums over the batch divided by the batch's number of points."""
    extent = EXTENT
    rare = set(cfg.rare_classes)
    segments = [outputs["init_points"].unsqueeze(2)] + [layer["points"] for layer in outputs["layers"]]
    valid = [g for g in gts if g.points.shape[0] > 0]
    n_gt = sum(g.points.shape[0] for g in valid)
    out = {}
    for s, pts in enumerate(segments):
        pred_sum, gt_sum, focal_sum, n_pred = 0.0, 0.0, 0.0, 0
        for b, gt in enumerate(gts):
            if gt.points.shape[0] == 0:
                continue
            pred = pts[b].reshape(-1, 3) * extent
            d = torch.cdist(pred, gt.points)
            p2g, g2p = d.argmin(1), d.argmin(0)
            n_pred += pred.shape[0]
            for i in range(pred.shape[0]):
                diff = pred[i] - gt.points[p2g[i]]
                w = 5.0 if diff.norm() > 0.04 else 1.0
                if int(gt.labels[p2g[i]]) in rare:
                    w = max(w, 10.0)
                pred_sum = pred_sum + F.smooth_l1_loss(pred[i], gt.points[p2g[i]], beta=0.04, reduction="sum") * w
            for j in range(gt.points.shape[0]):
                diff = gt.points[j] - pred[g2p[j]]
                w = 5.0 if diff.norm() > 0.04 else 1.0
                if int(gt.labels[j]) in rare:
                    w = max(w, 10.0)
                gt_sum = gt_sum + F.smooth_l1_loss(pred[g2p[j]], gt.points[j], beta=0.04, reduction="sum") * w
            if s > 0:
                logits = outputs["layers"][s - 1]["logits"][b].reshape(-1, 11)
                labels = gt.labels[p2g]
                target = F.one_hot(labels - 1, 11).float()
                prob = logits.sigmoid()
                ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
                focal = (0.25 * target + 0.75 * (1 - target)) * (prob * (1 - target) + (1 - prob) * target) ** 2 * ce
                xy = gt.points[p2g][:, :2]
                dist_w = 1 + (xy - 2.4).norm(dim=-1) / math.hypot(4.8, 4.8)
                focal_sum = focal_sum + (focal * class_weights[None] * dist_w[:, None]).sum()
        name = "chamfer_init" if s == 0 else f"chamfer_{s - 1}"
        out[name] = pred_sum / max(n_pred, 1) + gt_sum / max(n_gt, 1)
        if s > 0:
            out[f"focal_{s - 1}"] = focal_sum / max(n_pred, 1)
    return out


def random_case(seed, counts=(37, 0, 90), queries=6, refines=(1, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    layers = [{"points": torch.rand(len(counts), queries, r, 3, generator=g),
               "logits": torch.randn(len(counts), queries, r, 11, generator=g)} for r in refines]
    outputs = {"init_points": torch.rand(len(counts), queries, 3, generator=g), "layers": layers}
    gts = []
    for m in counts:  # clustered GT so both near (< 4 cm) and far pairs occur
        base = torch.rand(m, 3, generator=g) * EXTENT
        gts.append(GroundTruth(base, torch.randint(1, 12, (m,), generator=g)))
    return outputs, gts


def test_batched_loss_equals_per_sample_computation_with_unequal_gt_counts():
    freq = [1e4 * (c + 1) for c in range(11)]
    cfg = TaskLossConfig(class_frequencies=freq)
    outputs, gts = random_case(3)
    # put some predictions within 4 cm of a GT point so both weights occur
    outputs["layers"][2]["points"][0, :, 0] = gts[0].points[:6] / EXTENT + 0.001
    expected = reference_task_loss(outputs, gts, cfg, class_weights_from_frequencies(freq))
    for backend in ("cdist", "kdtree", "fused"):
        terms = TaskLoss(TaskLossConfig(class_frequencies=freq, nn_backend=backend))(outputs, gts)
        assert set(terms) == set(expected)
        for key, value in expected.items():
            assert terms[key].item() == pytest.approx(float(value), rel=1e-4), (backend, key)


def test_empty_scene_adds_nothing_and_all_empty_is_zero_and_differentiable():
    outputs, gts = random_case(4, counts=(25, 0))
    pts = outputs["layers"][0]["points"].requires_grad_()
    both = TaskLoss()(outputs, gts)
    alone = TaskLoss()({"init_points": outputs["init_points"][:1],
                        "layers": [{k: v[:1] for k, v in layer.items()} for layer in outputs["layers"]]}, gts[:1])
    for key in both:
        assert both[key].item() == pytest.approx(alone[key].item(), rel=1e-5)
    sum(both.values()).backward()
    assert torch.isfinite(pts.grad).all() and pts.grad[0].abs().sum() > 0 and pts.grad[1].abs().sum() == 0
    empty = [GroundTruth(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))] * 2
    zero = TaskLoss()(outputs, empty)
    assert set(zero) == set(TaskLoss().weight_dict(3)) and all(v.item() == 0.0 for v in zero.values())


def test_padded_nearest_neighbours_match_brute_force_in_chunks():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 30, 3, generator=g)
    gt = torch.rand(2, 17, 3, generator=g)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 11:] = False  # second scene has 11 points
    sizes = [10, 20]
    for p2g, g2p in (nearest_neighbours_padded(pred, sizes, gt, mask, max_elements=50),
                     nearest_neighbours_kdtree(pred, sizes, gt, mask), FUSED_SEARCH(pred, sizes, gt, mask)):
        for b, m in ((0, 17), (1, 11)):
            d = torch.cdist(pred[b], gt[b, :m])
            assert torch.equal(p2g[b], d.argmin(1))
            assert torch.equal(g2p[0, b, :m], d[:10].argmin(0))
            assert torch.equal(g2p[1, b, :m], d[10:].argmin(0) + 10)
    default = nearest_neighbours_padded(pred, sizes, gt, mask)  # the device's budget: one chunk here
    assert cdist_budget(pred.device) == MAX_CDIST_ELEMENTS
    assert all(torch.equal(a, b) for a, b in zip(default, nearest_neighbours_padded(pred, sizes, gt, mask, 50),
                                                 strict=True))
    d, i, rd, ri = nearest_neighbours(pred[0], gt[0], max_elements=40)
    full = torch.cdist(pred[0], gt[0])
    torch.testing.assert_close(d, full.min(1).values)
    assert torch.equal(i, full.argmin(1)) and torch.equal(ri, full.argmin(0))
    torch.testing.assert_close(rd, full.min(0).values)


def test_gpu_search_chunks_take_an_eighth_of_the_free_memory_up_to_4_gib(monkeypatch):
    """float32 distances: free // 32 of them fill an eighth of the free memory; at least 16 Mi, at most 1 Gi
    (an H200's ~139 GiB free gives the cap: lite at batch 32 then searches in 16 chunks, not 55)."""
    gib = 1024**3
    for free, expected in ((139 * gib, 1024 * 1024**2), (8 * gib, 256 * 1024**2), (100 * 1024**2, MAX_CDIST_ELEMENTS)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 141 * gib))
        assert cdist_budget(torch.device("cuda")) == expected


def test_padded_nearest_neighbours_stay_float32_under_autocast_and_handle_empty_scenes():
    """The squared-distance GEMM must not run in bf16 inside the trainer's autocast; a scene without GT maps to 0."""
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 200, 3, generator=g) * 4.0 + 1.0  # dense enough that bf16 distances pick other points
    gt = torch.rand(3, 300, 3, generator=g) * 4.0 + 1.0
    mask = torch.ones(3, 300, dtype=torch.bool)
    mask[1] = False  # no ground truth in the second scene
    mask[2, 90:] = False
    plain = nearest_neighbours_padded(pred, [200], gt, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = nearest_neighbours_padded(pred, [200], gt, mask)
        fused = FUSED_SEARCH(pred, [200], gt, mask)
    assert all(torch.equal(a, b) for a, b in zip(plain, cast, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain, fused, strict=True))
    p2g, g2p = plain
    for b, m in ((0, 300), (2, 90)):
        d = torch.cdist(pred[b].double(), gt[b, :m].double())
        assert torch.equal(p2g[b], d.argmin(1)) and torch.equal(g2p[0, b, :m], d.argmin(0))
    assert not p2g[1].any() and not g2p[0, 1].any() and not g2p[0, 2, 90:].any()


def _peak_rss_growth(fn, *args):
    """(bytes by which the process's peak resident memory rose above its current size during ``fn(*args)``,
    its result). Linux: writing 5 to clear_refs resets the peak, VmHWM."""
    def status(key: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) * 1024

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("the peak resident size cannot be reset here")
    before = status("VmRSS:")
    result = fn(*args)
    return status("VmHWM:") - before, result


def test_fused_search_stores_no_distance_volume_and_matches_float64_at_training_scale():
    """Lite's search at batch 2: 3,000 predictions against up to 20,000 GT centres, where a stored (B,P,M)
    float32 volume would take 480 MB (the GEMM search's chunks: 64 MiB). The fused reductions store only
    their results, and pick float64's nearest points both ways (a new GT size reuses the compiled code)."""
    g = torch.Generator().manual_seed(2)
    sizes = [600, 1200, 1200]
    pred = torch.rand(2, 3000, 3, generator=g) * torch.tensor([6.0, 6.0, 3.6])
    for m in (20000, 17321):
        gt = torch.rand(2, m, 3, generator=g) * torch.tensor([6.0, 6.0, 3.6])
        mask = torch.ones(2, m, dtype=torch.bool)
        mask[1, m // 2:] = False
        FUSED_SEARCH(pred, sizes, gt, mask)  # compiled (or reused) before the measurement
        growth, (p2g, g2p) = _peak_rss_growth(FUSED_SEARCH, pred, sizes, gt, mask)
        assert FUSED_SEARCH.usable and growth < 40e6, growth
        if m == 20000:  # the measurement itself can tell: the GEMM search's chunks show
            assert _peak_rss_growth(nearest_neighbours_padded, pred, sizes, gt, mask)[0] > 60e6
        for b, n in ((0, m), (1, m // 2)):
            d = torch.cdist(pred[b].double(), gt[b, :n].double())
            assert (p2g[b] == d.argmin(1)).float().mean() > 0.999
            for seg, lo in enumerate((0, 600, 1800)):
                near = d[lo:lo + sizes[seg]].argmin(0) + lo
                assert (g2p[seg, b, :n] == near).float().mean() > 0.999
        assert not g2p[:, 1, m // 2:].any()


def test_fused_search_recompiled_too_often_hands_over_to_the_gemm_search(caplog):
    """Past dynamo's recompile limit an eager run would store the whole distance volume; the search gives up
    there instead, logs, and the GEMM search takes over (here: a batch of one after a batch of two is a
    recompile, under a limit of one)."""
    import torch._dynamo

    g = torch.Generator().manual_seed(4)
    pred, gt = torch.rand(2, 40, 3, generator=g), torch.rand(2, 30, 3, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    search = losses.FusedSearch()
    # torch 2.6 renamed cache_size_limit to recompile_limit (the JetPack 6.0 torch, 2.3, has the old name)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(**{limit: 1}):
            assert search(pred, [10, 30], gt, mask) is not None
            assert search(pred[:1], [10, 30], gt[:1], mask[:1]) is None
    finally:
        torch._dynamo.reset()
    assert not search.usable and "nn_backend fused is off from now on" in caplog.text


class OpLog(TorchDispatchMode):
    """Records the name of every ATen op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fused_search_falls_back_to_the_gemm_search_when_compiling_fails(monkeypatch, caplog):
    from torch._dynamo.exc import Unsupported

    search = losses.FusedSearch()
    monkeypatch.setattr(losses, "FUSED_SEARCH", search)
    monkeypatch.setattr(search, "_functions", lambda: (_ for _ in ()).throw(Unsupported("no backend here")))
    outputs, gts = random_case(3)
    fused = TaskLoss(TaskLossConfig(nn_backend="fused"))(outputs, gts)
    gemm = TaskLoss(TaskLossConfig(nn_backend="cdist"))(outputs, gts)
    assert {k: v.item() for k, v in fused.items()} == {k: v.item() for k, v in gemm.items()}
    assert not search.usable and "nn_backend fused is off from now on" in caplog.text and "no backend here" in caplog.text
    monkeypatch.setattr(search, "usable", True)
    monkeypatch.setattr(search, "_functions", lambda: (_ for _ in ()).throw(ValueError("a bug, not a compiler")))
    with pytest.raises(ValueError, match="a bug"):
        TaskLoss(TaskLossConfig(nn_backend="fused"))(outputs, gts)
    monkeypatch.setattr(search, "_functions", lambda: pytest.fail("no compiling under a dispatch mode"))
    with OpLog() as ops:  # an op counter: dynamo compiles nothing under it, so the GEMM search runs, once
        counted = TaskLoss(TaskLossConfig(nn_backend="fused"))(outputs, gts)
    assert {k: v.item() for k, v in counted.items()} == {k: v.item() for k, v in gemm.items()}
    assert ops.names.count("aten.bmm.default") > 0 and search.usable
    with pytest.raises(ValueError, match="nn_backend must be one of auto, cdist, kdtree, fused"):
        TaskLoss(TaskLossConfig(nn_backend="faiss"))


def test_task_loss_reads_nothing_back_to_the_host_with_the_gpu_search():
    """Each host read is a device sync on a GPU: given padded ground truth, the loss's forward and backward
    with the GEMM search read no value back (F.one_hot read the labels' min and max: two a step)."""
    outputs, gts = random_case(3)
    for layer in outputs["layers"]:
        layer["points"].requires_grad_()
        layer["logits"].requires_grad_()
    padded = PaddedGroundTruth.from_list(gts)
    loss = TaskLoss(TaskLossConfig(nn_backend="cdist"))
    with OpLog() as ops:
        sum(loss(outputs, padded).values()).backward()
    reads = [name for name in ops.names if "_local_scalar_dense" in name or "nonzero" in name]
    assert reads == [] and len(ops.names) > 100


def test_padded_ground_truth_from_list_round_trip():
    gts = [GroundTruth(torch.rand(3, 3), torch.tensor([1, 2, 3])), GroundTruth(torch.zeros(0, 3), torch.zeros(0).long())]
    padded = PaddedGroundTruth.from_list(gts)
    assert padded.points.shape == (2, 3, 3) and padded.mask.sum().item() == 3
    torch.testing.assert_close(padded.points[0], gts[0].points)


def test_exact_fit_gives_zero_chamfer_and_small_focal():
    gt_m = torch.tensor([[1.0, 1.0, 1.0], [2.0, 3.0, 1.5], [4.0, 0.5, 2.0]])
    labels = torch.tensor([1, 3, 11])
    pts = (gt_m / EXTENT).view(1, 3, 1, 3)
    logits = torch.full((1, 3, 1, 11), -20.0)
    logits[0, torch.arange(3), 0, labels - 1] = 20.0
    terms = TaskLoss()(outputs_from(pts, logits), [GroundTruth(gt_m, labels)])
    assert terms["chamfer_0"].item() < 1e-6 and terms["chamfer_init"].item() < 1e-6
    assert terms["focal_0"].item() < 1e-6
    wrong = logits.roll(1, dims=-1)
    assert TaskLoss()(outputs_from(pts, wrong), [GroundTruth(gt_m, labels)])["focal_0"] > 1.0


def test_gradient_descent_on_points_reduces_task_loss():
    g = torch.Generator().manual_seed(1)
    gt = GroundTruth(torch.rand(40, 3, generator=g) * EXTENT, torch.randint(1, 12, (40,), generator=g))
    pts = torch.rand(1, 20, 2, 3, generator=g).requires_grad_()
    logits = torch.zeros(1, 20, 2, 11, requires_grad=True)
    loss_fn = TaskLoss()
    weights = loss_fn.weight_dict(1)
    opt = torch.optim.Adam([pts, logits], lr=0.02)
    first = None
    for _ in range(60):
        terms = loss_fn(outputs_from(pts, logits), [gt])
        loss = sum(terms[k] * weights[k] for k in terms)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_task_loss_ground_truth_uses_its_own_voxel_size_and_classes():
    # The trainer builds ground truth through its TaskLoss, so a config with other voxels or classes
    # gets targets in its own metres (not the default 0.08 m) and its own label range.
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, 1, 0, 2] = 5
    loss = TaskLoss(TaskLossConfig(rare_classes=[]), num_classes=5, grid_shape=[4, 4, 4], voxel_size=0.16)
    gt = loss.ground_truth(target)
    torch.testing.assert_close(gt.points[0, 0], torch.tensor([1.5, 0.5, 2.5]) * 0.16)
    assert gt.labels[0, 0].item() == 5 and gt.mask.tolist() == [[True]]
    target[0, 0, 0, 0] = 6
    with pytest.raises(ValueError, match="expected 0..5"):
        loss.ground_truth(target)
