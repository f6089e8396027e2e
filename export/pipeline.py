"""One frame end to end: preprocess -> backend.infer -> points_to_occupancy, with per-stage timings.

Shared by the ROS node, bag replay and the benchmarks so that all of them measure and run the same
code path (docs/architecture.md, "Inference data flow").
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from models.config import ModelConfig
from models.geometry import place_grid

from .backends.base import Backend

STAGES = ("preprocess", "infer", "postprocess", "total")


@dataclass
class StageTimings:
    """Wall-clock milliseconds of each stage of one frame."""

    preprocess_ms: float = 0.0
    infer_ms: float = 0.0
    postprocess_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# Post-processing settings a deployment may tune without re-exporting (e.g. from ROS parameters).
POSTPROCESS_FIELDS = ("name", "score_threshold", "max_center_dist", "closing")


def _network_fields(config: ModelConfig) -> dict:
    d = config.to_dict()
    d["backbone"] = {k: v for k, v in d["backbone"].items() if k not in ("pretrained", "frozen_stages")}
    return {k: v for k, v in d.items() if k not in POSTPROCESS_FIELDS}


class OccupancyPipeline:
    """Wires preprocess, a ``Backend`` and post-processing; keeps the last ``window`` frames' timings.

    ``config`` may differ from the backend's in post-processing settings only (score threshold,
    centre distance, closing); anything that changes the network's inputs or outputs is refused.
    """

    def __init__(self, backend: Backend, config: ModelConfig | None = None, window: int = 100):
        self.backend = backend
        self.config = config or backend.config
        mine, theirs = _network_fields(self.config), _network_fields(backend.config)
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"pipeline config '{self.config.name}' differs from the backend's model config "
                             f"'{backend.config.name}' in {diff}: inputs or outputs would not match the network")
        self.last_timings = StageTimings()
        self.history: deque[StageTimings] = deque(maxlen=window)

    def process(self, image_rgb: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
                depth: np.ndarray | None = None, voxel_origin: np.ndarray | None = None, floor_z: float = 0.0):
        """RGB uint8 HxWx3 + 3x3 K + 4x4 camera->world (+ depth in metres) -> ``OccupancyFrame``.

        Without ``voxel_origin`` the grid is placed by ``geometry.place_grid(cam_pose, floor_z)``.
        """
        from models.postprocess import points_to_occupancy
        from models.preprocess import preprocess

        t0 = time.perf_counter()
        if voxel_origin is None:
            voxel_origin = place_grid(cam_pose, floor_z=floor_z, voxel_size=self.config.voxel_size,
                                      grid_shape=tuple(self.config.grid_shape))
        inputs = preprocess(image_rgb, intrinsic, cam_pose, self.config, depth=depth, voxel_origin=voxel_origin)
        t1 = time.perf_counter()
        raw = self.backend.infer(inputs)
        t2 = time.perf_counter()
        frame = points_to_occupancy(raw["points"], raw["scores"], inputs.voxel_origin, self.config)
        t3 = time.perf_counter()
        self.last_timings = StageTimings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t3 - t0) * 1e3)
        self.history.append(self.last_timings)
        return frame

    def timing_summary(self) -> dict[str, dict[str, float]]:
        """Median, p95 and mean ms per stage over the recent window (empty before the first frame)."""
        if not self.history:
            return {}
        out = {}
        for stage in STAGES:
            values = np.array([getattr(t, f"{stage}_ms") for t in self.history])
            out[stage] = {"median_ms": float(np.median(values)), "p95_ms": float(np.percentile(values, 95)),
                          "mean_ms": float(values.mean())}
        return out

    def close(self) -> None:
        self.backend.close()
