"""List every op of an ONNX graph and flag what TensorRT's ONNX parser cannot build, without a GPU.

The supported-op table is the operator support matrix of onnx-tensorrt (``docs/operators.md``) as
published for TensorRT 10.15 (opset 9..24). Ops marked "N" there are simply absent from the set
below. A few ops near the end of the table (Attention, RMSNormalization, RotaryEmbedding,
TensorScatter) arrived with opsets 23/24 and late TensorRT 10 releases: JetPack 6.2 ships
TensorRT 10.3, so they are flagged as "newer than TensorRT 10.3" rather than accepted silently.
Besides op names, the constraints that DESIGN.md section 7 lists are checked per node: GridSample
on 4-D inputs only, TopK with a constant K < 3840, ScatterND without reduction, UINT8 only as
network I/O.
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

# Supported by the 10.15 parser but too new for the oldest TensorRT this project targets.
TRT_NEWER_THAN_OLDEST = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"})

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

    @property
    def unsupported_ops(self) -> list[str]:
        """Sorted unique ``op_type`` (``domain::op_type`` outside the default domain) with an issue."""
        return sorted({i.op_type if i.domain in _DEFAULT_DOMAINS else f"{i.domain}::{i.op_type}" for i in self.issues})

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        lines = [f"opset {self.opset}; {sum(self.ops.values())} nodes, {len(self.ops)} op types "
                 f"(checked against TensorRT {TRT_OPS_VERSION} ONNX parser list)"]
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


def _node_constraints(node, consts, ranks) -> list[str]:
    """Constraint violations of one default-domain node (DESIGN.md section 7)."""
    reasons = []
    if node.op_type == "GridSample":
        rank = ranks.get(node.input[0])
        if rank is not None and rank != 4:
            reasons.append(f"GridSample input is {rank}-D; TensorRT accepts 4-D inputs only")
    elif node.op_type == "TopK":
        k = consts.get(node.input[1]) if len(node.input) > 1 else None
        if k is None:
            reasons.append("TopK K is not a constant; TensorRT needs K as an initializer")
        elif int(np.max(k)) >= TRT_TOPK_MAX_K:
            reasons.append(f"TopK K={int(np.max(k))}; TensorRT needs K < {TRT_TOPK_MAX_K}")
    elif node.op_type == "ScatterND":
        reduction = _attr(node, "reduction")
        if reduction not in (None, b"none", "none"):
            red = reduction.decode() if isinstance(reduction, bytes) else reduction
            reasons.append(f"ScatterND reduction='{red}'; TensorRT supports reduction='none' only")
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

    ``allow_newer=False`` also flags ops that need a TensorRT newer than 10.3 (JetPack 6.2).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    opset = _default_opset(model)
    consts, ranks = _constant_values(model), _ranks(model)
    ops: dict[tuple[str, str], int] = {}
    issues: list[OpIssue] = []
    if opset and not TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]:
        issues.append(OpIssue("", "<opset>", "", f"opset {opset} outside TensorRT's range {TRT_OPSET_RANGE}"))
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
            issues.append(OpIssue(node.domain, node.op_type, node.name,
                                  f"needs a TensorRT newer than {TRT_OLDEST_SUPPORTED}"))
        else:
            issues += [OpIssue(node.domain, node.op_type, node.name, r) for r in _node_constraints(node, consts, ranks)]
    issues += _uint8_inside(model)
    return OpReport(ops=ops, opset=opset, issues=issues)
