"""SSCMetrics against hand-computed cases and a plain per-class loop of the published protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import SSCMetrics, format_table


def grid(values) -> np.ndarray:
    return np.asarray(values, dtype=np.uint8).reshape(len(values), 1, 1)


def test_hand_computed_case():
    m = SSCMetrics(12)
    # (gt, pred) pairs: (0,1) (1,1) (2,0) and an unknown voxel predicted as 2 (ignored)
    m.add_batch(grid([1, 1, 0, 2]), grid([0, 1, 2, 255]))
    r = m.compute()
    assert r["iou"] == pytest.approx(1 / 3) and r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["per_class_iou"][0] == 0.0                      # tp 0, fp 1, fn 1
    assert r["per_class_iou"][1] == pytest.approx(1 / (2 + 1e-5), abs=1e-12)  # tp 1, fp 1
    assert r["per_class_iou"][2] == 0.0                      # fn 1
    assert len(r["per_class_iou"]) == 12
    assert r["miou"] == pytest.approx((1 / (2 + 1e-5)) / 11)  # absent classes count as 0


def test_counts_are_accumulated_over_the_dataset_not_averaged():
    m = SSCMetrics(12)
    m.add_batch(grid([1, 1, 1, 1]), grid([1, 1, 1, 1]))   # frame IoU 1
    m.add_batch(grid([0, 0, 0, 0]), grid([1, 0, 0, 0]))   # frame IoU 0
    r = m.compute()
    assert r["iou"] == pytest.approx(4 / 5)                  # not (1 + 0) / 2
    assert r["per_class_iou"][1] == pytest.approx(4 / (5 + 1e-5))
    assert r["per_class_iou"][0] == pytest.approx(3 / (4 + 1e-5))


def test_no_true_positive_gives_zeros_not_nan():
    m = SSCMetrics(12)
    m.add_batch(grid([0, 0, 3]), grid([0, 5, 255]))
    r = m.compute()
    assert (r["iou"], r["precision"], r["recall"]) == (0.0, 0.0, 0.0)
    assert np.isfinite(r["miou"]) and r["miou"] == 0.0


def test_out_of_range_prediction_is_occupied_but_no_class():
    m = SSCMetrics(12)
    m.add_batch(grid([255, 1]), grid([1, 1]))
    r = m.compute()
    assert r["iou"] == 1.0                                   # both predicted occupied
    assert r["per_class_iou"][1] == pytest.approx(1 / (2 + 1e-5))  # tp 1, fn 1


def reference(preds, gts, n=12):
    """Plain loop over frames and classes of the published protocol (slow, for comparison only)."""
    tps, fps, fns = np.zeros(n), np.zeros(n), np.zeros(n)
    ctp = cfp = cfn = 0
    for p, g in zip(preds, gts, strict=True):
        valid = g != 255
        p, g = p[valid], g[valid]
        ctp += np.sum((g > 0) & (p > 0))
        cfp += np.sum((g == 0) & (p > 0))
        cfn += np.sum((g > 0) & (p == 0))
        for c in range(n):
            tps[c] += np.sum((g == c) & (p == c))
            fps[c] += np.sum((g != c) & (p == c))
            fns[c] += np.sum((g == c) & (p != c))
    iou_c = tps / (tps + fps + fns + 1e-5)
    return ctp / (ctp + cfp + cfn), ctp / (ctp + cfp), ctp / (ctp + cfn), iou_c


def test_matches_reference_loop_on_random_batches():
    rng = np.random.default_rng(0)
    gts = rng.choice([0, 0, 0, 1, 2, 3, 5, 7, 11, 255], size=(3, 60, 60, 36)).astype(np.uint8)
    preds = np.where(rng.random(gts.shape) < 0.6, gts, rng.integers(0, 12, gts.shape)).astype(np.uint8)
    preds[gts == 255] = 3
    m = SSCMetrics(12)
    m.add_batch(preds[:2], gts[:2])                          # (B, 60, 60, 36)
    m.add_batch(torch.from_numpy(preds[2]), torch.from_numpy(gts[2]))  # (60, 60, 36), tensors
    r = m.compute()
    iou, prec, rec, iou_c = reference(preds, gts)
    assert r["iou"] == pytest.approx(iou) and r["precision"] == pytest.approx(prec)
    assert r["recall"] == pytest.approx(rec)
    np.testing.assert_allclose(r["per_class_iou"], iou_c, rtol=1e-12)
    assert r["miou"] == pytest.approx(iou_c[1:].mean())


def test_merge_reset_and_errors():
    a, b, both = SSCMetrics(12), SSCMetrics(12), SSCMetrics(12)
    x, y = grid([1, 2, 0, 3]), grid([1, 0, 0, 3])
    a.add_batch(x, y)
    b.add_batch(y, x)
    both.add_batch(x, y)
    both.add_batch(y, x)
    a.merge(b)
    assert a.compute() == both.compute()
    a.reset()
    assert a.confusion.sum() == 0
    with pytest.raises(ValueError, match="differs"):
        a.add_batch(np.zeros((60, 60, 36)), np.zeros((60, 60, 35)))
    with pytest.raises(ValueError, match="outside"):
        a.add_batch(grid([0]), grid([12]))
    with pytest.raises(ValueError, match=">= 0"):
        a.add_batch(np.array([-1, 0]).reshape(2, 1, 1), grid([1, 0]))


def test_table_lists_every_class():
    m = SSCMetrics(12)
    m.add_batch(grid([1, 2]), grid([1, 2]))
    table = format_table(m.compute())
    for name in ("iou", "miou", "ceiling", "floor", "objects"):
        assert name in table
    assert "100.00" in table
