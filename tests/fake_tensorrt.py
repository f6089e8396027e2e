"""Test doubles that follow the real TensorRT, cuda-python and pycuda Python APIs (no GPU needed).

``make_fake_trt(version)`` builds a ``tensorrt`` module derived from NVIDIA/TensorRT's binding sources
(``python/src/infer/pyCore.cpp``, ``pyFoundationalTypes.cpp``, ``parsers/pyOnnx.cpp``, the headers
``NvInfer.h`` / ``NvInferRuntimeBase.h`` and ``python/packaging/bindings_wheel/tensorrt/__init__.py``)
at tags v10.3.0, v10.16 and v11.1:
- enums are enums with the per-version members and values (``BuilderFlag.FP16`` and the other weak-
  typing flags are gone in 11.x, where ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is 0 and
  ignored: networks are always strongly typed; ``Builder.platform_has_fast_fp16`` is gone too);
- ``set_input_shape`` returns False for a shape the engine does not accept, ``set_timing_cache``
  returns False for a cache from another device unless ``ignore_mismatch``, ``create_timing_cache``
  returns None for bytes that are not a cache, ``get_timing_cache`` may return None;
- ``nptype`` raises TypeError for BF16/FP8/INT4/FP4/E8M0;
- ``set_tensor_address`` / ``execute_async_v3`` take ``size_t`` (pybind11: a float, None, a string or
  a negative value is a TypeError);
- ``ParserError`` has ``code()``, ``node()``, ``node_name()``, ``node_operator()``, ``desc()`` and
  ``ErrorCode.__str__`` gives the bare name (``pyonnx2trt::errorCodeStr``);
- a strongly typed network refuses layer precisions (build returns None), as TensorRT does.

``DeviceHeap`` is the GPU memory the fakes share: ``CudaRuntimeShim`` (cuda-python's runtime calls,
with the real module's enums and, where no driver is present, each call passed through the real
function to check its argument conventions) and ``FakePycudaDriver`` (pycuda's documented API:
per-thread context stacks, ``make_context``/``push``/``pop``/``detach``, the ``pycuda.driver.Error``
hierarchy, ``memcpy_*_async`` copying the whole host buffer). Copies that run past an allocation
raise ``DeviceOverrun``: on a GPU they would corrupt memory.

CUDA contexts: the heap records which context owns each allocation and stream. cudart (cuda-python,
torch, TensorRT itself) works in the device's primary context; pycuda's ``make_context`` makes a
context of its own, ``Device.retain_primary_context`` retains the primary one. As on a GPU (pointers
and streams are valid only in their own context: "invalid resource handle", TensorRT issue #1133),
``execute_async_v3`` fails (returns False, error logged) when a bound buffer or the stream belongs to
another context than the primary one TensorRT runs in.
"""
from __future__ import annotations

import ctypes
import enum
import json
import operator
import threading
import types

import numpy as np
import onnx

ENGINE_MAGIC = b"FAKE-TRT-ENGINE:"
CACHE_MAGIC = b"FAKE-TRT-CACHE:"
GPU = {"name": "Fake Orin", "compute_capability": "8.7"}
STREAM = 0xC0FFEE
EVENT = 0xE7E47  # handles of the shim's events
PYCUDA_STREAM = 0x5EA0000  # handles of the pycuda double's streams
PRIMARY = "primary"  # the device's primary context (cudart's), as the heap records an owner


class DeviceOverrun(AssertionError):
    """A copy past the end of a device allocation (memory corruption on a real GPU)."""


