"""Backend selection, input validation, provider choice, clear errors for bad files and missing packages."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from export.backends import create_backend, input_feed, input_shapes, output_shapes
from export.backends.ort_backend import select_providers
from export.backends.torch_backend import TorchBackend
from export.sidecar import read_sidecar, sha256_state_dict, sidecar_path, write_sidecar
from models.preprocess import NetworkInputs


def _frame(config, depth=False, seed=0):
    rng = np.random.default_rng(seed)
    shapes = input_shapes(config)
    h, w = config.image_size
    return NetworkInputs(image=rng.standard_normal(shapes["image"]).astype(np.float32),
                       grid2img=np.eye(4, dtype=np.float32)[None],
                       depth=rng.uniform(0.5, 3, (1, 1, h, w)).astype(np.float32) if depth else None,
                       voxel_origin=np.zeros(3))


def test_unknown_backend_name_lists_choices(lite_config):
    with pytest.raises(ValueError, match="unknown backend 'openvino'.*onnxruntime.*tensorrt.*torch"):
        create_backend("openvino", "model.xml", config=lite_config)


def test_torch_backend_contract(lite_model, lite_config):
    backend = TorchBackend(lite_model, lite_config, device="cpu")
    out = backend.infer(_frame(lite_config))
    shapes = output_shapes(lite_config)
    assert set(out) == {"points", "scores"}
    for name, arr in out.items():
        assert arr.dtype == np.float32 and arr.shape == shapes[name]
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
    assert backend.name == "torch" and backend.device == "cpu"
    backend.close()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", "mps", "cuda:-1", "CPU", ""])
def test_a_device_string_of_another_form_is_a_value_error_with_the_accepted_forms(device):
    from models.device import resolve_device

    with pytest.raises(ValueError, match=r"use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_torch_backend_fp16_needs_cuda(lite_model, lite_config):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        TorchBackend(lite_model, lite_config, device="cpu", fp16=True)


def test_a_cuda_device_the_machine_lacks_is_a_clear_error(monkeypatch):
    """device 'cuda:1' on a one-GPU robot (a config copied from another machine): a ValueError the node
    reports as 'cannot start', not a CUDA 'invalid device ordinal' traceback on the first upload."""
    from models.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="has 1 CUDA device"):
        resolve_device("cuda:1")


def test_input_validation_names_the_problem(lite_config):
    frame = _frame(lite_config)
    frame.image = frame.image[:, :, :64]
    with pytest.raises(ValueError, match="input 'image' has shape"):
        input_feed(frame, lite_config)
    depth_cfg = type(lite_config).from_dict(dict(lite_config.to_dict(), use_depth=True))
    with pytest.raises(ValueError, match="needs input 'depth'"):
        input_feed(_frame(depth_cfg), depth_cfg)
    assert set(input_feed(_frame(depth_cfg, depth=True), depth_cfg)) == {"image", "grid2img", "depth"}


def test_provider_selection_order_aliases_and_error():
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(None, available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(["tensorrt", "cpu"], available) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        select_providers(["tensorrt"], ["CPUExecutionProvider"])


def test_provider_log_names_requested_and_used_and_warns_for_a_missing_gpu_provider(tmp_path, lite_config, caplog):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present: nothing is missing")
    path = tmp_path / "m.onnx"
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": _constant_onnx(path, lite_config)})
    with caplog.at_level("INFO", logger="export.backends.ort_backend"):
        create_backend("onnxruntime", path, providers=["cuda", "cpu"])
        create_backend("onnxruntime", path, providers=["cpu"])
    (warned, told) = [r for r in caplog.records if r.name == "export.backends.ort_backend"]
    assert warned.levelname == "WARNING" and "requested providers ['CUDAExecutionProvider', 'CPUExecutionProvider'], " \
        "using ['CPUExecutionProvider']: ['CUDAExecutionProvider'] not available" in warned.getMessage()
    assert told.levelname == "INFO" and "requested providers ['CPUExecutionProvider'], using" in told.getMessage()


def test_fp16_on_a_provider_that_ignores_it_is_warned(tmp_path, lite_config, caplog):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "m.onnx"
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": _constant_onnx(path, lite_config)})
    with caplog.at_level("WARNING", logger="export.backends.ort_backend"):
        create_backend("onnxruntime", path, providers=["cpu"])
        assert not caplog.records
        create_backend("onnxruntime", path, providers=["cpu"], fp16=True)
    (warned,) = caplog.records
    assert "fp16=True is applied only by onnxruntime's TensorRT provider; on CPUExecutionProvider, m.onnx runs at " \
        "the precision it was exported in" in warned.getMessage()


def test_missing_onnxruntime_names_the_package(monkeypatch, tmp_path, lite_config):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ImportError, match="'onnxruntime'.*pip install onnxruntime"):
        create_backend("onnxruntime", tmp_path / "m.onnx", config=lite_config)


def test_missing_tensorrt_names_the_package(monkeypatch, tmp_path, lite_config):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (tmp_path / "m.engine").write_bytes(b"x")
    with pytest.raises(ImportError, match="'tensorrt'"):
        create_backend("tensorrt", tmp_path / "m.engine", config=lite_config)
    from export.trt_build import build_engine

    with pytest.raises(ImportError, match="'tensorrt'"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


def test_corrupt_onnx_is_refused(tmp_path, lite_config):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    with pytest.raises(ValueError, match="could not load.*corrupt"):
        create_backend("onnxruntime", bad, config=lite_config, providers=["cpu"])


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        create_backend("torch", bad)


@pytest.mark.parametrize("backend, name, match", [
    ("onnxruntime", "lite_distilled.pt", "lite_distilled.pt is a PyTorch checkpoint, but the onnxruntime backend runs "
                                         "an ONNX model: choose backend torch, or export it with `discene-export onnx "
                                         "--checkpoint .*lite_distilled.pt --out lite_distilled.onnx`"),
    ("tensorrt", "model.PTH", "model.PTH is a PyTorch checkpoint, but the tensorrt backend runs a TensorRT engine or "
                              "an ONNX model: choose backend torch"),
    ("torch", "lite.onnx", "lite.onnx is an ONNX model, but the torch backend runs a PyTorch checkpoint: choose "
                           "backend onnxruntime or tensorrt, or give the checkpoint it was exported from"),
    ("torch", "lite.engine", "lite.engine is a TensorRT engine.*choose backend tensorrt,"),
    ("onnxruntime", "lite.plan", "lite.plan is a TensorRT engine, but the onnxruntime backend runs an ONNX model: "
                                 "choose backend tensorrt"),
])
def test_a_model_file_of_another_backend_is_refused_with_what_to_do(tmp_path, lite_config, backend, name, match):
    """The node's ``model`` and ``backend`` parameters mixed up: the error names the file's kind and the fix, not
    an unpickling or sidecar error; the file exists and is not read."""
    path = tmp_path / name
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match=match):
        create_backend(backend, path, config=lite_config)


def test_missing_files_and_config(tmp_path, lite_config):
    with pytest.raises(FileNotFoundError):
        create_backend("torch", tmp_path / "none.pt")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="sidecar m.onnx.json is missing"):
        create_backend("onnxruntime", tmp_path / "m.onnx")


def test_sidecar_roundtrip_and_corrupt_sidecar(tmp_path):
    art = tmp_path / "model.onnx"
    assert sidecar_path(art).name == "model.onnx.json"
    assert read_sidecar(art) is None
    write_sidecar(art, {"opset": 17})
    assert read_sidecar(art) == {"opset": 17}
    sidecar_path(art).write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sidecar(art)


@pytest.mark.parametrize("change, says", [
    ({"config": None}, r" has an invalid 'config': 'model' must be a mapping, got NoneType"),
    ({"config": [1, 2]}, r" has an invalid 'config': 'model' must be a mapping, got list"),
    ({"config": {"name": "lite", "num_classes": "11"}}, r" has an invalid 'config': .*'num_classes' must be an int"),
    ({"onnx_sha256": 5}, r": 'onnx_sha256' must be a JSON string, got 5"),
])
def test_malformed_onnx_sidecar_is_a_value_error_naming_it(tmp_path, lite_config, change, says):
    path = tmp_path / "m.onnx"
    sha = _constant_onnx(path, lite_config)
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": sha, **change})
    with pytest.raises(ValueError, match=f"sidecar {tmp_path / 'm.onnx.json'}{says}"):
        create_backend("onnxruntime", path, providers=["cpu"])


def test_weights_hash_tracks_values_not_object_identity(lite_model):
    state = {k: v.clone() for k, v in lite_model.state_dict().items()}
    h = sha256_state_dict(state)
    assert h == sha256_state_dict(lite_model.state_dict())
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = state[first] + 1e-3
    assert sha256_state_dict(state) != h


def test_pipeline_accepts_postprocess_overrides_but_not_network_changes(lite_model, lite_config):
    from export.pipeline import OccupancyPipeline

    backend = TorchBackend(lite_model, lite_config, device="cpu")
    tuned = type(lite_config).from_dict(dict(lite_config.to_dict(), score_threshold=0.3, closing=True))
    assert OccupancyPipeline(backend, tuned).config.score_threshold == 0.3
    other = type(lite_config).from_dict(dict(lite_config.to_dict(), image_size=[96, 128]))
    with pytest.raises(ValueError, match="image_size"):
        OccupancyPipeline(backend, other)


def test_static_buffer_replay_matches_eager_and_reuses_its_buffers(lite_model, lite_config):
    """cuda_graph on the CPU: static input/output buffers, eager forward; same numbers as eager."""
    from models.preprocess import TensorPreprocessor

    eager = TorchBackend(lite_model, lite_config, device="cpu")
    static = TorchBackend(lite_model, lite_config, device="cpu", cuda_graph=True, compile=True)
    assert static.mode == "static" and "CPU stays eager" in static.describe()
    frames = [_frame(lite_config), _frame(lite_config)]
    frames[1].grid2img = frames[1].grid2img * np.float32(1.01)
    outs = []
    for frame in frames:
        ref, got = eager.infer(frame), static.infer(frame)
        for name in ("points", "scores"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)
        outs.append(got)
    assert not np.allclose(outs[0]["points"], outs[1]["points"])  # the first result was not overwritten
    (entry,) = static.runner.entries.values()
    assert entry.replays == 2  # one entry for the one input shape, replayed per frame
    pts, _ = static.run(frames[0])
    assert pts.data_ptr() == entry.outputs[0].data_ptr()
    # device tensors from the TensorPreprocessor go straight in (no numpy round trip)
    k = np.array([[577.0, 0, 319.5], [0, 577.0, 239.5], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    pose[2, 3] = 1.2
    tensors = TensorPreprocessor(lite_config)(np.full((480, 640, 3), 90, np.uint8), k, pose)
    np.testing.assert_allclose(static.run(tensors)[0].numpy(), eager.run(tensors)[0].numpy(), rtol=1e-5, atol=1e-6)
    assert entry.replays == 4


def test_forward_builds_no_host_tensor(lite_model, lite_config):
    """No tensor is made from host data inside forward (a host-to-device copy on CUDA, which breaks
    CUDA graph capture) and nothing is read back to the host (a sync)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    frame = _frame(lite_config)
    image, g2i = torch.from_numpy(frame.image), torch.from_numpy(frame.grid2img)
    with torch.no_grad(), Record() as rec:
        lite_model(image, g2i)
    assert len(rec.ops) > 100
    bad = [op for op in rec.ops if "lift_fresh" in op or "_local_scalar_dense" in op or "aten.item" in op]
    assert not bad, bad
    with Record() as probe:  # the detector sees what it is meant to catch
        g2i.new_tensor([1.0, 2.0])
        g2i.sum().item()
    assert any("lift_fresh" in op for op in probe.ops) and any("_local_scalar_dense" in op for op in probe.ops)


