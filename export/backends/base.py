"""The one inference interface every backend (torch, onnxruntime, tensorrt) implements.

``Backend.infer(NetworkInputs) -> {"points": (1,Q,R,3), "scores": (1,Q,R,C)}`` numpy float32, points in
normalised grid coordinates and scores after the sigmoid (last decoder layer), so that
``models.postprocess.points_to_occupancy`` gets the same arrays whatever runs the network.
"""
from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from models.config import ModelConfig

log = logging.getLogger(__name__)

INPUT_NAMES = ("image", "grid2img", "depth")
OUTPUT_NAMES = ("points", "scores")


def require(module: str, package: str, purpose: str) -> Any:
    """Import ``module`` or raise ImportError naming the pip/apt package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs the Python package '{package}' (import {module} failed: {exc}); "
                          f"install it, e.g. `pip install {package}`") from exc


def own_config(own: ModelConfig, given: ModelConfig | None, source: str) -> ModelConfig:
    """``own``, the config the model file records (``source`` says where: a checkpoint, a sidecar); a different
    ``given`` one is logged and not used, on every backend: the weights were trained and exported with ``own``."""
    theirs, ours = (None if given is None else given.to_dict()), own.to_dict()
    if theirs is not None and theirs != ours:
        keys = [k for k in ours if theirs.get(k) != ours[k]]
        log.warning("the given config '%s' differs from %s ('%s') in %s; using the model file's own",
                    given.name, source, own.name, keys)
    return own


def input_names(config: ModelConfig) -> list[str]:
    """Network input names for a config: image, grid2img, and depth when ``use_depth``."""
    return ["image", "grid2img"] + (["depth"] if config.use_depth else [])


def input_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Static batch-1 input shapes at the config's input size."""
    h, w = config.image_size
    shapes = {"image": (1, 3, h, w), "grid2img": (1, 4, 4), "depth": (1, 1, h, w)}
    return {n: shapes[n] for n in input_names(config)}


def output_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Output shapes: points (1,Q,R,3) and scores (1,Q,R,C) of the last decoder layer."""
    q, r = config.decoder.num_queries, config.decoder.num_refines[-1]
    return {"points": (1, q, r, 3), "scores": (1, q, r, config.num_classes)}


def input_feed(inputs: Any, config: ModelConfig) -> dict[str, np.ndarray]:
    """Validated float32 arrays by input name from a ``NetworkInputs`` (or any object with those fields)."""
    feed = {}
    for name, shape in input_shapes(config).items():
        value = getattr(inputs, name, None)
        if value is None:
            raise ValueError(f"model '{config.name}' has use_depth={config.use_depth} and needs input '{name}', "
                             f"but the frame has none")
        arr = np.ascontiguousarray(value, dtype=np.float32)
        if arr.shape != shape:
            raise ValueError(f"input '{name}' has shape {arr.shape}, model '{config.name}' expects {shape} "
                             f"(run models.preprocess.preprocess with the same config)")
        feed[name] = arr
    return feed


class Backend(ABC):
    """Runs the exported network on one frame. Subclasses set ``name`` and ``device``."""

    name: str = "base"
    closed: bool = False

    def __init__(self, config: ModelConfig, device: str = "cpu"):
        self.config = config
        self.device = device

    @abstractmethod
    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        """``NetworkInputs`` -> {"points": (1,Q,R,3), "scores": (1,Q,R,C)} numpy float32 (scores after sigmoid)."""

    def close(self) -> None:
        """Release sessions, engines and device memory. Safe to call twice; subclasses call this first."""
        self.closed = True

    def require_open(self) -> None:
        """RuntimeError once ``close`` was called: what the backend runs on is released (a clear error, not an
        AttributeError or a silent eager fallback)."""
        if self.closed:
            raise RuntimeError(f"the {self.name} backend was closed; create a new one to infer again")

    def describe(self) -> str:
        return f"{self.name} on {self.device} ({self.config.name})"

    def _check_outputs(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Cast to float32 and verify output shapes, so every backend hands back the same contract."""
        result = {}
        for name, shape in output_shapes(self.config).items():
            arr = np.asarray(out[name], dtype=np.float32)
            if arr.shape != shape:
                raise RuntimeError(f"{self.name} backend returned '{name}' of shape {arr.shape}, expected {shape}")
            result[name] = arr
        return result

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
