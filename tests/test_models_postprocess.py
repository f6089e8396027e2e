"""Post-processing on constructed point sets: threshold, centre distance, voxel mean score, closing."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from models import native_postprocess
from models.postprocess import labels_batch, occupied_voxels, points_to_occupancy

SHAPE = np.array([60, 60, 36])
ORIGIN = np.array([1.0, -2.0, 0.5])


@pytest.fixture(autouse=True, params=["native", "torch"])
def cpu_path(request, monkeypatch):
    """Every rule below must hold for both CPU implementations: the native kernel and the torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(native_postprocess, "_kernel", None)
    else:
        request.getfixturevalue("native_kernel")
    return request.param


@pytest.fixture()
def open_config(lite_config):
    """The lite post-processing without closing (each test below isolates one other rule)."""
    return dataclasses.replace(lite_config, closing=False)


def _center(i, j, k):
    """Normalised coordinates of the centre of voxel (i, j, k)."""
    return (np.array([i, j, k]) + 0.5) / SHAPE


def _empty(q, r, c=11):
    return np.zeros((q, r, 3), np.float32), np.zeros((q, r, c), np.float32)


def test_voxel_score_is_the_mean_of_its_points_score_vectors(open_config):
    points, scores = _empty(2, 2)
    points[:] = _center(10, 20, 5)
    scores[0, 0, [2, 4]] = [0.9, 0.2]
    scores[0, 1, [2, 4]] = [0.55, 0.8]
    scores[1, 0, [2, 4]] = [0.6, 0.1]
    scores[1, 1, [2, 4]] = [0.3, 0.9]
    frame = points_to_occupancy(points, scores, ORIGIN, open_config)
    # class 2 mean (0.9+0.55+0.6+0.3)/4 = 0.5875 beats class 4 mean 0.5 -> label 3
    np.testing.assert_array_equal(frame.voxel_indices, [[10, 20, 5]])
    np.testing.assert_array_equal(frame.voxel_labels, [3])
    np.testing.assert_allclose(frame.voxel_scores, [0.5875], rtol=1e-6)
    assert frame.labels.shape == (60, 60, 36) and frame.labels.dtype == np.uint8
    assert frame.labels[10, 20, 5] == 3 and np.count_nonzero(frame.labels) == 1
    assert frame.voxel_indices.dtype == np.int32 and frame.voxel_scores.dtype == np.float32
    np.testing.assert_allclose(frame.centers_world(), [ORIGIN + (np.array([10, 20, 5]) + 0.5) * 0.08])
    np.testing.assert_array_equal(frame.voxel_origin, ORIGIN)


def test_score_threshold_drops_points_at_or_below_it(open_config):
    points, scores = _empty(1, 3)
    points[0] = [_center(1, 1, 1), _center(2, 2, 2), _center(3, 3, 3)]
    scores[0, :, 0] = [0.5, 0.51, 0.2]
    scores[0, 2, 7] = 0.49
    frame = points_to_occupancy(points, scores, ORIGIN, open_config)
    np.testing.assert_array_equal(frame.voxel_indices, [[2, 2, 2]])
    low = dataclasses.replace(open_config, score_threshold=0.3)
    np.testing.assert_array_equal(points_to_occupancy(points, scores, ORIGIN, low).voxel_indices,
                                  [[1, 1, 1], [2, 2, 2], [3, 3, 3]])
    np.testing.assert_array_equal(points_to_occupancy(points, scores, ORIGIN, low).voxel_labels, [1, 1, 8])


