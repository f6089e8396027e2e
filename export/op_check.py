"""List every op of an ONNX graph and flag what TensorRT's ONNX parser cannot build, without a GPU.

The supported-op table is the operator support matrix of onnx-tensorrt (``docs/operators.md``) as
published for TensorRT 10.15 (opset 9..24). Ops marked "N" there are absent from the set below.
Ops added during TensorRT 10 (TensorRT CHANGELOG: window functions 10.4, STFT 10.5, Attention
10.14, RMSNormalization/RotaryEmbedding/TensorScatter 10.15, Einsum with ellipsis or diagonal
10.12) are accepted by default and flagged with ``allow_newer=False`` (``--strict-jetpack``), which
checks against TensorRT 10.3 (JetPack 6.2), whose opset range is the 9..20 documented for 10.0/10.1.
Per node, the parser's documented limits are checked: GridSample on 4-D inputs only, TopK with
``sorted=1`` and a constant K < 3840 (a runtime K is accepted since TensorRT 8.6 but must stay below
3840), ScatterND without reduction, Resize modes/attributes, UINT8 only as network I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TRT_OPS_VERSION = "10.15"
TRT_OPSET_RANGE = (9, 24)
TRT_OLDEST_SUPPORTED = "10.3"  # JetPack 6.2
TRT_OLDEST_OPSET_RANGE = (9, 20)  # onnx-tensorrt operators.md for 10.0/10.1; no later opset bump up to 10.3
TRT_TOPK_MAX_K = 3840  # K must be strictly less than this

# Default ONNX domain ops marked "Y" in onnx-tensorrt docs/operators.md for TensorRT 10.15.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos
Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero
Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# First TensorRT release whose parser imports the op (TensorRT CHANGELOG.md); older ops are in 10.0.
TRT_OP_SINCE = {"BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4), "STFT": (10, 5),
                "Attention": (10, 14), "RMSNormalization": (10, 15), "RotaryEmbedding": (10, 15),
                "TensorScatter": (10, 15)}
TRT_EINSUM_ELLIPSIS_SINCE = (10, 12)  # ellipsis, diagonal and broadcasting in Einsum equations
_OLDEST = (10, 3)
# Supported by the 10.15 parser but too new for the oldest TensorRT this project targets.
TRT_NEWER_THAN_OLDEST = frozenset(op for op, since in TRT_OP_SINCE.items() if since > _OLDEST)

RESIZE_MODES = ("nearest", "linear", "cubic")
RESIZE_COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpIssue:
    """One problem found in the graph: the op, the node name and why TensorRT would refuse it."""

    domain: str
    op_type: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"domain": self.domain or "ai.onnx", "op_type": self.op_type, "node": self.node, "reason": self.reason}


@dataclass
class OpReport:
    """Every (domain, op_type) with its count, the opset, and the issues found."""

    ops: dict[tuple[str, str], int]
    opset: int
    issues: list[OpIssue]
    target: str = TRT_OPS_VERSION  # the TensorRT release checked against (TRT_OLDEST_SUPPORTED: --strict-jetpack)

    @property
    def unsupported_ops(self) -> list[str]:
        """Sorted unique ``op_type`` (``domain::op_type`` outside the default domain) with an issue."""
        return sorted({i.op_type if i.domain in _DEFAULT_DOMAINS else f"{i.domain}::{i.op_type}" for i in self.issues})

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        lines = [f"opset {self.opset}; {sum(self.ops.values())} nodes, {len(self.ops)} op types "
                 f"(checked against TensorRT {self.target}'s ONNX parser list)"]
        for (domain, op), n in sorted(self.ops.items()):
            lines.append(f"  {domain or 'ai.onnx'}::{op} x{n}")
        for issue in self.issues:
            lines.append(f"  FLAGGED {issue.op_type} ({issue.node}): {issue.reason}")
        if not self.issues:
            lines.append("  no op flagged for TensorRT")
        return "\n".join(lines)


def _iter_nodes(graph: onnx.GraphProto):
    """All nodes, including those in If/Loop/Scan subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return 0


