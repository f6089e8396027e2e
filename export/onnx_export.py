"""Export DiSceneNet to ONNX (opset 17, static batch-1 shapes), check it, measure parity, write the sidecar.

Exporter choice (torch 2.13): the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``)
emits opset 17 directly and passes ``onnx.checker``. The dynamo exporter (``dynamo=True``, onnxscript)
builds opset 18 and its down-conversion to 17 fails on this graph (the Reduce/Split "axes as input"
adapter finds no constant axes) so it silently keeps opset 18; its graph is smaller but TensorRT 10.3
(JetPack 6.2) and older ONNX Runtime builds are safer at 17. Shapes are static, so the TorchScript
tracer's data-independent shape checks (the only Python-level conditions in the network) are exact.

Inputs: ``image`` (1,3,H,W) float32 ImageNet-normalised RGB, ``grid2img`` (1,4,4) float32, and
``depth`` (1,1,H,W) float32 metres when the config uses depth. Outputs: ``points`` (1,Q,R,3)
normalised grid coordinates and ``scores`` (1,Q,R,C) after the sigmoid, both of the last layer.
"""
from __future__ import annotations

import copy
import inspect
import logging
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from models import build_model
from models.checkpoint import check_output_file, load_model
from models.classes import CLASS_NAMES
from models.config import ModelConfig, load_config
from models.geometry import place_grid
from models.postprocess import points_to_occupancy
from models.preprocess import NetworkInputs, preprocess
from models.sampling import set_sampling_impl

from .backends.base import input_names, input_shapes, output_shapes
from .backends.ort_backend import OrtBackend
from .backends.torch_backend import TorchBackend
from .fp16 import KEEP_FP32_OPS, convert_file_to_fp16, fp16_onnx_agreement, torch_variant_agreement
from .op_check import TRT_OPS_VERSION, check_model
from .sidecar import (
    atomic_write_bytes,
    sha256_file,
    sha256_state_dict,
    sidecar_path,
    write_sidecar,
)
from .wrapper import ExportWrapper

# torch 2.5 added ``dynamo`` (and 2.9 made it the default); before 2.5 the TorchScript exporter is the only one
TORCHSCRIPT_EXPORTER = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}

log = logging.getLogger(__name__)

OPSET = 17
PARITY_SEED = 0


