"""TensorRT builder and backend against the TensorRT 10 Python API contract, with a recording fake module.

The fake enforces what the real API requires: the parser fills a network created with the right flags,
the timing cache is created from the file's bytes and attached before building, every IO tensor gets
``set_tensor_address`` with a buffer of the right size before ``execute_async_v3``, which must get the
stream handle; outputs are computed from the bound input buffers, so wrong pointers give wrong results.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.backends.trt_backend as trt_backend_mod
import export.trt_build as trt_build_mod
from export.backends import create_backend, output_shapes
from export.backends.trt_backend import TensorRTBackend
from export.sidecar import read_sidecar, sha256_file, write_sidecar
from export.trt_build import build_engine
from models.config import lite
from models.preprocess import FrameInputs

Q, R = lite().decoder.num_queries, lite().decoder.num_refines[-1]  # output shape of the lite engine

ENGINE_MAGIC = b"FAKE-TRT-ENGINE:"
GPU = {"name": "Fake Orin", "compute_capability": "8.7"}
STREAM = 0xC0FFEE


class FakeMemory:
    """Device memory: pointers index numpy arrays, copies are recorded."""

    name = "fake"

    def __init__(self, gpu=GPU):
        self.arrays: dict[int, np.ndarray] = {}
        self.next_ptr = 0x1000
        self.gpu = dict(gpu)
        self.calls: list[tuple] = []

    def alloc(self, shape, dtype):
        from export.cuda_mem import DeviceBuffer

        arr = np.zeros(shape, dtype)
        ptr = self.next_ptr
        self.next_ptr += arr.nbytes + 256
        self.arrays[ptr] = arr
        return DeviceBuffer(ptr, arr.nbytes, tuple(shape), np.dtype(dtype), arr)

    def upload(self, buf, host):
        self.calls.append(("upload", buf.ptr))
        self.arrays[buf.ptr][...] = host

    def download(self, buf):
        self.calls.append(("download", buf.ptr))
        return self.arrays[buf.ptr].copy()

    def stream_handle(self):
        return STREAM

    def synchronize(self):
        self.calls.append(("sync",))

    def gpu_info(self):
        return dict(self.gpu)

    def close(self):
        self.calls.append(("close",))


def make_fake_trt(version="10.3.0", memory=None, parse_ok=True):
    """A ``tensorrt`` module double recording calls in ``trt.log``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.log = []
    trt.memory = memory

    class Logger:
        WARNING, VERBOSE = "WARNING", "VERBOSE"

        def __init__(self, severity):
            self.severity = severity

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class BuilderFlag:
        FP16 = "FP16"

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return memoryview(self.data + b"+timings")

    class ParserError:
        def code(self):
            return "UNSUPPORTED_NODE"

        def node(self):
            return 3

        def desc(self):
            return "No importer registered for op: FancyOp"

    class Network:
        def __init__(self, flags):
            self.flags, self.parsed = flags, None

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse(self, data, path):
            model = onnx.load_from_string(bytes(data))  # the parser gets the serialised model bytes
            trt.log.append(("parse", path, {i.data_type for i in model.graph.initializer}))
            if not parse_ok:
                self.num_errors = 1
                return False
            self.network.parsed = model
            return True

        def get_error(self, i):
            return ParserError()

    class BuilderConfig:
        def __init__(self):
            self.flags, self.pool, self.cache = set(), {}, None

        def set_memory_pool_limit(self, pool, size):
            self.pool[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def create_timing_cache(self, data):
            trt.log.append(("create_timing_cache", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            assert ignore_mismatch is False
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            trt.log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return BuilderConfig()

        def build_serialized_network(self, network, config):
            assert network.parsed is not None, "build before a successful parse"
            assert config.cache is not None, "timing cache not attached"
            trt.log.append(("build", network.flags, sorted(config.flags), dict(config.pool)))
            return memoryview(ENGINE_MAGIC + version.encode())

    class Engine:
        io = [("image", "INPUT"), ("grid2img", "INPUT"), ("points", "OUTPUT"), ("scores", "OUTPUT")]

        def __init__(self):
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return self.io[i][0]

        def get_tensor_mode(self, name):
            return dict(self.io)[name]

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def create_execution_context(self):
            return Context()

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            trt.log.append(("set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            if name in ("points", "scores"):
                return (1, Q, R, 3) if name == "points" else (1, Q, R, 11)
            return self.shapes[name]

        def set_tensor_address(self, name, ptr):
            trt.log.append(("set_tensor_address", name, ptr))
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            trt.log.append(("execute_async_v3", stream_handle))
            mem = trt.memory
            for name, _ in Engine.io:
                assert name in self.addresses, f"no address bound for {name}"
            assert set(self.shapes) == {"image", "grid2img"}
            image, g = mem.arrays[self.addresses["image"]], mem.arrays[self.addresses["grid2img"]]
            mem.arrays[self.addresses["points"]][...] = image.mean()
            mem.arrays[self.addresses["scores"]][...] = 1.0 / (1.0 + np.exp(-g.sum()))
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            trt.log.append(("deserialize", bytes(data[:len(ENGINE_MAGIC)])))
            return Engine() if bytes(data).startswith(ENGINE_MAGIC) else None

    def nptype(dtype):
        return {"FLOAT": np.float32, "HALF": np.float16}[dtype]

    for obj in (Logger, TensorIOMode, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag, OnnxParser,
                Builder, Runtime, nptype):
        setattr(trt, obj.__name__, obj)
    return trt


@pytest.fixture()
def fake(monkeypatch):
    """Install a fake tensorrt (10.3) and fake device memory; returns the module."""
    memory = FakeMemory()
    trt = make_fake_trt(memory=memory)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend_mod, "create_device_memory", lambda prefer=None: memory)
    monkeypatch.setattr(trt_build_mod, "gpu_info", lambda: dict(memory.gpu))
    return trt


@pytest.fixture()
def onnx_file(tmp_path, lite_config):
    """A tiny valid ONNX with the lite IO names/shapes and one float weight; sidecar with the config."""
    w = numpy_helper.from_array(np.ones((1, Q, R, 3), np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=1),
             helper.make_node("Mul", ["m", "w"], ["points"]),
             helper.make_node("ReduceSum", ["grid2img"], ["s"], keepdims=1),
             helper.make_node("Sigmoid", ["s"], ["sg"]),
             helper.make_node("Expand", ["sg", "shape"], ["scores"])]
    shape = numpy_helper.from_array(np.array([1, Q, R, 11], np.int64), "shape")
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 192, 256]),
         helper.make_tensor_value_info("grid2img", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("points", TensorProto.FLOAT, [1, Q, R, 3]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, Q, R, 11])], [w, shape])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    write_sidecar(path, {"config": lite_config.to_dict(), "class_names": ["empty"]})
    return path


