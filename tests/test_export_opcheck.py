"""TensorRT op check and the FP16 graph pass on small hand-built ONNX graphs (no model, no GPU)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import convert_to_fp16
from export.op_check import TRT_SUPPORTED_OPS, check_model


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def test_supported_graph_has_no_flags_and_lists_every_op():
    m = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])],
               [_vi("x", [1, 4])], [_vi("y", [1, 4])])
    report = check_model(m)
    assert report.ok and report.unsupported_ops == []
    assert report.ops == {("", "Relu"): 1, ("", "Sigmoid"): 1} and report.opset == 17


def test_unsupported_and_custom_domain_ops_are_flagged():
    assert "Unique" not in TRT_SUPPORTED_OPS and "GridSample" in TRT_SUPPORTED_OPS
    nodes = [helper.make_node("Unique", ["x"], ["u"]),
             helper.make_node("MyOp", ["x"], ["y"], domain="com.example")]
    m = _model(nodes, [_vi("x", [4])], [_vi("u", [None]), _vi("y", [4])])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    report = check_model(m)
    assert not report.ok
    assert report.unsupported_ops == ["Unique", "com.example::MyOp"]
    assert "FLAGGED Unique" in report.summary()


def test_gridsample_must_be_4d():
    ok = _model([helper.make_node("GridSample", ["x", "g"], ["y"], align_corners=1)],
                [_vi("x", [1, 2, 5, 5]), _vi("g", [1, 3, 3, 2])], [_vi("y", [1, 2, 3, 3])], opset=20)
    bad = _model([helper.make_node("GridSample", ["x", "g"], ["y"], align_corners=1)],
                 [_vi("x", [1, 2, 5, 5, 5]), _vi("g", [1, 3, 3, 3, 3])], [_vi("y", [1, 2, 3, 3, 3])], opset=20)
    assert check_model(ok).ok
    issues = check_model(bad).issues
    assert len(issues) == 1 and "4-D" in issues[0].reason


def test_topk_k_limit_and_scatternd_reduction_and_uint8():
    def topk(k):
        init = numpy_helper.from_array(np.array([k], np.int64), "k")
        return _model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [_vi("x", [1, 5000])],
                      [_vi("v", [1, k]), _vi("i", [1, k], TensorProto.INT64)], [init])

    assert check_model(topk(100)).ok
    assert "3840" in check_model(topk(4000)).issues[0].reason
    idx = numpy_helper.from_array(np.array([[0], [1]], np.int64), "idx")
    upd = numpy_helper.from_array(np.ones((2, 3), np.float32), "upd")
    scat = _model([helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], reduction="add")],
                  [_vi("x", [4, 3])], [_vi("y", [4, 3])], [idx, upd], opset=18)
    assert "reduction" in check_model(scat).issues[0].reason
    u8 = _model([helper.make_node("Cast", ["x"], ["c"], to=TensorProto.UINT8),
                 helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)],
                [_vi("x", [4])], [_vi("y", [4])])
    assert "UINT8" in check_model(u8).issues[0].reason


def test_empty_or_graphless_model_is_an_error_naming_the_file(tmp_path, capsys):
    from export.cli import main as cli_main

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    graphless = tmp_path / "graphless.onnx"
    graphless.write_bytes(_model([], [], []).SerializeToString())
    for path in (empty, graphless):
        with pytest.raises(ValueError, match="no ONNX graph"):
            check_model(path)
        assert cli_main(["check", "--onnx", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "no ONNX graph" in err and "Traceback" not in err


def test_opset_outside_tensorrt_range_is_flagged():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=8)
    assert check_model(m).unsupported_ops == ["<opset>"]


def test_strict_jetpack_checks_against_tensorrt_10_3():
    def single(op, opset=17, **attrs):
        return _model([helper.make_node(op, ["x"], ["y"], **attrs)], [_vi("x", [4], TensorProto.INT64)],
                      [_vi("y", [None])], opset=opset)

    for op, since in [("HannWindow", "10.4"), ("HammingWindow", "10.4"), ("BlackmanWindow", "10.4")]:
        assert check_model(single(op)).ok  # supported by the 10.15 parser
        (issue,) = check_model(single(op), allow_newer=False).issues
        assert f"needs TensorRT >= {since}, newer than 10.3" in issue.reason
    stft = _model([helper.make_node("STFT", ["x", "step"], ["y"])], [_vi("x", [1, 64, 1]), _vi("step", [], TensorProto.INT64)],
                  [_vi("y", [None])])
    assert check_model(stft).ok and ">= 10.5" in check_model(stft, allow_newer=False).issues[0].reason
    relu21 = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], opset=21)
    assert check_model(relu21).ok  # 10.15: opset 9..24
    assert "TensorRT 10.3's range (9, 20)" in check_model(relu21, allow_newer=False).issues[0].reason
    assert "checked against TensorRT 10.3's ONNX parser list" in check_model(relu21, allow_newer=False).summary()
    assert "checked against TensorRT 10.15's ONNX parser list" in check_model(relu21).summary()


def test_topk_runtime_k_and_sorted():
    def topk(k_input, **attrs):
        return _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], **attrs)], [_vi("x", [1, 50]), k_input],
                      [_vi("v", [1, None]), _vi("i", [1, None], TensorProto.INT64)])

    assert check_model(topk(_vi("k", [1], TensorProto.INT64))).ok  # runtime K: fine since TensorRT 8.6
    (issue,) = check_model(topk(_vi("k", [1], TensorProto.INT64), sorted=0)).issues
    assert "sorted=1" in issue.reason


def test_resize_limits():
    def resize(**attrs):
        scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
        return _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)], [_vi("x", [1, 1, 4, 4])],
                      [_vi("y", [1, 1, 8, 8])], [scales], opset=19)

    assert check_model(resize(mode="cubic", coordinate_transformation_mode="align_corners")).ok
    assert check_model(resize(mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn")).ok
    cases = {"antialias": dict(mode="linear", antialias=1),
             "keep_aspect_ratio_policy": dict(keep_aspect_ratio_policy="not_larger"),
             "tf_crop_and_resize": dict(coordinate_transformation_mode="tf_crop_and_resize"),
             "round_prefer_floor": dict(coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode="floor")}
    for word, attrs in cases.items():
        (issue,) = check_model(resize(**attrs)).issues
        assert word in issue.reason


def test_einsum_ellipsis_needs_10_12_under_strict_jetpack():
    def einsum(eq):
        return _model([helper.make_node("Einsum", ["a", "b"], ["y"], equation=eq)],
                      [_vi("a", [2, 3, 4]), _vi("b", [2, 4, 5])], [_vi("y", [2, 3, 5])], opset=17)

    assert check_model(einsum("...ij,...jk->...ik")).ok
    assert "10.12" in check_model(einsum("...ij,...jk->...ik"), allow_newer=False).issues[0].reason
    assert check_model(einsum("bij,bjk->bik"), allow_newer=False).ok


def _fp16_test_model():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "scale", "bias"], ["n"], axis=-1),
             helper.make_node("Softmax", ["n"], ["s"], axis=-1),
             helper.make_node("Relu", ["s"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 8])], [_vi("y", [2, 8])], [w, scale, bias])
    model.ir_version = 8  # what torch's opset-17 export writes; onnxruntime before 1.15 reads IR 8 at most
    return model


def test_fp16_pass_keeps_io_and_layernorm_softmax_in_fp32_and_matches():
    m = _fp16_test_model()
    h = convert_to_fp16(m)
    assert h.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert h.graph.output[0].name == "y" and h.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    inits = {i.name: i.data_type for i in h.graph.initializer}
    assert inits["w"] == TensorProto.FLOAT16
    read = {name for node in h.graph.node for name in node.input}
    assert set(inits) <= read  # LayerNormalization reads scale/bias as FP32 copies: no FP16 ones left unread
    inferred = onnx.shape_inference.infer_shapes(h, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update(inits)
    for node in inferred.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert all(types[i] == TensorProto.FLOAT for i in node.input), node.op_type
        if node.op_type == "MatMul":
            assert all(types[i] == TensorProto.FLOAT16 for i in node.input)
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(h.SerializeToString()).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=5e-3)


def test_fp16_pass_refuses_weights_beyond_fp16_range():
    m = _fp16_test_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((8, 8), 1e6, np.float32), "w"))
    with pytest.raises(ValueError, match="FP16 range"):
        convert_to_fp16(m)
