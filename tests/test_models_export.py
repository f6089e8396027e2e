"""The lite forward pass exports to ONNX opset 17 with standard, TensorRT-supported ops only."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.onnx_export import TORCHSCRIPT_EXPORTER

# ops the network may use; everything here exists in TensorRT's ONNX parser
ALLOWED_OPS = {
    "Add", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Einsum", "Equal", "Expand",
    "Gather", "Greater", "GridSample", "Identity", "LayerNormalization", "MatMul", "MaxPool", "Mul", "Neg", "Pow",
    "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice", "Softmax", "Split",
    "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
}


class LastLayer(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image, grid2img):
        out = self.model(image, grid2img)["layers"][-1]
        return out["points"], out["logits"].sigmoid()


def test_lite_exports_to_onnx_opset17_and_matches_torch(tmp_path, lite_model, lite_config, lite_grid2img):
    wrapper = LastLayer(lite_model).eval()
    image = torch.randn(1, 3, *lite_config.image_size, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "lite.onnx"
    torch.onnx.export(wrapper, (image, lite_grid2img), str(path), opset_version=17, **TORCHSCRIPT_EXPORTER,
                      input_names=["image", "grid2img"], output_names=["points", "scores"])
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version == 17
    ops = {node.op_type for node in graph.graph.node}
    assert ops <= ALLOWED_OPS, f"unexpected ops {sorted(ops - ALLOWED_OPS)}"
    assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    points, scores = session.run(None, {"image": image.numpy(), "grid2img": lite_grid2img.numpy()})
    with torch.no_grad():
        ref_points, ref_scores = wrapper(image, lite_grid2img)
    np.testing.assert_allclose(points, ref_points.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4)
