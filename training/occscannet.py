"""Occ-ScanNet loader (real data or ``discene-synth`` output): a torch Dataset plus its collate function.

Each item is prepared exactly like an inference frame (``models.preprocess.preprocess``: resize to
``image_size``, scale K, ImageNet normalisation, ``grid2img``) and carries its label grid:

    image        (3,H,W) float32, ImageNet-normalised RGB
    depth        (1,H,W) float32 metres, 0 = invalid (nearest-neighbour resized)
    intrinsic    (3,3)   float32, K scaled to (H, W)
    cam_pose     (4,4)   float32 camera->world
    voxel_origin (3,)    float64 world xyz of the grid corner
    grid2img     (4,4)   float32 ``K4 @ inv(cam_pose) @ G`` (models.geometry.grid_to_image_matrix)
    target       (60,60,36) int64 indexed (x, y, z): 0 empty, 1..11 classes, 255 unknown
    sample_id    str ``<scene>/<frame>``
    rgb          (H,W,3) uint8 resized image (only with ``return_rgb=True``, for renders)

Axis convention: the stored ``target_1_4`` is read with ``target_layout`` (default ``"yxz"``, see
``training/scene_format.py``) and returned as (x, y, z). Training-time remap: none by default (255
stays unknown and is ignored by losses and metrics); ``unknown_as_empty=True`` reproduces the
ISO/EmbodiedOcc training remap 255 -> 0.

The ``.pkl`` files are read with :class:`SafeUnpickler`, which builds only plain containers, numbers,
strings and numpy arrays: a pickle that references anything else (e.g. ``os.system``) is refused
before any of it runs.

Bad samples (missing files, truncated or unsafe pkl, wrong shapes or dtypes, non-finite geometry, a
pose that is not rigid or a K that does not fit its image (the node's ``check_pose`` and
``check_intrinsics``), depth that is not a 16-bit single-channel image, a grid the camera does not see,
labels outside 0..11 and 255, all-unknown or empty targets) raise ``BadSampleError`` naming the sample
id; with ``skip_bad=True`` they are logged, counted in ``skipped`` and replaced by the next good sample,
so a long run never crashes on one broken file. The replacing item carries them as ``skipped`` (id ->
reason), so that the process that reads the batches counts what its loader workers skipped. A consumer
that logs those itself (the Trainer) sets ``log_skipped = False``: one line per bad sample, not one more
per loader worker; a sample no item can carry (every sample bad) is still logged here.
"""
from __future__ import annotations

import codecs
import functools
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from discene_ros.msg_decode import check_intrinsics, check_pose
from models.config import ModelConfig
from models.geometry import GRID_SHAPE, scale_intrinsic
from models.preprocess import preprocess, resize_image

from .scene_format import DEPTH_SCALE, IMAGES, STORED_LAYOUT, UNKNOWN, from_stored, read_split, sample_paths

log = logging.getLogger(__name__)
REQUIRED_KEYS = ("cam_pose", "intrinsic", "voxel_origin", "target_1_4")
MAX_LABEL = 11
DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes of single-channel 16-bit (or 32-bit) integer images
MIN_VIEW_DEPTH = 1e-5  # metres in front of the camera a voxel centre must lie to count as seen (project_points' eps)


class BadSampleError(RuntimeError):
    """A sample that cannot be used; the message names the sample id and the problem."""


def _numpy_globals() -> dict[str, Any]:
    """The numpy callables real array pickles reference, under their numpy 1.x and 2.x module names.

    Resolved from numpy's own ``__reduce__`` output, so the same objects load under either numpy.
    """
    reconstruct = np.zeros(1).__reduce__()[0]              # multiarray._reconstruct (protocol <= 4)
    scalar = np.float64(0).__reduce__()[0]                  # multiarray.scalar (numpy scalars)
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]            # numeric._frombuffer (protocol 5)
    out: dict[str, Any] = {"numpy ndarray": np.ndarray, "numpy dtype": np.dtype}
    for core in ("numpy.core", "numpy._core"):
        out[f"{core}.multiarray _reconstruct"] = reconstruct
        out[f"{core}.multiarray scalar"] = scalar
        out[f"{core}.numeric _frombuffer"] = frombuffer
    return out


