"""Photometric distortion of training images, as the reference trains (its PhotoMetricDistortionMultiViewImage,
mmdet's PhotoMetricDistortion with the default ranges): random brightness, contrast before or after,
saturation and hue, each applied with probability 1/2, on 0..255 values and never clipped.

It runs on the device on the whole batch (``data.prepare_inputs``), with each image's draws from a
generator the trainer seeds per step, so that a resumed run distorts as an uninterrupted one would.
The colour space is OpenCV's float HSV (H in degrees, S in [0, 1], V in the image's units), worked out
per pixel as ``cv2.cvtColor`` does; tests/test_augment.py compares the two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BRIGHTNESS_DELTA = 32.0           # added to every channel, U(-delta, delta), on 0..255 values
CONTRAST_RANGE = (0.5, 1.5)       # every channel multiplied by U(lo, hi)
SATURATION_RANGE = (0.5, 1.5)     # S multiplied by U(lo, hi)
HUE_DELTA = 18.0                  # degrees added to H, U(-delta, delta), then wrapped into [0, 360)
EPS = 1.1920929e-07               # FLT_EPSILON, as OpenCV's float HSV conversion guards its divisions


@dataclass
class PhotometricDraws:
    """One batch's draws, (B,) each: the factor or offset of each step, and whether it applies."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    contrast_first: torch.Tensor  # the reference's mode 1: contrast before the HSV steps, else after
    saturation: torch.Tensor
    hue: torch.Tensor
    apply: torch.Tensor           # (B, 4) bool: brightness, contrast, saturation, hue

    @classmethod
    def sample(cls, batch: int, generator: torch.Generator) -> PhotometricDraws:
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(batch, generator=generator, dtype=torch.float64)

        return cls(brightness=uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), contrast=uniform(*CONTRAST_RANGE),
                   contrast_first=torch.rand(batch, generator=generator) < 0.5,
                   saturation=uniform(*SATURATION_RANGE), hue=uniform(-HUE_DELTA, HUE_DELTA),
                   apply=torch.rand(batch, 4, generator=generator) < 0.5)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) float RGB -> HSV as OpenCV's float conversion: H in [0, 360), S = (V - min) / V."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(dim=1)
    diff = v - rgb.min(dim=1).values
    s = diff / (v.abs() + EPS)
    scale = 60.0 / (diff + EPS)
    h = torch.where(v == r, (g - b) * scale, torch.where(v == g, (b - r) * scale + 120.0, (r - g) * scale + 240.0))
    h = torch.where(h < 0, h + 360.0, h)
    return torch.stack([h, s, v], dim=1)


# which of (v, p, q, t) each of r, g, b takes in each 60-degree sector of H (OpenCV's sector table)
_SECTOR_RGB = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) OpenCV float HSV -> RGB; the inverse of :func:`rgb_to_hsv`."""
    h, s, v = hsv.unbind(1)
    h6 = torch.remainder(h * (6.0 / 360.0), 6.0)
    sector = h6.floor().clamp(0, 5)
    f = h6 - sector
    tab = torch.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))], dim=1)  # v, p, q, t
    index = torch.tensor(_SECTOR_RGB, device=hsv.device)[sector.long()]  # (B,H,W,3)
    rgb = tab.gather(1, index.permute(0, 3, 1, 2))
    return torch.where((s == 0).unsqueeze(1), v.unsqueeze(1).expand_as(rgb), rgb)


def photometric_distortion(image: torch.Tensor, draws: PhotometricDraws) -> torch.Tensor:
    """(B,3,H,W) float RGB on 0..255 -> the distorted images (the same units; not clipped)."""
    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=image.device, dtype=image.dtype).view(-1, 1, 1)

    apply = draws.apply.to(image.device)
    x = image + per_image(draws.brightness * draws.apply[:, 0]).unsqueeze(1)
    contrast = per_image(torch.where(draws.apply[:, 1], draws.contrast, torch.ones_like(draws.contrast))).unsqueeze(1)
    first = draws.contrast_first.to(image.device).view(-1, 1, 1, 1)
    x = torch.where(first, x * contrast, x)
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(1)
    s = torch.where(apply[:, 2].view(-1, 1, 1), s * per_image(draws.saturation), s)
    shifted = h + per_image(draws.hue)
    shifted = torch.where(shifted > 360.0, shifted - 360.0, torch.where(shifted < 0, shifted + 360.0, shifted))
    h = torch.where(apply[:, 3].view(-1, 1, 1), shifted, h)
    x = hsv_to_rgb(torch.stack([h, s, v], dim=1))
    return torch.where(first, x, x * contrast)