def test_points_far_from_their_query_center_are_dropped(open_config):
    # one query, 4 points: three at x = 0.1 m, one at x = 1.3 m (metric grid coordinates, y, z fixed)
    # centre x = 0.4 m: distances 0.3, 0.3, 0.3 and 0.9 m -> only the last exceeds 0.6 m
    points, scores = _empty(1, 4)
    xs = np.array([0.1, 0.1, 0.1, 1.3])
    points[0, :, 0] = xs / 4.8
    points[0, :, 1] = 1.0 / 4.8
    points[0, :, 2] = 1.0 / 2.88
    scores[0, :, 5] = 0.9
    frame = points_to_occupancy(points, scores, ORIGIN, open_config)
    np.testing.assert_array_equal(frame.voxel_indices, [[1, 12, 12]])
    wide = dataclasses.replace(open_config, max_center_dist=1.0)
    np.testing.assert_array_equal(points_to_occupancy(points, scores, ORIGIN, wide).voxel_indices,
                                  [[1, 12, 12], [16, 12, 12]])
    # distance is metric: the same normalised spread (0.25) along z (2.88 m extent) is 0.72 m, so the
    # far point is 0.54 m from the centre and kept
    along_z = np.full_like(points, 0.5)
    along_z[0, :, 2] = xs / 4.8
    assert len(points_to_occupancy(along_z, scores, ORIGIN, open_config).voxel_labels) == 2


def test_points_outside_the_grid_are_ignored_and_inputs_accept_torch_and_batch_of_one(open_config):
    points, scores = _empty(3, 1)
    points[:, 0] = [_center(0, 0, 0), [1.0001, 0.5, 0.5], [0.5, -0.001, 0.5]]
    scores[:, 0, 9] = 0.8
    frame = points_to_occupancy(torch.from_numpy(points)[None], torch.from_numpy(scores)[None], ORIGIN, open_config)
    np.testing.assert_array_equal(frame.voxel_indices, [[0, 0, 0]])
    np.testing.assert_array_equal(frame.voxel_labels, [10])


def test_closing_fills_a_one_voxel_hole(lite_config):
    ring = [(i, j, 10) for i in (4, 5, 6) for j in (4, 5, 6) if (i, j) != (5, 5)]
    ring += [(5, 5, 9), (5, 5, 11)]
    points, scores = _empty(len(ring), 1)
    points[:, 0] = [_center(*v) for v in ring]
    scores[:, 0, 2] = 0.9
    scores[:4, 0, 2] = 0.7
    plain = points_to_occupancy(points, scores, ORIGIN, dataclasses.replace(lite_config, closing=False))
    assert plain.labels[5, 5, 10] == 0
    assert lite_config.closing  # on by default, as in the reference
    closed = points_to_occupancy(points, scores, ORIGIN, lite_config)
    assert closed.labels[5, 5, 10] == 3
    assert np.all(closed.labels[plain.labels > 0] == plain.labels[plain.labels > 0])  # nothing removed
    assert len(closed.voxel_labels) == len(plain.voxel_labels) + 1
    np.testing.assert_allclose(closed.voxel_scores[closed.voxel_indices.tolist().index([5, 5, 10])], 0.9)


def test_batch_variant_matches_single_frames(lite_config):
    rng = np.random.default_rng(0)
    points = rng.uniform(0.2, 0.8, (2, 30, 4, 3)).astype(np.float32)
    points[:, :, 1:] = points[:, :, :1] + rng.normal(0, 0.01, (2, 30, 3, 3)).astype(np.float32)
    scores = rng.uniform(0, 1, (2, 30, 4, 11)).astype(np.float32)
    labels = labels_batch(torch.from_numpy(points), torch.from_numpy(scores), lite_config)
    assert labels.shape == (2, 60, 60, 36)
    for b in range(2):
        frame = points_to_occupancy(points[b], scores[b], ORIGIN, lite_config)
        assert frame.labels.any()
        np.testing.assert_array_equal(labels[b].numpy(), frame.labels)


def test_bad_inputs_are_rejected(lite_config):
    points, scores = _empty(2, 3)
    with pytest.raises(ValueError, match="points must be"):
        points_to_occupancy(points[..., :2], scores, ORIGIN, lite_config)
    with pytest.raises(ValueError, match="scores must be"):
        points_to_occupancy(points, scores[..., :5], ORIGIN, lite_config)
    with pytest.raises(ValueError, match="disagree"):
        points_to_occupancy(points, scores[:1], ORIGIN, lite_config)
    with pytest.raises(ValueError, match="voxel_origin"):
        points_to_occupancy(points, scores, [0.0, 0.0], lite_config)
    with pytest.raises(ValueError, match="one frame"):
        points_to_occupancy(np.stack([points, points]), np.stack([scores, scores]), ORIGIN, lite_config)


