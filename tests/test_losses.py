"""Task loss on constructed cases: exact fits, empty scenes, chunked nearest neighbours, weights."""
import math

import torch

from training.losses import (
    GroundTruth,
    TaskLoss,
    TaskLossConfig,
    class_frequencies_from_targets,
    class_weights_from_frequencies,
    distance_weight,
    ground_truth_from_voxels,
    nearest_neighbours,
    nearest_neighbours_kdtree,
)

EXTENT = torch.tensor([4.8, 4.8, 2.88])


def outputs_from(points_norm, logits, init=None):
    """A network-like output dict with one layer; points (B,N,R,3), logits (B,N,R,C)."""
    init = points_norm[:, :, 0] if init is None else init
    return {"init_points": init, "layers": [{"points": points_norm, "logits": logits}]}


def test_class_weights_formula_and_floor():
    w = class_weights_from_frequencies([1e4, 1e6, 0.0])
    assert math.isclose(w[0].item(), (1 / math.log(1e4) - 0.05) * 400, rel_tol=1e-5)
    assert math.isclose(w[1].item(), (1 / math.log(1e6) - 0.05) * 400, rel_tol=1e-5)
    assert w[2] == w[0]  # unseen class gets the largest seen weight
    assert class_weights_from_frequencies([1e12])[0] == 1.0  # floored, never negative


def test_ground_truth_from_voxels_centres_and_labels():
    grid = torch.zeros(1, 4, 4, 4, dtype=torch.uint8)
    grid[0, 1, 2, 3] = 5
    grid[0, 0, 0, 0] = 255
    gt = ground_truth_from_voxels(grid)[0]
    assert gt.labels.tolist() == [5]
    torch.testing.assert_close(gt.points, torch.tensor([[1.5, 2.5, 3.5]]) * 0.08)
    assert class_frequencies_from_targets(grid)[4] == 1.0


def test_chunked_nearest_neighbour_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    src, dst = torch.rand(301, 3, generator=g), torch.rand(97, 3, generator=g)
    d, i, rd, ri = nearest_neighbours(src, dst, max_elements=500)  # forces many chunks
    full = torch.cdist(src, dst)
    bd, bi = full.min(1)
    torch.testing.assert_close(d, bd)
    assert torch.equal(i, bi)
    rbd, rbi = full.min(0)
    torch.testing.assert_close(rd, rbd)
    assert torch.equal(ri, rbi)
    kd, ki, krd, kri = nearest_neighbours_kdtree(src, dst)
    torch.testing.assert_close(kd, bd)
    torch.testing.assert_close(krd, rbd)
    assert torch.equal(ki, bi) and torch.equal(kri, rbi)


def test_cdist_and_kdtree_backends_give_the_same_loss():
    g = torch.Generator().manual_seed(2)
    gt = [GroundTruth(torch.rand(300, 3, generator=g) * 3, torch.randint(1, 12, (300,), generator=g))]
    out = outputs_from(torch.rand(1, 40, 4, 3, generator=g), torch.randn(1, 40, 4, 11, generator=g))
    a = TaskLoss(TaskLossConfig(nn_backend="cdist"))(out, gt)
    b = TaskLoss(TaskLossConfig(nn_backend="kdtree"))(out, gt)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


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


def test_empty_scene_and_uneven_batch_are_finite_and_differentiable():
    pts = torch.rand(2, 5, 2, 3, requires_grad=True)
    logits = torch.randn(2, 5, 2, 11, requires_grad=True)
    gts = [GroundTruth(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
           GroundTruth(torch.rand(17, 3) * 2, torch.randint(1, 12, (17,)))]
    terms = TaskLoss()(outputs_from(pts, logits), gts)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["task"].backward()
    assert torch.isfinite(pts.grad).all() and pts.grad.abs().sum() > 0
    all_empty = [GroundTruth(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))] * 2
    assert TaskLoss()(outputs_from(pts, logits), all_empty)["task"].item() == 0.0


def test_far_ground_truth_is_reweighted_x5_and_rare_floor():
    # One prediction on GT voxel a; GT voxel b lies 1 m away: the GT side of b is weighted x5.
    a, b = torch.tensor([[2.4, 2.4, 1.44]]), torch.tensor([[3.4, 2.4, 1.44]])
    pts = (a / EXTENT).view(1, 1, 1, 3)
    logits = torch.zeros(1, 1, 1, 11)
    cfg = TaskLossConfig(chamfer_weight=1.0, max_distance_weight=1.0)
    gt = [GroundTruth(torch.cat([a, b]), torch.tensor([2, 2]))]
    chamfer = TaskLoss(cfg)(outputs_from(pts, logits), gt)["chamfer_0"].item()
    sl1 = 1.0 - 0.5 * 0.04  # SmoothL1 of a 1 m error on one axis
    assert math.isclose(chamfer, sl1 * 5 / 2, rel_tol=1e-4)  # pred side 0, GT side (0 + 5*sl1)/2
    freq = [1e6] * 11
    freq[1] = 10.0  # class 2 is rare: weight floor 10
    rare = TaskLoss(TaskLossConfig(chamfer_weight=1.0, max_distance_weight=1.0, class_frequencies=freq))
    assert math.isclose(rare(outputs_from(pts, logits), gt)["chamfer_0"].item(), sl1 * 10 / 2, rel_tol=1e-4)


def test_distance_weight_range():
    centre = EXTENT / 2
    assert distance_weight(centre[None]).item() == 1.0
    assert math.isclose(distance_weight(torch.zeros(1, 3)).item(), 1.5, rel_tol=1e-6)


def test_gradient_descent_on_points_reduces_task_loss():
    g = torch.Generator().manual_seed(1)
    gt = GroundTruth(torch.rand(40, 3, generator=g) * EXTENT, torch.randint(1, 12, (40,), generator=g))
    pts = torch.rand(1, 20, 2, 3, generator=g).requires_grad_()
    logits = torch.zeros(1, 20, 2, 11, requires_grad=True)
    loss_fn = TaskLoss()
    opt = torch.optim.Adam([pts, logits], lr=0.02)
    first = None
    for _ in range(60):
        loss = loss_fn(outputs_from(pts, logits), [gt])["task"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
