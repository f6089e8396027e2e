"""Inference backends behind one interface, selected by name with ``create_backend``."""
from __future__ import annotations

import logging
from pathlib import Path

from models.config import ModelConfig

from .base import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    Backend,
    input_feed,
    input_names,
    input_shapes,
    output_shapes,
    own_config,
    require,
)

log = logging.getLogger(__name__)

BACKEND_NAMES = {"torch": "torch", "pytorch": "torch", "onnxruntime": "onnxruntime", "ort": "onnxruntime",
                 "tensorrt": "tensorrt", "trt": "tensorrt"}

__all__ = ["Backend", "BACKEND_NAMES", "INPUT_NAMES", "OUTPUT_NAMES", "create_backend", "input_feed",
           "input_names", "input_shapes", "output_shapes", "require"]


# what a model file's name says it holds, for the backends that cannot read it (a common mix-up of the node's
# ``model`` and ``backend`` parameters, which otherwise ends in an unpickling, sidecar or parser error)
_KIND_BY_SUFFIX = {".pt": "checkpoint", ".pth": "checkpoint", ".ckpt": "checkpoint", ".onnx": "onnx",
                   ".engine": "engine", ".plan": "engine"}
_KIND_NAMES = {"checkpoint": "a PyTorch checkpoint", "onnx": "an ONNX model", "engine": "a TensorRT engine"}
_KINDS_RUN = {"torch": ("checkpoint",), "onnxruntime": ("onnx",), "tensorrt": ("engine", "onnx")}
_BACKENDS_FOR = {"checkpoint": "torch", "onnx": "onnxruntime or tensorrt", "engine": "tensorrt"}


def _check_model_kind(key: str, path: Path) -> None:
    """Refuse, with what to do instead, a model file whose suffix names a kind that backend ``key`` cannot run."""
    kind = _KIND_BY_SUFFIX.get(path.suffix.lower())
    if kind is None or kind in _KINDS_RUN[key]:
        return
    runs = " or ".join(_KIND_NAMES[k] for k in _KINDS_RUN[key])
    instead = (f"export it with `discene-export onnx --checkpoint {path} --out {path.with_suffix('.onnx').name}`"
               if kind == "checkpoint" else "give the checkpoint it was exported from")
    raise ValueError(f"{path.name} is {_KIND_NAMES[kind]}, but the {key} backend runs {runs}: choose backend "
                     f"{_BACKENDS_FOR[kind]}, or {instead}")


def _onnx_config(path: Path, config: ModelConfig | None) -> tuple[ModelConfig, str]:
    """(the config to run ``path`` with, where it came from): the one in its sidecar, which must describe this
    very file (its ``onnx_sha256``: an ONNX replaced without its sidecar is refused); a different ``config``
    is logged and not used (as the torch backend does with a checkpoint's). ``config`` when there is none."""
    from ..sidecar import read_sidecar, sha256_file, sidecar_config, sidecar_path

    sidecar = read_sidecar(path, fields={"onnx_sha256": str})
    side = sidecar_path(path)
    if not sidecar or "config" not in sidecar:
        if config is not None:
            return config, "the given config"
        raise ValueError(f"no model config for {path}: its sidecar {side.name} is missing or has no 'config'; "
                         f"pass config=... or re-export with discene-export onnx")
    recorded = sidecar.get("onnx_sha256")
    if recorded and path.is_file() and (actual := sha256_file(path)) != recorded:
        raise ValueError(f"{path} is not the ONNX its sidecar {side.name} describes (sha256 {actual[:12]}..., the "
                         f"sidecar records {recorded[:12]}...): the model was replaced without its sidecar; "
                         "re-export both with discene-export onnx")
    return own_config(sidecar_config(sidecar, path), config, f"its sidecar {side.name}"), f"its sidecar {side.name}"