class DeviceHeap:
    """Fake device memory: allocations at distinct addresses, each a zeroed byte array."""

    def __init__(self):
        self.allocs: dict[int, np.ndarray] = {}
        self.owner: dict[int, object] = {}  # allocation -> its CUDA context (PRIMARY or a pycuda Context)
        self.stream_owner: dict[int, object] = {}  # stream handle -> its CUDA context
        self.next_ptr = 0x7F0000000000
        self.log: list[tuple] = []

    def malloc(self, nbytes: int, context: object = PRIMARY) -> int:
        ptr = self.next_ptr
        self.allocs[ptr] = np.zeros(int(nbytes), np.uint8)
        self.owner[ptr] = context
        self.next_ptr += int(nbytes) + 4096
        return ptr

    def free(self, ptr: int) -> None:
        del self.allocs[int(ptr)]
        del self.owner[int(ptr)]

    def context_of(self, ptr: int) -> object:
        """The context owning the allocation that holds ``ptr``; DeviceOverrun if none does."""
        for base, arr in self.allocs.items():
            if base <= ptr < base + max(arr.size, 1):
                return self.owner[base]
        raise DeviceOverrun(f"{ptr:#x} is not a device allocation")

    def region(self, ptr: int, nbytes: int) -> np.ndarray:
        """Bytes ``[ptr, ptr+nbytes)``; DeviceOverrun if they leave the allocation."""
        for base, arr in self.allocs.items():
            if base <= ptr < base + max(arr.size, 1):
                if ptr + nbytes > base + arr.size:
                    raise DeviceOverrun(f"{nbytes} bytes at {ptr:#x} overrun the {arr.size}-byte allocation at {base:#x}")
                return arr[ptr - base: ptr - base + nbytes]
        raise DeviceOverrun(f"{ptr:#x} is not a device allocation")

    def view(self, ptr: int, dtype, shape) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.region(ptr, nbytes).view(dtype).reshape(shape)


def size_t(value, what: str) -> int:
    """pybind11's size_t conversion: ints and objects with __index__/__int__; TypeError otherwise."""
    if isinstance(value, float) or value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{what}(): incompatible function arguments: {type(value).__name__} is not size_t")
    try:
        number = operator.index(value)
    except TypeError:
        if not hasattr(value, "__int__"):
            raise TypeError(f"{what}(): incompatible function arguments: {type(value).__name__}") from None
        number = int(value)
    if number < 0:
        raise TypeError(f"{what}(): incompatible function arguments: negative size_t")
    return number


# ---- TensorRT enums per version (values from the C++ headers, members from the pybind11 bindings) ----

DATA_TYPES = {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6, "BF16": 7,
              "INT64": 8, "INT4": 9}
DATA_TYPES_10_8_ON = {"FP4": 10, "E8M0": 11}  # present at v10.16 and v11.1, absent at v10.3.0

BUILDER_FLAGS = {
    "10.3": {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
             "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9,
             "PREFER_PRECISION_CONSTRAINTS": 10, "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12,
             "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16,
             "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20,
             "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23},
    "10.16": {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
              "SPARSE_WEIGHTS": 7, "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9,
              "PREFER_PRECISION_CONSTRAINTS": 10, "DIRECT_IO": 11, "REJECT_EMPTY_ALGORITHMS": 12,
              "VERSION_COMPATIBLE": 13, "EXCLUDE_LEAN_RUNTIME": 14, "FP8": 15, "ERROR_ON_TIMING_CACHE_MISS": 16,
              "BF16": 17, "DISABLE_COMPILATION_CACHE": 18, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20,
              "WEIGHT_STREAMING": 21, "INT4": 22, "REFIT_INDIVIDUAL": 23, "STRICT_NANS": 24, "MONITOR_MEMORY": 25,
              "FP4": 26, "EDITABLE_TIMING_CACHE": 27, "DISTRIBUTIVE_INDEPENDENCE": 28},
    "11.1": {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
             "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
             "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18,
             "REFIT_IDENTICAL": 19, "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23,
             "MONITOR_MEMORY": 24, "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27},
}
CREATION_FLAGS = {
    "10.3": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    "10.16": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3},
    "11.1": {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2},
}
MEMORY_POOLS = {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2, "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4,
                "TACTIC_SHARED_MEMORY": 5}
LAYER_TYPES = {"ACTIVATION": 2, "SOFTMAX": 6, "ELEMENTWISE": 9, "REDUCE": 14, "EINSUM": 38, "NORMALIZATION": 45}
ERROR_CODES = ["SUCCESS", "INTERNAL_ERROR", "MEM_ALLOC_FAILED", "MODEL_DESERIALIZE_FAILED", "INVALID_VALUE",
               "INVALID_GRAPH", "INVALID_NODE", "UNSUPPORTED_GRAPH", "UNSUPPORTED_NODE", "UNSUPPORTED_NODE_ATTR",
               "UNSUPPORTED_NODE_INPUT", "UNSUPPORTED_NODE_DATATYPE", "UNSUPPORTED_NODE_DYNAMIC",
               "UNSUPPORTED_NODE_SHAPE", "REFIT_FAILED"]
ONNX_LAYER = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "Einsum": "EINSUM",
              "ReduceMean": "REDUCE", "ReduceSum": "REDUCE", "Sigmoid": "ACTIVATION", "Relu": "ACTIVATION"}
