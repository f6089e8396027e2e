"""TensorRT builder and backend against fakes that follow the real TensorRT 10.3 / 10.16 / 11.1 Python API.

The fake (tests/fake_tensorrt.py) is derived from NVIDIA/TensorRT's binding sources: enums with the
per-version members, ``set_input_shape`` / ``set_timing_cache`` returning False, ``get_timing_cache``
able to return None, ``nptype`` raising TypeError, ``size_t`` arguments. The backend runs on the real
``export.cuda_mem.CudaPythonMemory`` provider over a cuda-python runtime shim, so copies, pointers and
stream handles go through the same code as on a robot; the fake engine computes its outputs from the
bound device buffers, so a wrong pointer gives a wrong result.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import threading

import numpy as np
import onnx
import pytest
import tqdm
from fake_tensorrt import (
    CACHE_MAGIC,
    GPU,
    STREAM,
    VARIANTS,
    CudaRuntimeShim,
    DeviceHeap,
    make_fake_pycuda_driver,
    make_fake_trt,
)
from onnx import TensorProto, helper, numpy_helper

import export.backends.trt_backend as trt_backend_mod
import export.trt_build as trt_build_mod
from export import cli
from export.backends import create_backend, output_shapes
from export.backends.trt_backend import TensorRTBackend
from export.cuda_mem import CudaPythonMemory, PyCudaMemory
from export.fp16 import convert_file_to_fp16
from export.sidecar import read_sidecar, sha256_file, sidecar_path, write_sidecar
from export.trt_build import build_engine
from models.config import lite
from models.preprocess import NetworkInputs

Q, R = lite().decoder.num_queries, lite().decoder.num_refines[-1]  # output shape of the lite engine
ALL = list(VARIANTS)


class Machine:
    """One fake robot: a TensorRT variant, device memory and the cuda-python provider over it."""

    def __init__(self, monkeypatch, version="10.3", gpu=GPU, **trt_kwargs):
        self.heap = DeviceHeap()
        self.trt = make_fake_trt(version, heap=self.heap, gpu=gpu, **trt_kwargs)
        self.gpu = dict(gpu)
        self.providers: list[CudaPythonMemory] = []
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setattr(trt_backend_mod, "create_device_memory", self.memory)
        monkeypatch.setattr(trt_build_mod, "gpu_info", lambda: dict(self.gpu))

    def memory(self, prefer=None):
        mem = CudaPythonMemory(runtime=CudaRuntimeShim(self.heap, gpu=self.gpu))
        self.providers.append(mem)
        return mem

    def calls(self, name):
        return [c for c in self.trt.log if c[0] == name]


@pytest.fixture(params=ALL)
def machine(request, monkeypatch):
    return Machine(monkeypatch, request.param)


def _graph_model(out_type=TensorProto.FLOAT, image_hw=(192, 256), extra_op=None, weight=1.0, queries=Q, classes=11):
    w = numpy_helper.from_array(np.full((1, queries, R, 3), weight, np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, queries, R, classes], np.int64), "shape")
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=1, name="mean"),
             helper.make_node("Mul", ["m", "w"], ["points"], name="mul"),
             helper.make_node("Softmax", ["grid2img"], ["sm"], axis=-1, name="attn_softmax"),
             helper.make_node("ReduceSum", ["sm"], ["s"], keepdims=1, name="sum"),
             helper.make_node("Sigmoid", ["s"], ["sg"], name="sigmoid"),
             helper.make_node("Expand", ["sg", "shape"], ["e"], name="expand")]
    nodes.append(helper.make_node("Cast", ["e"], ["scores"], to=out_type, name="cast_out"))
    if extra_op:
        nodes.insert(0, helper.make_node(extra_op, ["image"], ["x"], name="fancy_node"))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, *image_hw]),
         helper.make_tensor_value_info("grid2img", TensorProto.FLOAT, [1, 4, 4])],
        [helper.make_tensor_value_info("points", TensorProto.FLOAT, [1, queries, R, 3]),
         helper.make_tensor_value_info("scores", out_type, [1, queries, R, classes])], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _write_onnx(path, config, **kwargs):
    onnx.save(_graph_model(**kwargs), str(path))
    write_sidecar(path, {"config": config.to_dict(), "class_names": ["empty"]})
    return path


@pytest.fixture()
def onnx_file(tmp_path, lite_config):
    """A tiny valid ONNX with the lite IO names/shapes, a Softmax and one float weight; sidecar with the config."""
    return _write_onnx(tmp_path / "model.onnx", lite_config)


def _frame(config, seed=0):
    rng = np.random.default_rng(seed)
    h, w = config.image_size
    return NetworkInputs(image=rng.standard_normal((1, 3, h, w)).astype(np.float32),
                       grid2img=rng.standard_normal((1, 4, 4)).astype(np.float32), depth=None,
                       voxel_origin=np.zeros(3))


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# ---- the fake itself follows the bindings --------------------------------------------------------

def test_fake_follows_the_binding_sources():
    t3, t16, t11 = (make_fake_trt(v) for v in ALL)
    assert int(t3.BuilderFlag.FP16) == 0 and int(t3.BuilderFlag.OBEY_PRECISION_CONSTRAINTS) == 9
    assert int(t16.BuilderFlag.FP16) == 0 and int(t16.BuilderFlag.EDITABLE_TIMING_CACHE) == 27
    assert not hasattr(t11.BuilderFlag, "FP16") and not hasattr(t11.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    assert int(t11.BuilderFlag.EDITABLE_TIMING_CACHE) == 26
    assert int(t3.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    assert int(t11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert hasattr(t16.Builder, "platform_has_fast_fp16") and not hasattr(t11.Builder, "platform_has_fast_fp16")
    assert not hasattr(t3.DataType, "FP4") and int(t16.DataType.FP4) == 10
    assert t3.TensorIOMode.INPUT != "INPUT" and int(t3.TensorIOMode.OUTPUT) == 2
    assert str(t3.DataType.HALF) == "DataType.HALF" and str(t3.ErrorCode.UNSUPPORTED_NODE) == "UNSUPPORTED_NODE"
    assert t3.nptype(t3.DataType.HALF) is np.float16
    for dt in (t3.DataType.BF16, t3.DataType.FP8, t3.DataType.INT4):
        with pytest.raises(TypeError):
            t3.nptype(dt)
    config = t3.Builder(t3.Logger()).create_builder_config()
    with pytest.raises(TypeError):
        config.set_flag("FP16")  # strings are not BuilderFlag
    foreign = config.create_timing_cache(CACHE_MAGIC + json.dumps(["NVIDIA A100", 5]).encode())
    assert config.set_timing_cache(foreign, False) is False and config.get_timing_cache() is None
    assert config.set_timing_cache(foreign, True) is True
    assert config.create_timing_cache(b"garbage") is None


# ---- building: precision policy per version ------------------------------------------------------

def test_fp32_build_writes_engine_sidecar_and_cache(machine, onnx_file, tmp_path):
    cache, engine = tmp_path / "timing.cache", tmp_path / "model.engine"
    side = build_engine(onnx_file, engine, workspace_mb=512, timing_cache=cache)
    (build,) = machine.calls("build")
    assert build[2] == [] and build[3] == {"WORKSPACE": 512 << 20}
    assert cache.read_bytes().startswith(CACHE_MAGIC) and GPU["name"] in cache.read_text()
    assert side == read_sidecar(engine) and side["precision"] == "fp32" and side["gpu"] == GPU
    assert side["source_onnx_sha256"] == sha256_file(onnx_file) and side["engine_sha256"] == sha256_file(engine)
    assert side["strongly_typed"] is (machine.trt.__version__.startswith("11"))
    machine.trt.log.clear()
    build_engine(onnx_file, engine, timing_cache=cache)  # second build reuses the saved cache
    assert ("set_timing_cache", GPU["name"], False, True) in machine.trt.log


def test_fp16_flag_path_pins_softmax_to_fp32_on_10_3(monkeypatch, onnx_file, tmp_path):
    m = Machine(monkeypatch, "10.3")
    side = build_engine(onnx_file, tmp_path / "m.engine", fp16=True)
    assert m.calls("create_network") == [("create_network", 0)]
    (build,) = m.calls("build")
    assert build[2] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and build[4] == ["attn_softmax"]
    assert side["strongly_typed"] is False and side["fp32_pinned_layers"] == 1 and side["precision"] == "fp16"


@pytest.mark.parametrize("version,flags", [("10.16", 1 << 1), ("11.1", 0)])
def test_fp16_strongly_typed_from_fp16_onnx_from_10_12(monkeypatch, onnx_file, tmp_path, version, flags):
    m = Machine(monkeypatch, version)
    side = build_engine(onnx_file, tmp_path / "m.engine", fp16=True)
    # 1 << int(STRONGLY_TYPED) on 10.x; nothing on 11.x, where the (deprecated) flag is ignored
    assert m.calls("create_network") == [("create_network", flags)]
    (build,) = m.calls("build")
    assert build[2] == [] and build[4] == []  # no FP16 builder flag, no layer precisions
    (parse,) = m.calls("parse")
    assert parse[1].endswith("model.fp16.onnx") and TensorProto.FLOAT16 in parse[2]
    assert side["strongly_typed"] is True and side["built_from"] == "model.fp16.onnx"


def test_strongly_typed_works_on_10_3_and_flag_path_still_on_10_16(monkeypatch, onnx_file, tmp_path):
    m = Machine(monkeypatch, "10.3")
    assert build_engine(onnx_file, tmp_path / "a.engine", fp16=True, strongly_typed=True)["strongly_typed"]
    assert m.calls("create_network") == [("create_network", 1 << 1)]
    m = Machine(monkeypatch, "10.16")
    side = build_engine(onnx_file, tmp_path / "b.engine", fp16=True, strongly_typed=False)
    assert side["strongly_typed"] is False and m.calls("build")[0][2] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]


def test_flag_path_on_tensorrt_11_is_refused_in_one_line(monkeypatch, onnx_file, tmp_path):
    m = Machine(monkeypatch, "11.1")
    with pytest.raises(ValueError, match="no builder FP16 flag") as exc:
        build_engine(onnx_file, tmp_path / "m.engine", fp16=True, strongly_typed=False)
    _one_line(exc)
    assert not m.calls("build") and not (tmp_path / "m.engine").exists()


# ---- timing cache, atomic writes, CUDA binding first ---------------------------------------------

@pytest.mark.parametrize("cache_bytes", [CACHE_MAGIC + json.dumps(["NVIDIA A100", 7]).encode(), b"\x00corrupt"],
                         ids=["foreign", "corrupt"])
def test_foreign_or_corrupt_timing_cache_falls_back_and_engine_is_not_rebuilt_again(
        machine, onnx_file, tmp_path, cache_bytes):
    cache, engine = tmp_path / "timing.cache", tmp_path / "model.engine"
    cache.write_bytes(cache_bytes)
    build_engine(onnx_file, engine, timing_cache=cache)
    assert ("set_timing_cache", GPU["name"], False, True) in machine.trt.log  # fresh cache attached
    assert json.loads(cache.read_bytes()[len(CACHE_MAGIC):])[0] == GPU["name"]  # rewritten for this GPU
    machine.trt.log.clear()
    TensorRTBackend(engine).close()
    assert not machine.calls("build")  # sidecar current: no rebuild at the next start


def test_missing_timing_cache_after_build_keeps_engine_and_sidecar(monkeypatch, onnx_file, tmp_path):
    Machine(monkeypatch, "10.3", lose_timing_cache=True)
    cache, engine = tmp_path / "timing.cache", tmp_path / "model.engine"
    cache.write_bytes(b"old")
    side = build_engine(onnx_file, engine, timing_cache=cache)
    assert read_sidecar(engine) == side and cache.read_bytes() == b"old"


def test_failed_build_leaves_previous_engine_sidecar_and_cache(monkeypatch, onnx_file, tmp_path, lite_config):
    Machine(monkeypatch, "10.3")
    cache, engine = tmp_path / "timing.cache", tmp_path / "model.engine"
    build_engine(onnx_file, engine, timing_cache=cache)
    before = {p: p.read_bytes() for p in (engine, tmp_path / "model.engine.json", cache)}
    _write_onnx(onnx_file, lite_config, extra_op="FancyOp")
    with pytest.raises(RuntimeError) as exc:
        build_engine(onnx_file, engine, timing_cache=cache)
    text = _one_line(exc)
    assert "node 0 'fancy_node' (FancyOp)" in text and "[UNSUPPORTED_NODE]" in text and "FancyOp" in text
    assert {p: p.read_bytes() for p in before} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_no_cuda_binding_is_found_before_building(monkeypatch, onnx_file, tmp_path):
    m = Machine(monkeypatch, "10.3")

    def no_binding():
        raise ImportError("the tensorrt backend needs CUDA device memory from one of: ...")

    monkeypatch.setattr(trt_build_mod, "gpu_info", no_binding)
    with pytest.raises(ImportError):
        build_engine(onnx_file, tmp_path / "m.engine")
    assert not m.calls("build") and not m.calls("create_network") and not list(tmp_path.glob("m.engine*"))


# ---- stale engines -------------------------------------------------------------------------------

def test_reexported_onnx_rebuilds_the_engine_or_is_refused(machine, onnx_file, tmp_path, lite_config):
    engine = tmp_path / "model.engine"
    create_backend("tensorrt", onnx_file).close()  # first use builds
    assert len(machine.calls("build")) == 1
    create_backend("tensorrt", onnx_file).close()  # current: reused
    assert len(machine.calls("build")) == 1
    model = _graph_model()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((1, Q, R, 3), 2, np.float32), "w"))
    onnx.save(model, str(onnx_file))  # re-exported with new weights
    with pytest.raises(RuntimeError, match="changed since the engine was built.*Rebuilding is disabled") as exc:
        TensorRTBackend(engine, rebuild=False)
    _one_line(exc)
    create_backend("tensorrt", onnx_file).close()
    assert len(machine.calls("build")) == 2
    assert read_sidecar(engine)["source_onnx_sha256"] == sha256_file(onnx_file)


def test_precision_change_rebuilds(machine, onnx_file, tmp_path):
    create_backend("tensorrt", onnx_file).close()
    backend = create_backend("tensorrt", onnx_file, fp16=True)
    assert len(machine.calls("build")) == 2 and read_sidecar(tmp_path / "model.engine")["precision"] == "fp16"
    backend.close()
    with pytest.raises(RuntimeError, match="engine precision is fp16, fp32 was requested"):
        TensorRTBackend(tmp_path / "model.engine", fp16=False, rebuild=False)


def test_fp16_onnx_with_fp32_requested_builds_once_and_says_so(machine, onnx_file, tmp_path, lite_config, caplog):
    half = convert_file_to_fp16(onnx_file, tmp_path / "half.onnx")
    write_sidecar(half, {"config": lite_config.to_dict()})
    for _ in range(2):  # two starts of a node with the default fp16=False
        with caplog.at_level(logging.INFO, logger="export"):
            create_backend("tensorrt", half, fp16=False).close()
    assert len(machine.calls("build")) == 1 and read_sidecar(tmp_path / "half.engine")["precision"] == "fp16"
    said = [r for r in caplog.records if "is an FP16 ONNX" in r.getMessage()]
    assert len(said) == 2  # one line per start
    TensorRTBackend(tmp_path / "half.engine", fp16=False, rebuild=False).close()  # the engine given directly


@pytest.mark.parametrize("change, says", [({"config": [1, 2]}, "'config' must be a JSON object, got \\[1, 2\\]"),
                                          ({"config": {"num_classes": 11.0}}, "invalid 'config': .*'num_classes'"),
                                          ({"engine_sha256": 5}, "'engine_sha256' must be a JSON string"),
                                          ({"workspace_mb": "4096"}, "'workspace_mb' must be a JSON integer"),
                                          ({"gpu": "Orin"}, "'gpu' must be a JSON object")])
def test_malformed_engine_sidecar_is_a_value_error_naming_it(machine, onnx_file, tmp_path, change, says):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    write_sidecar(engine, dict(read_sidecar(engine), **change))
    for make in (lambda: TensorRTBackend(engine), lambda: create_backend("tensorrt", onnx_file)):
        with pytest.raises(ValueError, match=f"sidecar .*model.engine.json.*{says}") as exc:
            make()
        _one_line(exc)
    assert machine.heap.allocs == {}


def test_upper_case_onnx_suffix_is_an_onnx_and_no_engine_is_written_over_a_model(machine, onnx_file, tmp_path):
    upper = tmp_path / "MODEL.ONNX"
    upper.write_bytes(onnx_file.read_bytes())
    sidecar_path(upper).write_bytes(sidecar_path(onnx_file).read_bytes())
    before = upper.read_bytes()
    create_backend("tensorrt", upper).close()
    assert (tmp_path / "MODEL.engine").is_file() and read_sidecar(tmp_path / "MODEL.engine")["source_onnx"] == "MODEL.ONNX"
    with pytest.raises(ValueError, match="MODEL.ONNX is an ONNX model, not an engine"):
        TensorRTBackend(upper)  # its sidecar read as an engine's would have it rebuilt from model.onnx, over it
    with pytest.raises(ValueError, match="refusing to write a TensorRT engine to .*MODEL.ONNX"):
        build_engine(onnx_file, upper)
    with pytest.raises(ValueError, match="refusing to write a TensorRT engine to .*model.onnx"):
        build_engine(onnx_file, onnx_file)
    assert upper.read_bytes() == before and len(machine.calls("build")) == 1


def test_engine_runs_with_its_own_config_and_onnx_without_one_is_refused_before_building(
        machine, tmp_path, lite_config, caplog):
    path = tmp_path / "model.onnx"
    onnx.save(_graph_model(), str(path))  # exported elsewhere, its sidecar left behind
    with pytest.raises(ValueError, match="no model config for .*model.onnx: its sidecar model.onnx.json is missing"):
        create_backend("tensorrt", path)
    assert not machine.calls("build") and not (tmp_path / "model.engine").exists()
    backend = create_backend("tensorrt", path, config=lite_config)  # a config given: built and run with it
    assert len(machine.calls("build")) == 1 and backend.config == lite_config
    backend.close()
    _write_onnx(path, lite_config, weight=2.0)  # re-exported with its sidecar: rebuilt, config recorded
    given = dataclasses.replace(lite_config, score_threshold=0.3)
    with caplog.at_level("WARNING", logger="export.backends"):
        backend = create_backend("tensorrt", path, config=given)
    assert backend.config == lite_config and "its sidecar model.engine.json" in caplog.text
    backend.close()


def test_engine_replaced_without_its_sidecar_is_detected(machine, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    engine.write_bytes(engine.read_bytes() + b" ")  # e.g. copied from elsewhere, sidecar left behind
    onnx_file.unlink()
    with pytest.raises(RuntimeError, match="not the engine its sidecar describes.*No ONNX model") as exc:
        TensorRTBackend(engine)
    _one_line(exc)
    assert all(p.stream is None for p in machine.providers)  # refused engine: memory released


def test_engine_for_other_gpu_is_rebuilt_from_onnx_beside_it(machine, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    write_sidecar(engine, dict(read_sidecar(engine), gpu={"name": "NVIDIA A100", "compute_capability": "8.0"}))
    machine.trt.log.clear()
    TensorRTBackend(engine).close()
    assert machine.calls("build") and read_sidecar(engine)["gpu"] == GPU


def test_engine_for_other_tensorrt_without_onnx_is_refused(machine, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    write_sidecar(engine, dict(read_sidecar(engine), tensorrt_version="8.6.1"))
    onnx_file.unlink()
    with pytest.raises(RuntimeError, match="TensorRT 8.6.1.*No ONNX model model.onnx beside it"):
        TensorRTBackend(engine)
    with pytest.raises(RuntimeError, match="Rebuilding is disabled"):
        TensorRTBackend(engine, rebuild=False)


def test_tensorrt_without_usable_cuda_is_one_line(monkeypatch, onnx_file, tmp_path):
    Machine(monkeypatch, "10.3")
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    m = Machine(monkeypatch, "10.3", no_cuda=True)
    with pytest.raises(RuntimeError, match="could not create a runtime") as exc:
        TensorRTBackend(engine)
    _one_line(exc)
    assert all(p.stream is None for p in m.providers)


def test_corrupt_engine_is_refused(machine, onnx_file, tmp_path):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    (tmp_path / "model.engine.json").unlink()
    engine.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="could not deserialise.*corrupt") as exc:
        TensorRTBackend(engine, config=lite())
    _one_line(exc)


# ---- running: binding, validation, dtypes --------------------------------------------------------

def test_backend_binds_every_tensor_and_runs_on_the_stream(machine, onnx_file, tmp_path, lite_config):
    engine = tmp_path / "model.engine"
    build_engine(onnx_file, engine)
    machine.trt.log.clear()
    backend = create_backend("tensorrt", engine)  # config from the engine sidecar
    addresses = {c[1]: c[2] for c in machine.calls("set_tensor_address")}
    assert set(addresses) == {"image", "grid2img", "points", "scores"} and len(set(addresses.values())) == 4
    for name, ptr in addresses.items():
        assert type(ptr) is int and ptr == backend.buffers[name].ptr
        assert machine.heap.allocs[ptr].size == backend.buffers[name].nbytes
    assert ("set_input_shape", "image", (1, 3, 192, 256)) in machine.trt.log
    frame = _frame(lite_config)
    shim = machine.providers[-1].rt
    shim.calls.clear()
    out = backend.infer(frame)
    assert ("execute_async_v3", STREAM) in machine.trt.log
    copies = [c for c in machine.heap.log if c[0] == "memcpy"]
    assert copies[:2] == [("memcpy", 1, frame.image.nbytes), ("memcpy", 1, frame.grid2img.nbytes)]
    # between the uploads and the downloads the host sleeps on a blocking-sync event, not spinning in a copy
    order = [(c[0], int(c[4]) if c[0] == "cudaMemcpyAsync" else None) for c in shim.calls]
    to_host = int(shim.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    to_device = int(shim.cudaMemcpyKind.cudaMemcpyHostToDevice)
    assert order[:4] == [("cudaMemcpyAsync", to_device)] * 2 + [("cudaEventRecord", None), ("cudaEventSynchronize", None)]
    assert [c for c in order[4:] if c[0] == "cudaMemcpyAsync"] == [("cudaMemcpyAsync", to_host)] * 2
    (flags,) = shim.events.values()
    assert flags == shim.cudaEventBlockingSync | shim.cudaEventDisableTiming
    shapes = output_shapes(lite_config)
    assert out["points"].shape == shapes["points"] and out["scores"].shape == shapes["scores"]
    np.testing.assert_allclose(out["points"], frame.image.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["scores"], 1 / (1 + np.exp(-frame.grid2img.sum())), rtol=1e-5)
    backend.close()
    assert machine.heap.allocs == {}  # every buffer freed


def test_pycuda_memory_runs_in_the_primary_context_tensorrt_uses(machine, onnx_file, tmp_path, lite_config,
                                                                 monkeypatch):
    """TensorRT runs in the device's primary context: buffers or a stream from a pycuda context of its own
    (``make_context``) are invalid handles there, and the fake's execute_async_v3 refuses them as a GPU would."""
    drv = make_fake_pycuda_driver(machine.heap)
    monkeypatch.setattr(trt_backend_mod, "create_device_memory", lambda prefer=None: PyCudaMemory(driver=drv))
    build_engine(onnx_file, tmp_path / "model.engine")
    backend = TensorRTBackend(tmp_path / "model.engine", memory="pycuda")
    frame, result = _frame(lite_config), {}

    def infer():  # on another thread, as the node's worker does
        try:
            result["out"] = backend.infer(frame)
        except RuntimeError as exc:
            result["error"] = exc

    worker = threading.Thread(target=infer)
    worker.start()
    worker.join()
    assert "error" not in result, result.get("error")
    np.testing.assert_allclose(result["out"]["points"], frame.image.mean(), rtol=1e-5)
    backend.close()
    assert drv.contexts == [] and drv.primary.detached and machine.heap.allocs == {}

    drv.init()
    private = drv.Device(0).make_context()  # what a context of pycuda's own gives TensorRT
    context = machine.trt.Runtime(machine.trt.Logger()).deserialize_cuda_engine(
        (tmp_path / "model.engine").read_bytes()).create_execution_context()
    for name in ("image", "grid2img", "points", "scores"):
        context.set_tensor_address(name, int(drv.mem_alloc(1 << 20)))
        if name in ("image", "grid2img"):
            context.set_input_shape(name, context.engine.get_tensor_shape(name))
    assert context.execute_async_v3(drv.Stream().handle) is False
    assert machine.calls("error")[-1][1].startswith("invalid resource handle")
    private.detach()


