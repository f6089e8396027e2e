"""Real lite export: ONNX graph, sidecar, onnxruntime-vs-torch parity, FP16 companion, pipeline, CLI."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

import models
from export.backends import create_backend
from export.cli import main as cli_main
from export.onnx_export import example_frame, export_onnx
from export.op_check import check_model
from export.pipeline import OccupancyPipeline
from export.sidecar import read_sidecar, sha256_file, sha256_state_dict
from models import native_postprocess
from models.checkpoint import save_model
from models.classes import CLASS_NAMES
from models.postprocess import labels_batch

# Parity tolerances enforced on the lite export (float32 ORT CPU vs eager torch CPU).
MAX_ABS_DIFF_FP32 = 2e-4        # scores, and points in normalised grid units (2e-4 * 4.8 m ~ 1 mm)
MAX_ABS_DIFF_FP32_ANY = 5e-3   # any single value, ill-conditioned queries included
MIN_QUERY_AGREEMENT_FP32 = 0.98  # queries whose every value is within MAX_ABS_DIFF_FP32
MIN_LABEL_AGREEMENT_FP32 = 0.999  # voxel labels over the voxels either backend marks occupied
MAX_POINTS_DIFF_FP16 = 0.05       # normalised grid units: 0.05 * 4.8 m = 0.24 m worst point
MIN_LABEL_AGREEMENT_FP16 = 0.99


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A lite model whose class heads predict occupancy (random weights would predict p=0.01 everywhere),
    saved as a checkpoint and exported with its FP16 companion."""
    config = models.load_config("lite")
    torch.manual_seed(1)
    model = models.build_model(config).eval()
    with torch.no_grad():
        for layer in model.decoder.layers:
            head = layer.cls_head[-1]
            head.weight.normal_(0.0, 0.5)
            head.bias.fill_(0.5)
    root = tmp_path_factory.mktemp("export")
    ckpt = root / "lite_test.pt"
    save_model(ckpt, model, config)
    out = root / "lite.onnx"
    sidecar = export_onnx("lite", out, checkpoint=ckpt, fp16=True)
    return {"config": config, "model": model, "ckpt": ckpt, "onnx": out, "sidecar": sidecar}


def test_onnx_graph_inputs_outputs_and_opset(exported):
    m = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(m, full_check=True)
    assert [(i.domain, i.version) for i in m.opset_import if i.domain in ("", "ai.onnx")] == [("", 17)]
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(m.graph.input) + list(m.graph.output)}
    q, r = exported["config"].decoder.num_queries, exported["config"].decoder.num_refines[-1]
    assert dims == {"image": [1, 3, 192, 256], "grid2img": [1, 4, 4], "points": [1, q, r, 3], "scores": [1, q, r, 11]}


def test_lite_export_has_no_tensorrt_flags(exported):
    report = check_model(exported["onnx"])
    assert report.ok, report.summary()
    assert ("", "GridSample") in report.ops  # per-level 2-D sampling is in the graph, and accepted as 4-D
    from export.op_check import _ranks

    m = onnx.load(str(exported["onnx"]))
    ranks = _ranks(m)
    assert {ranks.get(n.input[0]) for n in m.graph.node if n.op_type == "GridSample"} == {4}  # verified, not unknown


def test_sidecar_content(exported):
    side = read_sidecar(exported["onnx"], required=True)
    assert side == json.loads(json.dumps(exported["sidecar"]))
    assert side["config"] == exported["config"].to_dict() and side["config_name"] == "lite"
    assert side["class_names"] == list(CLASS_NAMES) and side["input_size"] == [192, 256]
    assert side["opset"] == 17 and side["random_weights"] is False and side["checkpoint"] == "lite_test.pt"
    assert side["weights_sha256"] == sha256_state_dict(exported["model"].state_dict())
    assert side["onnx_sha256"] == sha256_file(exported["onnx"])
    assert side["trt_unsupported_ops"] == []
    assert [i["name"] for i in side["inputs"]] == ["image", "grid2img"]
    q, r = exported["config"].decoder.num_queries, exported["config"].decoder.num_refines[-1]
    assert [(o["name"], o["shape"]) for o in side["outputs"]] == [("points", [1, q, r, 3]), ("scores", [1, q, r, 11])]


