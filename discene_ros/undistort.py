"""Undistortion of raw camera images from their CameraInfo (numpy remap, maps cached per calibration).

The network assumes a pinhole camera. A raw ``image_raw`` with non-zero ``plumb_bob``,
``rational_polynomial`` or ``equidistant`` coefficients is remapped to the pinhole image with the
same K (what ``image_proc`` calls ``image_rect`` with P = K): for every output pixel the forward
distortion model gives the raw pixel to sample. The map depends only on the calibration and the
image size, so it is computed once and reused. Images with zero coefficients pass through untouched, and
rectified ones (``processing.images_rectified``: image_proc's ``image_rect``, beside the raw image's CameraInfo
and its non-zero D) never come here.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CameraInfoError

MIN_MAP_COVERAGE = 0.5  # share of the pinhole image whose undistortion samples the raw image

DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")


def distortion_coefficients(info: Any) -> tuple[str, np.ndarray]:
    """(model, coefficients) of a CameraInfo; zero coefficients mean a pinhole (rectified) image."""
    model = str(getattr(info, "distortion_model", "") or "plumb_bob")
    d = np.asarray(getattr(info, "d", ()), dtype=np.float64).reshape(-1)
    return model, d


def needs_undistortion(info: Any) -> bool:
    _, d = distortion_coefficients(info)
    return bool(d.size) and bool(np.any(d != 0.0))


def distort_normalised(x: np.ndarray, y: np.ndarray, model: str, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward distortion of normalised pinhole coordinates (x = X/Z, y = Y/Z) -> distorted ones."""
    if not np.all(np.isfinite(d)):
        raise CameraInfoError(f"camera info distortion coefficients are not finite: {d.tolist()}")
    if model in ("plumb_bob", "rational_polynomial"):
        k = np.zeros(8)
        k[: min(d.size, 8)] = d[:8]
        k1, k2, p1, p2, k3, k4, k5, k6 = k
        r2 = x * x + y * y
        radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        return xd, yd
    if model == "equidistant":
        k = np.zeros(4)
        k[: min(d.size, 4)] = d[:4]
        r = np.sqrt(x * x + y * y)
        theta = np.arctan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (k[0] + t2 * (k[1] + t2 * (k[2] + t2 * k[3]))))
        scale = np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)
        return x * scale, y * scale
    raise CameraInfoError(f"distortion model {model!r} is not supported (supported: {', '.join(DISTORTION_MODELS)}); "
                          "rectify the images with image_proc and read its image_rect topic (rectified:=auto or true)")