def test_infer_after_close_is_a_clear_error(machine, onnx_file, lite_config):
    backend = create_backend("tensorrt", onnx_file)
    backend.close()
    with pytest.raises(RuntimeError, match="the tensorrt backend was closed; create a new one") as exc:
        backend.infer(_frame(lite_config))
    _one_line(exc)
    assert not machine.calls("execute_async_v3")


def test_wrong_frame_is_refused_before_any_copy(machine, onnx_file, tmp_path, lite_config):
    backend = create_backend("tensorrt", onnx_file)
    machine.heap.log.clear()
    frame = _frame(lite_config)
    frame.image = frame.image[:, :, :96]
    with pytest.raises(ValueError, match="input 'image' has shape") as exc:
        backend.infer(frame)
    _one_line(exc)
    assert machine.heap.log == [] and not machine.calls("execute_async_v3")
    backend.close()


def test_engine_for_another_input_size_is_refused_by_set_input_shape(machine, tmp_path, lite_config):
    path = _write_onnx(tmp_path / "model.onnx", lite_config, image_hw=(96, 128))
    with pytest.raises(ValueError, match="engine rejects input 'image' of shape") as exc:
        create_backend("tensorrt", path)
    _one_line(exc)
    assert ("set_input_shape", "image", (1, 3, 192, 256)) in machine.trt.log
    assert machine.heap.allocs == {}