def test_parity_fp32_enforced(exported):
    parity = exported["sidecar"]["parity"]
    assert parity["occupied_voxels_torch"] > 50  # the label comparison is not trivially all-empty
    assert parity["max_abs_diff"] < MAX_ABS_DIFF_FP32
    assert parity["label_agreement"] == 1.0 and parity["occupied_label_agreement"] > 0.999


def assert_float32_parity(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Two float32 backends' points and scores: the bulk of the queries within MAX_ABS_DIFF_FP32, every value
    within MAX_ABS_DIFF_FP32_ANY (the next test's docstring says why)."""
    for key in ("points", "scores"):
        assert b[key].dtype == np.float32 and b[key].shape == a[key].shape
        diff = np.abs(b[key] - a[key])[0]
        per_query = diff.reshape(diff.shape[0], -1).max(axis=1)
        assert np.mean(per_query <= MAX_ABS_DIFF_FP32) >= MIN_QUERY_AGREEMENT_FP32, (key, np.sort(per_query)[-5:])
        assert diff.max() < MAX_ABS_DIFF_FP32_ANY, key


def test_onnxruntime_backend_matches_torch_backend_on_another_frame(exported):
    """Two float32 backends on a frame the export never saw, compared where it matters.

    Almost every query agrees to ~1e-6, but on this frame one query (of 240) is ill-conditioned in
    float32: torch and onnxruntime each differ from a float64 run of the same weights there by 3-4e-4
    and round to opposite sides, so its scores differ by up to 7e-4 depending on the CPU's kernels.
    The test therefore bounds the bulk tightly, every value loosely, and the voxel labels exactly.
    """
    config = exported["config"]
    frame = example_frame(config, seed=7)
    torch_backend = create_backend("torch", exported["ckpt"], device="cpu")
    ort_backend = create_backend("onnxruntime", exported["onnx"], providers=["cpu"])  # config from sidecar
    assert ort_backend.device == "CPUExecutionProvider" and ort_backend.config.to_dict() == config.to_dict()
    a, b = torch_backend.infer(frame), ort_backend.infer(frame)
    assert_float32_parity(a, b)
    la = labels_batch(torch.from_numpy(a["points"]), torch.from_numpy(a["scores"]), config).numpy()
    lb = labels_batch(torch.from_numpy(b["points"]), torch.from_numpy(b["scores"]), config).numpy()
    occupied = (la > 0) | (lb > 0)
    assert occupied.sum() > 500  # the label comparison is not trivially all-empty
    assert np.mean(la[occupied] == lb[occupied]) >= MIN_LABEL_AGREEMENT_FP32


def test_fp16_companion(exported):
    path = exported["onnx"].with_name("lite.fp16.onnx")
    side = read_sidecar(path, required=True)
    m = onnx.load(str(path))
    assert side["precision"] == "fp16" and side["trt_unsupported_ops"] == []
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    read = {name for node in m.graph.node for name in node.input}
    assert {i.name for i in m.graph.initializer} <= read  # no weight left unread (onnxruntime warns about each)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in list(m.graph.input) + list(m.graph.output))
    assert side["parity"]["max_abs_diff_points"] < MAX_POINTS_DIFF_FP16
    assert side["parity"]["label_agreement"] >= MIN_LABEL_AGREEMENT_FP16


def test_onnxruntimes_own_warnings_are_kept_except_for_an_fp16_graph_on_the_cpu(exported):
    """onnxruntime's warnings (e.g. nodes its GPU provider leaves to the CPU) reach the user; only an FP16
    graph on the CPU EP, where each FP16 node without a CPU kernel makes constant folding warn, is quiet."""
    from export.backends.ort_backend import ORT_ERRORS, ORT_WARNINGS, OrtBackend

    def severity(path):
        return OrtBackend(path, exported["config"], providers=["cpu"]).session.get_session_options().log_severity_level

    assert severity(exported["onnx"]) == ORT_WARNINGS
    assert severity(exported["onnx"].with_name("lite.fp16.onnx")) == ORT_ERRORS


def test_fp16_conversion_has_one_policy(exported, tmp_path):
    """The FP16 ONNX a strongly typed TensorRT build writes (convert_file_to_fp16 with its defaults) is
    the export's FP16 companion, sampling-location arithmetic in FP32 included: not a second policy."""
    from export.fp16 import convert_file_to_fp16

    default = convert_file_to_fp16(exported["onnx"], tmp_path / "default.fp16.onnx")
    companion = exported["onnx"].with_name("lite.fp16.onnx")
    assert onnx.load(str(default)).graph == onnx.load(str(companion)).graph


def test_pipeline_runs_onnxruntime_end_to_end(exported):
    from conftest import CAM_POSE, IMAGE_HW, INTRINSIC

    backend = create_backend("onnxruntime", exported["onnx"], providers=["cpu"])
    pipe = OccupancyPipeline(backend, exported["config"])
    image = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    frame = pipe.process(image, INTRINSIC, CAM_POSE, floor_z=0.0)
    assert frame.labels.shape == (60, 60, 36) and frame.labels.dtype == np.uint8
    assert len(frame.voxel_labels) == len(frame.voxel_indices) == int((frame.labels > 0).sum())
    t = pipe.last_timings
    assert t.infer_ms > 0 and t.preprocess_ms > 0 and t.postprocess_ms > 0
    assert t.total_ms >= t.infer_ms
    assert set(pipe.timing_summary()) == {"preprocess", "infer", "postprocess", "total"}
    np.testing.assert_allclose(frame.voxel_origin[2], 0.0)
    pipe.close()


def test_onnxruntime_pipeline_takes_the_torch_backends_cpu_preprocessing(exported):
    """The backends that take host arrays get the torch backend's CPU preprocessing (the native resize where
    built), the same input tensors bit for bit, read by onnxruntime as numpy; its output agrees with torch's as the
    export's parity does."""
    from conftest import CAM_POSE, IMAGE_HW, INTRINSIC

    from export.backends.torch_backend import TorchBackend

    ort_pipe = OccupancyPipeline(create_backend("onnxruntime", exported["onnx"], providers=["cpu"]), exported["config"])
    torch_pipe = OccupancyPipeline(TorchBackend(exported["model"], exported["config"]))
    resize = " in the native kernel" if native_postprocess.available() else ""  # (DISCENE_NATIVE_POSTPROCESS=0)
    assert f"host preprocessing on the CPU (uint8 antialiased resize{resize})" in ort_pipe.describe()
    image = np.random.default_rng(1).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)[..., ::-1]  # a bgr8 view
    got = ort_pipe.prepare(image, INTRINSIC, CAM_POSE).inputs
    ref = torch_pipe.prepare(image, INTRINSIC, CAM_POSE).inputs
    assert torch.equal(got.image, ref.image) and torch.equal(got.grid2img, ref.grid2img)
    points, scores = torch_pipe.backend.run(ref)
    assert_float32_parity({"points": points.numpy(), "scores": scores.numpy()}, ort_pipe.backend.infer(got))
    ort_pipe.close()
    torch_pipe.close()


def test_cli_export_without_checkpoint_warns_and_check_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rand.onnx"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert cli_main(["onnx", "--config", "lite", "--out", str(out), "--no-parity", "--simplify"]) == 0
    side = read_sidecar(out, required=True)
    assert side["random_weights"] is True and side["simplified"] is False and "parity" not in side
    assert cli_main(["check", "--onnx", str(out)]) == 0
    assert "no op flagged for TensorRT" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this CI machine: no TensorRT
    assert cli_main(["trt", "--onnx", str(out), "--out", str(tmp_path / "x.engine")]) == 2
    assert "tensorrt" in capsys.readouterr().err


def test_depth_model_exports_with_depth_input_and_parity(tmp_path):
    """use_depth adds the named 'depth' input; small config to keep the test fast."""
    base = models.load_config("lite").to_dict()
    base.update(name="tiny_depth", use_depth=True, image_size=[96, 128])
    base["decoder"].update(num_queries=48)
    config = models.ModelConfig.from_dict(base)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        side = export_onnx(config, tmp_path / "d.onnx")
    assert [i["name"] for i in side["inputs"]] == ["image", "grid2img", "depth"]
    assert side["inputs"][2]["shape"] == [1, 1, 96, 128]
    assert side["parity"]["max_abs_diff"] < MAX_ABS_DIFF_FP32 and side["trt_unsupported_ops"] == []
    backend = create_backend("onnxruntime", tmp_path / "d.onnx", providers=["cpu"])
    frame = example_frame(config, seed=3)
    assert frame.depth is not None and (frame.depth > 0).any()
    frame.depth = None
    with pytest.raises(ValueError, match="needs input 'depth'"):
        backend.infer(frame)


def test_compare_backends_counts_label_disagreement(exported):
    """The precision-agreement check: identical runs agree fully; a run whose scores are shifted for one
    class shows exactly the voxels that changed, and the labels handed out are the ones compared."""
    from export.fp16 import compare_backends, torch_variant_agreement

    config = exported["config"]
    frames = [example_frame(config, seed=s) for s in (3, 4)]
    ref = create_backend("torch", exported["ckpt"], device="cpu")

    class Shifted:  # the same network, class 0's score raised: more voxels become class 1
        def infer(self, frame):
            out = ref.infer(frame)
            out["scores"] = out["scores"].copy()
            out["scores"][..., 0] += 0.5
            return out

    same = compare_backends(ref, ref, config, frames)
    assert same["label_agreement"] == 1.0 and same["occupancy_iou"] == 1.0 and same["max_abs_diff_points"] == 0.0
    assert same["occupied_voxels_fp32"] == same["occupied_voxels_other"] > 0
    pairs: list = []
    diff = compare_backends(ref, Shifted(), config, frames, pairs)
    assert len(pairs) == 2
    changed = sum(int((a != b).sum()) for a, b in pairs)
    total = sum(a.size for a, _ in pairs)
    assert changed > 0 and diff["label_agreement"] == pytest.approx(1 - changed / total)
    assert diff["occupied_voxels_other"] == sum(int((b > 0).sum()) for _, b in pairs)
    with pytest.raises(ValueError, match="needs a CUDA device"):  # torch FP16 is offered on CUDA only
        torch_variant_agreement(ref.wrapper.model, config, frames, "test", "fp16", device="cpu")


def test_cli_export_checks_output_paths_first(exported, tmp_path, capsys):
    """A bad --out is named as the output, before the checkpoint is read; an input is never overwritten."""
    ckpt = tmp_path / "victim.pt"
    ckpt.write_bytes(exported["ckpt"].read_bytes())
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "side").mkdir()
    (tmp_path / "side" / "m.onnx.json").mkdir()  # the sidecar's path is taken by a folder
    for out, says in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "m.onnx", "is a file, not a folder"),
                      (tmp_path / "side" / "m.onnx", "m.onnx.json is a folder"),
                      (ckpt, "is the input --checkpoint")):
        rc = cli_main(["onnx", "--checkpoint", str(ckpt), "--out", str(out), "--no-parity"])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "cannot read" not in err and "Traceback" not in err, (out, err)
    assert ckpt.read_bytes() == exported["ckpt"].read_bytes()
    assert not (tmp_path / "side" / "m.onnx").exists()  # no ONNX without its sidecar
    onnx_in = tmp_path / "in.onnx"
    onnx_in.write_bytes(b"onnx")
    assert cli_main(["trt", "--onnx", str(onnx_in), "--out", str(onnx_in)]) == 2
    assert "is the input --onnx" in capsys.readouterr().err and onnx_in.read_bytes() == b"onnx"


