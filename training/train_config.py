"""Training configuration: dataclasses with YAML load/save, command-line overrides and validation.

A YAML file has the sections ``data``, ``optim``, ``loss``, ``distill`` and top-level run settings
(see training/configs/*.yaml). Unknown keys are rejected by name.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.checkpoint import atomic_write, load_checkpoint
from models.config import ModelConfig, load_config, read_yaml, reject_unknown_keys

from .compiled import COMPILE_BACKENDS
from .distill import DistillConfig
from .losses import TaskLossConfig, resolve_class_frequencies

MODES = ("teacher", "student", "distill")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class DataConfig:
    """Occ-ScanNet-format dataset (real or synthetic) and loader settings."""

    root: str = "data/occscannet"
    train_split: str = "train"
    val_split: str = "val"
    max_train_frames: int | None = None  # first N frames of the split (None: all)
    max_val_frames: int | None = None
    workers: int = 2                     # loader worker processes, started once per fit() and kept (persistent)
    prefetch_factor: int = 2             # batches each worker keeps ready (workers > 0)
    pin_memory: bool = True              # page-locked batches for non-blocking copies (CUDA only)
    frequency_frames: int = 200          # frames read to count class frequencies when loss.class_frequencies is unset
    photometric: bool = True             # the reference's photometric distortion of training images
                                         # (brightness, contrast, saturation, hue; training/augment.py)


@dataclass
class OptimConfig:
    """AdamW with a lower backbone lr, cosine decay under a linear warm-up (the reference's mmcv policy),
    gradient clipping."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    backbone_lr_mult: float = 0.1
    sampling_offsets_lr_mult: float = 0.1  # decoder sampling offsets (the reference's paramwise custom key)
    warmup_iters: int = 500
    warmup_ratio: float = 1.0 / 3.0      # lr factor at step 0 of the warm-up
    min_lr_ratio: float = 1e-3           # lr factor the cosine heads for at the end of the run
    lr_by_epoch: bool = False            # true: the cosine stepped once per epoch, as the reference's runner does
                                         # (paper configs, 10 epochs); false: every step, for runs of few epochs
    grad_clip: float = 35.0              # max gradient norm (0: no clipping; its finiteness is still checked)


@dataclass
class TrainConfig:
    """One training run: teacher, plain student, or distilled student."""

    name: str = "run"
    mode: str = "student"                # teacher | student | distill
    model: str = "lite"                  # named model config or YAML path
    model_overrides: dict[str, Any] = field(default_factory=dict)  # nested keys merged into the model config
    teacher_checkpoint: str | None = None  # distill mode: trained teacher (models.checkpoint format)
    tgi: bool = True                     # distill mode: Teacher-Guided Initialisation
    init_checkpoint: str | None = None   # warm start: the trained network's weights from this checkpoint (a
                                         # final.pt or last.pt); optimiser, lr schedule and step start fresh
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: TaskLossConfig = field(default_factory=TaskLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 10
    max_steps: int | None = None         # total optimiser steps; overrides epochs when set
    batch_size: int = 1                  # per process (per GPU)
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    amp: str = "none"                    # none | bf16 | fp16 (autocast on CUDA)
    amp_on_cpu: bool = False             # also autocast (bf16) on CPU; otherwise CPU runs stay fp32
    seed: int = 0
    deterministic: bool = False          # torch.use_deterministic_algorithms (bitwise-repeatable runs and resumes)
    compile: str = "none"                # none | inductor | aot_eager: torch.compile the networks' forward and decode
                                         # (training/compiled.py; the losses and evaluation stay eager)
    out_dir: str = "runs/run"
    log_every: int = 10                  # steps between TensorBoard scalars
    eval_every: int = 0                  # steps between evaluations (0: at the end only)
    ckpt_every: int = 500                # steps between last.pt checkpoints (and at the end)
    progress: bool = True                # tqdm bar on rank 0
    find_unused_parameters: bool = False  # DDP

    def model_config(self) -> ModelConfig:
        """The network config: the named/YAML config with ``model_overrides`` merged in."""
        base = load_config(self.model).to_dict()
        merged = _deep_merge(base, self.model_overrides)
        if self.model_overrides and "name" not in self.model_overrides:
            merged["name"] = f"{base['name']}+overrides"
        return ModelConfig.from_dict(merged)

    def needs_depth(self) -> bool:
        """Whether training batches must carry depth: the student's depth branch, or (distill) the teacher's."""
        if self.model_config().use_depth:
            return True
        if self.mode == "distill" and self.teacher_checkpoint:
            return bool(load_checkpoint(self.teacher_checkpoint)["config"].get("use_depth", False))
        return False

    def validate(self) -> TrainConfig:
        for prefix, section in (("", self), ("data.", self.data), ("optim.", self.optim), ("loss.", self.loss),
                                ("distill.", self.distill)):
            mistyped = _mistyped_field(section)
            if mistyped:
                raise ValueError(f"invalid train config '{self.name}': {prefix}{mistyped}")
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}"),
            (self.compile in COMPILE_BACKENDS, f"compile must be one of {COMPILE_BACKENDS}, got {self.compile!r}"),
            (self.mode != "distill" or bool(self.teacher_checkpoint), "mode 'distill' needs teacher_checkpoint"),
            (self.mode != "distill" or not (self.tgi and self.init_checkpoint),
             "init_checkpoint and tgi would both set the student's weights: set tgi=false to warm-start the "
             "student from init_checkpoint, or drop init_checkpoint"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.data.workers >= 0 and self.data.prefetch_factor > 0, "data.workers must be >= 0, data.prefetch_factor > 0"),
            (self.epochs > 0 or (self.max_steps or 0) > 0, "epochs or max_steps must be positive"),
            (self.max_steps is None or self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}"),
            (self.optim.lr > 0, f"optim.lr must be positive, got {self.optim.lr}"),
            (self.optim.warmup_iters >= 0, "optim.warmup_iters must be >= 0"),
            (self.log_every > 0 and self.ckpt_every > 0 and self.eval_every >= 0, "log_every/ckpt_every must be > 0, eval_every >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid train config '{self.name}': {message}")
        self.distill.validate()
        try:
            resolve_class_frequencies(self.loss.class_frequencies)
        except ValueError as exc:
            raise ValueError(f"invalid train config '{self.name}': {exc}") from exc
        self.model_config()  # raises on a bad model name or override
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = copy.deepcopy(data)
        reject_unknown_keys(cls, data, "train")
        sections = {"distill": DistillConfig, "loss": TaskLossConfig, "data": DataConfig, "optim": OptimConfig}
        built = {}
        for key, sub in sections.items():
            value = data.pop(key, {}) or {}
            if not isinstance(value, dict):
                raise ValueError(f"train config section '{key}' must be a mapping, got {type(value).__name__}")
            reject_unknown_keys(sub, value, key)
            built[key] = sub(**value)
        return cls(**data, **built).validate()

    def save(self, path: str | Path) -> None:
        """Write the config as YAML atomically (a crash never leaves half a file)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write(path, lambda f: f.write(text.encode()))


NUMBER_KINDS = {bool: "true or false", int: "an integer", float: "a number"}


def _is_kind(value: Any, kinds: list[type]) -> bool:
    """Whether ``value`` is one of ``kinds`` (bool, int, float) as YAML gives them: an int is a float too,
    a bool is neither."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return isinstance(value, float) and float in kinds


def _mistyped_field(section: Any) -> str | None:
    """'KEY must be KIND, got VALUE' for the first bool / int / float field of a config dataclass (None
    allowed where annotated) holding anything else; None when all do. Other fields are not checked here.
    A float field's number written as YAML 1.1 reads as text (``lr: 2e-4``, without a dot) becomes a float."""
    for name, hint in typing.get_type_hints(type(section)).items():
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        value, wanted = getattr(section, name), [k for k in kinds if k in NUMBER_KINDS]
        if float in wanted and isinstance(value, str):
            try:
                value = float(value)
                setattr(section, name, value)
            except ValueError:
                pass
        if not wanted or (value is None and type(None) in kinds) or _is_kind(value, wanted):
            continue
        shown = " or ".join(NUMBER_KINDS[k] for k in wanted) + (" or null" if type(None) in kinds else "")
        return f"{name} must be {shown}, got {value!r}"
    return None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def parse_value(raw: str) -> Any:
    """A command-line value as YAML, with numbers like ``2e-3`` (a string in YAML 1.1) read as floats."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML train config; ``overrides`` are ``key.sub=value`` strings (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        packaged = Path(__file__).parent / "configs" / f"{path.name if path.suffix else path.name + '.yaml'}"
        if packaged.is_file():
            path = packaged
        elif not path.exists():
            raise ValueError(f"train config {path} not found (also looked for {packaged})")
    data = read_yaml(path, "train config") or {}
    if not isinstance(data, dict):
        raise ValueError(f"train config {path} must hold a mapping at the top level")
    return TrainConfig.from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a config dict, in place; returns it."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), parse_value(raw))
    return data