@pytest.mark.parametrize("graph, says", [({"queries": Q // 2}, rf"output 'points' is \[1, {Q // 2}, {R}, 3\]"),
                                         ({"classes": 5}, rf"output 'scores' is \[1, {Q}, {R}, 5\]")])
def test_engine_of_another_config_is_refused_at_load(machine, tmp_path, lite_config, graph, says):
    path = _write_onnx(tmp_path / "model.onnx", lite_config, **graph)  # the ONNX of another model, lite's sidecar
    with pytest.raises(ValueError, match=f"model.engine: {says} in the engine but .* for config 'lite' from its "
                                         "sidecar model.engine.json") as exc:
        create_backend("tensorrt", path)
    _one_line(exc)
    assert machine.heap.allocs == {} and not machine.calls("execute_async_v3")


def test_output_without_numpy_dtype_is_a_clear_error(machine, tmp_path, lite_config):
    path = _write_onnx(tmp_path / "model.onnx", lite_config, out_type=TensorProto.BFLOAT16)
    with pytest.raises(ValueError, match="'scores' has type DataType.BF16, which has no numpy equivalent") as exc:
        create_backend("tensorrt", path)
    _one_line(exc)


# ---- command line: one clear line in every case --------------------------------------------------

def _cli_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_cli_trt_shows_the_builds_phases_as_progress_bars(machine, monkeypatch, capsys, onnx_file, tmp_path):
    """TensorRT's progress monitor (a build takes minutes on a Jetson): a bar per phase, nested ones below it
    (and cleared when done), each run to its last step and closed; --no-progress attaches none."""
    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    out = str(tmp_path / "m.engine")
    assert cli.main(["trt", "--onnx", str(onnx_file), "--out", out]) == 0
    layers = len(onnx.load(str(onnx_file)).graph.node)
    assert [(b.desc, b.n, b.total, abs(b.pos), b.leave) for b in bars] == [
        ("Building engine", 2, 2, 0, True), ("Tactic selection", layers, layers, 1, False)]
    assert all(b.disable for b in bars)  # tqdm's close() sets it: every bar was closed
    assert re.search(r"Building engine: 100%.*2/2", capsys.readouterr().err)
    bars.clear()
    assert cli.main(["trt", "--onnx", str(onnx_file), "--out", out, "--no-progress"]) == 0
    assert not bars and "Building engine" not in capsys.readouterr().err
    assert not machine.calls("monitor_exception")  # the binding would have printed and swallowed them


def test_ctrl_c_during_a_build_cancels_it_and_writes_nothing(machine, monkeypatch, capsys, onnx_file, tmp_path):
    """Python runs the SIGINT handler inside the monitor's calls; TensorRT's binding catches what they raise and
    prints it, so the build ran on (phase_start, phase_finish) or was cancelled without a word (step_complete)
    and failed as 'TensorRT failed to build'. The monitor cancels the build and the command ends as Ctrl-C does."""

    class CtrlCOnTheThirdStep(tqdm.tqdm):
        def update(self, n=1):
            if self.desc == "Tactic selection" and self.n == 2:
                raise KeyboardInterrupt
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", CtrlCOnTheThirdStep)
    out = tmp_path / "m.engine"
    assert cli.main(["trt", "--onnx", str(onnx_file), "--out", str(out)]) == 130
    assert "discene-export trt: interrupted (Ctrl-C); nothing written" in capsys.readouterr().err
    assert not out.exists() and not sidecar_path(out).exists() and not machine.calls("monitor_exception")
    assert ("error", "build cancelled by the progress monitor") in machine.trt.log


def test_a_progress_monitor_must_initialise_its_binding(machine):
    with pytest.raises(TypeError, match="must be called when overriding __init__"):
        class Uninitialised(machine.trt.IProgressMonitor):
            def __init__(self):
                pass
        machine.trt.Builder(machine.trt.Logger()).create_builder_config().progress_monitor = Uninitialised()


def test_cli_trt_fails_with_one_line(monkeypatch, capsys, onnx_file, tmp_path, lite_config):
    out = str(tmp_path / "m.engine")
    m = Machine(monkeypatch, "11.1")
    line = _cli_error(capsys, ["trt", "--onnx", str(onnx_file), "--out", out, "--fp16", "--strongly-typed", "no"])
    assert "no builder FP16 flag" in line
    huge = _write_onnx(tmp_path / "huge.onnx", lite_config, weight=1e6)  # beyond the FP16 range
    line = _cli_error(capsys, ["trt", "--onnx", str(huge), "--out", out, "--fp16"])
    assert "could not convert" in line and "beyond the FP16 range" in line
    monkeypatch.setattr(trt_build_mod, "gpu_info", lambda: (_ for _ in ()).throw(ImportError("no CUDA binding")))
    assert "no CUDA binding" in _cli_error(capsys, ["trt", "--onnx", str(onnx_file), "--out", out])
    monkeypatch.setattr(trt_build_mod, "gpu_info", lambda: dict(m.gpu))
    bad = _write_onnx(tmp_path / "bad.onnx", lite_config, extra_op="FancyOp")
    assert "(FancyOp)" in _cli_error(capsys, ["trt", "--onnx", str(bad), "--out", out])
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe not protobuf")
    assert "not a readable ONNX" in _cli_error(capsys, ["trt", "--onnx", str(tmp_path / "junk.onnx"), "--out", out])
    assert "not found" in _cli_error(capsys, ["trt", "--onnx", str(tmp_path / "none.onnx"), "--out", out])
    Machine(monkeypatch, "10.16", no_cuda=True)
    assert "could not create a builder (no usable GPU" in _cli_error(capsys, ["trt", "--onnx", str(onnx_file),
                                                                            "--out", out])
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    assert "needs the Python package 'tensorrt'" in _cli_error(capsys, ["trt", "--onnx", str(onnx_file), "--out", out])
    assert not (tmp_path / "m.engine").exists()