SUPPORTED = {"LayerNormalization", "Softmax", "Einsum", "ReduceMean", "ReduceSum", "Sigmoid", "Relu", "Mul", "Add",
             "Expand", "Cast", "Constant", "Reshape"}

VARIANTS = {"10.3": "10.3.0.26", "10.16": "10.16.0.72", "11.1": "11.1.0.5"}


class _IntEnum(enum.Enum):
    """pybind11 enum: ``int()`` gives the value, ``str()`` is ``Type.NAME``, no equality with ints."""

    def __int__(self):
        return self.value

    def __index__(self):
        return self.value


def _enum(name: str, members: dict[str, int]):
    return _IntEnum(name, members)


def make_fake_trt(version: str = "10.3", heap: DeviceHeap | None = None, gpu: dict | None = None,
                  unsupported_op: str | None = None, lose_timing_cache: bool = False,
                  no_cuda: bool = False) -> types.ModuleType:
    """A ``tensorrt`` module of variant ``version`` ("10.3", "10.16" or "11.1"); calls logged in ``trt.log``.

    ``heap`` is the device memory ``execute_async_v3`` reads and writes; ``gpu`` the device the builder
    runs on (timing caches are tagged with its name); ``unsupported_op`` an ONNX op the parser rejects;
    ``lose_timing_cache`` makes ``get_timing_cache`` return None; ``no_cuda`` makes ``Builder`` and
    ``Runtime`` fail as pybind11 does when the C++ factory returns nullptr (TypeError).
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VARIANTS[version]
    trt.log = []
    trt.heap = heap if heap is not None else DeviceHeap()
    device = dict(gpu or GPU)
    v11 = version.startswith("11")

    DataType = _enum("DataType", {**DATA_TYPES, **({} if version == "10.3" else DATA_TYPES_10_8_ON)})
    BuilderFlag = _enum("BuilderFlag", BUILDER_FLAGS[version])
    NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", CREATION_FLAGS[version])
    MemoryPoolType = _enum("MemoryPoolType", MEMORY_POOLS)
    TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    LayerType = _enum("LayerType", LAYER_TYPES)

    class ErrorCode(_IntEnum):
        __str__ = lambda self: self.name  # noqa: E731 - pyonnx2trt::errorCodeStr
    ErrorCode = ErrorCode("ErrorCode", {n: i for i, n in enumerate(ERROR_CODES)})  # type: ignore[misc]

    numpy_of = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8}
    onnx_to_trt = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                   onnx.TensorProto.BFLOAT16: DataType.BF16, onnx.TensorProto.INT64: DataType.INT64}

    def nptype(trt_type):
        if trt_type in numpy_of:
            return numpy_of[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=1):
            self.min_severity = min_severity

    class ParserError:
        def __init__(self, code, node, name, op, desc):
            self._v = (code, node, name, op, desc)

        def code(self):
            return self._v[0]

        def node(self):
            return self._v[1]

        def node_name(self):
            return self._v[2]

        def node_operator(self):
            return self._v[3]

        def desc(self):
            return self._v[4]

    class Layer:
        def __init__(self, node):
            self.name = node.name or node.op_type
            self.type = getattr(LayerType, ONNX_LAYER.get(node.op_type, "ELEMENTWISE"))
            self.num_outputs = len(node.output)
            self._precision, self.output_types = None, {}

        @property
        def precision(self):
            return self._precision or DataType.FLOAT

        @precision.setter
        def precision(self, dtype):
            if not isinstance(dtype, DataType):
                raise TypeError("precision must be a tensorrt.DataType")
            self._precision = dtype

        def set_output_type(self, index, dtype):
            if not isinstance(dtype, DataType) or not 0 <= index < self.num_outputs:
                raise TypeError("set_output_type(index: int, dtype: tensorrt.DataType)")
            self.output_types[index] = dtype

    class Network:
        def __init__(self, flags):
            self.flags = flags
            bit = 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            self.strongly_typed = v11 or bool(flags & bit)
            self.model, self.layers = None, []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, index):
            return self.layers[index]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

        def parse(self, model, path=None):
            try:
                proto = onnx.load_from_string(bytes(model))
            except Exception:  # noqa: BLE001
                self.errors.append(ParserError(ErrorCode.MODEL_DESERIALIZE_FAILED, -1, "", "", "Failed to parse ONNX"))
                return False
            trt.log.append(("parse", path, {i.data_type for i in proto.graph.initializer}))
            for index, node in enumerate(proto.graph.node):
                if node.op_type == unsupported_op or node.op_type not in SUPPORTED:
                    self.errors.append(ParserError(ErrorCode.UNSUPPORTED_NODE, index, node.name, node.op_type,
                                                   f"No importer registered for op: {node.op_type}"))
                    return False
                self.network.layers.append(Layer(node))
            self.network.model = proto
            return True

    class TimingCache:
        def __init__(self, tag: str, entries: int):
            self.tag, self.entries = tag, entries

        def serialize(self):
            return memoryview(CACHE_MAGIC + json.dumps([self.tag, self.entries]).encode())

    class IProgressMonitor:
        """pybind11 trampoline (pyCore.cpp: ``py::init<>()``, phase_start / step_complete / phase_finish): a
        subclass that overrides ``__init__`` must call this one, or pybind11 refuses the instance."""

        def __init__(self):
            self._initialised = True

        def phase_start(self, phase_name, parent_phase, num_steps):
            raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phaseStart"')

        def step_complete(self, phase_name, step):
            raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::stepComplete"')

        def phase_finish(self, phase_name):
            raise RuntimeError('Tried to call pure virtual function "IProgressMonitor::phaseFinish"')

    class BuilderConfig:
        def __init__(self):
            self.flags, self.pool, self.cache = set(), {}, None
            self._monitor = None

        @property
        def progress_monitor(self):
            return self._monitor

        @progress_monitor.setter
        def progress_monitor(self, monitor):  # def_property(..., setProgressMonitor, keep_alive<1, 2>)
            if monitor is not None and not isinstance(monitor, IProgressMonitor):
                raise TypeError("(): incompatible function arguments: (arg0: tensorrt.IProgressMonitor)")
            if monitor is not None and not getattr(monitor, "_initialised", False):
                raise TypeError(f"{type(monitor).__name__}.__init__() must be called when overriding __init__")
            self._monitor = monitor

        def set_memory_pool_limit(self, pool, pool_size):
            if not isinstance(pool, MemoryPoolType):
                raise TypeError("set_memory_pool_limit(pool: tensorrt.MemoryPoolType, pool_size: int)")
            self.pool[pool] = size_t(pool_size, "set_memory_pool_limit")

        def set_flag(self, flag):
            if not isinstance(flag, BuilderFlag):
                raise TypeError("set_flag(flag: tensorrt.BuilderFlag)")
            self.flags.add(flag)

        def create_timing_cache(self, serialized_timing_cache):
            data = bytes(memoryview(serialized_timing_cache))
            trt.log.append(("create_timing_cache", data))
            if not data:
                return TimingCache(device["name"], 0)
            if not data.startswith(CACHE_MAGIC):
                return None  # not a timing cache: the C++ call returns nullptr
            tag, entries = json.loads(data[len(CACHE_MAGIC):])
            return TimingCache(tag, entries)

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, TimingCache):
                raise TypeError("set_timing_cache(cache: tensorrt.ITimingCache, ignore_mismatch: bool)")
            ok = ignore_mismatch or cache.tag == device["name"]
            trt.log.append(("set_timing_cache", cache.tag, bool(ignore_mismatch), ok))
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self):
            return None if lose_timing_cache else self.cache

    def _trampoline(monitor, method, *args):
        """PyProgressMonitor (pyCore.cpp): an exception from the Python override (any, KeyboardInterrupt too) is
        printed as "[ERROR] Exception caught in <method>()" and swallowed; step_complete then returns False."""
        try:
            return getattr(monitor, method)(*args)
        except BaseException as exc:  # noqa: BLE001 - C++ catch (...) around PYBIND11_OVERLOAD_PURE_NAME
            trt.log.append(("monitor_exception", method, type(exc).__name__))
            return False

    def _report_progress(monitor, network):
        """Phases as TensorRT reports them: a top-level phase, a nested one per layer's tactics; False: cancelled."""
        _trampoline(monitor, "phase_start", "Building engine", None, 2)
        try:
            if not _trampoline(monitor, "step_complete", "Building engine", 0):
                return False
            _trampoline(monitor, "phase_start", "Tactic selection", "Building engine", len(network.layers))
            try:
                for step in range(len(network.layers)):
                    if not _trampoline(monitor, "step_complete", "Tactic selection", step):
                        return False
            finally:
                _trampoline(monitor, "phase_finish", "Tactic selection")
            return bool(_trampoline(monitor, "step_complete", "Building engine", 1))
        finally:
            _trampoline(monitor, "phase_finish", "Building engine")

    def no_device():
        if no_cuda:
            raise TypeError("pybind11::init(): factory function returned nullptr")

    class Builder:
        def __init__(self, logger):
            no_device()
            self.logger = logger

        def create_network(self, flags=0):
            flags = size_t(flags, "create_network")
            trt.log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def build_serialized_network(self, network, config):
            if network.model is None:
                return None
            if network.strongly_typed and any(layer._precision or layer.output_types for layer in network.layers):
                trt.log.append(("error", "layer precision set on a strongly typed network"))
                return None
            fp16_flag = getattr(BuilderFlag, "FP16", None) in config.flags
            fp32_layers = sorted(layer.name for layer in network.layers
                                 if layer._precision == DataType.FLOAT
                                 and getattr(BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None) in config.flags)
            if config.progress_monitor is not None and not _report_progress(config.progress_monitor, network):
                trt.log.append(("error", "build cancelled by the progress monitor"))
                return None
            if config.cache is not None:
                config.cache.entries += len(network.layers)
            trt.log.append(("build", network.flags, sorted(f.name for f in config.flags),
                            {p.name: s for p, s in config.pool.items()}, fp32_layers))
            io = []
            for vi, mode in [(v, "INPUT") for v in network.model.graph.input] + \
                            [(v, "OUTPUT") for v in network.model.graph.output]:
                dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
                io.append([vi.name, mode, onnx_to_trt[vi.type.tensor_type.elem_type].name, dims])
            header = {"version": trt.__version__, "io": io, "fp16": fp16_flag or network.strongly_typed}
            return memoryview(ENGINE_MAGIC + json.dumps(header).encode())

    if not v11:
        Builder.platform_has_fast_fp16 = True

    class Engine:
        def __init__(self, io):
            self.io = [(n, getattr(TensorIOMode, m), getattr(DataType, t), tuple(d)) for n, m, t, d in io]
            self.num_io_tensors = len(self.io)

        def _t(self, name):
            for t in self.io:
                if t[0] == name:
                    return t
            raise KeyError(name)

        def get_tensor_name(self, index):
            return self.io[index][0]

        def get_tensor_mode(self, name):
            return self._t(name)[1] if any(t[0] == name for t in self.io) else TensorIOMode.NONE

        def get_tensor_dtype(self, name):
            return self._t(name)[2]

        def get_tensor_shape(self, name):
            return self._t(name)[3]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            shape = tuple(int(d) for d in shape)
            trt.log.append(("set_input_shape", name, shape))
            if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT or shape != self.engine.get_tensor_shape(name):
                return False  # static engine: only its own shape is inside the (single) profile
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name):
            return self.shapes.get(name, self.engine.get_tensor_shape(name))

        def set_tensor_address(self, name, memory):
            memory = size_t(memory, "set_tensor_address")
            trt.log.append(("set_tensor_address", name, memory))
            if self.engine.get_tensor_mode(name) == TensorIOMode.NONE:
                return False
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            stream_handle = size_t(stream_handle, "execute_async_v3")
            trt.log.append(("execute_async_v3", stream_handle))
            inputs = {t[0] for t in self.engine.io if t[1] == TensorIOMode.INPUT}
            if set(self.addresses) != {t[0] for t in self.engine.io} or set(self.shapes) != inputs:
                return False
            foreign = [n for n, ptr in self.addresses.items() if trt.heap.context_of(ptr) != PRIMARY]
            if trt.heap.stream_owner.get(stream_handle, PRIMARY) != PRIMARY:
                foreign.append("the stream")
            if foreign:  # TensorRT runs in the primary context: another context's handles are invalid there
                trt.log.append(("error", f"invalid resource handle: {foreign} belong to another CUDA context"))
                return False
            arrays = {n: trt.heap.view(self.addresses[n], nptype(dt), shape) for n, _, dt, shape in self.engine.io}
            if "points" in arrays:
                arrays["points"][...] = arrays["image"].mean()
            if "scores" in arrays:
                arrays["scores"][...] = 1.0 / (1.0 + np.exp(-arrays["grid2img"].sum()))
            return True

    class Runtime:
        def __init__(self, logger):
            no_device()
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            trt.log.append(("deserialize", len(data)))
            if not data.startswith(ENGINE_MAGIC):
                return None
            try:
                header = json.loads(data[len(ENGINE_MAGIC):])
            except ValueError:
                return None
            return Engine(header["io"]) if header["version"] == trt.__version__ else None

    for name, obj in dict(DataType=DataType, BuilderFlag=BuilderFlag, MemoryPoolType=MemoryPoolType,
                          NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, TensorIOMode=TensorIOMode,
                          LayerType=LayerType, ErrorCode=ErrorCode, Logger=Logger, OnnxParser=OnnxParser,
                          Builder=Builder, Runtime=Runtime, nptype=nptype, ParserError=ParserError,
                          IProgressMonitor=IProgressMonitor).items():
        setattr(trt, name, obj)
    for alias, member in dict(float32="FLOAT", float16="HALF", bfloat16="BF16", int8="INT8", int32="INT32",
                              int64="INT64", bool="BOOL", uint8="UINT8", fp8="FP8", int4="INT4").items():
        setattr(trt, alias, getattr(DataType, member))
    return trt


