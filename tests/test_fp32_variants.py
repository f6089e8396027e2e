"""The FP32 speed options (TF32, TF32 convolutions, cudnn.benchmark) in the two issue-10 benchmarks, on the CPU.

bench_frame_path: ``--tf32``/``--tf32-convolutions``/``--cudnn-benchmark`` reach the backend, rows record
them as they ran, ``--append`` keeps rows that differ only in them. fp16_agreement: ``--compare`` refuses the CPU with a
clear message; its rows are built and named per variant (run here with the backends pinned to the
CPU, where the flags change nothing, so each variant agrees fully with the reference).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from benchmark_modules import load

import export.backends.torch_backend as torch_backend_module
from export.fp16 import TORCH_VARIANTS, OwnThread, torch_variant_agreement
from models import native_postprocess

ROOT = Path(__file__).resolve().parents[1]
LITE = ROOT / "discene_ros" / "data" / "lite_distilled.pt"
SAMPLE = ROOT / "discene_ros" / "data" / "sample_dataset"

# what the bench rows record: "native" where the kernel runs (CI builds it), "torch" where
# DISCENE_NATIVE_POSTPROCESS=0 switches it off
IMPL = "native" if native_postprocess.available() else "torch"

bench = load("bench_frame_path")
agreement = load("fp16_agreement")


@pytest.fixture()
def keep_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_bench_backend_gets_the_options_and_the_append_key_separates_them():
    backend, _ = bench.make_backend("lite", "cpu", False, False, True, tf32=True, cudnn_benchmark=True)
    assert backend.tf32 is True and "cudnn_benchmark requested but the device is the CPU" in backend.describe()
    row = {"config": "paper_student", "backend": "torch compile+cuda_graph fused", "precision": "fp32",
           "input": "bgr8", "closing": True}
    keys = {bench.append_key({**row, "tf32": t, "tf32_convolutions": t or v, "cudnn_benchmark": c})
            for t in (False, True) for v in (False, True) for c in (False, True)}
    assert len(keys) == 6  # IEEE, TF32 convolutions, TF32; each with and without cudnn.benchmark
    assert bench.append_key(row) == bench.append_key({**row, "tf32": False, "cudnn_benchmark": False})
    # a TF32 row from before tf32_convolutions was recorded ran its convolutions in TF32 too
    assert bench.append_key({**row, "tf32": True}) == bench.append_key({**row, "tf32": True, "tf32_convolutions": True})
    backend, _ = bench.make_backend("lite", "cpu", False, False, True, tf32_convolutions=True)
    assert backend.tf32_convolutions is True and backend.tf32 is False
    # CPU post-processing by the native kernel or by torch ops: two measurements; rows from before the
    # kernel ran torch ops unless fused
    cpu = {**row, "backend": "torch static"}
    assert bench.append_key({**cpu, "postprocess_impl": "native"}) != bench.append_key(cpu)
    assert bench.append_key({**cpu, "postprocess_impl": "torch"}) == bench.append_key(cpu)
    assert bench.append_key({**cpu, "fused_postprocess": True}) == bench.append_key({**cpu, "postprocess_impl": "fused"})
    # the CPU preprocessing's resize by the native kernel or by torch: two measurements; CPU rows (with a
    # thread count) from before the field resized with torch
    cpu_row = {**cpu, "threads": 2}
    assert bench.append_key({**cpu_row, "resize": "native"}) != bench.append_key(cpu_row)
    assert bench.append_key({**cpu_row, "resize": "torch"}) == bench.append_key(cpu_row)
    # launch-ahead rows: the watcher and polling are two measurements; rows from before the watcher polled
    fused = {**row, "postprocess_impl": "fused"}
    assert bench.append_key({**fused, "launch_wait": "watch"}) != bench.append_key({**fused, "launch_wait": "poll"})
    assert bench.append_key({**fused, "launch_wait": "poll"}) == bench.append_key(fused)
    # with a decode stage of its own or not: two measurements; rows from before the field had none
    assert bench.append_key({**row, "decode_stage": True}) != bench.append_key(row)
    assert bench.append_key({**row, "decode_stage": False}) == bench.append_key(row)
    assert bench.append_key({**row, "camera_hz": 30.0}) != bench.append_key(row)  # fed by a camera, or flat out
    assert bench.append_key({**row, "serial": True}) != bench.append_key(row)  # one frame at a time, or pipelined
    assert bench.append_key({**row, "serial": False}) == bench.append_key(row)  # rows before the field: pipelined
    serial = {**row, "serial": True}  # the next frame's host work beside this one's, or one frame at a time
    assert bench.append_key({**serial, "host_overlap": True}) != bench.append_key(serial)
    assert bench.append_key({**serial, "host_overlap": False}) == bench.append_key(serial)  # rows before: one at a time


@pytest.mark.skipif(not LITE.is_file(), reason="shipped lite checkpoint missing")
def test_bench_rows_carry_the_flags_and_append_keeps_other_variants(tmp_path, keep_threads, native_kernel):
    pytest.importorskip("rosbags")
    path = tmp_path / "rows.json"
    args = ["--device", "cpu", "--configs", "lite", "--frames", "2", "--warmup", "1", "--inputs", "bgr8",
            "--threads", "1", "--marker-period", "1000", "--json", str(path)]
    assert bench.main([*args, "--tf32", "--tf32-convolutions", "--cudnn-benchmark"]) == 0
    first = json.loads(path.read_text())
    (row,) = first["rows"]
    # as they ran: the CPU has none of them
    assert row["tf32"] is False and row["tf32_convolutions"] is False and row["cudnn_benchmark"] is False
    assert row["postprocess_impl"] == "native" and row["resize"] == "native"
    for field in ("config", "backend", "precision", "input", "fps", "infer_ms", "overhead_ms", "stages_ms"):
        assert field in row
    # thread CPU time beside the wall time
    assert set(row["stages_cpu_ms"]) == {"decode", "preprocess", "launch", "pointcloud2"}
    assert row["process_cpu_ms_per_frame"] > 0
    # the node's finish stage: its output checks are CPU-side work, counted in the overhead, and so is a
    # launch-ahead row's launch (none here: on the CPU the inference is the launch)
    stages = row["stages_ms"]
    assert stages["output_check"] > 0 and stages["launch"] == 0
    overhead_stages = ("decode", "preprocess", "launch", "postprocess", "output_check", "pointcloud2")
    assert row["overhead_ms"] == pytest.approx(sum(stages[s] for s in overhead_stages))
    assert row["jpeg_decoder"] is None  # a bgr8 row decodes nothing
    assert row["decode_stage"] is False and row["dropped"] == 0  # the node's loop (a raw Image: no decode
    # thread), fed losslessly
    assert row["serial"] is True and row["host_overlap"] is True  # pipelining auto on the CPU, as the node
    # the network's wait between frames: the host time the frame rate pays for
    assert 0 < row["between_networks_ms"] and row["between_networks_fraction_of_infer"] > 0
    old = {k: v for k, v in row.items()  # a row from before the fields
           if k not in ("tf32", "tf32_convolutions", "cudnn_benchmark")}
    old["postprocess_impl"] = "native"
    first["rows"] = [{**old, "fps": -1.0}, {**row, "tf32": True, "fps": -2.0}, {**row, "cudnn_benchmark": True,
                                                                               "fps": -3.0}]
    path.write_text(json.dumps(first))
    assert bench.main([*args, "--append"]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert sorted(r["fps"] for r in rows if r["fps"] < 0) == [-3.0, -2.0]  # the IEEE row replaced, the others kept
    assert len(rows) == 3 and sum(not r["tf32"] and not r["cudnn_benchmark"] for r in rows) == 1
    assert bench.main([*args, "--append", "--decode-stage", "on"]) == 0  # another measurement: appended
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 4 and sorted(r["decode_stage"] for r in rows if r["fps"] > 0) == [False, True]
    assert bench.main([*args, "--append", "--pipelining", "on"]) == 0  # the pipelined loop: appended too
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 5 and sorted(r["serial"] for r in rows if r["fps"] > 0 and not r["decode_stage"]) == [False,
                                                                                                              True]
    assert bench.main([*args, "--append", "--resize", "torch"]) == 0  # torch's resize: another measurement
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 6 and sorted(r["resize"] for r in rows if r["fps"] > 0) == ["native"] * 3 + ["torch"]
    assert bench.main([*args, "--append", "--host-overlap", "off"]) == 0  # one frame at a time: appended
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 7 and sum(r["host_overlap"] is False for r in rows if r["fps"] > 0) == 2  # + pipelined
    # the node's mode: a 2 Hz camera. The rate is timed from the warm-up frame's end, so a slow first
    # frame (capture) shortens the span: at 2 Hz it may take up to 0.7 s before the rate passes 6 FPS
    assert bench.main([*args, "--append", "--camera-hz", "2"]) == 0
    (camera,) = [r for r in json.loads(path.read_text())["rows"] if r["camera_hz"] == 2.0]
    assert camera["decode_stage"] is False
    assert camera["fps"] < 6.0  # paced by the camera, not flat out
    assert camera["stages_ms"]["end_to_end_latency_p90"] >= camera["stages_ms"]["end_to_end_latency"] > 0


@pytest.mark.skipif(not LITE.is_file(), reason="shipped lite checkpoint missing")
def test_bench_runs_the_onnxruntime_frame_path_on_the_same_weights(tmp_path, keep_threads):
    """--backend onnxruntime: the shipped lite exported to a temporary ONNX, the node's frame path around it (the
    CPU tensor preprocessing, the native kernel); CPU and fp32 only."""
    pytest.importorskip("rosbags")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "ort.json"
    args = ["--device", "cpu", "--configs", "lite", "--frames", "2", "--warmup", "1", "--inputs", "bgr8", "--threads",
            "1", "--marker-period", "1000", "--backend", "onnxruntime"]
    assert bench.main([*args, "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert row["backend"] == "onnxruntime CPUExecutionProvider" and row["weights"] == LITE.name
    assert row["postprocess_impl"] == IMPL and row["resize"] == IMPL and row["dropped"] == 0
    assert bench.main([*args, "--precisions", "fp16"]) == 2


def test_agreement_variants_need_cuda(lite_model, lite_config, capsys):
    with pytest.raises(ValueError, match="'tf32' comparison needs a CUDA device"):
        torch_variant_agreement(lite_model, lite_config, [], "test", "tf32", device="cpu")
    with pytest.raises(ValueError, match="unknown torch variant 'bf16'"):
        torch_variant_agreement(lite_model, lite_config, [], "test", "bf16")
    with pytest.raises(SystemExit) as exc:
        agreement.main(["--checkpoint", "x.pt", "--data", "d", "--device", "cpu", "--compare", "tf32"])
    assert exc.value.code == 2
    assert "--compare tf32 needs --device cuda" in capsys.readouterr().err


@pytest.mark.skipif(not (LITE.is_file() and SAMPLE.is_dir()), reason="shipped lite checkpoint or sample dataset missing")
def test_agreement_rows_per_variant_with_the_backends_on_the_cpu(tmp_path, monkeypatch):
    """The --compare path end to end with every backend pinned to the CPU: one row per variant, named
    and labelled, built from a reference without options and the variant's options."""
    made: list[dict] = []

    class PinnedToCpu(torch_backend_module.TorchBackend):
        def __init__(self, model, config, device=None, **options):
            made.append(options)
            super().__init__(model, config, device="cpu", **options)

    monkeypatch.setattr(torch_backend_module, "TorchBackend", PinnedToCpu)
    monkeypatch.setattr(agreement, "TorchBackend", PinnedToCpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    out = tmp_path / "agreement.json"
    assert agreement.main(["--checkpoint", str(LITE), "--data", str(SAMPLE), "--split", "val", "--device", "cuda",
                           "--compare", "tf32", "tf32_convolutions", "tf32_cudnn_benchmark", "--max-frames", "2",
                           "--score-threshold", "0.3", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert set(result["rows"]) == {"torch_tf32", "torch_tf32_convolutions", "torch_tf32_cudnn_benchmark",
                                   "cuda_graph_vs_eager"}
    for variant in ("tf32", "tf32_convolutions", "tf32_cudnn_benchmark"):
        row = result["rows"][f"torch_{variant}"]
        assert row["variant"] == variant and row["frames"] == 2 and row["label_agreement"] == 1.0
        assert row["gt_metrics_reference"] == row["gt_metrics_other"]
    assert result["rows"]["torch_tf32_cudnn_benchmark"]["runtime"].endswith("TF32 + cudnn.benchmark")
    variant_options = [o for o in made if o.get("cuda_graph") and set(o) != {"cuda_graph"}]
    assert variant_options == [{"cuda_graph": True, **TORCH_VARIANTS[v]}
                               for v in ("tf32", "tf32_convolutions", "tf32_cudnn_benchmark")]
    assert sum(o == {"cuda_graph": True} for o in made) == 4  # three references + the graph-vs-eager row
    assert result["rows"]["torch_tf32_convolutions"]["runtime"].endswith("TF32 convolutions (matmuls IEEE)")


def test_each_compared_backend_runs_on_one_thread_of_its_own():
    """cuDNN's plan cache is per thread: every call of one backend on the same thread, not the caller's,
    and two backends on two threads."""
    class Recorder:
        def __init__(self):
            self.threads: list[int] = []

        def infer(self, frame):
            self.threads.append(threading.get_ident())
            return {"frame": frame}

        def close(self):
            self.threads.append(threading.get_ident())

    a, b = Recorder(), Recorder()
    wa, wb = OwnThread(a), OwnThread(b)
    assert [wa.infer(i)["frame"] for i in range(3)] == [0, 1, 2]
    wb.infer(0)
    wa.close()
    wb.close()
    assert len(set(a.threads)) == 1 and len(a.threads) == 4 and threading.get_ident() not in a.threads
    assert set(a.threads) != set(b.threads)


def test_bench_rows_name_the_jpeg_decoder_that_ran(image_decoder):
    """JPEG rows say which library decoded them: OpenCV where installed (the node's decoder), else PIL."""
    expected = "opencv " if image_decoder == "cv2" else "PIL "
    assert bench.jpeg_decoder().startswith(expected)
