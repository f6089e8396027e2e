"""Backend selection, input validation, provider choice, clear errors for bad files and missing packages."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from export.backends import create_backend, input_feed, input_shapes, output_shapes
from export.backends.ort_backend import select_providers
from export.backends.torch_backend import TorchBackend
from export.sidecar import read_sidecar, sha256_state_dict, sidecar_path, write_sidecar
from models.preprocess import FrameInputs


def _frame(config, depth=False, seed=0):
    rng = np.random.default_rng(seed)
    shapes = input_shapes(config)
    h, w = config.image_size
    return FrameInputs(image=rng.standard_normal(shapes["image"]).astype(np.float32),
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


def test_torch_backend_fp16_needs_cuda(lite_model, lite_config):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        TorchBackend(lite_model, lite_config, device="cpu", fp16=True)


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