def example_camera(config: ModelConfig, height: float = 1.4, pitch_deg: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """A robot-like camera: 640x480 K (fx=fy=577), ``height`` m above the floor, pitched down, facing +x."""
    k = np.array([[577.0, 0.0, 319.5], [0.0, 577.0, 239.5], [0.0, 0.0, 1.0]])
    c, s = np.cos(np.radians(pitch_deg)), np.sin(np.radians(pitch_deg))
    pose = np.eye(4)
    pose[:3, :3] = np.stack([[0.0, -1.0, 0.0], [-s, 0.0, -c], [c, 0.0, -s]], axis=1)  # columns: cam x, y, z
    pose[2, 3] = height
    return k, pose


def example_frame(config: ModelConfig, seed: int = PARITY_SEED):
    """Seeded realistic ``NetworkInputs``: smooth colour image, the example camera, floor-plane depth."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(15, 20, 3)).astype(np.float32)
    image = np.kron(coarse, np.ones((32, 32, 1), np.float32))  # 480x640 blocky scene-like image
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    k, pose = example_camera(config)
    depth = None
    if config.use_depth:
        v, u = np.mgrid[0:480, 0:640].astype(np.float64)
        rays = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1) @ pose[:3, :3].T
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(rays[..., 2] < -1e-3, -pose[2, 3] / rays[..., 2], 0.0)
        depth = np.where(depth < 10.0, depth, 0.0).astype(np.float32)
    origin = place_grid(pose, voxel_size=config.voxel_size, grid_shape=tuple(config.grid_shape))
    return preprocess(image, k, pose, config, depth=depth, voxel_origin=origin)


SAMPLE_DATASET = Path(__file__).resolve().parents[1] / "discene_ros" / "data" / "sample_dataset"


def agreement_frames(config: ModelConfig, root: str | Path | None = SAMPLE_DATASET,
                     max_frames: int = 16) -> tuple[list[Any], str]:
    """Frames for precision-agreement checks: the Occ-ScanNet-format sample dataset shipped with the
    package (both splits, real images and poses) when it is readable, else seeded example frames."""
    if root is not None and Path(root).is_dir():
        try:
            from training.occscannet import OccScanNetDataset  # the sample dataset's reader; example frames without it

            frames = []
            for split in ("val", "train"):
                ds = OccScanNetDataset(root, split, config=config, load_depth=config.use_depth)
                for i in range(len(ds)):
                    s = ds[i]
                    frames.append(NetworkInputs(image=s["image"][None].numpy(), grid2img=s["grid2img"][None].numpy(),
                                              depth=s["depth"][None].numpy() if config.use_depth else None,
                                              voxel_origin=s["voxel_origin"].numpy()))
            if frames:
                return frames[:max_frames], f"sample dataset {Path(root).name} (val + train, {len(frames[:max_frames])} frames)"
        except (ImportError, OSError, ValueError, RuntimeError) as exc:
            log.warning("sample dataset %s not usable for the agreement check (%s); using example frames", root, exc)
    frames = [example_frame(config, seed=s) for s in range(4)]
    return frames, "seeded example frames (export.onnx_export.example_frame, seeds 0-3)"


def load_for_export(config: str | ModelConfig | None, checkpoint: str | Path | None) -> tuple[torch.nn.Module, ModelConfig]:
    """Model and config from a checkpoint, or the named config with seeded random weights (warned)."""
    if checkpoint is not None:
        model, ckpt_config = load_model(str(checkpoint), map_location="cpu")
        if config is not None:
            wanted = config if isinstance(config, ModelConfig) else load_config(config)
            if wanted.name != ckpt_config.name:
                log.warning("--config %s differs from the checkpoint's config %s; using the checkpoint's",
                            wanted.name, ckpt_config.name)
        return model.eval(), ckpt_config
    if config is None:
        raise ValueError("export needs --config NAME or --checkpoint CKPT")
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    msg = f"no checkpoint given: exporting '{cfg.name}' with RANDOM weights (seed 0); for tests and speed only"
    warnings.warn(msg, stacklevel=2)
    log.warning(msg)
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def _export_graph(wrapper: ExportWrapper, frame: Any, config: ModelConfig, path: Path, opset: int) -> None:
    names = input_names(config)
    args = tuple(torch.from_numpy(np.asarray(getattr(frame, n), dtype=np.float32)) for n in names)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-level shape checks; with static shapes they are exact.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["points", "scores"],
                          opset_version=opset, do_constant_folding=True, **TORCHSCRIPT_EXPORTER)


def _simplify(path: Path) -> bool:
    try:
        import onnxsim
    except ImportError:
        log.warning("--simplify: onnxsim is not installed (pip install onnxsim); keeping the unsimplified graph")
        return False
    model, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        log.warning("onnxsim could not validate the simplified graph; keeping the original")
        return False
    atomic_write_bytes(path, model.SerializeToString())
    return True


def measure_parity(onnx_path: Path, model: torch.nn.Module, config: ModelConfig, frame: Any) -> dict[str, Any]:
    """onnxruntime CPU vs eager torch on ``frame``: max abs differences and voxel label agreement."""
    ref = TorchBackend(model, config, device="cpu").infer(frame)
    ort_backend = OrtBackend(onnx_path, config, providers=["CPUExecutionProvider"])
    got = ort_backend.infer(frame)
    ort_backend.close()
    lab_ref = points_to_occupancy(ref["points"], ref["scores"], frame.voxel_origin, config).labels
    lab_got = points_to_occupancy(got["points"], got["scores"], frame.voxel_origin, config).labels
    occupied = (lab_ref > 0) | (lab_got > 0)
    d_pts = float(np.abs(ref["points"] - got["points"]).max())
    d_scr = float(np.abs(ref["scores"] - got["scores"]).max())
    return {
        "max_abs_diff": max(d_pts, d_scr),
        "max_abs_diff_points": d_pts,
        "max_abs_diff_scores": d_scr,
        "label_agreement": float((lab_ref == lab_got).mean()),
        "occupied_label_agreement": float((lab_ref == lab_got)[occupied].mean()) if occupied.any() else 1.0,
        "occupied_voxels_torch": int((lab_ref > 0).sum()),
        "reference": "torch eager CPU float32",
        "runtime": "onnxruntime CPUExecutionProvider",
        "input_seed": PARITY_SEED,
    }


def _io_spec(config: ModelConfig) -> tuple[list[dict], list[dict]]:
    ins = [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in input_shapes(config).items()]
    outs = [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in output_shapes(config).items()]
    return ins, outs


def export_onnx(config: str | ModelConfig | None, out: str | Path, checkpoint: str | Path | None = None,
                simplify: bool = False, fp16: bool = False, opset: int = OPSET,
                parity: bool = True, sampling: str = "grid_sample") -> dict[str, Any]:
    """Write ``out`` (+ ``out.json``; + ``<stem>.fp16.onnx`` and its sidecar when ``fp16``); returns the sidecar.

    ``sampling``: ``grid_sample`` (GridSample ops: TensorRT) or ``gather`` (the same bilinear read as
    Gather ops: ONNX Runtime's CPU provider runs it faster than its GridSample kernel; see
    models/sampling.py). The parity check compares with eager torch in the default grid_sample form.
    """
    out = Path(out)
    for path in export_outputs(out, fp16):
        check_output_file(path, "--out" if path == out else "output", {"--checkpoint": checkpoint})
    model, cfg = load_for_export(config, checkpoint)
    export_model = model
    if sampling != "grid_sample":
        export_model = copy.deepcopy(model)
        set_sampling_impl(export_model, sampling)
    wrapper = ExportWrapper(export_model, cfg.use_depth).eval()
    frame = example_frame(cfg)
    tmp = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:  # the graph stays in tmp until its sidecar is written: both are replaced, or neither
        _export_graph(wrapper, frame, cfg, tmp, opset)
        onnx.checker.check_model(str(tmp), full_check=True)
        simplified = _simplify(tmp) if simplify else False
        sidecar = _sidecar(tmp, cfg, model, checkpoint, opset, simplified, sampling)
        if parity:
            sidecar["parity"] = measure_parity(tmp, model, cfg, frame)
        _publish(tmp, out, sidecar)
    finally:
        tmp.unlink(missing_ok=True)
    if fp16:
        export_fp16_companion(out, sidecar, model, cfg, frame, parity)
    return sidecar


def fp16_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx``, the FP16 companion's path."""
    return out.with_name(out.stem + ".fp16.onnx")


def export_outputs(out: Path, fp16: bool) -> list[Path]:
    """Every file an export to ``out`` writes: the ONNX and its sidecar, with ``fp16`` the companion's two."""
    paths = [out, sidecar_path(out)]
    return paths + [fp16_path(out), sidecar_path(fp16_path(out))] if fp16 else paths


def _publish(tmp: Path, out: Path, sidecar: dict[str, Any]) -> None:
    """Move the graph in ``tmp`` to ``out`` with its sidecar; on failure the previous pair (if any) stays."""
    side = sidecar_path(out)
    previous = side.read_bytes() if side.is_file() else None
    write_sidecar(out, sidecar)
    try:
        tmp.replace(out)
    except OSError:
        if previous is None:
            side.unlink(missing_ok=True)
        else:
            atomic_write_bytes(side, previous)
        raise


def _sidecar(onnx_file: Path, cfg: ModelConfig, model: torch.nn.Module, checkpoint: str | Path | None,
             opset: int, simplified: bool, sampling: str) -> dict[str, Any]:
    """The sidecar of the graph in ``onnx_file`` (not yet at its published path), parity not yet measured."""
    report = check_model(onnx_file)
    if report.issues:
        log.warning("ops TensorRT %s would reject:\n%s", TRT_OPS_VERSION, report.summary())
    ins, outs = _io_spec(cfg)
    return {
        "format": "discene-onnx/1",
        "config": cfg.to_dict(),
        "config_name": cfg.name,
        "class_names": list(CLASS_NAMES),
        "input_size": list(cfg.image_size),
        "opset": opset,
        "precision": "fp32",
        "exporter": "torch.onnx.export TorchScript (dynamo=False)",
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "python": platform.python_version(),
        "checkpoint": None if checkpoint is None else Path(checkpoint).name,
        "random_weights": checkpoint is None,
        "weights_sha256": sha256_state_dict(model.state_dict()),
        "onnx_sha256": sha256_file(onnx_file),
        "simplified": simplified,
        "sampling": sampling,
        "inputs": ins,
        "outputs": outs,
        "trt_ops_version": TRT_OPS_VERSION,
        "trt_unsupported_ops": report.unsupported_ops,
        "trt_op_issues": [i.to_dict() for i in report.issues],
        "op_counts": {op: n for (_, op), n in sorted(report.ops.items())},
    }


def export_fp16_companion(out: Path, sidecar: dict[str, Any], model: torch.nn.Module, cfg: ModelConfig,
                          frame: Any, parity: bool) -> Path:
    """``<stem>.fp16.onnx`` for TensorRT strongly typed builds, with its own sidecar and parity figures."""
    # sampling-location arithmetic kept FP32: measured on the shipped lite and the sample dataset
    # (4 frames), occupied-voxel label agreement with FP32 96.5 % instead of 95.3 %
    final = fp16_path(out)
    path = final.with_name(f".{final.name}.partial")  # published with its sidecar, as the FP32 graph
    try:
        convert_file_to_fp16(out, path, keep_geometry=True)
        side = dict(sidecar, precision="fp16", fp32_ops=sorted(KEEP_FP32_OPS), fp32_geometry=True,
                    source_onnx=out.name, onnx_sha256=sha256_file(path), simplified=False)
        report = check_model(path)
        side["trt_unsupported_ops"] = report.unsupported_ops
        side["trt_op_issues"] = [i.to_dict() for i in report.issues]
        side["op_counts"] = {op: n for (_, op), n in sorted(report.ops.items())}
        if parity:
            side["parity"] = measure_parity(path, model, cfg, frame)
            frames, source = agreement_frames(cfg)
            side["fp16_agreement"] = fp16_onnx_agreement(path, model, cfg, frames, source)
            if torch.cuda.is_available():  # the torch backend's FP16 (autocast) runs on CUDA only
                side["fp16_agreement_torch_autocast"] = torch_variant_agreement(copy.deepcopy(model), cfg, frames,
                                                                                 source, "fp16")
        _publish(path, final, side)
    finally:
        path.unlink(missing_ok=True)
    return final
