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


def read_sidecar(artefact: str | Path, required: bool = False) -> dict[str, Any] | None:
    """The sidecar of ``artefact`` as a dict; None when absent (ValueError if ``required``)."""
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
    return data


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