def create_backend(name: str, model_path: str | Path | None, config: ModelConfig | None = None,
                   device: str | None = None, fp16: bool = False, providers: list[str] | None = None,
                   **torch_options: bool) -> Backend:
    """Backend by name: ``torch`` (checkpoint .pt), ``onnxruntime`` (.onnx) or ``tensorrt`` (.engine).

    ``torch`` without ``model_path`` builds ``config`` with random weights (warned; demos and tests only);
    ``torch_options`` (``compile``, ``cuda_graph``, ``tf32``, ``tf32_convolutions``, ``cudnn_benchmark``) go to the
    torch backend and are ignored by the others.
    ``tensorrt`` given a ``.onnx`` builds ``<name>.engine`` beside it on first use and rebuilds it when
    the ONNX or ``fp16`` changed; given a ``.engine``, ``fp16`` is the precision it must have.
    """
    key = BACKEND_NAMES.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown backend '{name}'; choose one of {sorted(set(BACKEND_NAMES.values()))}")
    path = Path(model_path) if model_path is not None else None
    if path is not None:
        _check_model_kind(key, path)
    if key == "torch":
        from .torch_backend import TorchBackend

        if path is None:
            if config is None:
                raise ValueError("the torch backend needs a checkpoint path or a config")
            from models import build_model

            log.warning("torch backend without a checkpoint: RANDOM weights for config '%s'", config.name)
            return TorchBackend(build_model(config), config, device=device, fp16=fp16, **torch_options)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return TorchBackend.from_checkpoint(path, device=device, fp16=fp16, config=config, **torch_options)
    if path is None:
        raise ValueError(f"the {key} backend needs a model file path")
    if key == "onnxruntime":
        from .ort_backend import OrtBackend

        onnx_config, source = _onnx_config(path, config)
        return OrtBackend(path, onnx_config, providers=providers, fp16=fp16, config_source=source)
    from .trt_backend import TensorRTBackend

    if path.suffix.lower() == ".onnx":  # as _check_model_kind: MODEL.ONNX is an ONNX too, never an engine
        path, fp16 = _engine_for_onnx(path, fp16, config)
    return TensorRTBackend(path, config=config, fp16=fp16)


def _engine_problems(engine: Path, onnx_path: Path, fp16: bool) -> list[str]:
    """Reasons ``engine`` must be (re)built from ``onnx_path`` at precision ``fp16`` (empty list: current)."""
    from ..sidecar import read_sidecar
    from ..trt_build import ENGINE_SIDECAR_FIELDS, engine_staleness

    if not engine.is_file():
        return ["no engine built yet"]
    sidecar = read_sidecar(engine, fields=ENGINE_SIDECAR_FIELDS)
    if sidecar is None:
        return ["its sidecar is missing"]
    reasons = engine_staleness(engine, sidecar, fp16)
    if sidecar.get("source_onnx") != onnx_path.name:
        reasons.append(f"it was built from {sidecar.get('source_onnx')}, not {onnx_path.name}")
    return reasons


def _engine_for_onnx(onnx_path: Path, fp16: bool, config: ModelConfig | None = None) -> tuple[Path, bool]:
    """(``<name>.engine`` beside ``onnx_path``, its precision): (re)built unless current for this ONNX and precision.

    An FP16 ONNX makes an FP16 engine whatever ``fp16`` says, so that is the precision required of it (read
    from the ONNX only when the engine would otherwise be rebuilt). Without ``config``, an ONNX whose sidecar
    gives none (or describes another file) is refused before the build, which takes minutes: the engine
    could not be run without one. Foreign engines (other GPU or TensorRT version) are rebuilt by the backend.
    """
    from ..trt_build import build_engine, fp16_of_onnx

    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} not found")
    engine = onnx_path.with_suffix(".engine")
    reasons = _engine_problems(engine, onnx_path, fp16)
    if reasons and not fp16 and fp16_of_onnx(onnx_path, fp16):
        fp16 = True
        reasons = _engine_problems(engine, onnx_path, fp16)
    if reasons:
        if config is None:
            _onnx_config(onnx_path, None)
        log.info("building %s from %s: %s", engine, onnx_path, "; ".join(reasons))
        build_engine(onnx_path, engine, fp16=fp16, timing_cache=onnx_path.with_suffix(".timing.cache"))
    return engine, fp16
