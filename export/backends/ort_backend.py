"""ONNX Runtime backend with a configurable execution-provider preference list.

Providers are tried in the order given (default TensorRT EP, CUDA EP, CPU EP); the first one that this
onnxruntime build offers is used. The log names the providers requested and those in use, at WARNING when
a requested GPU provider is not in use. Short aliases: ``tensorrt``, ``cuda``, ``cpu``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig

from ..sidecar import read_sidecar
from .base import Backend, input_feed, input_shapes, output_shapes, require

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
FLOAT_TENSOR = "tensor(float)"  # onnxruntime's name for float32, what input_feed hands over
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


ORT_WARNINGS, ORT_ERRORS = 2, 3  # SessionOptions.log_severity_level: onnxruntime's default, errors only


def _fp16_graph_on_cpu(onnx_path: Path, providers: list[str]) -> bool:
    """An FP16 graph (its sidecar says so) on the CPU EP alone: there onnxruntime's constant folding warns
    about each FP16 node without a CPU kernel, which says nothing; its other warnings stay on."""
    if providers != ["CPUExecutionProvider"]:
        return False
    try:
        return (read_sidecar(onnx_path) or {}).get("precision") == "fp16"
    except ValueError:  # a corrupt sidecar is reported where the config is read from it
        return False


def requested_providers(requested: list[str] | tuple[str, ...] | None) -> list[str]:
    """The requested providers by their onnxruntime names (aliases resolved; None: the default list)."""
    return [PROVIDER_ALIASES.get(p.lower(), p) for p in (requested or DEFAULT_PROVIDERS)]


def select_providers(requested: list[str] | tuple[str, ...] | None, available: list[str]) -> list[str]:
    """Requested providers (aliases resolved) that this onnxruntime build offers, in the requested order.

    Raises ValueError when none of the requested providers is available.
    """
    wanted = requested_providers(requested)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise ValueError(f"none of the requested onnxruntime providers {wanted} is available; this onnxruntime "
                         f"offers {available} (GPU providers need the 'onnxruntime-gpu' package)")
    return chosen


def check_graph_shapes(onnx_path: Path, session: Any, config: ModelConfig, config_source: str) -> None:
    """ValueError, at load, when the graph's input names and types or its input/output shapes are not those
    ``config`` (image_size, num_classes, use_depth, decoder sizes) and the pipeline (float32) give: else every
    frame would fail. Symbolic dims (a dynamic batch) match anything; every fixed one is compared."""
    graph = {v.name: v.shape for v in [*session.get_inputs(), *session.get_outputs()]}
    wanted = {**input_shapes(config), **output_shapes(config)}
    h, w = config.image_size
    described = (f"config '{config.name}' from {config_source} (image_size {h}x{w}, num_classes "
                 f"{config.num_classes}, use_depth {config.use_depth})")
    inputs = sorted(v.name for v in session.get_inputs())
    if inputs != sorted(input_shapes(config)):
        raise ValueError(f"{onnx_path} takes inputs {inputs}, but {described} gives {sorted(input_shapes(config))}")
    for v in session.get_inputs():
        if v.type != FLOAT_TENSOR:
            raise ValueError(f"{onnx_path}: input '{v.name}' is {v.type}, the pipeline feeds float32 ({FLOAT_TENSOR}); "
                             "re-export with discene-export onnx (float32 inputs, also for the FP16 model)")
    for name, shape in wanted.items():
        got = graph.get(name)
        if not got:  # no shape recorded: onnxruntime checks at run time
            continue
        if len(got) != len(shape) or any(isinstance(g, int) and g != d for g, d in zip(got, shape, strict=True)):
            raise ValueError(f"{onnx_path}: '{name}' is {list(got)} in the graph but {list(shape)} for {described}; "
                             "the model and its config do not belong together (re-export with discene-export onnx)")


class OrtBackend(Backend):
    """Runs ``model.onnx`` in an ``onnxruntime.InferenceSession``; outputs cast to float32."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, config: ModelConfig, providers: list[str] | None = None,
                 fp16: bool = False, threads: int = 0, config_source: str = "the given config"):
        """``config_source`` names where ``config`` came from, for the error when the graph disagrees with it."""
        ort = require("onnxruntime", "onnxruntime", "the onnxruntime backend")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model {onnx_path} not found")
        chosen = select_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = ORT_ERRORS if _fp16_graph_on_cpu(onnx_path, chosen) else ORT_WARNINGS
        if threads:
            options.intra_op_num_threads = threads
        # No busy-waiting between runs: on a robot the CPU is shared with ROS, the camera driver and
        # any other backend in the process (spinning ORT threads made torch 5-15x slower beside it).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider_args = [(p, self._provider_options(p, onnx_path, fp16)) for p in chosen]
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise ValueError(f"onnxruntime could not load {onnx_path} (corrupt or not an ONNX model?): {exc}") from exc
        used = self.session.get_providers()
        self._log_providers(ort.__version__, requested_providers(providers), used)
        if fp16 and used[0] != "TensorrtExecutionProvider":
            log.warning("fp16=True is applied only by onnxruntime's TensorRT provider; on %s, %s runs at the precision "
                        "it was exported in (an FP16 graph: discene-export onnx --fp16 writes <out>.fp16.onnx)",
                        used[0], onnx_path.name)
        super().__init__(config, used[0])
        self.providers = used
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        missing = {"points", "scores"} - set(self._outputs)
        if missing:
            raise ValueError(f"{onnx_path} lacks outputs {sorted(missing)}; was it exported by discene-export?")
        check_graph_shapes(onnx_path, self.session, config, config_source)

    @staticmethod
    def _log_providers(version: str, wanted: list[str], used: list[str]) -> None:
        """One line naming the providers requested and those in use; WARNING when a requested GPU provider is not
        in use (not offered by this onnxruntime, or failed to load): the model then runs slower than intended."""
        missing = [p for p in wanted if p != "CPUExecutionProvider" and p not in used]
        if missing:
            log.warning("onnxruntime %s: requested providers %s, using %s: %s not available (GPU providers need the "
                        "'onnxruntime-gpu' package and its CUDA/TensorRT libraries)", version, wanted, used, missing)
        else:
            log.info("onnxruntime %s: requested providers %s, using %s", version, wanted, used)

    @staticmethod
    def _provider_options(provider: str, onnx_path: Path, fp16: bool) -> dict[str, Any]:
        if provider == "TensorrtExecutionProvider":
            cache = onnx_path.parent / "ort_trt_cache"
            return {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True}
        return {}

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        self.require_open()
        feed = input_feed(inputs, self.config)
        unknown = set(self._inputs) - set(feed)
        if unknown:
            raise ValueError(f"the ONNX model needs inputs {sorted(unknown)} that config '{self.config.name}' "
                             f"does not provide (use_depth mismatch?)")
        values = self.session.run(self._outputs, {k: feed[k] for k in self._inputs})
        return self._check_outputs(dict(zip(self._outputs, values, strict=True)))

    def close(self) -> None:
        super().close()
        self.session = None
