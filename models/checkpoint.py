"""Checkpoints: atomic ``torch.save`` of ``{"config": ModelConfig.to_dict(), "model": state_dict, ...}``."""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from . import build_model
from .config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, incomplete or does not fit the model."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temp file in the same directory, fsync, then os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints and exports are ordinary shared files
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error_behind(exc) if isinstance(exc, Exception) else None
        if cause is None or cause is exc:
            raise
        # torch.save turns a failed write (ENOSPC, EFBIG, EDQUOT) into RuntimeError("unexpected pos ..."): the
        # OSError behind it is what callers catch (discene-train's clean stop on a full disk)
        if cause.errno is None:
            raise OSError(f"writing {path}: {cause}") from exc
        raise OSError(cause.errno, cause.strerror, str(path)) from exc


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The first OSError in ``exc``'s cause/context chain (``exc`` itself included), or None: a write that
    failed for want of space or quota, whatever error the writer turned it into."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_output_file(path: str | Path, what: str, inputs: dict[str, str | Path | None] | None = None) -> None:
    """ValueError, before any work, when file ``path`` (described as ``what``, e.g. ``--out``) cannot be written:
    it is a folder, a parent is a file or the nearest existing folder takes no new file; or it is the same file as
    one of ``inputs`` (flag -> path), which writing it would destroy. A missing parent folder is fine (created)."""
    path = Path(path)
    for flag, source in (inputs or {}).items():
        if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ValueError(f"{what} {path} is the input {flag} {source}: writing it would destroy that file; "
                             "choose another output path")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    try:  # a real probe: os.access says yes to root for read-only places such as /proc
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write {what} {path}: folder {folder} is not writable ({exc.strerror})") from exc


def check_output_folder(path: str | Path, what: str) -> None:
    """ValueError, before any work, when folder ``path`` (described as ``what``) cannot be made or used because
    it, or the nearest of its parents that exists, is a file."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        if folder == Path(path):
            raise ValueError(f"{what} {path} is a file, not a folder")
        raise ValueError(f"cannot make {what} {path}: {folder} is a file, not a folder")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with torch.save atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(payload, f))


def save_model(path: str | Path, model: nn.Module, config: ModelConfig, **extra: Any) -> None:
    """Save a model with its config (plus training state such as optimizer, step, epoch in ``extra``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"config": config.to_dict(), "model": state, **extra})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict; CheckpointError if the file is missing, corrupt, truncated or incomplete."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give the checkpoint file in it ({path / 'final.pt'}?)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors all mean an unusable file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated, or holds objects other than tensors and "
                              f"plain data, which are refused ({type(exc).__name__}: {_without_unsafe_advice(exc)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    missing = [k for k in ("config", "model") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the keys {missing} (has {sorted(payload)})")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"checkpoint {path}: 'config' is a {type(payload['config']).__name__}, expected a "
                              "mapping of model settings (as written by save_model)")
    if not isinstance(payload["model"], dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is a {type(payload['model']).__name__}, expected a state dict")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in payload["model"].items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint {path}: its state dict 'model' holds {len(not_tensors)} entries that are not "
                              f"tensors, first {not_tensors[:3]}; it was not written by save_model")
    bad = [k for k, v in payload["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} has non-finite (NaN/inf) weights in {len(bad)} tensors, first "
                              f"{bad[:3]}: the run that wrote it diverged; use an earlier checkpoint")
    return payload


def trained_steps(payload: dict[str, Any]) -> int:
    """Optimiser steps behind a checkpoint's weights: its run's ``step`` plus the ``steps_before`` of the
    checkpoint that run was warm-started from (0 for a run started from scratch)."""
    return int(payload.get("step", 0)) + int(payload.get("steps_before", 0))


# Sentences of PyTorch's refusal that advise weights_only=False (arbitrary code execution): not for robot users.
_UNSAFE_ADVICE = re.compile(r"weights_only|Weights only load failed|trusted source|torch\.load", re.IGNORECASE)


def _without_unsafe_advice(exc: BaseException) -> str:
    """The exception text without the sentences that suggest loading with ``weights_only=False``."""
    sentences = re.split(r"(?<=[.!?])\s+|\n+", str(exc))
    kept = [x.strip() for x in sentences if x.strip() and not _UNSAFE_ADVICE.search(x)]
    return " ".join(kept) or "not a plain-data checkpoint"


@dataclass
class StateDiff:
    """How a state dict differs from a module's: keys missing from it, extra keys, shape mismatches."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, module shape, state shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def state_dict_diff(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> StateDiff:
    """Compare ``state`` against the module state dict ``own`` (keys and shapes)."""
    return StateDiff(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        mismatched=[(k, tuple(own[k].shape), tuple(state[k].shape))
                    for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)],
    )


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict) with an error naming the first missing, unexpected and mis-shaped keys."""
    diff = state_dict_diff(model.state_dict(), state)
    if diff:
        shapes = [f"{k} {theirs} vs model {mine}" for k, mine, theirs in diff.mismatched]
        parts = []
        if diff.missing:
            parts.append(f"{len(diff.missing)} missing keys, first {diff.missing[:3]}")
        if diff.unexpected:
            parts.append(f"{len(diff.unexpected)} unexpected keys, first {diff.unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, first {shapes[:3]}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Build the model from the checkpoint's config and load its weights; returns (model in eval mode, config)."""
    return model_from_payload(load_checkpoint(path, map_location), path)


def model_from_payload(payload: dict[str, Any], path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """``load_model`` of a checkpoint already read (``load_checkpoint``), for callers that also want its other
    entries (e.g. ``trained_steps``) without reading the file twice; ``path`` names it in errors."""
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {exc}") from exc
    config.backbone.pretrained = None  # the checkpoint's weights replace any ImageNet initialisation
    try:
        model = build_model(config)
    except (TypeError, ValueError, RuntimeError) as exc:  # a config that validates but builds no model (or no memory)
        raise CheckpointError(f"checkpoint {path}: its config '{config.name}' builds no model "
                              f"({type(exc).__name__}: {exc})") from exc
    load_state_strict(model, payload["model"], f"checkpoint {path}")
    return model.eval(), config
