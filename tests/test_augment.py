"""Photometric distortion: the reference's procedure (PhotoMetricDistortionMultiViewImage) written out with
OpenCV per image, against the batched torch version on the same draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.augment import PhotometricDraws, hsv_to_rgb, photometric_distortion, rgb_to_hsv

cv2 = pytest.importorskip("cv2")


def reference_distortion(img: np.ndarray, draws: PhotometricDraws, i: int) -> np.ndarray:
    """The reference's steps for image ``i`` (HxWx3 float32, 0..255), its random draws replaced by ``draws``."""
    img = img.copy()
    brightness, contrast, saturation, hue = draws.apply[i].tolist()
    if brightness:
        img += np.float32(draws.brightness[i])
    first = bool(draws.contrast_first[i])
    if first and contrast:
        img *= np.float32(draws.contrast[i])
    img = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    if saturation:
        img[..., 1] *= np.float32(draws.saturation[i])
    if hue:
        img[..., 0] += np.float32(draws.hue[i])
        img[..., 0][img[..., 0] > 360] -= 360
        img[..., 0][img[..., 0] < 0] += 360
    img = cv2.cvtColor(img, cv2.COLOR_HSV2RGB)
    if not first and contrast:
        img *= np.float32(draws.contrast[i])
    return img


def test_hsv_conversions_are_opencvs():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, size=(2, 16, 24, 3)).astype(np.float32)
    img[0, :3, :3] = 90.0  # grey: S = 0
    hsv = rgb_to_hsv(torch.from_numpy(img).permute(0, 3, 1, 2))
    expected = np.stack([cv2.cvtColor(i, cv2.COLOR_RGB2HSV) for i in img])
    np.testing.assert_allclose(hsv.permute(0, 2, 3, 1).numpy(), expected, atol=1e-3)
    back = hsv_to_rgb(torch.from_numpy(expected).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(back, np.stack([cv2.cvtColor(i, cv2.COLOR_HSV2RGB) for i in expected]), atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distortion_matches_the_reference_steps_on_the_same_draws(seed):
    g = torch.Generator().manual_seed(seed)
    draws = PhotometricDraws.sample(6, g)
    draws.apply[0] = True   # every step, contrast before or after
    draws.apply[1] = False  # none: only the HSV round trip
    img = np.random.default_rng(seed).uniform(0, 255, size=(6, 20, 28, 3)).astype(np.float32)
    out = photometric_distortion(torch.from_numpy(img).permute(0, 3, 1, 2), draws).permute(0, 2, 3, 1).numpy()
    for i in range(6):
        np.testing.assert_allclose(out[i], reference_distortion(img[i], draws, i), atol=2e-3, rtol=1e-5)
    np.testing.assert_allclose(out[1], img[1], atol=2e-3)
    assert not np.allclose(out[0], img[0], atol=1.0)


def test_draws_cover_the_reference_ranges_and_halves():
    draws = PhotometricDraws.sample(4000, torch.Generator().manual_seed(0))
    assert draws.brightness.abs().max() <= 32 and draws.brightness.abs().max() > 31
    assert 0.5 <= draws.contrast.min() and draws.contrast.max() <= 1.5
    assert 0.5 <= draws.saturation.min() and draws.saturation.max() <= 1.5 and draws.hue.abs().max() <= 18
    rates = draws.apply.float().mean(0).tolist() + [draws.contrast_first.float().mean().item()]
    assert all(0.46 < r < 0.54 for r in rates), rates