def _constant_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose shape ONNX shape inference can determine."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort; op names are still checked
        inferred = model
    ranks = {}
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _topk_reasons(node, consts) -> list[str]:
    reasons = []
    k = consts.get(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(np.max(k)) >= TRT_TOPK_MAX_K:
        reasons.append(f"TopK K={int(np.max(k))}; TensorRT needs K < {TRT_TOPK_MAX_K}")
    if _attr(node, "sorted") == 0:
        reasons.append("TopK sorted=0; TensorRT supports sorted=1 only")
    return reasons


def _resize_reasons(node, opset: int) -> list[str]:
    """Resize limits of the onnx-tensorrt op checker."""
    reasons = []
    mode = _text(_attr(node, "mode")) or "nearest"
    if mode not in RESIZE_MODES:
        reasons.append(f"Resize mode='{mode}'; TensorRT supports {', '.join(RESIZE_MODES)}")
    if opset >= 11:
        coord = _text(_attr(node, "coordinate_transformation_mode")) or "half_pixel"
        if coord not in RESIZE_COORDINATE_MODES:
            reasons.append(f"Resize coordinate_transformation_mode='{coord}'; TensorRT supports "
                           f"{', '.join(RESIZE_COORDINATE_MODES)}")
        nearest = _text(_attr(node, "nearest_mode")) or "round_prefer_floor"
        if coord == "tf_half_pixel_for_nn" and nearest != "round_prefer_floor":
            reasons.append(f"Resize tf_half_pixel_for_nn with nearest_mode='{nearest}'; TensorRT needs round_prefer_floor")
    if _attr(node, "antialias") not in (None, 0):
        reasons.append("Resize antialias=1; TensorRT does not support antialiasing")
    policy = _text(_attr(node, "keep_aspect_ratio_policy")) or "stretch"
    if policy != "stretch":
        reasons.append(f"Resize keep_aspect_ratio_policy='{policy}'; TensorRT supports 'stretch' only")
    axes = _attr(node, "axes")
    if axes is not None and len(set(axes)) != len(axes):
        reasons.append(f"Resize axes {list(axes)} are not unique")
    return reasons


def _einsum_needs_newer(node) -> bool:
    """Ellipsis or a repeated index inside one operand (diagonal): TensorRT >= 10.12."""
    equation = (_text(_attr(node, "equation")) or "").replace(" ", "")
    operands = equation.split("->")[0].split(",")
    return "..." in equation or any(len(set(op)) != len(op) for op in operands)


def _node_constraints(node, consts, ranks, opset: int = 17, allow_newer: bool = True) -> list[str]:
    """Constraint violations of one default-domain node (DESIGN.md section 7, onnx-tensorrt limits)."""
    reasons = []
    if node.op_type == "GridSample":
        rank = ranks.get(node.input[0])
        if rank is not None and rank != 4:
            reasons.append(f"GridSample input is {rank}-D; TensorRT accepts 4-D inputs only")
    elif node.op_type == "TopK":
        reasons += _topk_reasons(node, consts)
    elif node.op_type == "ScatterND":
        reduction = _text(_attr(node, "reduction"))
        if reduction not in (None, "none"):
            reasons.append(f"ScatterND reduction='{reduction}'; TensorRT supports reduction='none' only")
    elif node.op_type == "Resize":
        reasons += _resize_reasons(node, opset)
    elif node.op_type == "Einsum" and not allow_newer and _einsum_needs_newer(node):
        reasons.append(f"Einsum '{_text(_attr(node, 'equation'))}' uses an ellipsis or a diagonal: needs TensorRT "
                       f">= {'.'.join(map(str, TRT_EINSUM_ELLIPSIS_SINCE))}")
    return reasons


def _uint8_inside(model: onnx.ModelProto) -> list[OpIssue]:
    """UINT8 is allowed only as network input/output: flag Casts to UINT8 feeding inner nodes."""
    io = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    issues = []
    for node in model.graph.node:
        if node.op_type == "Cast" and _attr(node, "to") == onnx.TensorProto.UINT8 and node.output[0] not in io:
            issues.append(OpIssue(node.domain, node.op_type, node.name,
                                  "Cast to UINT8 inside the network; TensorRT allows UINT8 only as network I/O"))
    return issues


def check_model(model: onnx.ModelProto | str | Path, allow_newer: bool = True) -> OpReport:
    """List the ops of ``model`` and flag those TensorRT's ONNX parser would reject.

    ``allow_newer=False`` checks against TensorRT 10.3 (JetPack 6.2): ops and Einsum forms added later
    and opsets above 20 are flagged too. ValueError for a model without a graph (an empty or truncated file).
    """
    name = "the ONNX model"
    if not isinstance(model, onnx.ModelProto):
        name = str(model)
        model = onnx.load(name)
    if not model.graph.node:
        size = f"{Path(name).stat().st_size} bytes" if Path(name).is_file() else "a ModelProto"
        raise ValueError(f"{name} holds no ONNX graph ({size}, no nodes): an empty or truncated file, or not a model")
    opset = _default_opset(model)
    consts, ranks = _constant_values(model), _ranks(model)
    ops: dict[tuple[str, str], int] = {}
    issues: list[OpIssue] = []
    lo, hi = TRT_OPSET_RANGE if allow_newer else TRT_OLDEST_OPSET_RANGE
    target = TRT_OPS_VERSION if allow_newer else TRT_OLDEST_SUPPORTED
    if opset and not lo <= opset <= hi:
        issues.append(OpIssue("", "<opset>", "", f"opset {opset} outside TensorRT {target}'s range {(lo, hi)}"))
    for node in _iter_nodes(model.graph):
        key = (node.domain, node.op_type)
        ops[key] = ops.get(key, 0) + 1
        if node.domain not in _DEFAULT_DOMAINS:
            issues.append(OpIssue(node.domain, node.op_type, node.name,
                                  f"custom domain '{node.domain}' needs a TensorRT plugin"))
        elif node.op_type not in TRT_SUPPORTED_OPS:
            issues.append(OpIssue(node.domain, node.op_type, node.name,
                                  f"not supported by the TensorRT {TRT_OPS_VERSION} ONNX parser"))
        elif not allow_newer and node.op_type in TRT_NEWER_THAN_OLDEST:
            since = ".".join(map(str, TRT_OP_SINCE[node.op_type]))
            issues.append(OpIssue(node.domain, node.op_type, node.name,
                                  f"needs TensorRT >= {since}, newer than {TRT_OLDEST_SUPPORTED}"))
        else:
            issues += [OpIssue(node.domain, node.op_type, node.name, r)
                       for r in _node_constraints(node, consts, ranks, opset, allow_newer)]
    issues += _uint8_inside(model)
    return OpReport(ops=ops, opset=opset, issues=issues, target=target)
