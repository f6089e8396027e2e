"""Build a TensorRT engine from the exported ONNX with the TensorRT 10/11 Python API.

Steps: the GPU is identified first (a CUDA binding is needed to record it) -> ``Builder`` ->
``NetworkDefinition`` filled by ``OnnxParser`` (every parser error reported with node name and op) ->
``BuilderConfig`` (workspace memory-pool limit, precision, timing cache loaded from a file; a cache
from another GPU or TensorRT is refused by ``set_timing_cache`` and replaced by a fresh one) ->
``build_serialized_network``. Only when everything succeeded are the engine, its sidecar
``model.engine.json`` and the timing cache written, each atomically. The sidecar records TensorRT
version, GPU name and compute capability, the source ONNX sha256, precision and the engine's own
sha256, so a stale, foreign or half-replaced engine is detected before it runs (``engine_problems``).

Precision policy (DESIGN.md section 7), the same on every TensorRT version: ``fp16`` means FP16
everywhere except LayerNormalization, Softmax and Einsum, which stay FP32.
- TensorRT >= 10.12 (default there, and the only way on 11.x, where the builder FP16 flag no longer
  exists): a strongly typed network from an FP16 ONNX (``export.fp16`` keeps those ops in FP32),
  written to ``<name>.fp16.onnx`` when an FP32 ONNX is given.
- TensorRT < 10.12 (JetPack 6.2 ships 10.3): ``BuilderFlag.FP16`` on the FP32 ONNX, with the
  Normalization, SoftMax and Einsum layers pinned to FP32 and ``OBEY_PRECISION_CONSTRAINTS``.
  Strongly typed (``strongly_typed=True``) works on 10.3 too.
Asking for the flag path where the flag does not exist (11.x) is refused with one clear line.
``trtexec`` equivalents are in ``export/README.md``.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

from .backends.base import require
from .fp16 import convert_file_to_fp16
from .sidecar import atomic_write_bytes, read_sidecar, sha256_file, write_sidecar

log = logging.getLogger(__name__)

STRONGLY_TYPED_SINCE = (10, 12)
ENGINE_FORMAT = "discene-tensorrt-engine/1"
# the types of the engine sidecar's fields that are read back (``read_sidecar(..., fields=...)``)
ENGINE_SIDECAR_FIELDS = {"tensorrt_version": str, "gpu": dict, "source_onnx": str, "source_onnx_sha256": str,
                         "precision": str, "workspace_mb": int, "engine_sha256": str, "config": dict}
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "EINSUM")  # trt.LayerType names kept in FP32 under FP16


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
    """Reasons an engine described by ``sidecar`` cannot run on this machine (empty list: compatible)."""
    reasons = []
    if sidecar.get("tensorrt_version") != trt_version:
        reasons.append(f"built with TensorRT {sidecar.get('tensorrt_version')}, this machine has {trt_version}")
    built_gpu = sidecar.get("gpu") if isinstance(sidecar.get("gpu"), dict) else {}
    if built_gpu.get("compute_capability") != gpu.get("compute_capability") or built_gpu.get("name") != gpu.get("name"):
        reasons.append(f"built for GPU {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), "
                       f"this machine has {gpu.get('name')} (sm {gpu.get('compute_capability')})")
    return reasons


def source_onnx_path(engine_path: str | Path, sidecar: dict[str, Any] | None) -> Path:
    """The ONNX an engine was built from: ``source_onnx`` of its sidecar, else ``<name>.onnx`` beside it."""
    engine_path = Path(engine_path)
    name = (sidecar or {}).get("source_onnx") or engine_path.with_suffix(".onnx").name
    return engine_path.parent / Path(str(name)).name


def engine_staleness(engine_path: str | Path, sidecar: dict[str, Any], fp16: bool | None = None) -> list[str]:
    """Reasons the engine no longer matches what it should have been built from (empty list: current).

    Checks the engine bytes against the sidecar's ``engine_sha256`` (an engine replaced without its
    sidecar), the ONNX beside it against ``source_onnx_sha256`` (re-exported model) and, when ``fp16``
    is given, the requested precision against the sidecar's ``precision``.
    """
    engine_path = Path(engine_path)
    reasons = []
    recorded = sidecar.get("engine_sha256")
    if recorded and sha256_file(engine_path) != recorded:
        reasons.append(f"{engine_path.name} is not the engine its sidecar describes (sha256 differs)")
    onnx_path = source_onnx_path(engine_path, sidecar)
    recorded_onnx = sidecar.get("source_onnx_sha256")
    if onnx_path.is_file() and recorded_onnx and sha256_file(onnx_path) != recorded_onnx:
        reasons.append(f"{onnx_path.name} changed since the engine was built (re-exported?)")
    if fp16 is not None:
        wanted = "fp16" if fp16 else "fp32"
        if sidecar.get("precision") != wanted:
            reasons.append(f"engine precision is {sidecar.get('precision')}, {wanted} was requested")
    return reasons


def _is_fp16_onnx(model: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def onnx_file_is_fp16(onnx_path: str | Path) -> bool:
    """Whether the ONNX file holds FP16 weights (an engine built from it is FP16 whatever was requested).

    False for a file that is missing or unreadable: building from it reports that on its own.
    """
    try:
        return _is_fp16_onnx(onnx.load(str(onnx_path), load_external_data=False))
    except Exception:  # noqa: BLE001 - protobuf DecodeError, OSError: not this function's error to report
        return False


def fp16_of_onnx(onnx_path: str | Path, fp16: bool | None) -> bool | None:
    """``fp16``, or True (logged once) when FP32 was requested of an FP16 ONNX: its engine can only be FP16,
    and requiring FP32 of it would rebuild the engine at every start."""
    if fp16 is False and onnx_file_is_fp16(onnx_path):
        log.info("%s is an FP16 ONNX, so its TensorRT engine is FP16 (fp16=False does not apply to it)",
                 Path(onnx_path).name)
        return True
    return fp16


def has_fp16_builder_flag(trt: Any) -> bool:
    """``BuilderFlag.FP16`` exists (TensorRT 10.x; removed in 11 where networks are always strongly typed)."""
    return hasattr(trt.BuilderFlag, "FP16")


def precision_plan(trt: Any, fp16: bool, strongly_typed: bool | None) -> bool:
    """Whether to build strongly typed, following the module policy; ValueError where it cannot work."""
    version = parse_version(trt.__version__)
    flag = has_fp16_builder_flag(trt)
    if not flag:  # TensorRT 11: strongly typed always (the creation flag is kept but ignored)
        if strongly_typed is False and fp16:
            raise ValueError(f"TensorRT {trt.__version__} has no builder FP16 flag (networks are always strongly "
                             f"typed): drop --strongly-typed no, an FP16 ONNX is built instead")
        return True
    if strongly_typed is None:
        return bool(fp16) and version >= STRONGLY_TYPED_SINCE
    if strongly_typed is False and fp16 and version >= STRONGLY_TYPED_SINCE:
        log.warning("TensorRT %s deprecates the builder FP16 flag; prefer strongly typed FP16", trt.__version__)
    return bool(strongly_typed)


def _error_line(error: Any) -> str:
    """One parser error as text: code, node index, name and op when the error belongs to a node."""
    node = int(error.node())
    name = error.node_name() if hasattr(error, "node_name") else ""
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    where = f"node {node} '{name}' ({op})" if node >= 0 else "graph"
    return f"[{str(error.code()).split('.')[-1]}] {where}: {one_line(error.desc())}"


def one_line(text: object) -> str:
    """``text`` with runs of whitespace (newlines included) collapsed: error messages stay on one line."""
    return " ".join(str(text).split())


def create_builder(trt: Any, logger: Any) -> Any:
    """``trt.Builder``; pybind11 raises TypeError when TensorRT cannot initialise CUDA (factory returned nullptr)."""
    try:
        return trt.Builder(logger)
    except TypeError as exc:
        raise RuntimeError(f"TensorRT {trt.__version__} could not create a builder (no usable GPU or CUDA driver?): "
                           f"{one_line(exc)}") from exc


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path, strongly_typed: bool) -> Any:
    # TensorRT 11: always strongly typed, the creation flag is deprecated and ignored, so none is passed
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) \
        if strongly_typed and has_fp16_builder_flag(trt) else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [_error_line(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path} ({len(errors)} errors): "
                           + "; ".join(errors) + " (`discene-export check --onnx ...` lists unsupported ops)")
    return network, parser


def pin_fp32_layers(trt: Any, network: Any) -> list[str]:
    """Flag-path FP16: keep Normalization, SoftMax and Einsum layers (and their outputs) in FP32."""
    kinds = {getattr(trt.LayerType, k) for k in FP32_LAYER_TYPES if hasattr(trt.LayerType, k)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def _attach_timing_cache(config: Any, cache_path: Path | None) -> Any:
    """Load the cache file into ``config``; a corrupt or foreign cache is replaced by a fresh one."""
    data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    if data:
        log.warning("timing cache %s is corrupt or from another GPU/TensorRT; starting a fresh one", cache_path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("TensorRT refused an empty timing cache; building without one")
        return None
    return cache


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise RuntimeError(f"could not write the {what} {path}: {exc}") from exc


def progress_monitor(trt: Any) -> Any | None:
    """A TensorRT ``IProgressMonitor`` showing each phase of an engine build as a tqdm bar (nested phases below
    their parent): a build takes minutes on a Jetson. None where this TensorRT has no progress monitor.
    TensorRT calls it from its own threads, hence the lock."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None
    from tqdm import tqdm

    class BuildProgress(base):
        def __init__(self) -> None:
            base.__init__(self)  # pybind11: the C++ side must be initialised by hand
            self.bars: dict[str, Any] = {}
            self.lock = threading.Lock()
            self.interrupted = False  # Ctrl-C came during a call: the build is cancelled, build_engine re-raises

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._interruptible():
                self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=len(self.bars),
                                             leave=parent_phase is None, unit="step", dynamic_ncols=True)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._interruptible():
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)  # steps are numbered from 0
            return not self.interrupted  # False cancels the build

        def phase_finish(self, phase_name: str) -> None:
            with self._interruptible():
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

        @contextlib.contextmanager
        def _interruptible(self) -> Iterator[None]:
            """The lock, and a KeyboardInterrupt (Python runs the SIGINT handler inside these calls) turned into
            a cancelled build: the binding would print it and go on, or cancel with no word of why."""
            try:
                with self.lock:
                    yield
            except KeyboardInterrupt:
                self.interrupted = True

    return BuildProgress()