def _dense_case(cells, num_classes=11):
    """Points at voxel centres, one point per query, with the given score vectors."""
    points, scores = _empty(len(cells), 1, num_classes)
    for q, (voxel, score) in enumerate(cells):
        points[q, 0] = _center(*voxel)
        for cls, value in score.items():
            scores[q, 0, cls] = value
    return points, scores


def test_closing_labels_a_filled_voxel_from_the_eroded_score_volume(lite_config):
    # A 3x3 plate at z = 10 around the hole (5, 5, 10), plus the voxels above and below it. Class 2
    # scores 0.9 everywhere except the voxel (4, 4, 10) at 0.6; class 7 scores 0.8 at (6, 6, 10)
    # only. Erosion at the hole = min over its 3x3x3 neighbourhood of the dilation (max over 3x3x3):
    # class 2: every neighbour of the hole sees a 0.9 voxel within one step -> 0.9;
    # class 7: neighbours two steps from (6, 6, 10), e.g. (4, 4, 9), see no class-7 voxel -> 0.
    plate = [(i, j, 10) for i in (4, 5, 6) for j in (4, 5, 6) if (i, j) != (5, 5)] + [(5, 5, 9), (5, 5, 11)]
    cells = []
    for v in plate:
        score = {2: 0.6 if v == (4, 4, 10) else 0.9}
        if v == (6, 6, 10):
            score[7] = 0.8
        cells.append((v, score))
    frame = points_to_occupancy(*_dense_case(cells), ORIGIN, lite_config)
    hole = frame.voxel_indices.tolist().index([5, 5, 10])
    assert frame.voxel_labels[hole] == 3
    np.testing.assert_allclose(frame.voxel_scores[hole], 0.9, rtol=1e-6)
    # original voxels above the threshold keep their own scores (the 0.6 voxel is not raised to 0.9)
    low = frame.voxel_indices.tolist().index([4, 4, 10])
    np.testing.assert_allclose(frame.voxel_scores[low], 0.6, rtol=1e-6)


@pytest.mark.parametrize("closing", [True, False])
def test_ties_go_to_the_lowest_class_in_kept_and_filled_voxels(lite_config, closing):
    # torch's max returns the first index of equal maxima: classes 2 and 5 score alike in every voxel of
    # a ring around the hole (5, 5, 10) (plus the voxels above and below it), so each kept voxel and the
    # filled hole get class 2 (label 3), never class 5
    ring = [(i, j, 10) for i in (4, 5, 6) for j in (4, 5, 6) if (i, j) != (5, 5)] + [(5, 5, 9), (5, 5, 11)]
    cells = [(v, {2: 0.8, 5: 0.8}) for v in ring]
    frame = points_to_occupancy(*_dense_case(cells), ORIGIN, dataclasses.replace(lite_config, closing=closing))
    assert len(frame.voxel_labels) == len(ring) + closing
    assert set(frame.voxel_labels.tolist()) == {3}
    assert (frame.labels[5, 5, 10] == 3) == closing


def test_closing_erosion_uses_the_smallest_neighbourhood_maximum(lite_config):
    # Two voxels of class 0 at (10, 10, 10) (score 0.9) and (12, 10, 10) (score 0.7): the gap
    # (11, 10, 10) is filled. Dilation at (11, 10, 10) and its neighbours x = 10..12 reaches both
    # voxels; the neighbours at x = 10 see only the 0.9 voxel (its dilation 0.9), at x = 12 only the
    # 0.7 one (0.7), at x = 11 both (0.9). Erosion = min over the neighbourhood = 0.7.
    cells = [((10, 10, 10), {0: 0.9}), ((12, 10, 10), {0: 0.7})]
    frame = points_to_occupancy(*_dense_case(cells), ORIGIN, lite_config)
    got = {tuple(v): (int(lab), float(s)) for v, lab, s in
           zip(frame.voxel_indices.tolist(), frame.voxel_labels, frame.voxel_scores, strict=True)}
    # a line of two voxels with a gap: only the gap is closed (off-axis voxels see an empty neighbour)
    assert set(got) == {(10, 10, 10), (11, 10, 10), (12, 10, 10)}
    assert got[(11, 10, 10)][0] == 1
    np.testing.assert_allclose(got[(11, 10, 10)][1], 0.7, rtol=1e-6)


