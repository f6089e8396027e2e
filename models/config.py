"""Dataclass configs of the DiScene networks, with YAML load/save and validation.

Named configs: ``paper_student`` (ResNet-50, paper Table II), ``paper_teacher`` (wide ResNet-101,
same decoder; stands in for InternImage-XL, which needs custom CUDA ops), and ``lite`` (a small
network for CPU tests, CPU demos and the shipped checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .classes import NUM_CLASSES
from .geometry import GRID_SHAPE, VOXEL_SIZE


@dataclass
class BackboneConfig:
    """ResNet family with torchvision parameter names (resnet18..152, wide_resnet50/101_2)."""

    depth: int = 50                 # 18, 34, 50, 101 or 152
    base_channels: int = 64         # stem width; 64 in torchvision, smaller for ``lite``
    width_per_group: int = 64       # 128 gives torchvision's wide_resnet*_2
    pretrained: str | None = None   # local torchvision-format state dict (.pth), never downloaded
    frozen_stages: int = -1         # -1: train all; k: freeze stem and the first k stages
    norm_eval: bool = False         # keep every BatchNorm in eval mode while training (pretrained, batch 1/GPU)


@dataclass
class DecoderConfig:
    """Sparse query decoder (OPUS design, DESIGN.md section 2)."""

    num_queries: int = 960
    num_refines: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 16])  # points per query per layer
    embed_dims: int = 256
    num_heads: int = 8
    num_groups: int = 4             # sampling groups
    num_points: int = 16            # sampling points per group
    out_points: int = 32            # AdaMixer point-mixing output points (32 gives the paper's 73.7 M student)
    ffn_dims: int = 512
    dropout: float = 0.1            # attention weights and FFN (as the reference)
    offset_scale: float = 0.5       # regression offsets (metres) are scaled by this before being added
    head_layers: int = 2            # hidden layers of the class and regression heads


# ModelConfig fields that only post-process the network's output (what inference keeps): they may
# differ between a checkpoint and the config that resumes or deploys it.
POSTPROCESS_FIELDS = ("score_threshold", "max_center_dist", "closing")


@dataclass
class ModelConfig:
    name: str = "custom"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 256
    num_levels: int = 4             # FPN levels, from C2 (stride 4) to C5 (stride 32)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    num_classes: int = NUM_CLASSES
    image_size: list[int] = field(default_factory=lambda: [480, 640])  # (H, W) network input
    use_depth: bool = False         # depth branch (DiScene-dagger, paper eq. 1)
    voxel_size: float = VOXEL_SIZE
    grid_shape: list[int] = field(default_factory=lambda: list(GRID_SHAPE))
    score_threshold: float = 0.5    # points whose best class score is <= this are empty
    max_center_dist: float = 0.6    # metres; points farther from their query centre are dropped
    closing: bool = True            # 3x3x3 closing of the class-score volume (reference default)

    @property
    def num_points_out(self) -> int:
        return self.decoder.num_queries * self.decoder.num_refines[-1]

    @property
    def grid_extent(self) -> list[float]:
        """Size of the voxel grid in metres along x, y, z (grid_shape * voxel_size)."""
        return [n * self.voxel_size for n in self.grid_shape]

    def validate(self) -> ModelConfig:
        """Raise ValueError with a clear message for inconsistent settings; returns self."""
        b, d = self.backbone, self.decoder
        checks = [
            (b.depth in (18, 34, 50, 101, 152), f"backbone.depth must be 18, 34, 50, 101 or 152, got {b.depth}"),
            (b.base_channels > 0 and b.width_per_group > 0, "backbone widths must be positive"),
            (1 <= self.num_levels <= 4, f"num_levels must be 1..4, got {self.num_levels}"),
            (d.num_queries > 0, f"decoder.num_queries must be positive, got {d.num_queries}"),
            (len(d.num_refines) > 0 and all(r > 0 for r in d.num_refines),
             f"decoder.num_refines must be a non-empty list of positive ints, got {d.num_refines}"),
            (d.embed_dims % d.num_heads == 0, f"embed_dims {d.embed_dims} must be divisible by num_heads {d.num_heads}"),
            (d.embed_dims % d.num_groups == 0, f"embed_dims {d.embed_dims} must be divisible by num_groups {d.num_groups}"),
            (d.num_points > 0 and d.out_points > 0, "decoder.num_points and out_points must be positive"),
            (0.0 <= d.dropout < 1.0, f"decoder.dropout must be in [0, 1), got {d.dropout}"),
            (d.head_layers >= 0, f"decoder.head_layers must be >= 0, got {d.head_layers}"),
            (0 < self.num_classes < 256, f"num_classes must be in 1..255 (voxel labels are uint8, 0 = empty), "
                                         f"got {self.num_classes}"),
            (len(self.image_size) == 2 and all(s > 0 and s % 32 == 0 for s in self.image_size),
             f"image_size must be [H, W] with both multiples of 32, got {self.image_size}"),
            (len(self.grid_shape) == 3 and all(s > 0 for s in self.grid_shape), f"grid_shape must be 3 positive ints, got {self.grid_shape}"),
            (self.voxel_size > 0, f"voxel_size must be positive, got {self.voxel_size}"),
            (0.0 <= self.score_threshold < 1.0, f"score_threshold must be in [0, 1), got {self.score_threshold}"),
            (self.max_center_dist > 0, f"max_center_dist must be positive, got {self.max_center_dist}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid model config '{self.name}': {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a nested dict, rejecting unknown keys and values of the wrong type by name.

        ValueError for anything malformed (also a non-mapping): the dict comes from files (YAML, checkpoints,
        sidecars), and a float query count or a string threshold would otherwise fail later, far from here.
        """
        data = dict(_checked(cls, data, "model"))
        backbone = BackboneConfig(**_checked(BackboneConfig, data.pop("backbone", {}), "backbone"))
        decoder = DecoderConfig(**_checked(DecoderConfig, data.pop("decoder", {}), "decoder"))
        return cls(backbone=backbone, decoder=decoder, **data).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def reject_unknown_keys(cls: type, data: dict[str, Any], where: str) -> None:
    """Raise ValueError naming keys of ``data`` that are not fields of the dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {where} config keys {unknown}; known keys: {sorted(known)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


# what a value of each annotated field type may be (annotations are strings: ``from __future__ import annotations``)
_TYPE_CHECKS = {
    "int": ("an int", _is_int),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str | None": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "list[int]": ("a list of ints", _is_int_list),
}


def _checked(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` once it is a mapping of ``cls``'s fields with values of their types; ValueError naming the first
    that is not. Nested config fields (backbone, decoder) are checked by their own call."""
    if not isinstance(data, dict):
        raise ValueError(f"'{where}' must be a mapping, got {type(data).__name__}")
    reject_unknown_keys(cls, data, where)
    for f in dataclasses.fields(cls):
        if f.name in data and f.type in _TYPE_CHECKS:
            kind, ok = _TYPE_CHECKS[f.type]
            if not ok(data[f.name]):
                raise ValueError(f"{where} config key '{f.name}' must be {kind}, got {data[f.name]!r}")
    return data


