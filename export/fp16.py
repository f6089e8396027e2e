"""FP32 -> FP16 ONNX graph pass for TensorRT strongly typed networks (TensorRT >= 10.12, DESIGN.md 7).

A strongly typed network runs every tensor in the type the ONNX graph gives it, so precision is
chosen here, once: float tensors become FLOAT16 except around ops that lose accuracy in half
precision, which keep FLOAT32 inputs and outputs with Casts inserted at the boundary:
LayerNormalization and Softmax (variance / exp-sum reductions) and Einsum (the grid -> image
projection carries pixel*depth values in the thousands). Network inputs and outputs stay FLOAT32,
so every backend feeds and reads the same arrays. Only onnx itself is used (no onnxconverter-common).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:  # the graph pass needs only onnx: torch (sidecar, backends) is imported in the functions that use it
    import torch

KEEP_FP32_OPS = frozenset({"LayerNormalization", "Softmax", "Einsum"})
# (op_type, input index) slots whose type the ONNX spec fixes to float32 whatever the data type.
FP32_SLOTS = frozenset({("Resize", 2)})
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _to_f16_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    if np.isfinite(arr).all() and np.abs(arr).max(initial=0) > 65504:
        raise ValueError(f"tensor '{t.name}' has values beyond the FP16 range (max |x| = {np.abs(arr).max():.3g})")
    return numpy_helper.from_array(arr.astype(np.float16), t.name)


# Sampling-location arithmetic (point-set mean/std, offsets, projection, pixel -> grid): these
# element-wise/reduction nodes of the sampling modules stay FP32; the feature reads do not.
GEOMETRY_SCOPE = "/sampling/"
GEOMETRY_OPS = frozenset({"ReduceMean", "Sub", "Sqrt", "Div", "Clip", "Concat", "Einsum", "Slice"})


class _Converter:
    def __init__(self, model: onnx.ModelProto, keep_ops: frozenset[str], keep_geometry: bool = False):
        self.model, self.keep_ops, self.keep_geometry = model, keep_ops, keep_geometry
        self.orig_types = _elem_types(model)
        self.cur: dict[str, int] = {}  # tensor name -> element type after conversion
        self.casts: dict[tuple[str, int], str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.init_by_name = {i.name: i for i in model.graph.initializer}

    def typed(self, name: str, want: int) -> str:
        """Name of ``name`` as element type ``want``, inserting (or reusing) a Cast when needed."""
        have = self.cur.get(name)
        if not name or have not in (F32, F16) or have == want:
            return name
        key = (name, want)
        if key not in self.casts:
            if name in self.init_by_name:  # a second copy of the weight in the other precision
                arr = numpy_helper.to_array(self.init_by_name[name])
                new = f"{name}__{'fp16' if want == F16 else 'fp32'}"
                self.inits.append(numpy_helper.from_array(arr.astype(np.float16 if want == F16 else np.float32), new))
            else:
                new = f"{name}__cast{'16' if want == F16 else '32'}"
                self.nodes.append(helper.make_node("Cast", [name], [new], to=want, name=f"{new}_node"))
            self.casts[key] = new
        return self.casts[key]

    def run(self) -> onnx.ModelProto:
        g = self.model.graph
        for inp in g.input:
            self.cur[inp.name] = inp.type.tensor_type.elem_type
        for init in g.initializer:
            if init.data_type == F32:
                self.inits.append(_to_f16_tensor(init))
                self.cur[init.name] = F16
            else:
                self.inits.append(init)
                self.cur[init.name] = init.data_type
        for node in g.node:
            self.convert_node(node)
        outputs = []
        for out in g.output:
            name = self.typed(out.name, F32) if self.cur.get(out.name) == F16 else out.name
            if name != out.name:  # rename so that the graph output keeps its public name
                self.rename_output(name, out.name)
            outputs.append(out)
        # an FP32-only weight (LayerNormalization's scale and bias) is read through its FP32 copy: its FP16
        # version is left to no node, and onnxruntime would warn about each one it drops
        used = {name for node in self.nodes for name in node.input} | {out.name for out in g.output}
        inits = [init for init in self.inits if init.name in used]
        new_graph = helper.make_graph(self.nodes, g.name, list(g.input), outputs, inits)
        new = helper.make_model(new_graph, opset_imports=list(self.model.opset_import),
                                producer_name=self.model.producer_name + "+discene-fp16")
        new.ir_version = self.model.ir_version
        return new

    def rename_output(self, produced: str, public: str) -> None:
        """The FP32 Cast made for a graph output writes the public name; the FP16 tensor is renamed."""
        internal = f"{public}__fp16"
        for n in self.nodes:
            n.input[:] = [internal if x == public else x for x in n.input]
            n.output[:] = [internal if x == public else (public if x == produced else x) for x in n.output]

    def convert_node(self, node: onnx.NodeProto) -> None:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        keep = node.op_type in self.keep_ops or (
            self.keep_geometry and GEOMETRY_SCOPE in node.name and node.op_type in GEOMETRY_OPS)
        for i, name in enumerate(node.input):
            want = F32 if keep or (node.op_type, i) in FP32_SLOTS else F16
            if self.cur.get(name) in (F32, F16) and node.op_type != "Cast":
                node.input[i] = self.typed(name, want)
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == F32:
                    a.i = F16
        elif node.op_type in ("Constant", "ConstantOfShape"):
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    a.t.CopyFrom(_to_f16_tensor(a.t))
        self.nodes.append(node)
        for out in node.output:
            t = self.orig_types.get(out)
            self.cur[out] = F32 if (keep and t == F32) else (F16 if t == F32 else t)


def convert_to_fp16(model: onnx.ModelProto, keep_fp32_ops: frozenset[str] = KEEP_FP32_OPS,
                    keep_geometry: bool = True) -> onnx.ModelProto:
    """FP16 copy of an FP32 model: FP32 I/O, FP16 weights/activations, ``keep_fp32_ops`` in FP32, and
    with ``keep_geometry`` (the default, so that the export's FP16 companion and the FP16 ONNX a
    strongly typed TensorRT build writes are the same graph) the sampling-location arithmetic too
    (``GEOMETRY_SCOPE``/``GEOMETRY_OPS``)."""
    new = _Converter(model, frozenset(keep_fp32_ops), keep_geometry).run()
    onnx.checker.check_model(new)
    onnx.shape_inference.infer_shapes(new, strict_mode=True)  # raises on any type inconsistency
    return new


def convert_file_to_fp16(src: str | Path, dst: str | Path, keep_geometry: bool = True) -> Path:
    """Read an FP32 ONNX file, write its FP16 version; returns ``dst``."""
    from .sidecar import atomic_write_bytes

    model = onnx.load(str(src))
    new = convert_to_fp16(model, keep_geometry=keep_geometry)
    atomic_write_bytes(dst, new.SerializeToString())
    return Path(dst)


def label_agreement(ref_labels: list[np.ndarray], got_labels: list[np.ndarray]) -> dict[str, float | int]:
    """Voxel-label agreement of two runs over a set of frames (``ref`` is the FP32 reference).

    ``label_agreement``: share of all voxels with the same label (empty included); ``occupied_label_agreement``:
    the same over voxels occupied in either run; ``occupancy_iou``: IoU of the two occupied sets;
    ``semantic_agreement``: same class among voxels occupied in both.
    """
    same = occupied_either = occupied_both = same_class_both = total = ref_occ = 0
    for ref, got in zip(ref_labels, got_labels, strict=True):
        a, b = ref > 0, got > 0
        total += ref.size
        same += int((ref == got).sum())
        occupied_either += int((a | b).sum())
        occupied_both += int((a & b).sum())
        same_class_both += int(((ref == got) & a & b).sum())
        ref_occ += int(a.sum())
    return {
        "frames": len(ref_labels),
        "label_agreement": same / max(total, 1),
        "occupied_label_agreement": (same - (total - occupied_either)) / occupied_either if occupied_either else 1.0,
        "occupancy_iou": occupied_both / occupied_either if occupied_either else 1.0,
        "semantic_agreement": same_class_both / occupied_both if occupied_both else 1.0,
        "occupied_voxels_fp32": ref_occ,
    }


def compare_backends(ref_backend: Any, got_backend: Any, config: Any, frames: list[Any],
                     labels_out: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Run both backends on ``frames`` through the same post-processing: ``label_agreement`` plus the
    largest point difference (grid units) and each run's occupied-voxel count. ``labels_out`` (a list)
    receives each frame's (reference, other) label grids, e.g. for metrics against ground truth."""
    from models.postprocess import points_to_occupancy

    refs, gots, max_points = [], [], 0.0
    for frame in frames:
        a, b = ref_backend.infer(frame), got_backend.infer(frame)
        max_points = max(max_points, float(np.abs(a["points"] - b["points"]).max()))
        refs.append(points_to_occupancy(a["points"], a["scores"], frame.voxel_origin, config).labels)
        gots.append(points_to_occupancy(b["points"], b["scores"], frame.voxel_origin, config).labels)
        if labels_out is not None:
            labels_out.append((refs[-1], gots[-1]))
    return {**label_agreement(refs, gots), "max_abs_diff_points": max_points,
            "occupied_voxels_other": int(sum(int((g > 0).sum()) for g in gots)),
            "closing": bool(config.closing), "score_threshold": float(config.score_threshold)}