def _flags() -> tuple[bool, bool, bool]:
    return torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture()
def restore_cudnn_flags():
    saved = _flags()
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cudnn_benchmark_option_reaches_the_backend_and_does_nothing_on_the_cpu(lite_config, restore_cudnn_flags):
    backend = create_backend("torch", None, config=lite_config, device="cpu", cuda_graph=True, cudnn_benchmark=True)
    assert "cudnn_benchmark requested but the device is the CPU: no effect" in backend.describe()
    assert backend.cudnn_benchmark is False  # what runs: the flag only acts on CUDA
    plain = create_backend("torch", None, config=lite_config, device="cpu")
    assert plain.cudnn_benchmark is False and "cudnn" not in plain.describe()
    for outside in (False, True):  # the CPU backend and the option off both leave the global flag alone
        torch.backends.cudnn.benchmark = outside
        for b in (backend, plain):
            with b._context():
                assert torch.backends.cudnn.benchmark is outside
            assert torch.backends.cudnn.benchmark is outside


def test_context_sets_and_restores_cudnn_benchmark_around_every_run(lite_model, lite_config, restore_cudnn_flags):
    """With the option in force (as on CUDA; the flags themselves need no GPU), cudnn.benchmark is on
    in every forward of the backend (static-buffer build and replay, eager) and restored after,
    also when the forward raises; the TF32 flags are set and restored beside it."""
    seen: list[tuple[bool, bool, bool]] = []
    hook = lite_model.register_forward_pre_hook(lambda *_: seen.append(_flags()))
    try:
        for cuda_graph in (True, False):
            backend = TorchBackend(lite_model, lite_config, device="cpu", cuda_graph=cuda_graph, tf32=True)
            backend.cudnn_benchmark = True  # what __init__ sets on a CUDA device
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            seen.clear()
            backend.infer(_frame(lite_config))
            backend.infer(_frame(lite_config, seed=1))
            assert seen and all(s == (True, True, True) for s in seen), seen
            assert _flags() == (False, False, False)
    finally:
        hook.remove()
    torch.backends.cudnn.benchmark = True
    with pytest.raises(RuntimeError, match="boom"), backend._context():
        raise RuntimeError("boom")
    assert _flags() == (True, False, False)  # restored to what it was, not switched off


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tf32_and_cudnn_benchmark_capture_and_agreement(lite_model, lite_config, restore_cudnn_flags):
    """On CUDA: the flags are on while the graph is warmed up and captured, restored after; the
    TF32 / cudnn.benchmark agreement rows run and count label agreement against IEEE FP32."""
    from export.fp16 import torch_variant_agreement

    seen: list[tuple[bool, bool, bool]] = []
    torch.backends.cudnn.benchmark = False
    hook = lite_model.register_forward_pre_hook(lambda *_: seen.append(_flags()))
    try:
        backend = TorchBackend(lite_model, lite_config, device="cuda", cuda_graph=True, tf32=True, cudnn_benchmark=True)
        out = backend.infer(_frame(lite_config))
        backend.close()
    finally:
        hook.remove()
    assert seen and all(s == (True, True, True) for s in seen) and np.isfinite(out["points"]).all()
    assert _flags()[0] is False
    frames = [_frame(lite_config, seed=s) for s in (0, 1)]
    for variant in ("tf32", "tf32_convolutions", "cudnn_benchmark", "tf32_cudnn_benchmark"):
        row = torch_variant_agreement(lite_model, lite_config, frames, "test", variant)
        assert row["variant"] == variant and row["frames"] == 2 and 0.0 <= row["label_agreement"] <= 1.0
    assert "TF32 + cudnn.benchmark" in row["runtime"] and "(TF32 off)" in row["reference"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("option", ["tf32", "tf32_convolutions"])
def test_cuda_tf32_stays_off_with_fp16(lite_model, lite_config, restore_cudnn_flags, option):
    """fp16 + tf32 (or tf32_convolutions): TF32 off while the autocast graph runs (its float32 geometry stays
    IEEE), said in describe()."""
    seen: list[tuple[bool, bool, bool]] = []
    hook = lite_model.register_forward_pre_hook(lambda *_: seen.append(_flags()))
    try:
        backend = TorchBackend(lite_model, lite_config, device="cuda", fp16=True, cuda_graph=True, **{option: True})
        backend.infer(_frame(lite_config))
        backend.close()
    finally:
        hook.remove()
    assert seen and not any(s[1] or s[2] for s in seen)
    assert backend.tf32 is False and backend.tf32_convolutions is False
    assert f"{option} requested with fp16: off" in backend.describe() and backend.device == "cuda fp16"


def test_tf32_on_the_cpu_is_said_to_do_nothing(lite_model, lite_config):
    backend = TorchBackend(lite_model, lite_config, device="cpu", tf32=True)
    assert "tf32 requested but the device is the CPU: no effect" in backend.describe()
    backend = TorchBackend(lite_model, lite_config, device="cpu", tf32_convolutions=True)
    assert "tf32_convolutions requested but the device is the CPU: no effect" in backend.describe()
    assert backend.device == "cpu"  # the label names a TF32 mode only where it runs


@pytest.mark.parametrize("options, expected, math", [
    ({}, (False, False), "ieee"),
    ({"tf32_convolutions": True}, (True, False), "tf32 convolutions"),  # PyTorch's own default FP32
    ({"tf32": True}, (True, True), "tf32"),
    ({"tf32": True, "tf32_convolutions": True}, (True, True), "tf32"),
])
def test_tf32_modes_set_the_convolution_and_matmul_flags_in_every_forward(
        lite_model, lite_config, restore_cudnn_flags, options, expected, math):
    """IEEE, TF32 convolutions only, or TF32 for both: the two flags inside every forward (set as on CUDA;
    setting them needs no GPU), the previous values restored after."""
    seen: list[tuple[bool, bool]] = []
    hook = lite_model.register_forward_pre_hook(lambda *_: seen.append(_flags()[1:]))
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = (not expected[0], not expected[1])
    try:
        backend = TorchBackend(lite_model, lite_config, device="cpu", cuda_graph=True, **options)
        backend.infer(_frame(lite_config))
    finally:
        hook.remove()
    assert seen and all(s == expected for s in seen), seen
    assert _flags()[1:] == (not expected[0], not expected[1])
    assert backend.fp32_math == math


def _constant_onnx(path, config, image_hw=None, num_classes=None, input_type=None, batch=1):
    """A graph with the export's input and output names whose outputs are constants, at ``config``'s shapes
    unless ``image_hw`` / ``num_classes`` say otherwise, inputs of ``input_type`` (default float32) and
    batch ``batch`` (a string: a symbolic dim); returns its sha256."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export.sidecar import sha256_file

    h, w = image_hw or config.image_size
    shapes = output_shapes(config)
    scores = (*shapes["scores"][:-1], num_classes or config.num_classes)
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.zeros(shape, np.float32)))
             for name, shape in (("points", shapes["points"]), ("scores", scores))]
    kind = input_type or TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", kind, [batch, 3, h, w]),
                                           helper.make_tensor_value_info("grid2img", kind, [batch, 4, 4])],
                              [helper.make_tensor_value_info("points", TensorProto.FLOAT, list(shapes["points"])),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, list(scores))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what torch's opset-17 export writes; the onnx package's default can be newer than ORT reads
    onnx.save(model, str(path))
    return sha256_file(path)


@pytest.mark.parametrize("graph, says", [({"image_hw": (96, 128)}, r"'image' is \[1, 3, 96, 128\] in the graph but "
                                                                     r"\[1, 3, 192, 256\]"),
                                         ({"num_classes": 5}, r"'scores' is \[1, .*, 5\] in the graph but .*, 11\]")])
def test_onnx_whose_sidecar_config_disagrees_with_the_graph_is_refused_at_load(tmp_path, lite_config, graph, says):
    path = tmp_path / "m.onnx"
    sha = _constant_onnx(path, lite_config, **graph)
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": sha})
    with pytest.raises(ValueError, match=f"m.onnx: {says} for config 'lite' from its sidecar m.onnx.json"):
        create_backend("onnxruntime", path, providers=["cpu"])


def test_onnx_with_another_input_size_behind_a_symbolic_batch_is_refused_at_load(tmp_path, lite_config):
    path = tmp_path / "m.onnx"
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": _constant_onnx(path, lite_config, batch="N")})
    assert create_backend("onnxruntime", path, providers=["cpu"]).infer(_frame(lite_config))  # symbolic batch: fine
    sha = _constant_onnx(path, lite_config, image_hw=(96, 128), batch="N")
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": sha})
    with pytest.raises(ValueError, match=r"m.onnx: 'image' is \['N', 3, 96, 128\] in the graph but \[1, 3, 192, 256\]"):
        create_backend("onnxruntime", path, providers=["cpu"])


def test_onnx_whose_inputs_are_not_float32_is_refused_at_load(tmp_path, lite_config):
    from onnx import TensorProto

    path = tmp_path / "m.onnx"
    sha = _constant_onnx(path, lite_config, input_type=TensorProto.FLOAT16)
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": sha})
    with pytest.raises(ValueError, match=r"m.onnx: input 'image' is tensor\(float16\), the pipeline feeds float32"):
        create_backend("onnxruntime", path, providers=["cpu"])


def test_a_given_config_never_overrides_the_model_files_own_on_any_backend(tmp_path, lite_model, lite_config, caplog):
    import dataclasses

    from models.checkpoint import save_model

    given = dataclasses.replace(lite_config, score_threshold=0.3)  # e.g. the named config, not the trained one
    save_model(tmp_path / "m.pt", lite_model, lite_config)
    path = tmp_path / "m.onnx"
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": _constant_onnx(path, lite_config)})
    with caplog.at_level("WARNING", logger="export.backends"):
        backends = [create_backend("torch", tmp_path / "m.pt", config=given, device="cpu"),
                    create_backend("onnxruntime", path, config=given, providers=["cpu"])]
    assert [b.config.score_threshold for b in backends] == [lite_config.score_threshold] * 2
    said = [r.getMessage() for r in caplog.records if "differs from" in r.getMessage()]
    assert len(said) == 2 and all("in ['score_threshold']; using the model file's own" in m for m in said)
    assert "the checkpoint m.pt" in said[0] and "its sidecar m.onnx.json" in said[1]
    sidecar_path(path).unlink()  # no config of its own: the given one is what it runs with
    assert create_backend("onnxruntime", path, config=given, providers=["cpu"]).config.score_threshold == 0.3


def test_infer_after_close_is_a_clear_error(tmp_path, lite_model, lite_config):
    path = tmp_path / "m.onnx"
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": _constant_onnx(path, lite_config)})
    backends = [TorchBackend(lite_model, lite_config, device="cpu"),
                TorchBackend(lite_model, lite_config, device="cpu", cuda_graph=True),  # static buffers
                create_backend("onnxruntime", path, providers=["cpu"])]
    for backend in backends:
        backend.infer(_frame(lite_config))
        backend.close()
        backend.close()  # twice is fine
        with pytest.raises(RuntimeError, match=f"the {backend.name} backend was closed; create a new one"):
            backend.infer(_frame(lite_config))


def test_onnx_replaced_without_its_sidecar_is_refused(tmp_path, lite_config):
    path = tmp_path / "m.onnx"
    sha = _constant_onnx(path, lite_config)
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": sha})
    backend = create_backend("onnxruntime", path, providers=["cpu"])  # the pair as exported: loads and runs
    assert backend.infer(_frame(lite_config))["scores"].shape == output_shapes(lite_config)["scores"]
    write_sidecar(path, {"config": lite_config.to_dict(), "onnx_sha256": "0" * 64})
    with pytest.raises(ValueError, match="m.onnx is not the ONNX its sidecar m.onnx.json describes.*re-export"):
        create_backend("onnxruntime", path, providers=["cpu"])