def test_closing_does_not_erode_at_the_grid_border(lite_config):
    # Voxels on the x = 0 face are "closed" against the outside: min-pool ignores the padding, so a
    # gap at the border corner (0, 0, 1) between (0, 0, 0) and (0, 0, 2) is filled too.
    cells = [((0, 0, 0), {4: 0.95}), ((0, 0, 2), {4: 0.95})]
    frame = points_to_occupancy(*_dense_case(cells), ORIGIN, lite_config)
    assert frame.labels[0, 0, 1] == 5
    assert frame.labels[1, 1, 1] == 0  # interior neighbour: sees empty voxels two steps away


def test_closing_drops_a_voxel_whose_mean_score_is_below_the_threshold(lite_config):
    # One voxel with two points of different classes: each class mean is (2 thr - 0.1 + 0.1) / 2 = thr,
    # not above it (threshold 0.5: scores (0.9, 0.1) and (0.1, 0.9) -> means 0.5, 0.5) -> empty after
    # closing, as in the reference; without closing every voxel with a kept point stays.
    thr = lite_config.score_threshold
    points, scores = _empty(2, 1)
    points[:, 0] = _center(20, 20, 20)
    scores[0, 0, 1] = scores[1, 0, 3] = 2 * thr - 0.1
    scores[0, 0, 3] = scores[1, 0, 1] = 0.1  # each point passes the threshold with one class only
    assert scores.max(-1).min() > thr
    assert points_to_occupancy(points, scores, ORIGIN, lite_config).voxel_labels.size == 0
    plain = points_to_occupancy(points, scores, ORIGIN, dataclasses.replace(lite_config, closing=False))
    assert plain.voxel_labels.size == 1


def test_closing_filters_equal_max_pool3d():
    import torch.nn.functional as F

    from models.postprocess import _filter3

    rng = torch.Generator().manual_seed(0)
    v = torch.rand(2, 7, 5, 4, 3, generator=rng)
    v[v < 0.6] = 0
    dilated = _filter3(v, torch.maximum)
    ref = F.max_pool3d(v.permute(0, 4, 1, 2, 3), 3, stride=1, padding=1).permute(0, 2, 3, 4, 1)
    assert torch.equal(dilated, ref)
    ref_eroded = -F.max_pool3d(-ref.permute(0, 4, 1, 2, 3), 3, stride=1, padding=1).permute(0, 2, 3, 4, 1)
    assert torch.equal(_filter3(dilated, torch.minimum), ref_eroded)