def paper_student() -> ModelConfig:
    """ResNet-50 + FPN student of the paper (paper: 73.7 M learnable parameters; this build: 73.9 M, 73.7 M learnable with frozen_stages 1)."""
    return ModelConfig(name="paper_student").validate()


def paper_teacher() -> ModelConfig:
    """Large teacher: wide ResNet-101 (torchvision wide_resnet101_2 names), same decoder."""
    return ModelConfig(name="paper_teacher", backbone=BackboneConfig(depth=101, width_per_group=128)).validate()


def lite() -> ModelConfig:
    """Small network for CPU tests and demos: ResNet-18 at 1/4 width, 3 layers, 192x256 input.

    Like the paper's student it ends with 15,360 points (240 queries x 64): fewer points cannot cover
    the 10-20k occupied voxels of an indoor frame, which capped recall near 6% with 240 x 16.
    """
    return ModelConfig(
        name="lite",
        backbone=BackboneConfig(depth=18, base_channels=16),
        fpn_channels=64,
        decoder=DecoderConfig(num_queries=240, num_refines=[2, 16, 64], embed_dims=64, num_heads=4,
                              num_groups=4, num_points=4, out_points=16, ffn_dims=128),
        image_size=[192, 256],
    ).validate()


NAMED_CONFIGS = {"paper_student": paper_student, "paper_teacher": paper_teacher, "lite": lite}


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``; ValueError naming ``what`` and the file when it is not readable YAML
    text (invalid YAML, a folder, no permission, a binary file)."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{what} {path} is not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} {path} cannot be read as text: {exc}") from exc


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A named config (``paper_student``, ``paper_teacher``, ``lite``) or a YAML file path."""
    key = str(name_or_path)
    if key in NAMED_CONFIGS:
        return NAMED_CONFIGS[key]()
    path = Path(key)
    if not path.exists():
        raise ValueError(f"unknown model config '{key}': not one of {sorted(NAMED_CONFIGS)} and no such YAML file")
    data = read_yaml(path, "model config")
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} must hold a mapping at the top level")
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return ModelConfig.from_dict(data)
