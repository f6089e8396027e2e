"""Shared fixtures: the lite model config/network, one hand-checkable camera set-up, deterministic mode."""
from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models
from discene_ros import msg_decode, processing
from models import geometry, native_postprocess

# Camera 1.5 m above the floor at the world origin, looking horizontally along world +y.
# Columns of the rotation are the camera x (right), y (down), z (forward) axes in world coordinates.
CAM_POSE = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 1.5], [0.0, 0.0, 0.0, 1.0]])
# K of a 512x384 image; the lite network input is 256x192, so fx = fy = 100, cx = 128, cy = 96 there.
INTRINSIC = np.array([[200.0, 0.0, 256.0], [0.0, 200.0, 192.0], [0.0, 0.0, 1.0]])
IMAGE_HW = (384, 512)


@pytest.fixture(autouse=True)
def unfreeze_objects(request, monkeypatch):
    """The node and the replay freeze their start-up objects out of the garbage collector
    (``processing.freeze_startup_objects``); each test ends with them collectable again. The full collection
    before the freeze scans this whole test process (0.24 s a call, two per node): only tests marked
    ``full_startup_collection`` run it; the others freeze without it, and the unfreeze below releases what
    that froze."""
    if request.node.get_closest_marker("full_startup_collection") is None:
        monkeypatch.setattr(processing, "gc", SimpleNamespace(collect=lambda: 0, freeze=gc.freeze,
                                                              get_freeze_count=gc.get_freeze_count))
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Benchmarks' ``main`` set torch's process-wide thread count; each test ends with the count it began
    with (a count left at 1 made later in-process training rows differ from their child processes')."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_FORKS: list[list[str]] | None = None  # thread names at each os.fork of this process, while a test records
_FORK_HOOK = False  # whether the recorder is registered (registrations cannot be undone)


def _record_fork() -> None:
    if _FORKS is not None:
        _FORKS.append(sorted(t.name for t in threading.enumerate()))


@pytest.fixture()
def forks_of_this_process() -> Iterator[list[list[str]]]:
    """The threads running at each ``os.fork`` of this (the test) process while the test runs, one sorted list
    of names a fork: for tests that workers start from a fork server, never as forks of a threaded process."""
    global _FORKS, _FORK_HOOK
    if not _FORK_HOOK:
        os.register_at_fork(before=_record_fork)
        _FORK_HOOK = True
    _FORKS = forks = []
    try:
        yield forks
    finally:
        _FORKS = None


@pytest.fixture()
def native_kernel() -> None:
    """For tests of the native kernel itself: failed where it is missing or stale (CI builds it with
    ``pip install -e .``; a build that silently failed must not pass as skips), skipped only where
    ``DISCENE_NATIVE_POSTPROCESS=0`` switches it off on purpose, so that the suite can be run as on a robot
    whose install had no C compiler (the torch ops and Python floats then run everything)."""
    if native_postprocess.switched_off():
        pytest.skip(f"native kernel {native_postprocess.SWITCHED_OFF}")
    assert native_postprocess.available(), native_postprocess.unavailable_reason()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny synthetic Occ-ScanNet set (3 scenes x 2 frames, 128x96) for training tests (shared: read only)."""
    from training.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, scenes=3, frames_per_scene=2, seed=3, width=128, height=96, val_fraction=0.34, progress=False)
    return root


@pytest.fixture(scope="session")
def lite_config() -> models.ModelConfig:
    return models.load_config("lite")


@pytest.fixture(scope="session")
def lite_model(lite_config) -> torch.nn.Module:
    """A randomly initialised lite network in eval mode (shared: do not modify it in tests)."""
    torch.manual_seed(0)
    return models.build_model(lite_config).eval()


@pytest.fixture()
def lite_grid2img(lite_config) -> torch.Tensor:
    """(1,4,4) grid2img of the reference camera at the lite input size, grid placed by place_grid."""
    k = geometry.scale_intrinsic(INTRINSIC, IMAGE_HW, tuple(lite_config.image_size))
    origin = geometry.place_grid(CAM_POSE)
    return torch.tensor(geometry.grid_to_image_matrix(k, CAM_POSE, origin), dtype=torch.float32)[None]


@pytest.fixture()
def deterministic():
    """For tests whose runs set ``deterministic: true``: switches torch's deterministic algorithms off after."""
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(params=["cv2", "pil"])
def image_decoder(request, monkeypatch) -> str:
    """Run a test with each compressed-image decoder of ``msg_decode``: cv2 (where it is installed, as on
    a robot: package.xml depends on python3-opencv), and PIL with cv2 hidden (its fallback)."""
    if request.param == "cv2":
        pytest.importorskip("cv2", reason="opencv-python-headless is in the dev extras")
    else:
        monkeypatch.setattr(msg_decode, "opencv", lambda: None)
    return request.param