def undistort_map(k: np.ndarray, model: str, d: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(map_x, map_y) float32 (H, W): raw-image pixel to sample for each pinhole output pixel."""
    h, w = hw
    fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2]
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (u - cx) / fx, (v - cy) / fy
    xd, yd = distort_normalised(x, y, model, d)
    return (fx * xd + cx).astype(np.float32), (fy * yd + cy).astype(np.float32)


def check_map_coverage(map_x: np.ndarray, map_y: np.ndarray, hw: tuple[int, int], model: str, d: np.ndarray) -> None:
    """CameraInfoError when the map samples the raw image for less than MIN_MAP_COVERAGE of the pinhole
    image: coefficients of another camera or resolution, or garbage, would otherwise give a mostly black
    image that the network reads as a scene. A real lens leaves at most its corners uncovered."""
    h, w = hw
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)  # NaN compares False
    coverage = float(inside.mean())
    if coverage < MIN_MAP_COVERAGE:
        raise CameraInfoError(f"{model} distortion coefficients {np.round(d, 6).tolist()} map only {100 * coverage:.0f} % "
                              f"of the {w}x{h} image inside the raw one (at least {100 * MIN_MAP_COVERAGE:.0f} % "
                              "expected): a calibration of another camera or resolution?")


class BilinearTable:
    """Precomputed bilinear sampling of one map: four flat source indices and weights per output pixel
    (weight 0 outside the image), so a frame costs four gathers and a weighted sum."""

    def __init__(self, map_x: np.ndarray, map_y: np.ndarray, src_hw: tuple[int, int]) -> None:
        h, w = src_hw
        x0, y0 = np.floor(map_x).astype(np.int64), np.floor(map_y).astype(np.int64)
        fx, fy = (map_x - x0).astype(np.float32), (map_y - y0).astype(np.float32)
        index, weight = [], []
        for dy, dx, wgt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
            xs, ys = x0 + dx, y0 + dy
            inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
            index.append((ys.clip(0, h - 1) * w + xs.clip(0, w - 1)).reshape(-1))
            weight.append(np.where(inside, wgt, 0.0).astype(np.float32).reshape(-1, 1))
        self.index, self.weight, self.out_hw = index, weight, map_x.shape

    def __call__(self, image: np.ndarray) -> np.ndarray:
        flat = image.reshape(-1, image.shape[2] if image.ndim == 3 else 1)
        out = flat[self.index[0]] * self.weight[0]
        for index, weight in zip(self.index[1:], self.weight[1:], strict=True):
            out += flat[index] * weight
        if np.issubdtype(image.dtype, np.integer):
            out = np.clip(np.rint(out), np.iinfo(image.dtype).min, np.iinfo(image.dtype).max)
        return out.astype(image.dtype).reshape(self.out_hw + image.shape[2:])


def remap_nearest(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Nearest-neighbour sampling (depth: never blend across an edge); outside -> ``fill``."""
    h, w = image.shape[:2]
    xs, ys = np.rint(map_x).astype(np.int64), np.rint(map_y).astype(np.int64)
    ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    return np.where(ok, image[ys.clip(0, h - 1), xs.clip(0, w - 1)], fill).astype(image.dtype)


class Undistorter:
    """Remaps raw images to pinhole ones; maps and sampling tables per (calibration, image size), built once."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray, BilinearTable] | str] = {}  # str: why refused
        self.maps_built = 0

    def maps(self, info: Any, k: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, BilinearTable] | None:
        """(map_x, map_y, bilinear table) for an image of size ``hw`` with intrinsics ``k``; None without distortion."""
        if not needs_undistortion(info):
            return None
        model, d = distortion_coefficients(info)
        key = (model, tuple(d.tolist()), tuple(np.round(k, 9).reshape(-1).tolist()), tuple(hw))
        if key not in self._cache:
            if len(self._cache) > 8:  # a changing calibration must not grow memory without bound
                self._cache.clear()
            map_x, map_y = undistort_map(k, model, d, hw)
            self.maps_built += 1
            try:
                check_map_coverage(map_x, map_y, hw, model, d)
            except CameraInfoError as exc:  # refused once per calibration, not recomputed per frame
                self._cache[key] = str(exc)
                raise
            self._cache[key] = (map_x, map_y, BilinearTable(map_x, map_y, hw))
        cached = self._cache[key]
        if isinstance(cached, str):  # a fresh exception each frame: a re-raised one would grow its traceback
            raise CameraInfoError(cached)
        return cached

    def __call__(self, info: Any, rgb: np.ndarray, k: np.ndarray,
                 depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(rgb, depth) as a pinhole camera with intrinsics ``k`` would see them."""
        cached = self.maps(info, k, rgb.shape[:2])
        if cached is None:
            return rgb, depth
        map_x, map_y, table = cached
        rgb = table(rgb)
        if depth is not None:
            if depth.shape != rgb.shape[:2]:  # depth at another resolution: its own map (same normalised model)
                kd = k.copy()
                kd[0] *= depth.shape[1] / rgb.shape[1]
                kd[1] *= depth.shape[0] / rgb.shape[0]
                map_x, map_y, _ = self.maps(info, kd, depth.shape)
            depth = remap_nearest(depth, map_x, map_y, fill=np.nan)
        return rgb, depth
