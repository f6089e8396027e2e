"""TensorRT 10/11 backend: deserialised engine run with the tensor API on a CUDA stream.

Per engine: IO tensors from ``num_io_tensors`` / ``get_tensor_name`` / ``get_tensor_mode``; the
input names, shapes (``set_input_shape`` must return True) and dtypes are checked against the model
config; one device buffer per tensor (torch CUDA tensors when torch has CUDA, else cuda-python or
pycuda), bound once with ``set_tensor_address``; per frame: inputs validated, host->device copies,
``execute_async_v3(stream)``, device->host copies. The engine's sidecar is checked first: an engine
built for another GPU or TensorRT version, from an ONNX that has changed since, at another precision
than requested, or replaced without its sidecar, is rebuilt from the ONNX beside it, or refused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig

from ..cuda_mem import create_device_memory
from ..sidecar import read_sidecar, sidecar_config, sidecar_path
from ..trt_build import (
    ENGINE_SIDECAR_FIELDS,
    build_engine,
    engine_mismatches,
    engine_staleness,
    fp16_of_onnx,
    source_onnx_path,
)
from .base import Backend, input_feed, input_shapes, output_shapes, own_config, require

log = logging.getLogger(__name__)


def _config_from_sidecar(sidecar: dict[str, Any] | None, config: ModelConfig | None,
                         path: Path) -> tuple[ModelConfig, str]:
    """(the config to run the engine ``path`` with, where it came from): its sidecar's (a different ``config``
    is logged and not used, as on every backend), else ``config``."""
    if sidecar and "config" in sidecar:
        source = f"its sidecar {sidecar_path(path).name}"
        return own_config(sidecar_config(sidecar, path), config, source), source
    if config is not None:
        return config, "the given config"
    raise ValueError(f"no model config for {path}: its sidecar {path.name}.json is missing or has no 'config'; "
                     f"pass config=... or re-export with discene-export")


class TensorRTBackend(Backend):
    """Runs a serialised TensorRT engine (``model.engine`` + ``model.engine.json``)."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, config: ModelConfig | None = None, rebuild: bool = True,
                 memory: str | None = None, workspace_mb: int | None = None, fp16: bool | None = None):
        """``fp16``: required engine precision (None: whatever the engine was built with)."""
        trt = require("tensorrt", "tensorrt", "the tensorrt backend")
        self.trt = trt
        engine_path = Path(engine_path)
        if engine_path.suffix.lower() == ".onnx":  # read as an engine, its sidecar would make it "rebuilt" in place
            raise ValueError(f"{engine_path.name} is an ONNX model, not an engine: give it to "
                             "create_backend('tensorrt', ...), which builds the engine beside it")
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine {engine_path} not found (build it with `discene-export trt`)")
        self.mem = create_device_memory(memory)
        try:
            self._open(engine_path, config, rebuild, workspace_mb, fp16)
        except BaseException:
            self.close()  # frees buffers and detaches a pycuda context: nothing leaks on a refused engine
            raise

    def _open(self, engine_path: Path, config: ModelConfig | None, rebuild: bool, workspace_mb: int | None,
              fp16: bool | None) -> None:
        trt = self.trt
        sidecar = read_sidecar(engine_path, fields=ENGINE_SIDECAR_FIELDS)
        config, self.config_source = _config_from_sidecar(sidecar, config, engine_path)
        self.engine_path = engine_path
        super().__init__(config, f"cuda ({self.mem.gpu_info()['name']}, TensorRT {trt.__version__})")
        if sidecar is None:
            log.warning("%s has no sidecar: cannot check that it was built for this GPU and TensorRT", engine_path)
        else:
            self._ensure_current(engine_path, sidecar, rebuild, workspace_mb, fp16)
        self.logger = trt.Logger(trt.Logger.WARNING)
        try:
            self.runtime = trt.Runtime(self.logger)
        except TypeError as exc:  # pybind11: the factory returned nullptr (CUDA could not be initialised)
            raise RuntimeError(f"TensorRT {trt.__version__} could not create a runtime (no usable GPU or CUDA "
                               f"driver?): {exc}") from exc
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ValueError(f"TensorRT could not deserialise {engine_path}: the file is corrupt, truncated or not "
                             f"an engine of TensorRT {trt.__version__}; rebuild it with `discene-export trt`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {engine_path} (out of GPU memory?)")
        self._bind()

    def _ensure_current(self, engine_path: Path, sidecar: dict[str, Any], rebuild: bool, workspace_mb: int | None,
                        fp16: bool | None) -> None:
        """Rebuild (or refuse) an engine that is foreign to this machine or stale against its ONNX."""
        onnx_path = source_onnx_path(engine_path, sidecar)
        mismatches = engine_mismatches(sidecar, self.trt.__version__, self.mem.gpu_info())
        reasons = mismatches + engine_staleness(engine_path, sidecar, fp16)
        if reasons and fp16 is False and sidecar.get("precision") == "fp16" and fp16_of_onnx(onnx_path, fp16):
            fp16 = True  # built from an FP16 ONNX: FP16 is all it can be, rebuilding would not change that
            reasons = mismatches + engine_staleness(engine_path, sidecar, fp16)
        if not reasons:
            return
        what = f"engine {engine_path} cannot be used as it is: " + "; ".join(reasons)
        if not rebuild:
            raise RuntimeError(f"{what}. Rebuilding is disabled; build a new engine here with `discene-export trt`")
        if not onnx_path.is_file():
            raise RuntimeError(f"{what}. No ONNX model {onnx_path.name} beside it to rebuild from; copy the ONNX next "
                               f"to the engine or build one here with `discene-export trt --onnx ...`")
        log.warning("%s; rebuilding from %s", what, onnx_path)
        build_engine(onnx_path, engine_path, fp16=(sidecar.get("precision") == "fp16") if fp16 is None else fp16,
                     workspace_mb=workspace_mb or int(sidecar.get("workspace_mb", 4096)),
                     timing_cache=engine_path.with_suffix(".timing.cache"))

    def _bind(self) -> None:
        """Check the engine's IO against the config, allocate one device buffer per tensor and bind it."""
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected_in = input_shapes(self.config)
        if sorted(self.inputs) != sorted(expected_in):
            raise ValueError(f"engine inputs {self.inputs} do not match config '{self.config.name}' "
                             f"(expected {sorted(expected_in)}); was it built from this model's ONNX?")
        expected_out = output_shapes(self.config)
        missing = set(expected_out) - set(self.outputs)
        if missing:
            raise ValueError(f"engine lacks outputs {sorted(missing)}; was it built from a discene-export ONNX?")
        for name in self.inputs:
            if not self.context.set_input_shape(name, expected_in[name]):
                raise ValueError(f"engine rejects input '{name}' of shape {expected_in[name]} (engine shape "
                                 f"{tuple(engine.get_tensor_shape(name))}); was it built for config "
                                 f"'{self.config.name}' at input size {tuple(self.config.image_size)}?")
        shapes = {name: tuple(int(d) for d in self.context.get_tensor_shape(name)) for name in names}
        for name, shape in shapes.items():
            if any(d < 0 for d in shape):
                raise ValueError(f"engine tensor '{name}' has unresolved shape {shape}")
            if name in expected_out and shape != expected_out[name]:
                c = self.config
                raise ValueError(f"{self.engine_path}: output '{name}' is {list(shape)} in the engine but "
                                 f"{list(expected_out[name])} for config '{c.name}' from {self.config_source} "
                                 f"({c.decoder.num_queries} queries, {c.num_classes} classes); the engine and its "
                                 "config do not belong together (rebuild it from this model's ONNX)")
        self.buffers = {}
        for name in names:
            shape = shapes[name]
            trt_dtype = engine.get_tensor_dtype(name)
            try:
                dtype = np.dtype(trt.nptype(trt_dtype))
            except TypeError as exc:
                raise ValueError(f"engine tensor '{name}' has type {trt_dtype}, which has no numpy equivalent; "
                                 f"export the ONNX with float32 inputs and outputs") from exc
            if name in self.inputs and dtype != np.float32:
                raise ValueError(f"engine input '{name}' is {dtype}, the pipeline feeds float32; rebuild the engine "
                                 f"from a discene-export ONNX (FP32 I/O, also in FP16 mode)")
            self.buffers[name] = self.mem.alloc(shape, dtype)
            if not self.context.set_tensor_address(name, int(self.buffers[name].ptr)):
                raise RuntimeError(f"TensorRT set_tensor_address failed for '{name}'")

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        self.require_open()
        feed = input_feed(inputs, self.config)  # names, shapes, float32: checked before any copy
        for name in self.inputs:
            buf = self.buffers[name]
            if feed[name].shape != buf.shape:
                raise ValueError(f"input '{name}' has shape {feed[name].shape}, the engine buffer {buf.shape}")
        for name in self.inputs:
            self.mem.upload(self.buffers[name], feed[name])
        if not self.context.execute_async_v3(int(self.mem.stream_handle())):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.mem.wait()  # sleep until the engine is done: the copies below would spin a core while it runs
        out = {name: self.mem.download(self.buffers[name]) for name in self.outputs}
        return self._check_outputs(out)

    def close(self) -> None:
        super().close()
        mem = getattr(self, "mem", None)
        if mem is None:
            return
        self.mem = None
        try:
            if getattr(self, "context", None) is not None:
                mem.synchronize()
        finally:
            self.context = None
            self.engine = None
            self.buffers = {}
            mem.close()
