"""ResNet image encoder with torchvision parameter names (own code; torchvision is not a dependency).

Parameter names follow torchvision exactly (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``layer2.0.downsample.0``), so a torchvision ``resnet*``/``wide_resnet*_2`` state dict saved to a
local file loads with :func:`load_torchvision_state_dict` (``fc.*`` keys are ignored).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import state_dict_diff
from .config import BackboneConfig

# blocks per stage and block type of each supported depth
RESNET_SPECS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with identity shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision v1.5) -> 1x1 with 4x expansion (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * width_per_group / 64)
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ResNet returning the C2..C5 feature maps (strides 4, 8, 16, 32)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if config.depth not in RESNET_SPECS:
            raise ValueError(f"backbone.depth must be one of {sorted(RESNET_SPECS)}, got {config.depth}")
        kind, blocks = RESNET_SPECS[config.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        if kind == "basic" and config.width_per_group != 64:
            raise ValueError(f"backbone.width_per_group must be 64 for ResNet-{config.depth} (BasicBlock), "
                             f"got {config.width_per_group}")
        base = config.base_channels
        self.frozen_stages = config.frozen_stages
        self.norm_eval = config.norm_eval
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = base
        self.out_channels: list[int] = []
        for i, n in enumerate(blocks):
            planes = base * 2**i
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(in_ch, planes, stride, config.width_per_group))
                in_ch = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            self.out_channels.append(in_ch)
        self._init_weights()
        if config.pretrained:
            load_torchvision_state_dict(self, config.pretrained)
        self._freeze()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # zero-init the last BN of each residual branch: blocks start as identities
        for m in self.modules():
            last_bn = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None)
            if isinstance(m, (Bottleneck, BasicBlock)) and last_bn is not None:
                nn.init.zeros_(last_bn.weight)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: list[nn.Module] = [self.conv1, self.bn1]
        mods += [getattr(self, f"layer{i}") for i in range(1, min(self.frozen_stages, 4) + 1)]
        return mods

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Frozen stages (and every BatchNorm with ``norm_eval``) keep their statistics fixed in training mode."""
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()
        if self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


def load_torchvision_state_dict(model: ResNet, path: str | Path) -> None:
    """Load a torchvision-format ResNet state dict from a local file (``fc.*`` ignored).

    Accepts a bare state dict or a dict wrapping it under ``state_dict`` / ``model``; raises
    ValueError naming missing, unexpected or mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone.pretrained: no such file {path} (weights are never downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"backbone.pretrained: cannot read {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"backbone.pretrained: {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    diff = state_dict_diff(model.state_dict(), state)
    if diff:
        shapes = [f"{k}: file {theirs} vs model {mine}" for k, mine, theirs in diff.mismatched]
        raise ValueError(
            f"backbone.pretrained {path} does not match the configured ResNet: "
            f"missing {diff.missing[:5]}, unexpected {diff.unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)
