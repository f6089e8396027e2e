"""JSON sidecars beside exported artefacts (``model.onnx.json``, ``model.engine.json``) and file hashes.

A sidecar records what a deployed file was built from (config, weights hash, tool versions, GPU) so
that a robot can detect a stale or foreign engine before loading it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import atomic_write
from models.config import ModelConfig

SIDECAR_SUFFIX = ".json"


def sidecar_path(artefact: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    p = Path(artefact)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` via a temp file in the same folder and ``os.replace``: readers never see half a file."""
    atomic_write(path, lambda f: f.write(data))


def write_sidecar(artefact: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON beside ``artefact``; returns the sidecar path."""
    path = sidecar_path(artefact)
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
    return path


def read_sidecar(artefact: str | Path, required: bool = False,
                 fields: dict[str, type] | None = None) -> dict[str, Any] | None:
    """The sidecar of ``artefact`` as a dict; None when absent (ValueError if ``required``).

    ``fields``: the type each of those keys must have where present (ValueError naming the sidecar otherwise:
    a hand-edited or foreign sidecar must not end in a TypeError deep in the code that reads it).
    """
    path = sidecar_path(artefact)
    if not path.is_file():
        if required:
            raise ValueError(f"sidecar {path} not found: it is written next to {Path(artefact).name} by discene-export")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"sidecar {path} is not valid JSON (corrupt or truncated): {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"sidecar {path} must hold a JSON object")
    for key, kind in (fields or {}).items():
        value = data.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise ValueError(f"sidecar {path}: '{key}' must be a JSON {_JSON_NAMES.get(kind, kind.__name__)}, "
                             f"got {json.dumps(value)[:60]}; re-export to write it again")
    return data


_JSON_NAMES = {str: "string", int: "integer", dict: "object", list: "array", bool: "boolean"}


def sidecar_config(sidecar: dict[str, Any], artefact: str | Path) -> ModelConfig:
    """The model config recorded in the sidecar of ``artefact``; ValueError naming the sidecar when malformed."""
    try:
        return ModelConfig.from_dict(sidecar["config"])
    except (TypeError, ValueError) as exc:  # TypeError: a value from_dict's type checks do not cover
        raise ValueError(f"sidecar {sidecar_path(artefact)} has an invalid 'config': {exc}") from exc


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(state_dict: dict[str, Any]) -> str:
    """Hex sha256 over parameter/buffer names, dtypes, shapes and values, in sorted name order.

    Independent of how the weights were saved (file layout, pickle protocol), so the same weights
    give the same hash whether they came from a checkpoint or a freshly built model.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state_dict[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
