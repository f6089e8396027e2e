"""The gather form of the bilinear feature read equals grid_sample, in torch and in an ONNX export."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from export.onnx_export import export_onnx
from export.sidecar import read_sidecar
from models.sampling import AdaptiveSampling, gather_bilinear, set_sampling_impl


def test_gather_bilinear_equals_grid_sample_including_outside_and_borders():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 5, 7, 9, generator=g)
    grid = torch.rand(3, 11, 4, 2, generator=g) * 2.6 - 1.3  # some points outside the image
    grid[0, 0, 0] = torch.tensor([-1.0, -1.0])   # exact corners and borders
    grid[0, 0, 1] = torch.tensor([1.0, 1.0])
    grid[0, 0, 2] = torch.tensor([1.0, -0.3])
    ref = F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)  # (B,C,N,P)
    got = gather_bilinear(feat, grid).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_model_outputs_agree_between_sampling_impls(lite_model, lite_config):
    other = copy.deepcopy(lite_model)
    assert set_sampling_impl(other, "gather") == len(lite_config.decoder.num_refines)  # one per layer
    assert all(m.impl == "gather" for m in other.modules() if isinstance(m, AdaptiveSampling))
    h, w = lite_config.image_size
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    g2i = torch.tensor([[[120.0, 0, 60, 10], [0, 120.0, 40, 5], [0, 0, 2.0, 1.5], [0, 0, 0, 1]]])
    with torch.no_grad():
        a, b = lite_model(image, g2i), other(image, g2i)
    torch.testing.assert_close(b["layers"][-1]["points"], a["layers"][-1]["points"], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown sampling"):
        set_sampling_impl(other, "nearest")


def test_gather_export_has_no_gridsample_and_matches_torch(tmp_path):
    out = tmp_path / "lite_gather.onnx"
    side = export_onnx("lite", out, sampling="gather")  # random weights: speed/graph test
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "GridSample" not in ops and "Gather" in ops
    assert read_sidecar(out)["sampling"] == "gather"
    parity = side["parity"]  # onnxruntime (gather graph) vs eager torch (grid_sample)
    assert parity["max_abs_diff"] < 2e-4 and parity["label_agreement"] > 0.999
    assert np.isfinite(parity["max_abs_diff_points"])


def test_fp16_agreement_counts_by_hand():
    from export.fp16 import label_agreement

    ref = np.zeros((2, 2, 2), np.uint8)
    got = ref.copy()
    ref[0, 0, 0], got[0, 0, 0] = 3, 3    # occupied in both, same class
    ref[0, 0, 1], got[0, 0, 1] = 3, 4    # occupied in both, different class
    ref[0, 1, 0] = 2                     # only FP32
    got[1, 1, 1] = 5                     # only FP16
    r = label_agreement([ref], [got])
    assert r["label_agreement"] == 5 / 8          # the 4 empty-in-both voxels and (0, 0, 0) agree
    assert r["occupied_label_agreement"] == 1 / 4  # 4 occupied in either, 1 same
    assert r["occupancy_iou"] == 2 / 4 and r["semantic_agreement"] == 1 / 2
    assert r["occupied_voxels_fp32"] == 3 and r["frames"] == 1