def build_engine(onnx_path: str | Path, engine_path: str | Path, fp16: bool = False, workspace_mb: int = 4096,
                 timing_cache: str | Path | None = None, strongly_typed: bool | None = None,
                 verbose: bool = False, progress: bool = False) -> dict[str, Any]:
    """Build ``engine_path`` from ``onnx_path``; returns the engine sidecar dict (also written to disk).

    ``strongly_typed=None`` follows the precision policy of this module. Nothing is written unless the
    build succeeded; a failure leaves any previous engine, sidecar and timing cache untouched. ``progress``
    shows the build's phases as progress bars (``progress_monitor``; the CLI's default).
    """
    trt = require("tensorrt", "tensorrt", "building a TensorRT engine")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} not found")
    if engine_path.suffix.lower() == ".onnx" or engine_path.exists() and engine_path.samefile(onnx_path):
        raise ValueError(f"refusing to write a TensorRT engine to {engine_path}: it would replace an ONNX model; "
                         f"write it to {engine_path.with_suffix('.engine').name}")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ValueError(f"{onnx_path} is not a readable ONNX model (corrupt or truncated?): {exc}") from exc
    if int(workspace_mb) <= 0:
        raise ValueError(f"workspace_mb must be positive, got {workspace_mb}")
    gpu = gpu_info()  # before building: an engine must never be left without its sidecar
    version = trt.__version__
    strongly_typed = precision_plan(trt, fp16, strongly_typed)
    source = onnx_path
    if strongly_typed and fp16 and not _is_fp16_onnx(model):
        source = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
        log.info("TensorRT %s: strongly typed FP16 needs an FP16 ONNX; writing %s", version, source)
        try:
            convert_file_to_fp16(onnx_path, source)
        except Exception as exc:  # noqa: BLE001 - onnx shape inference, range checks and I/O, one line each
            raise ValueError(f"could not convert {onnx_path} to the FP16 ONNX a strongly typed build needs: "
                             f"{one_line(exc)}") from exc

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = create_builder(trt, logger)
    network, _parser = _parse(trt, builder, logger, source, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    pinned: list[str] = []
    if fp16 and not strongly_typed:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast FP16; building with the FP16 flag anyway")
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = pin_fp32_layers(trt, network)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = _attach_timing_cache(config, cache_path)
    monitor = progress_monitor(trt) if progress and hasattr(config, "progress_monitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # the config keeps it alive (keep_alive in the binding)
    log.info("building TensorRT %s engine from %s (fp16=%s, strongly_typed=%s, workspace %d MiB, cache %s)",
             version, source, fp16, strongly_typed, workspace_mb, cache_path or "none")
    serialized = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.interrupted:
        raise KeyboardInterrupt("TensorRT engine build cancelled")
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {source}; rerun with --verbose for the log")
    engine_bytes = bytes(memoryview(serialized))
    cache_bytes = None
    if cache_path is not None and cache is not None:
        updated = config.get_timing_cache()
        if updated is None:
            log.warning("TensorRT returned no timing cache after the build; %s left as it was", cache_path)
        else:
            cache_bytes = bytes(memoryview(updated.serialize()))

    onnx_side = read_sidecar(onnx_path) or {}
    sidecar = {
        "format": ENGINE_FORMAT,
        "tensorrt_version": version,
        "gpu": gpu,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "built_from": source.name,
        "precision": "fp16" if fp16 or _is_fp16_onnx(model) else "fp32",
        "strongly_typed": bool(strongly_typed),
        "fp32_pinned_layers": len(pinned),
        "workspace_mb": int(workspace_mb),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key in ("config", "class_names", "inputs", "outputs", "weights_sha256"):
        if key in onnx_side:
            sidecar[key] = onnx_side[key]
    _write(engine_path, engine_bytes, "engine")
    try:
        write_sidecar(engine_path, sidecar)
    except OSError as exc:
        raise RuntimeError(f"could not write the engine sidecar beside {engine_path}: {exc}") from exc
    if cache_bytes is not None:
        _write(cache_path, cache_bytes, "timing cache")
    return sidecar