def _frame(config, seed=0):
    rng = np.random.default_rng(seed)
    h, w = config.image_size
    return FrameInputs(image=rng.standard_normal((1, 3, h, w)).astype(np.float32),
                       grid2img=rng.standard_normal((1, 4, 4)).astype(np.float32), depth=None,
                       voxel_origin=np.zeros(3))


def test_build_fp16_flag_path_before_10_12_with_timing_cache(fake, onnx_file, tmp_path):
    cache = tmp_path / "timing.cache"
    engine = tmp_path / "model.engine"
    side = build_engine(onnx_file, engine, fp16=True, workspace_mb=512, timing_cache=cache)
    build = [c for c in fake.log if c[0] == "build"][0]
    assert build[1] == 0 and build[2] == ["FP16"] and build[3] == {"WORKSPACE": 512 << 20}
    assert ("create_timing_cache", b"") in fake.log  # no cache file yet: empty cache
    assert cache.read_bytes() == b"+timings"
    assert engine.read_bytes() == ENGINE_MAGIC + b"10.3.0"
    assert side == read_sidecar(engine)
    assert side["tensorrt_version"] == "10.3.0" and side["gpu"] == GPU and side["precision"] == "fp16"
    assert side["source_onnx_sha256"] == sha256_file(onnx_file) and side["strongly_typed"] is False
    assert side["config"]["name"] == "lite"
    fake.log.clear()
    build_engine(onnx_file, engine, fp16=True, timing_cache=cache)  # second build reuses the saved cache
    assert ("create_timing_cache", b"+timings") in fake.log