def test_export_replaces_onnx_and_sidecar_together(exported, tmp_path, monkeypatch):
    """A sidecar that cannot be written leaves the previous export's pair as it was (no new ONNX beside it)."""
    import export.onnx_export as onnx_export

    out = tmp_path / "m.onnx"
    out.write_bytes(exported["onnx"].read_bytes())
    side = tmp_path / "m.onnx.json"
    side.write_bytes(b'{"old": true}\n')

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "write_sidecar", disk_full)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert cli_main(["onnx", "--config", "lite", "--out", str(out), "--no-parity"]) == 2
    assert out.read_bytes() == exported["onnx"].read_bytes() and side.read_bytes() == b'{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no partial file left


def test_fp16_companion_is_published_with_its_sidecar(tmp_path, monkeypatch):
    """A companion sidecar that cannot be written leaves no ``.fp16.onnx`` without one (a full disk)."""
    import export.onnx_export as onnx_export

    real = onnx_export.write_sidecar

    def companion_disk_full(artefact, data):
        if str(artefact).endswith(".fp16.onnx"):
            raise OSError(28, "No space left on device")
        return real(artefact, data)

    monkeypatch.setattr(onnx_export, "write_sidecar", companion_disk_full)
    out = tmp_path / "m.onnx"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert cli_main(["onnx", "--config", "lite", "--out", str(out), "--no-parity", "--fp16"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # the FP32 pair, nothing else