def _reference_closing(ids, mean, batch, grid_shape, thr):
    """The reference's dense closing, as its head writes it (max_pool3d on the (C, X, Y, Z) volume)."""
    import torch.nn.functional as F

    nx, ny, nz = grid_shape
    c = mean.shape[-1]
    occ = torch.zeros(batch * nx * ny * nz, c)
    occ[ids] = mean
    occ = occ.view(batch, nx, ny, nz, c).permute(0, 4, 1, 2, 3)
    eroded = -F.max_pool3d(-F.max_pool3d(occ, 3, stride=1, padding=1), 3, stride=1, padding=1)
    original = (occ > thr).any(dim=1, keepdim=True).expand_as(eroded)
    eroded[original] = occ[original]
    flat = eroded.permute(0, 2, 3, 4, 1).reshape(-1, c)
    keep = (flat > thr).any(dim=-1).nonzero()[:, 0]
    return keep, flat[keep]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cropped_class_pruned_closing_equals_the_dense_reference(seed):
    from models.postprocess import close_holes

    g = torch.Generator().manual_seed(seed)
    shape, thr, batch = (9, 8, 7), 0.5, 2
    n = 9 * 8 * 7 * batch
    ids = torch.randperm(n, generator=g)[: n // 4].sort().values
    if seed == 2:  # a small cluster away from the border: exercises the crop
        ids = torch.tensor([(1 * 9 * 8 * 7) + ((4 * 8 + 4) * 7 + 3) + d for d in (0, 2, 14, 16)])
    mean = torch.rand(len(ids), 5, generator=g) * 0.9
    mean[:, 3] = 0.1  # a class never above the threshold: left out of the filters
    got_ids, got = close_holes(ids, mean, batch, list(shape), thr)
    ref_ids, ref = _reference_closing(ids, mean, batch, shape, thr)
    assert torch.equal(got_ids, ref_ids)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(got.max(-1).values, ref.max(-1).values)


def _closing_case(g: torch.Generator, kind: str):
    """A random (ids, mean, batch, shape) for the closing: random density, or empty / full / one voxel /
    grid faces only, or a tall grid (z packed into several words, across the 62-bit word boundaries);
    a class that never passes the threshold, and scores exactly at the threshold."""
    shape = tuple(int(s) for s in torch.randint(1, 9, (3,), generator=g))
    if kind == "tall":
        z = (1, 2, 61, 62, 63, 64, 123, 124, 125, 140)[int(torch.randint(0, 10, (1,), generator=g))]
        shape = (*(int(s) for s in torch.randint(1, 5, (2,), generator=g)), z)
    batch = int(torch.randint(1, 3, (1,), generator=g))
    n = batch * shape[0] * shape[1] * shape[2]
    if kind == "empty":
        ids = torch.zeros(0, dtype=torch.long)
    elif kind == "full":
        ids = torch.arange(n)
    elif kind == "one":
        ids = torch.randint(0, n, (1,), generator=g)
    elif kind == "faces":
        flat = torch.arange(n)
        i, j, k = (flat // (shape[1] * shape[2])) % shape[0], (flat // shape[2]) % shape[1], flat % shape[2]
        face = (i == 0) | (i == shape[0] - 1) | (j == 0) | (j == shape[1] - 1) | (k == 0) | (k == shape[2] - 1)
        ids = flat[face & (torch.rand(n, generator=g) < 0.5)]
    else:
        ids = torch.randperm(n, generator=g)[: int(n * float(torch.rand(1, generator=g)) * 0.7)].sort().values
    c = int(torch.randint(1, 12, (1,), generator=g))
    mean = torch.rand(len(ids), c, generator=g) * 0.9
    mean[torch.rand(mean.shape, generator=g) < 0.1] = 0.5  # at the threshold: not above it
    if c > 1:
        mean[:, int(torch.randint(0, c, (1,), generator=g))] = 0.2  # never above the threshold
    return ids, mean, batch, shape


@pytest.mark.parametrize("kind", ["random", "empty", "full", "one", "faces", "tall"])
def test_closing_equals_the_dense_reference_exactly_on_random_grids(kind):
    # Every id and every score of the classes that pass the threshold somewhere, bit for bit; the other
    # classes of a filled voxel are 0 (a kept voxel keeps its own mean), which leaves labels unchanged.
    from models.postprocess import close_holes

    g = torch.Generator().manual_seed(sum(map(ord, kind)))
    for _ in range(40 if kind in ("random", "faces", "one", "tall") else 8):
        ids, mean, batch, shape = _closing_case(g, kind)
        got_ids, got = close_holes(ids, mean, batch, list(shape), 0.5)
        if len(ids) == 0:
            assert len(got_ids) == 0
            continue
        ref_ids, ref = _reference_closing(ids, mean, batch, shape, 0.5)
        assert torch.equal(got_ids, ref_ids)
        inactive = ~(mean > 0.5).any(dim=0)
        kept = torch.isin(ref_ids, ids[(mean > 0.5).any(dim=-1)])
        ref[:, inactive] = torch.where(kept[:, None], ref[:, inactive], 0.0)
        assert torch.equal(got, ref)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_closing_buffers_are_per_thread():
    # The closing reuses per-thread work buffers: two threads closing different grids at the same time
    # each get the single-threaded result.
    from models.postprocess import close_holes

    g = torch.Generator().manual_seed(7)
    cases = [_closing_case(g, "random") for _ in range(2)]
    expected = [close_holes(ids, mean, b, list(s), 0.5) for ids, mean, b, s in cases]
    results: list[list[bool]] = [[], []]

    def work(n: int) -> None:
        ids, mean, b, s = cases[n]
        for _ in range(30):
            got = close_holes(ids, mean, b, list(s), 0.5)
            results[n].append(torch.equal(got[0], expected[n][0]) and torch.equal(got[1], expected[n][1]))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == [True] * 30 and results[1] == [True] * 30


@pytest.mark.parametrize("closing", [True, False])
def test_occupied_labels_are_argmax_and_max_of_occupied_voxels(lite_config, closing):
    # The outputs' path (labels and best scores without the closed score matrix) against occupied_voxels,
    # exactly, on random point sets dense enough for the closing to fill and to drop voxels.
    from models.postprocess import occupied_labels, occupied_voxels

    cfg = dataclasses.replace(lite_config, closing=closing, score_threshold=0.5)
    g = torch.Generator().manual_seed(11)
    filled = 0
    for n in range(6):
        b = 1 + n % 2
        center = torch.rand(b, 40, 1, 3, generator=g) * 0.6 + 0.2
        points = center + torch.randn(b, 40, 64, 3, generator=g) * (0.02 + 0.01 * n)
        scores = torch.rand(b, 40, 64, 11, generator=g) ** (1 + n)
        scores[..., 2] *= 0.4  # a class never above the threshold: the closing leaves it out
        ids, mean = occupied_voxels(points, scores, cfg)
        got_ids, label, best = occupied_labels(points, scores, cfg)
        assert len(ids) > 20 and torch.equal(got_ids, ids)
        if closing:
            filled += len(ids) - len(occupied_voxels(points, scores, dataclasses.replace(cfg, closing=False))[0])
        assert torch.equal(label, mean.argmax(dim=-1) + 1) and torch.equal(best, mean.amax(dim=-1))
    assert filled > 0 or not closing


def test_voxel_means_equal_a_unique_based_reference(lite_config):
    # Voxels found by counting equal torch.unique + index_add_ over the kept points, bit for bit
    # (the same points summed in the same order), with and without dropped points, batch 1 and 2.
    cfg = dataclasses.replace(lite_config, closing=False, score_threshold=0.5)
    g = torch.Generator().manual_seed(5)
    for n in range(6):
        b = 1 + n % 2
        points = torch.rand(b, 30, 64, 3, generator=g) * 1.2 - 0.1  # some outside the grid
        scores = torch.rand(b, 30, 64, 11, generator=g) * (0.5 if n == 5 else 1.0)
        if n == 4:
            scores[:] = 0.9  # nothing dropped by the threshold
            points = points.clamp(0.0, 0.99)
        got_ids, got = occupied_voxels(points, scores, dataclasses.replace(cfg, max_center_dist=1e9 if n == 4 else 0.6))
        nx, ny, nz = cfg.grid_shape
        center_d = (points - points.mean(dim=2, keepdim=True)) * torch.tensor([nx, ny, nz]) * cfg.voxel_size
        keep = (center_d.norm(dim=-1) <= (1e9 if n == 4 else 0.6)) & (scores.max(dim=-1).values > 0.5)
        ijk = torch.floor(points * torch.tensor([nx, ny, nz])).long()
        keep &= ((ijk >= 0) & (ijk < torch.tensor([nx, ny, nz]))).all(dim=-1)
        linear = torch.arange(b).view(b, 1, 1) * (nx * ny * nz) + (ijk[..., 0] * ny + ijk[..., 1]) * nz + ijk[..., 2]
        ids, inverse = torch.unique(linear[keep], sorted=True, return_inverse=True)
        sums = torch.zeros(len(ids), 11).index_add_(0, inverse, scores[keep])
        ref = sums / torch.bincount(inverse, minlength=len(ids)).unsqueeze(-1).float()
        assert torch.equal(got_ids, ids) and torch.equal(got, ref)
        assert (len(ids) == 0) == (n == 5) and (bool(keep.all()) == (n == 4))
