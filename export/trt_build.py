"""Build a TensorRT engine from the exported ONNX with the TensorRT 10 Python API.

Steps: ``Builder`` -> ``NetworkDefinition`` filled by ``OnnxParser`` (every parser error reported) ->
``BuilderConfig`` (workspace memory-pool limit, precision, timing cache loaded from and saved back to
a file so rebuilds skip tactic timing) -> ``build_serialized_network`` -> engine written atomically,
with ``model.engine.json`` recording TensorRT version, GPU name and compute capability and the source
ONNX sha256 (engines only run on the GPU model and TensorRT version that built them).

Precision (DESIGN.md section 7): for TensorRT < 10.12 ``--fp16`` sets ``BuilderFlag.FP16`` on an FP32
ONNX (the path JetPack 6.2 / TensorRT 10.3 needs). From 10.12 that flag is deprecated (removed in 11):
the network is created STRONGLY_TYPED from an FP16 ONNX (``export.fp16``, LayerNorm/Softmax kept in
FP32), converted on the fly to ``<name>.fp16.onnx`` when an FP32 ONNX is given.

Equivalent ``trtexec`` command (TensorRT 10)::

    trtexec --onnx=model.onnx --saveEngine=model.engine --memPoolSize=workspace:4096M \\
            --timingCacheFile=timing.cache --fp16                     # TensorRT < 10.12
    trtexec --onnx=model.fp16.onnx --saveEngine=model.engine --memPoolSize=workspace:4096M \\
            --timingCacheFile=timing.cache --stronglyTyped            # TensorRT >= 10.12
"""
from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path
from typing import Any

import onnx

from .backends.base import require
from .sidecar import atomic_write_bytes, read_sidecar, sha256_file, write_sidecar

log = logging.getLogger(__name__)

STRONGLY_TYPED_SINCE = (10, 12)


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; non-numeric suffixes are ignored."""
    return tuple(int(x) for x in re.findall(r"\d+", str(text))[:4])


def gpu_info() -> dict[str, str]:
    """Name and compute capability of CUDA device 0, from whichever CUDA binding is installed."""
    from .cuda_mem import create_device_memory

    mem = create_device_memory()
    try:
        return mem.gpu_info()
    finally:
        mem.close()


def engine_mismatches(sidecar: dict[str, Any], trt_version: str, gpu: dict[str, str]) -> list[str]:
    """Reasons an engine described by ``sidecar`` cannot run here (empty list: compatible)."""
    reasons = []
    if sidecar.get("tensorrt_version") != trt_version:
        reasons.append(f"built with TensorRT {sidecar.get('tensorrt_version')}, this machine has {trt_version}")
    built_gpu = sidecar.get("gpu", {})
    if built_gpu.get("compute_capability") != gpu.get("compute_capability") or built_gpu.get("name") != gpu.get("name"):
        reasons.append(f"built for GPU {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), "
                       f"this machine has {gpu.get('name')} (sm {gpu.get('compute_capability')})")
    return reasons


def _is_fp16_onnx(model: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path, strongly_typed: bool) -> Any:
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(onnx_path.read_bytes(), str(onnx_path))
    if not ok:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        lines = [f"  [{e.code()}] node {e.node()}: {e.desc()}" for e in errors]
        raise RuntimeError(f"TensorRT could not parse {onnx_path} ({len(errors)} errors):\n" + "\n".join(lines)
                           + "\nrun `discene-export check --onnx ...` to list ops TensorRT does not support")
    return network, parser


def build_engine(onnx_path: str | Path, engine_path: str | Path, fp16: bool = False, workspace_mb: int = 4096,
                 timing_cache: str | Path | None = None, strongly_typed: bool | None = None,
                 verbose: bool = False) -> dict[str, Any]:
    """Build ``engine_path`` from ``onnx_path``; returns the engine sidecar dict (also written to disk).

    ``strongly_typed=None`` picks strongly typed FP16 for TensorRT >= 10.12 when ``fp16`` is set.
    """
    trt = require("tensorrt", "tensorrt", "building a TensorRT engine")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} not found")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ValueError(f"{onnx_path} is not a readable ONNX model (corrupt or truncated?): {exc}") from exc
    version = trt.__version__
    if strongly_typed is None:
        strongly_typed = fp16 and parse_version(version) >= STRONGLY_TYPED_SINCE
    source = onnx_path
    if strongly_typed and fp16 and not _is_fp16_onnx(model):
        from .fp16 import convert_file_to_fp16

        source = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
        log.info("TensorRT %s: strongly typed FP16 needs an FP16 ONNX; writing %s", version, source)
        convert_file_to_fp16(onnx_path, source)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, source, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if fp16 and not strongly_typed:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; building with the FP16 flag anyway")
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    log.info("building TensorRT %s engine from %s (fp16=%s, strongly_typed=%s, workspace %d MiB, cache %s)",
             version, source, fp16, strongly_typed, workspace_mb, cache_path or "none")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {source}; rerun with --verbose for the log")
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    onnx_side = read_sidecar(onnx_path) or {}
    sidecar = {
        "format": "discene-tensorrt-engine/1",
        "tensorrt_version": version,
        "gpu": gpu_info(),
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "built_from": source.name,
        "precision": "fp16" if fp16 else "fp32",
        "strongly_typed": bool(strongly_typed),
        "workspace_mb": int(workspace_mb),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key in ("config", "class_names", "inputs", "outputs", "weights_sha256"):
        if key in onnx_side:
            sidecar[key] = onnx_side[key]
    write_sidecar(engine_path, sidecar)
    return sidecar