SAFE_GLOBALS: dict[str, Any] = {
    **_numpy_globals(),
    "builtins set": set, "builtins frozenset": frozenset, "builtins complex": complex, "builtins bytearray": bytearray,
    "_codecs encode": codecs.encode,  # bytes in protocol-2 pickles
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for dataset samples: only dicts, lists, tuples, strings, numbers and numpy arrays/dtypes.

    Any other global (a function or class the pickle would call) raises pickle.UnpicklingError naming it,
    so a malicious ``.pkl`` cannot run code.
    """

    def __init__(self, file: Any, source: str = "pickle") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = SAFE_GLOBALS.get(f"{module} {name}")
        if found is None:
            raise pickle.UnpicklingError(f"{self.source} references the global {module}.{name}, which a dataset "
                                         "sample never needs; refused (only dicts, lists, strings, numbers and "
                                         "numpy arrays are loaded)")
        return found


def safe_load_pickle(path: str | Path) -> Any:
    """Load a dataset ``.pkl`` with :class:`SafeUnpickler`."""
    with open(path, "rb") as f:
        return SafeUnpickler(f, str(path)).load()


# numpy before 1.24 makes an object array of ragged nested lists, with this warning, where 1.24 and later raise
RAGGED_WARNING = getattr(np, "exceptions", np).VisibleDeprecationWarning


def _numeric_array(sample_id: str, key: str, value: Any) -> np.ndarray:
    """``value`` as a numeric numpy array, or BadSampleError (strings, ragged lists, objects)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RAGGED_WARNING)
            arr = np.asarray(value)
    except (ValueError, TypeError, RAGGED_WARNING) as exc:  # ragged nested sequences
        raise BadSampleError(f"sample {sample_id}: {key} is not a regular numeric array ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        raise BadSampleError(f"sample {sample_id}: {key} has dtype {arr.dtype}, expected numbers")
    return arr


class OccScanNetDataset(Dataset):
    """Occ-ScanNet-format frames of one split (``train``/``val`` list under root, or a list-file path)."""

    def __init__(self, root: str | Path, split: str = "train", image_size: tuple[int, int] | list[int] = (480, 640),
                 config: Any = None, target_layout: str = STORED_LAYOUT, skip_bad: bool = False,
                 unknown_as_empty: bool = False, max_samples: int | None = None, return_rgb: bool = False,
                 load_depth: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Occ-ScanNet root '{self.root}' does not exist")
        if config is None:
            config = ModelConfig(image_size=[int(image_size[0]), int(image_size[1])])
        self.config = config
        self.image_size = (int(config.image_size[0]), int(config.image_size[1]))
        self.target_layout = target_layout
        from_stored(np.zeros((1, 1, 1)), target_layout)  # validates the layout name
        self.skip_bad = skip_bad
        self.unknown_as_empty = unknown_as_empty
        self.return_rgb = return_rgb
        self.load_depth = load_depth
        self.ids = read_split(self.root, split)
        if max_samples is not None:
            self.ids = self.ids[:max_samples]
        if not self.ids:
            raise ValueError(f"split '{split}' under '{self.root}' lists no samples")
        self.skipped: dict[str, str] = {}  # sample id -> reason (this process only)
        self.log_skipped = True  # off where the consumer of the items' ``skipped`` logs them (the Trainer)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not self.skip_bad:
            return self.load(self.ids[index])
        replaced: dict[str, str] = {}  # found bad in this call: the item carries them to the training process
        for step in range(len(self.ids)):
            sample_id = self.ids[(index + step) % len(self.ids)]
            if sample_id in self.skipped:
                continue
            try:
                item = self.load(sample_id)
            except BadSampleError as exc:
                self.skipped[sample_id] = replaced[sample_id] = str(exc)
                if self.log_skipped:
                    _log_skip(len(self.skipped), exc)
                continue
            if replaced:
                item["skipped"] = replaced
            return item
        if not self.log_skipped:  # no item carries these to the consumer: said here
            before = len(self.skipped) - len(replaced)
            for count, reason in enumerate(replaced.values(), before + 1):
                _log_skip(count, reason)
        raise BadSampleError(f"all {len(self.ids)} samples of '{self.root}' are bad; first: "
                             f"{next(iter(self.skipped.values()), '?')}")

    # ------------------------------------------------------------------ reading
    def read_pickle(self, sample_id: str) -> dict[str, Any]:
        """The raw pkl dict of a sample, checked for keys and shapes."""
        return read_pickle(self.root, sample_id)

    def read_target(self, sample_id: str, data: dict | None = None, allow_empty: bool = False) -> np.ndarray:
        """The (x, y, z) uint8 label grid of a sample (validated; no remap). A grid with no occupied voxel
        is refused for training (``allow_empty``: scoring takes it, as the reference's test phase does)."""
        data = self.read_pickle(sample_id) if data is None else data
        raw = _numeric_array(sample_id, "target_1_4", data["target_1_4"])
        if raw.dtype.kind == "f" and not np.all(np.isfinite(raw)):
            raise BadSampleError(f"sample {sample_id}: target_1_4 has {int(np.sum(~np.isfinite(raw)))} non-finite values")
        if raw.dtype.kind == "f" and not np.all(raw == np.round(raw)):
            raise BadSampleError(f"sample {sample_id}: target_1_4 has non-integer labels")
        bad = (raw < 0) | ((raw > MAX_LABEL) & (raw != UNKNOWN))  # checked before the uint8 cast wraps them
        if bad.any():
            shown = [v.item() for v in np.unique(raw[bad])[:5]]
            raise BadSampleError(f"sample {sample_id}: target has labels {shown} outside 0..{MAX_LABEL} and {UNKNOWN}")
        target = from_stored(raw.astype(np.uint8), self.target_layout)
        if allow_empty:
            return target
        if np.all(target == UNKNOWN):
            raise BadSampleError(f"sample {sample_id}: target is all unknown (255)")
        if not np.any((target > 0) & (target <= MAX_LABEL)):
            raise BadSampleError(f"sample {sample_id}: target has no occupied voxel")
        return target

    def load(self, sample_id: str, allow_empty: bool = False) -> dict[str, Any]:
        """Read and prepare one sample (raises BadSampleError)."""
        data = self.read_pickle(sample_id)
        target = self.read_target(sample_id, data, allow_empty)
        rgb = read_image(sample_id, find_image(self.root, sample_id, data, "img"), "RGB")
        depth = None
        if self.load_depth:
            raw = read_image(sample_id, find_image(self.root, sample_id, data, "depth_gt"), "I")
            depth = raw.astype(np.float32) / DEPTH_SCALE
        intrinsic = np.asarray(data["intrinsic"], dtype=np.float64)[:3, :3]
        cam_pose = np.asarray(data["cam_pose"], dtype=np.float64)
        origin = np.asarray(data["voxel_origin"], dtype=np.float64).reshape(3)
        try:
            check_pose(cam_pose, "cam_pose")
            check_intrinsics(intrinsic, rgb.shape[1], rgb.shape[0], "intrinsic")
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is named by check_grid_in_view below
                frame = preprocess(rgb, intrinsic, cam_pose, self.config, depth=depth, voxel_origin=origin)
        except ValueError as exc:  # FrameError (pose, K) is a ValueError too
            raise BadSampleError(f"sample {sample_id}: {exc}") from exc
        check_grid_in_view(sample_id, frame.grid2img[0], self.image_size, tuple(self.config.grid_shape))
        if self.unknown_as_empty:
            target = np.where(target == UNKNOWN, 0, target)
        out = {
            "image": torch.from_numpy(frame.image[0]),
            "depth": torch.from_numpy(frame.depth[0]) if frame.depth is not None
            else torch.zeros(1, *self.image_size),
            "intrinsic": torch.from_numpy(scale_intrinsic(intrinsic, rgb.shape[:2], self.image_size).astype(np.float32)),
            "cam_pose": torch.from_numpy(cam_pose.astype(np.float32)),
            "voxel_origin": torch.from_numpy(origin),
            "grid2img": torch.from_numpy(frame.grid2img[0]),
            "target": torch.from_numpy(target.astype(np.int64)),
            "sample_id": sample_id,
        }
        if self.return_rgb:
            out["rgb"] = torch.from_numpy(np.array(resize_image(rgb, self.image_size), dtype=np.uint8))
        return out


def _log_skip(count: int, reason: Any) -> None:
    log.warning("skipping bad sample (%d skipped so far in this process): %s", count, reason)


def read_pickle(root: str | Path, sample_id: str) -> dict[str, Any]:
    """The raw pkl dict of a sample, checked for keys, shapes and finite geometry (BadSampleError)."""
    pkl = sample_paths(root, sample_id)[0]
    if not pkl.is_file():
        raise BadSampleError(f"sample {sample_id}: missing file {pkl}")
    try:
        data = safe_load_pickle(pkl)
    except Exception as exc:  # truncated / corrupt pickles raise many different types
        raise BadSampleError(f"sample {sample_id}: cannot read {pkl} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise BadSampleError(f"sample {sample_id}: {pkl} holds a {type(data).__name__}, expected a dict")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise BadSampleError(f"sample {sample_id}: {pkl} lacks keys {missing}")
    arrays = {key: _numeric_array(sample_id, key, data[key]) for key in REQUIRED_KEYS}
    checks = [(arrays["cam_pose"].shape == (4, 4), "cam_pose must be 4x4"),
              (arrays["intrinsic"].ndim == 2 and min(arrays["intrinsic"].shape) >= 3, "intrinsic must be 3x3 or 4x4"),
              (arrays["voxel_origin"].size == 3, "voxel_origin must have 3 values"),
              (arrays["target_1_4"].shape == GRID_SHAPE, f"target_1_4 must be {GRID_SHAPE}")]
    for ok, message in checks:
        if not ok:
            raise BadSampleError(f"sample {sample_id}: {message}")
    for key in ("cam_pose", "intrinsic", "voxel_origin"):
        if not np.all(np.isfinite(arrays[key].astype(np.float64))):
            raise BadSampleError(f"sample {sample_id}: {key} has non-finite values")
    return data


def find_image(root: str | Path, sample_id: str, data: dict, key: str) -> Path:
    """Image ('img') or depth ('depth_gt') file of a sample.

    The public pkl files store absolute paths of their authors' machines (``.../posed_images/<scene>/<file>``),
    so the stored path is tried as is, then re-rooted under ``root/posed_images``, then relative to root;
    without a stored path, ``posed_images/<sample id>.jpg`` / ``.png`` is used.
    """
    root = Path(root)
    default = sample_paths(root, sample_id)[1 if key == "img" else 2]
    stored = data.get(key)
    candidates = []
    if isinstance(stored, (str, Path)) and str(stored):
        stored = Path(stored)
        candidates = [stored, root / IMAGES / stored.parent.name / stored.name, root / stored]
    for candidate in candidates + [default]:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates + [default]))
    raise BadSampleError(f"sample {sample_id}: missing file (tried {tried})")


def read_image(sample_id: str, path: Path, mode: str) -> np.ndarray:
    """Decode an image file to a numpy array in PIL mode ``mode`` ('RGB', or 'I' for 16-bit depth).

    Depth must be a single-channel integer image (16-bit millimetres): an 8-bit, colour or float file
    converts to 'I' without error but not to millimetres, so it is refused rather than read as wrong depth."""
    try:
        with Image.open(path) as im:
            if mode == "I" and im.mode not in DEPTH_MODES:
                raise BadSampleError(f"sample {sample_id}: depth image {path} has PIL mode {im.mode}, expected a "
                                     "single-channel 16-bit image in millimetres")
            return np.asarray(im.convert(mode) if im.mode != mode else im.copy())
    except BadSampleError:
        raise
    except Exception as exc:
        raise BadSampleError(f"sample {sample_id}: cannot decode {path} ({type(exc).__name__}: {exc})") from exc


@functools.lru_cache(maxsize=4)
def _normalised_centres(grid_shape: tuple[int, int, int]) -> np.ndarray:
    """(4, N) homogeneous voxel centres of a grid in the [0,1]^3 coordinates grid2img takes."""
    axes = [(np.arange(n) + 0.5) / n for n in grid_shape]
    xyz = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    return np.concatenate([xyz, np.ones((1, xyz.shape[1]))]).astype(np.float32)


def check_grid_in_view(sample_id: str, grid2img: np.ndarray, size_hw: tuple[int, int],
                       grid_shape: tuple[int, int, int]) -> None:
    """BadSampleError unless ``grid2img`` is finite in float32 and at least one voxel centre projects in front
    of the camera inside the image: a grid the camera cannot see (wrong voxel_origin, a pose from another
    frame) gives a network input with no image evidence and a loss or score that means nothing."""
    if not np.all(np.isfinite(grid2img)):
        raise BadSampleError(f"sample {sample_id}: the grid-to-image matrix overflows float32 (voxel_origin "
                             "or cam_pose too large)")
    uvz = grid2img.astype(np.float32) @ _normalised_centres(grid_shape)
    z = uvz[2]
    front = z > MIN_VIEW_DEPTH
    u, v = uvz[0, front] / z[front], uvz[1, front] / z[front]
    inside = (u >= 0) & (u < size_hw[1]) & (v >= 0) & (v < size_hw[0])
    if not inside.any():
        raise BadSampleError(f"sample {sample_id}: the camera sees no voxel of the grid ({int(front.sum())} of "
                             f"{z.size} voxel centres in front of it, none inside the image): voxel_origin and "
                             "cam_pose do not belong together")


def collate_occscannet(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of a list of samples along a new batch axis; strings become lists."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in batch[0]:
        if key == "skipped":
            continue
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    skipped = skipped_in(batch)
    if skipped:
        out["skipped"] = skipped
    return out


def skipped_in(items: list[dict[str, Any]]) -> dict[str, str]:
    """Bad samples (id -> reason) that the items of a batch replaced (``skip_bad``), for the consumer to count."""
    return {sample_id: reason for item in items for sample_id, reason in item.get("skipped", {}).items()}