def test_build_strongly_typed_fp16_onnx_from_10_12(monkeypatch, onnx_file, tmp_path):
    trt = make_fake_trt(version="10.13.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_build_mod, "gpu_info", lambda: GPU)
    side = build_engine(onnx_file, tmp_path / "m.engine", fp16=True)
    assert ("create_network", 1 << 1) in trt.log  # 1 << int(STRONGLY_TYPED)
    build = [c for c in trt.log if c[0] == "build"][0]
    assert build[2] == []  # no deprecated FP16 builder flag
    parse = [c for c in trt.log if c[0] == "parse"][0]
    assert parse[1].endswith("model.fp16.onnx") and TensorProto.FLOAT16 in parse[2]
    assert side["strongly_typed"] is True and side["built_from"] == "model.fp16.onnx"


def test_parse_errors_are_reported(monkeypatch, onnx_file, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(parse_ok=False))
    with pytest.raises(RuntimeError, match=r"(?s)could not parse.*UNSUPPORTED_NODE\] node 3: .*FancyOp"):
        build_engine(onnx_file, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_corrupt_onnx_refused_by_builder(fake, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not protobuf")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        build_engine(bad, tmp_path / "m.engine")


def test_backend_binds_every_tensor_and_runs_on_the_stream(fake, onnx_file, tmp_path, lite_config):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    fake.log.clear()
    backend = create_backend("tensorrt", engine)  # config from the engine sidecar
    mem = fake.memory
    addresses = {c[1]: c[2] for c in fake.log if c[0] == "set_tensor_address"}
    assert set(addresses) == {"image", "grid2img", "points", "scores"}
    for name, ptr in addresses.items():
        assert ptr == backend.buffers[name].ptr and mem.arrays[ptr].shape == backend.buffers[name].shape
    assert len(set(addresses.values())) == 4
    assert ("set_input_shape", "image", (1, 3, 192, 256)) in fake.log
    assert ("set_input_shape", "grid2img", (1, 4, 4)) in fake.log
    frame = _frame(lite_config)
    out = backend.infer(frame)
    assert ("execute_async_v3", STREAM) in fake.log
    assert mem.calls.index(("upload", addresses["image"])) < mem.calls.index(("download", addresses["points"]))
    shapes = output_shapes(lite_config)
    assert out["points"].shape == shapes["points"] and out["scores"].shape == shapes["scores"]
    np.testing.assert_allclose(out["points"], frame.image.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["scores"], 1 / (1 + np.exp(-frame.grid2img.sum())), rtol=1e-5)
    backend.close()
    assert ("close",) in mem.calls


def test_engine_for_other_gpu_is_rebuilt_from_onnx_beside_it(fake, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    side = read_sidecar(engine)
    write_sidecar(engine, dict(side, gpu={"name": "NVIDIA A100", "compute_capability": "8.0"}))
    fake.log.clear()
    TensorRTBackend(engine)
    assert any(c[0] == "build" for c in fake.log)
    assert read_sidecar(engine)["gpu"] == GPU


def test_engine_for_other_tensorrt_without_onnx_is_refused(fake, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    write_sidecar(engine, dict(read_sidecar(engine), tensorrt_version="8.6.1"))
    onnx_file.unlink()
    with pytest.raises(RuntimeError, match="TensorRT 8.6.1.*No ONNX model model.onnx beside it"):
        TensorRTBackend(engine)
    with pytest.raises(RuntimeError, match="Rebuilding is disabled"):
        TensorRTBackend(engine, rebuild=False)


def test_corrupt_engine_is_refused(fake, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    engine.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="could not deserialise.*corrupt"):
        TensorRTBackend(engine)