def fp16_onnx_agreement(fp16_onnx: str | Path, model: torch.nn.Module, config: Any, frames: list[Any],
                        source: str, labels_out: list | None = None) -> dict[str, Any]:
    """FP16 ONNX on onnxruntime's CPU provider against eager FP32 torch on the CPU, over ``frames``
    (``NetworkInputs``), through the same post-processing: see ``label_agreement``."""
    from .backends.ort_backend import OrtBackend
    from .backends.torch_backend import TorchBackend

    ref_backend = TorchBackend(model, config, device="cpu")
    ort_backend = OrtBackend(fp16_onnx, config, providers=["CPUExecutionProvider"])
    try:
        result = compare_backends(ref_backend, ort_backend, config, frames, labels_out)
    finally:
        ort_backend.close()
    return {**result, "frames_source": source, "reference": "torch eager CPU float32",
            "runtime": "onnxruntime CPUExecutionProvider, FP16 graph"}


# Torch backend options compared with its IEEE FP32 (TF32 off, cuDNN's heuristic algorithms) on CUDA.
TORCH_VARIANTS: dict[str, dict[str, bool]] = {
    "fp16": {"fp16": True},
    "tf32": {"tf32": True},
    "tf32_convolutions": {"tf32_convolutions": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "tf32_cudnn_benchmark": {"tf32": True, "cudnn_benchmark": True},
}
_VARIANT_LABELS = {"fp16": "FP16 autocast", "tf32": "TF32", "tf32_convolutions": "TF32 convolutions (matmuls IEEE)",
                   "cudnn_benchmark": "cudnn.benchmark"}


class OwnThread:
    """A backend whose ``infer`` calls all run on one thread of its own.

    PyTorch's cuDNN (v8 API, the default) keeps the convolution plan it chose per thread, keyed by
    shapes, dtype and the TF32 flag but not by ``cudnn.benchmark``: two backends warmed up on the same
    thread would share plans, so a benchmarked variant would silently reuse the reference's heuristic
    choice (or the reverse). With ``TORCH_CUDNN_V8_API_DISABLED=1`` the cache is process-wide and this
    does not separate them.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agreement-backend")

    def infer(self, frame: Any) -> dict[str, np.ndarray]:
        return self.pool.submit(self.backend.infer, frame).result()

    def close(self) -> None:
        try:
            self.pool.submit(self.backend.close).result()
        finally:
            self.pool.shutdown()


def torch_variant_agreement(model: torch.nn.Module, config: Any, frames: list[Any], source: str,
                            variant: str = "fp16", device: str = "cuda", cuda_graph: bool = True,
                            labels_out: list | None = None) -> dict[str, Any]:
    """The torch backend with the options of ``TORCH_VARIANTS[variant]`` (FP16 autocast, TF32, TF32
    convolutions only, cudnn.benchmark) against its IEEE FP32 on one CUDA device, both replayed as CUDA
    graphs by default (the node's path), over ``frames``: see ``label_agreement``. All of them are CUDA modes (on the CPU
    the TF32/benchmark runs would be the reference itself), so another device is refused. Each backend
    runs on its own thread (``OwnThread``: cuDNN's plan choice stays its own)."""
    from .backends.torch_backend import TorchBackend

    options = TORCH_VARIANTS.get(variant)
    if options is None:
        raise ValueError(f"unknown torch variant '{variant}'; choose one of {sorted(TORCH_VARIANTS)}")
    if str(device).split(":")[0] != "cuda":
        raise ValueError(f"the torch '{variant}' comparison needs a CUDA device ({device} given): FP16 autocast, "
                         f"TF32 and cudnn.benchmark are CUDA modes of the torch backend")
    ref_backend = OwnThread(TorchBackend(model, config, device=device, cuda_graph=cuda_graph))
    other_backend = OwnThread(TorchBackend(model, config, device=device, cuda_graph=cuda_graph, **options))
    try:
        result = compare_backends(ref_backend, other_backend, config, frames, labels_out)
    finally:
        ref_backend.close()
        other_backend.close()
    mode = "CUDA graph" if cuda_graph else "eager"
    return {**result, "frames_source": source, "variant": variant,
            "reference": f"torch {mode} {device} float32 (TF32 off)",
            "runtime": f"torch {mode} {device}, " + " + ".join(_VARIANT_LABELS[k] for k in options)}