# ---- cuda-python runtime shim --------------------------------------------------------------------

class CudaRuntimeShim:
    """``cuda.bindings.runtime`` calls used by export.cuda_mem, emulated on a DeviceHeap.

    Returns what the real functions return: a tuple ``(cudaError_t, *results)``, with the real
    module's enums when ``real`` is given. With ``passthrough`` (only where no driver is present,
    so the real call cannot touch memory) every call is first made on the real function with the
    same arguments: a wrong argument type raises there exactly as it would on a robot.
    """

    def __init__(self, heap: DeviceHeap, real=None, passthrough: bool = False, gpu: dict | None = None,
                 fail: dict[str, str] | None = None):
        self.heap, self.real, self.passthrough = heap, real, passthrough
        self.gpu, self.fail = dict(gpu or GPU), dict(fail or {})
        self.calls: list[tuple] = []
        if real is not None:
            self.cudaError_t, self.cudaMemcpyKind = real.cudaError_t, real.cudaMemcpyKind
        else:
            self.cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2,
                                                             "cudaErrorInvalidValue": 1, "cudaErrorNoDevice": 100})
            self.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1,
                                                                   "cudaMemcpyDeviceToHost": 2})
        self.streams: set[int] = set()
        self.events: dict[int, int] = {}  # handle -> creation flags
        self.cudaEventBlockingSync, self.cudaEventDisableTiming = ((real.cudaEventBlockingSync, real.cudaEventDisableTiming)
                                                                   if real is not None else (1, 2))

    def _call(self, name, *args):
        self.calls.append((name, *args))
        if self.passthrough:
            real = getattr(self.real, name)(*args)
            assert isinstance(real, tuple) and isinstance(real[0], self.cudaError_t), (name, real)
        if name in self.fail:
            err = getattr(self.cudaError_t, self.fail[name])
            return True, err
        return False, self.cudaError_t.cudaSuccess

    def cudaSetDevice(self, device):
        failed, err = self._call("cudaSetDevice", device)
        return (err,)

    def cudaStreamCreate(self):
        failed, err = self._call("cudaStreamCreate")
        if failed:
            return err, None
        handle = STREAM + len(self.streams)
        self.streams.add(handle)
        self.heap.stream_owner[handle] = PRIMARY
        return err, (self.real.cudaStream_t(handle) if self.real is not None else handle)

    def cudaMalloc(self, size):
        failed, err = self._call("cudaMalloc", size)
        return (err, None) if failed else (err, self.heap.malloc(size_t(size, "cudaMalloc")))

    def cudaFree(self, dev_ptr):
        failed, err = self._call("cudaFree", dev_ptr)
        if not failed:
            self.heap.free(int(dev_ptr))
        return (err,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        failed, err = self._call("cudaMemcpyAsync", dst, src, count, kind, stream)
        if failed:
            return (err,)
        assert int(stream) in self.streams, "copy on a stream that was not created"
        count = size_t(count, "cudaMemcpyAsync")
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            region = self.heap.region(int(dst), count)
            region[...] = np.frombuffer(ctypes.string_at(int(src), count), np.uint8)
        elif kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost:
            region = self.heap.region(int(src), count)
            ctypes.memmove(int(dst), region.ctypes.data, count)
        else:
            raise AssertionError(f"unexpected cudaMemcpyKind {kind}")
        self.heap.log.append(("memcpy", int(kind), count))
        return (err,)

    def cudaStreamSynchronize(self, stream):
        failed, err = self._call("cudaStreamSynchronize", stream)
        return (err,)

    def cudaEventCreateWithFlags(self, flags):
        failed, err = self._call("cudaEventCreateWithFlags", flags)
        if failed:
            return err, None
        handle = EVENT + len(self.events)
        self.events[handle] = int(flags)
        return err, (self.real.cudaEvent_t(handle) if self.real is not None else handle)

    def cudaEventRecord(self, event, stream):
        failed, err = self._call("cudaEventRecord", event, stream)
        assert int(event) in self.events and int(stream) in self.streams, "record of an unknown event or stream"
        return (err,)

    def cudaEventSynchronize(self, event):
        failed, err = self._call("cudaEventSynchronize", event)
        assert int(event) in self.events, "wait on an unknown event"
        return (err,)

    def cudaEventDestroy(self, event):
        failed, err = self._call("cudaEventDestroy", event)
        self.events.pop(int(event), None)
        return (err,)

    def cudaStreamDestroy(self, stream):
        failed, err = self._call("cudaStreamDestroy", stream)
        self.streams.discard(int(stream))
        return (err,)

    def cudaGetDeviceProperties(self, device):
        failed, err = self._call("cudaGetDeviceProperties", device)
        major, minor = (int(x) for x in self.gpu["compute_capability"].split("."))
        props = types.SimpleNamespace(name=self.gpu["name"].encode() + b"\x00" * 8, major=major, minor=minor)
        return (err, None) if failed else (err, props)

    def cudaGetErrorString(self, error):
        if self.real is not None:
            return self.real.cudaGetErrorString(error)
        return self.cudaError_t.cudaSuccess, f"error {int(error)}".encode()


# ---- pycuda.driver double (documented API, not the real module) ---------------------------------

def make_fake_pycuda_driver(heap: DeviceHeap, gpu: dict | None = None) -> types.ModuleType:
    """A ``pycuda.driver`` double: per-thread context stacks, the Error hierarchy, async copies of whole buffers."""
    drv = types.ModuleType("pycuda.driver")
    gpu = dict(gpu or GPU)
    local = threading.local()
    drv.contexts: list = []  # made by make_context
    drv.primary = None  # the device's primary context, once retained

    class Error(Exception):
        pass

    class LogicError(Error):
        pass

    class MemoryError(Error):  # noqa: A001 - pycuda's name
        pass

    class LaunchError(Error):
        pass

    class RuntimeError(Error):  # noqa: A001 - pycuda's name
        pass

    def stack():
        if not hasattr(local, "stack"):
            local.stack = []
        return local.stack

    def current():
        if not stack():
            raise LogicError("explicit_context_dependent failed: invalid device context - no currently active context?")
        return stack()[-1]

    class Context:
        def __init__(self, primary: bool = False):
            self.refcount, self.detached, self.primary = 1, False, primary

        @property
        def owner(self):  # what the heap records for this context's allocations and streams
            return PRIMARY if self.primary else self

        def push(self):
            if self.detached:
                raise LogicError("cannot push a detached context")
            stack().append(self)

        @staticmethod
        def pop():
            if not stack():
                raise LogicError("context::pop: cannot pop non-current context")
            stack().pop()

        @staticmethod
        def get_current():
            return stack()[-1] if stack() else None

        def detach(self):
            if self in stack():
                stack().remove(self)
            self.refcount -= 1
            self.detached = self.refcount == 0

    class Device:
        def __init__(self, index):
            if not drv.initialised:
                raise LogicError("cuInit has not been called")
            if index != 0:
                raise LogicError("cuDeviceGet failed: invalid device ordinal")

        def make_context(self, flags=0):
            ctx = Context()
            drv.contexts.append(ctx)
            stack().append(ctx)
            return ctx

        def retain_primary_context(self):
            """The runtime API's context, reference counted; unlike make_context not made current."""
            if drv.primary is None or drv.primary.detached:
                drv.primary = Context(primary=True)
            else:
                drv.primary.refcount += 1
            return drv.primary

        def name(self):
            return gpu["name"]

        def compute_capability(self):
            return tuple(int(x) for x in gpu["compute_capability"].split("."))

    class DeviceAllocation:
        def __init__(self, nbytes):
            self.ctx = current()
            self.ptr = heap.malloc(nbytes, self.ctx.owner)

        def __int__(self):
            return self.ptr

        __index__ = __int__

        def free(self):
            current()
            heap.free(self.ptr)

    class Stream:
        def __init__(self, flags=0):
            self.ctx = current()
            self.handle = PYCUDA_STREAM + len(heap.stream_owner)
            heap.stream_owner[self.handle] = self.ctx.owner

        def synchronize(self):
            if current() is not self.ctx:
                raise LogicError("stream used outside its context")

    event_flags = types.SimpleNamespace(DEFAULT=0, BLOCKING_SYNC=1, DISABLE_TIMING=2, INTERPROCESS=4)

    class Event:  # documented: Event(flags=0), record(stream=None) and synchronize() return self
        def __init__(self, flags=0):
            self.ctx, self.flags = current(), flags
            drv.events.append(self)

        def record(self, stream=None):
            if current() is not self.ctx or (stream is not None and stream.ctx is not self.ctx):
                raise LogicError("event recorded outside its context")
            drv.event_log.append(("record", self.flags))
            return self

        def synchronize(self):
            if current() is not self.ctx:
                raise LogicError("event waited on outside its context")
            drv.event_log.append(("synchronize", self.flags))
            return self

    def init(flags=0):
        drv.initialised = True

    def mem_alloc(nbytes):
        return DeviceAllocation(nbytes)

    def memcpy_htod_async(dest, src, stream=None):
        current()
        data = np.frombuffer(memoryview(src).cast("B"), np.uint8)  # the whole host buffer, as pycuda does
        heap.region(int(dest), data.size)[...] = data
        heap.log.append(("htod", data.size))

    def memcpy_dtoh_async(dest, src, stream=None):
        current()
        out = memoryview(dest).cast("B")
        out[:] = heap.region(int(src), len(out)).tobytes()
        heap.log.append(("dtoh", len(out)))

    drv.initialised = False
    drv.events, drv.event_log = [], []
    for name, obj in dict(Error=Error, LogicError=LogicError, MemoryError=MemoryError, LaunchError=LaunchError,
                          RuntimeError=RuntimeError, Context=Context, Device=Device, Stream=Stream, Event=Event,
                          event_flags=event_flags, init=init,
                          mem_alloc=mem_alloc, memcpy_htod_async=memcpy_htod_async,
                          memcpy_dtoh_async=memcpy_dtoh_async).items():
        setattr(drv, name, obj)
    drv.context_stack = stack
    return drv
