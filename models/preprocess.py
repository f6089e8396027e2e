"""Frame preprocessing shared by the ROS node, replay, benchmarks and export checks.

Resizes the RGB image (and optional depth) to the network input size, scales K accordingly,
places the grid when no ``voxel_origin`` is given, and builds ``grid2img``; batch of one.

Two implementations of the same function:
- ``preprocess``: numpy + PIL on the host, the reference (ONNX Runtime / TensorRT feeds, export checks).
- ``TensorPreprocessor``: the frame path of the torch backend. The uint8 image is copied once into a
  reused (pinned, on CUDA) host buffer and uploaded with a non-blocking copy; resize, normalisation
  and the depth resize run on the device into reused output buffers. Resize tolerance against PIL,
  measured on 640x480 blocky and noise images (grey levels of 255): float path (CUDA) at most 1.0,
  mean 0.27-0.29; uint8 path (CPU, torch's PIL-derived kernel, 6x faster than PIL) at most 1
  (256x192) and 2 (512x384), mean <= 0.08. ``tests/test_preprocess_device.py`` holds these bounds.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import native_postprocess
from .config import ModelConfig
from .geometry import DEFAULT_FORWARD_DISTANCE, finite_origin, grid_to_image_matrix, place_grid, scale_intrinsic

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def capture_graph(body: Callable[[], Any], device: torch.device, pool: Any = None) -> Any:
    """``body``'s device work as a ``torch.cuda.CUDAGraph``: run once on a side stream first (lazy allocations,
    cuDNN's choices, index tables), then captured. ``thread_local``: the frame loop's other threads may
    decode, copy or query events meanwhile. ``pool``: a memory pool shared with other graphs that never run
    at the same time."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        body()
    return graph


@dataclass
class NetworkInputs:
    """Network inputs of one frame (numpy): image (1,3,h,w) f32, grid2img (1,4,4) f32,
    depth (1,1,h,w) f32 metres (0 = invalid) or None, voxel_origin (3,) f64."""

    image: np.ndarray
    grid2img: np.ndarray
    depth: np.ndarray | None
    voxel_origin: np.ndarray


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB, uint8 0..255 or float in [0,1] -> float32 normalised with ImageNet mean/std."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"normalize_image expects (B,3,H,W), got {tuple(image.shape)}")
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pixel_values(image: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`normalize_image`: ImageNet-normalised (B,3,H,W) RGB -> float values on 0..255."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image * std + mean) * 255.0


def resize_image(image_rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 HxWx3 image with PIL."""
    h, w = size_hw
    if image_rgb.shape[:2] == (h, w):
        return image_rgb
    return np.asarray(Image.fromarray(image_rgb).resize((w, h), Image.BILINEAR))


def resize_depth(depth: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (never blends valid with invalid depth); pixel centres aligned."""
    h, w = size_hw
    rows = np.minimum(((np.arange(h) + 0.5) * depth.shape[0] / h).astype(np.int64), depth.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * depth.shape[1] / w).astype(np.int64), depth.shape[1] - 1)
    return depth[rows[:, None], cols[None, :]]


def clean_depth(depth: np.ndarray) -> np.ndarray:
    """Float32 metres with NaN, inf and negative values set to 0 (invalid)."""
    d = depth.astype(np.float32, copy=True)
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d


def _check_image(image_rgb: np.ndarray) -> None:
    if not isinstance(image_rgb, np.ndarray) or image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb must be a uint8 numpy array, got {getattr(image_rgb, 'dtype', type(image_rgb))}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or min(image_rgb.shape[:2]) < 1:
        raise ValueError(f"image_rgb must be HxWx3 (RGB), got shape {image_rgb.shape}")


def _check_camera(intrinsic: np.ndarray, cam_pose: np.ndarray) -> None:
    if intrinsic.shape[0] < 3 or intrinsic.shape[1] < 3 or intrinsic.ndim != 2:
        raise ValueError(f"intrinsic must be 3x3 (or 3x4 / 4x4 with K top-left), got shape {intrinsic.shape}")
    # on Python floats: this runs per frame, where a numpy call costs ten times its warm time (geometry.place_grid)
    k = intrinsic[:3, :3].tolist()
    if not all(map(math.isfinite, (*k[0], *k[1], *k[2]))) or k[0][0] <= 0 or k[1][1] <= 0:
        raise ValueError(f"intrinsic must be finite with positive focal lengths, got fx={k[0][0]}, fy={k[1][1]}")
    if cam_pose.shape != (4, 4) or not all(map(math.isfinite, cam_pose.reshape(-1).tolist())):
        raise ValueError(f"cam_pose must be a finite 4x4 camera->world matrix, got shape {cam_pose.shape}")


def _checked_depth(depth: np.ndarray | None) -> np.ndarray | None:
    """``depth`` as an HxW float array (an HxWx1 one without its channel axis); ValueError unless it is one."""
    if depth is None:
        return None
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW metres, got shape {depth.shape}")
    if not np.issubdtype(depth.dtype, np.floating):
        raise ValueError(f"depth must be float metres, got dtype {depth.dtype} (convert 16-bit millimetres first)")
    return depth


def _frame_origin(voxel_origin: np.ndarray | None, cam_pose: np.ndarray, voxel_size: float,
                  grid_shape: tuple[int, ...], floor_z: float = 0.0) -> np.ndarray:
    """The grid origin (3,) float64: ``voxel_origin`` checked, or placed by ``place_grid`` when None."""
    if voxel_origin is None:
        voxel_origin = place_grid(cam_pose, floor_z=floor_z, voxel_size=voxel_size, grid_shape=grid_shape)
    return finite_origin(voxel_origin)


def frame_geometry(image_hw: tuple[int, int], intrinsic: np.ndarray, cam_pose: np.ndarray, size_hw: tuple[int, int],
                   voxel_size: float, grid_shape: tuple[int, int, int], voxel_origin: np.ndarray | None = None,
                   floor_z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(grid2img 4x4, voxel_origin (3,)) float64 of a frame whose image is ``image_hw``: K and the pose checked,
    the grid placed where no origin is given, K scaled to the network input ``size_hw``. In one C call where the
    kernel takes the inputs (``native_postprocess.grid_geometry``: the same numbers; the prepare stage about 0.07 ms
    shorter per frame right after a wait for the device), else on Python floats as ``preprocess``."""
    fast = native_postprocess.grid_geometry(intrinsic, cam_pose, image_hw, size_hw, voxel_size, grid_shape,
                                            voxel_origin, floor_z, DEFAULT_FORWARD_DISTANCE)
    if fast is not None:
        return fast
    intrinsic = np.asarray(intrinsic, dtype=np.float64)
    cam_pose = np.asarray(cam_pose, dtype=np.float64)
    _check_camera(intrinsic, cam_pose)
    voxel_origin = _frame_origin(voxel_origin, cam_pose, voxel_size, grid_shape, floor_z)
    k = scale_intrinsic(intrinsic[:3, :3], image_hw, size_hw)
    return grid_to_image_matrix(k, cam_pose, voxel_origin, voxel_size, grid_shape), voxel_origin


def preprocess(
    image_rgb: np.ndarray,
    intrinsic: np.ndarray,
    cam_pose: np.ndarray,
    config: ModelConfig,
    depth: np.ndarray | None = None,
    voxel_origin: np.ndarray | None = None,
) -> NetworkInputs:
    """uint8 HxWx3 RGB + 3x3 K (of that image) + 4x4 camera->world [+ HxW depth metres] -> NetworkInputs.

    The grid is placed by ``geometry.place_grid`` when ``voxel_origin`` is None. Depth may have
    another resolution than the image (same field of view); it is resized nearest-neighbour.
    """
    _check_image(image_rgb)
    size_hw = (int(config.image_size[0]), int(config.image_size[1]))
    grid2img, voxel_origin = frame_geometry(image_rgb.shape[:2], intrinsic, cam_pose, size_hw, config.voxel_size,
                                            tuple(int(n) for n in config.grid_shape), voxel_origin)
    depth = _checked_depth(depth)
    rgb = resize_image(image_rgb, size_hw).astype(np.float32) / 255.0
    image = (rgb - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    depth_out = None
    if depth is not None:
        depth_out = resize_depth(clean_depth(depth), size_hw)[None, None]
    return NetworkInputs(
        image=np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32),
        grid2img=grid2img[None].astype(np.float32),
        depth=None if depth_out is None else np.ascontiguousarray(depth_out, dtype=np.float32),
        voxel_origin=voxel_origin,
    )


@dataclass
class FrameTensors:
    """Network inputs of one frame as tensors on the inference device (same fields as NetworkInputs).

    The tensors are the preprocessor's reused buffers of one slot: valid until that slot is reused.
    """

    image: torch.Tensor
    grid2img: torch.Tensor
    depth: torch.Tensor | None
    voxel_origin: np.ndarray
    slot: int = 0
    device_origin: torch.Tensor | None = None  # as a target: where the device work copies the staged origin (float64)


@dataclass
class StagedFrame:
    """A frame checked and staged in its slot's host buffers (``TensorPreprocessor.stage``), its device work
    not yet queued: ``TensorPreprocessor.run`` queues it, into the slot's buffers or given ones."""

    slot: int
    depth_hw: tuple[int, int] | None
    voxel_origin: np.ndarray


class _Slot:
    """Per-slot host staging (pinned on CUDA) and device output buffers, allocated once per input shape."""

    def __init__(self) -> None:
        self.host_rgb: torch.Tensor | None = None
        self.host_rgb_np: np.ndarray | None = None  # numpy view of host_rgb, made once
        self.host_depth: torch.Tensor | None = None
        self.host_g2i: torch.Tensor | None = None
        self.host_origin: torch.Tensor | None = None  # (3,) float64, staged with grid2img
        self.dev_rgb: torch.Tensor | None = None
        self.dev_depth: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self.grid2img: torch.Tensor | None = None
        self.depth: torch.Tensor | None = None
        self.uploaded: torch.cuda.Event | None = None  # host staging may be rewritten once this completed
        self.uploaded_lent = False  # ``uploaded`` is the frame graph's done event (``staging_done``), not the slot's
        self.g2i_np: np.ndarray | None = None  # numpy view of host_g2i[0]
        self.origin_np: np.ndarray | None = None  # numpy view of host_origin
        self.bgr = False  # the staged bytes are in BGR order
        self.frame_rgb: torch.Tensor | None = None  # CPU: the frame's own bytes, viewed, until resized
        # (image shape, bgr, depth shape, output buffer[, frame key]) -> CUDA graph of the device work (and of
        # the frame graph's tail); dropped whenever the staging buffers are reallocated
        self.graphs: dict[tuple, Any] = {}

    def staged_shape(self) -> tuple[int, ...]:
        """Shape of the staged image: the pinned buffer's, or on the CPU the viewed frame's."""
        return tuple((self.host_rgb if self.frame_rgb is None else self.frame_rgb).shape)


class TensorPreprocessor:
    """``preprocess`` on the torch device: one uint8 upload, device resize, normalise, depth resize.

    ``slots`` independent buffer sets let a pipelined caller prepare the next frame while the
    previous one is still being read (the caller says which slot to write). ``uint8_resize``
    (default: on CPU only) resizes uint8 directly: torch's CPU antialias kernel, or where built the native
    kernel's copy of it (``native_postprocess.resize_normalise``: the same bytes, normalised in the same call;
    ``native_resize`` False keeps torch's, e.g. to compare);
    otherwise the image is resized in float32 (the only antialiased mode CUDA offers). ``graphs`` (default: on
    CUDA) captures each slot's device work (uploads from its pinned buffers, resize, normalisation,
    depth) as one CUDA graph per input shape, replayed per frame: a dozen launches become one.
    ``frame_graph`` captures that work together with the caller's (the fused path: network, post-processing,
    copies back) as one graph per slot (``frame_graphs``, default: with ``graphs``).
    ``__call__`` is ``stage`` (host: checks, ``grid2img``, the frame into the slot's buffers) then ``run``
    (device work, into the slot's outputs or given tensors); the fused frame loop calls the two on its
    prepare and finish threads.
    """

    def __init__(self, config: ModelConfig, device: str | torch.device = "cpu", slots: int = 3,
                 uint8_resize: bool | None = None, graphs: bool | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        self.size_hw = (int(config.image_size[0]), int(config.image_size[1]))
        self.grid_shape = tuple(int(n) for n in config.grid_shape)
        self.pin = self.device.type == "cuda"
        self.uint8_resize = (self.device.type == "cpu") if uint8_resize is None else bool(uint8_resize)
        self.native_resize = True
        self.graphs = self.pin if graphs is None else bool(graphs) and self.pin
        self.frame_graphs = self.graphs
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)
        # normalised = x * scale + shift, x in 0..255 (constants uploaded once, here)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self.shift = (-torch.tensor(IMAGENET_MEAN, dtype=torch.float32) / std).view(1, 3, 1, 1).to(self.device)
        self.bgr_to_rgb = torch.tensor([2, 1, 0], device=self.device)  # channel order of staged BGR bytes
        self.scale_f = tuple(self.scale.reshape(-1).tolist())  # the same float32 values, for the CPU kernel
        self.shift_f = tuple(self.shift.reshape(-1).tolist())
        self.slots = [_Slot() for _ in range(max(1, int(slots)))]
        self._depth_index: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # ``stage`` and ``run`` may run on two threads (the fused frame loop's prepare and finish stages): a
        # slot's buffers are (re)allocated, and stale graphs destroyed, on a stream of their own and never
        # while ``run`` captures a graph. Without both, a bgr8 -> JPEG size change on H200 failed one frame
        # in three runs out of six with "CUDA error: invalid argument" (session 23, device call 11).
        self._device_lock = threading.Lock()
        self._staging_stream = torch.cuda.Stream(self.device) if self.pin else None

    def _empty_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    @contextlib.contextmanager
    def _allocating(self) -> Iterator[None]:
        """Around every (re)allocation of staging buffers and destruction of captured graphs (CUDA: under
        the capture lock, on the staging stream; a no-op on the CPU). Only when an input size changes."""
        if self._staging_stream is None:
            yield
            return
        with self._device_lock, torch.cuda.stream(self._staging_stream):
            yield

    def _stage(self, slot: _Slot, image_rgb: np.ndarray, depth: np.ndarray | None, grid2img: np.ndarray,
               voxel_origin: np.ndarray) -> None:
        """Stage the frame in the slot's host buffers (reallocated only when the input size changes); on the
        CPU a writable frame is viewed where it is instead."""
        if slot.uploaded is not None and not slot.uploaded.query():  # query: no GIL round trip when done
            slot.uploaded.synchronize()  # the previous upload from these host buffers has finished
        flipped = image_rgb[..., ::-1]
        slot.bgr = flipped.flags.c_contiguous  # a bgr8 message seen as RGB: take the bytes as they are,
        source = flipped if slot.bgr else image_rgb  # swap channels after the resize
        if not self.pin and source.flags.writeable and min(source.strides) >= 0:
            slot.frame_rgb = torch.from_numpy(source)  # CPU: the resize reads the frame's own bytes, no copy
        else:  # CUDA (pinned staging for the upload), or bytes torch cannot view (read-only, broadcast)
            slot.frame_rgb = None
            if slot.host_rgb is None or tuple(slot.host_rgb.shape) != image_rgb.shape:
                with self._allocating():
                    slot.graphs.clear()  # captured graphs read the old buffers
                    slot.host_rgb = self._empty_host(image_rgb.shape, torch.uint8)
                    slot.host_rgb_np = slot.host_rgb.numpy()
                    slot.dev_rgb = (torch.empty(image_rgb.shape, dtype=torch.uint8, device=self.device) if self.pin
                                    else None)
            np.copyto(slot.host_rgb_np, source)
        if slot.host_g2i is None:
            with self._allocating():
                slot.host_g2i = self._empty_host((1, 4, 4), torch.float32)
                slot.host_origin = self._empty_host((3,), torch.float64)
            slot.g2i_np, slot.origin_np = slot.host_g2i.numpy()[0], slot.host_origin.numpy()
        slot.g2i_np[...] = grid2img
        slot.origin_np[...] = voxel_origin
        if depth is not None:
            if slot.host_depth is None or tuple(slot.host_depth.shape) != depth.shape:
                with self._allocating():
                    slot.graphs.clear()
                    slot.host_depth = self._empty_host(depth.shape, torch.float32)
                    slot.dev_depth = (torch.empty(depth.shape, dtype=torch.float32, device=self.device) if self.pin
                                      else None)
            np.copyto(slot.host_depth.numpy(), depth, casting="same_kind")

    def _outputs(self, slot: _Slot, with_depth: bool, voxel_origin: np.ndarray) -> FrameTensors:
        """The slot's own output buffers (allocated on first use) as the targets of its device work."""
        h, w = self.size_hw
        if slot.image is None:
            slot.image = torch.empty((1, 3, h, w), dtype=torch.float32, device=self.device)
            # on the CPU the staged matrix is the input itself (no copy per frame)
            slot.grid2img = (torch.empty((1, 4, 4), dtype=torch.float32, device=self.device) if self.pin
                             else slot.host_g2i)
        if with_depth and slot.depth is None:
            slot.depth = torch.empty((1, 1, h, w), dtype=torch.float32, device=self.device)
        return FrameTensors(slot.image, slot.grid2img, slot.depth if with_depth else None, voxel_origin)

    def _nearest_index(self, src_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices of ``resize_depth`` (pixel centres aligned), cached per source size."""
        if src_hw not in self._depth_index:
            h, w = self.size_hw
            rows = np.minimum(((np.arange(h) + 0.5) * src_hw[0] / h).astype(np.int64), src_hw[0] - 1)
            cols = np.minimum(((np.arange(w) + 0.5) * src_hw[1] / w).astype(np.int64), src_hw[1] - 1)
            self._depth_index[src_hw] = (torch.from_numpy(rows).to(self.device), torch.from_numpy(cols).to(self.device))
        return self._depth_index[src_hw]

    def __call__(self, image_rgb: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
                 depth: np.ndarray | None = None, voxel_origin: np.ndarray | None = None,
                 slot: int = 0, floor_z: float = 0.0) -> FrameTensors:
        """Same inputs and checks as ``preprocess``; returns the slot's device tensors (``stage`` + ``run``)."""
        return self.run(self.stage(image_rgb, intrinsic, cam_pose, depth, voxel_origin, slot, floor_z))

    def stage(self, image_rgb: np.ndarray, intrinsic: np.ndarray, cam_pose: np.ndarray,
              depth: np.ndarray | None = None, voxel_origin: np.ndarray | None = None,
              slot: int = 0, floor_z: float = 0.0) -> StagedFrame:
        """Host half: the checks, the grid (placed on ``floor_z`` where no ``voxel_origin`` is given) and
        ``grid2img`` (``frame_geometry``), and the frame copied into the slot's (pinned) host buffers. Queues no
        device work."""
        _check_image(image_rgb)
        g2i, voxel_origin = frame_geometry(image_rgb.shape[:2], intrinsic, cam_pose, self.size_hw,
                                           self.config.voxel_size, self.grid_shape, voxel_origin, floor_z)
        depth = _checked_depth(depth)
        index = slot % len(self.slots)
        self._stage(self.slots[index], image_rgb, depth, g2i, voxel_origin)
        return StagedFrame(index, None if depth is None else tuple(depth.shape), voxel_origin)

    def run(self, staged: StagedFrame, out: FrameTensors | None = None, stream: Any = None) -> FrameTensors:
        """Device half: queue the upload, resize and normalisation of a staged frame on the current stream
        (``stream``, when the caller has it at hand), into ``out``'s tensors (the slot's own buffers by
        default; e.g. a captured network's static inputs, so that no copy follows). One graph replay per
        frame where graphs are on; the slot's host buffers may be restaged once that work is done."""
        s = self.slots[staged.slot]
        depth_hw = staged.depth_hw
        target = self._outputs(s, depth_hw is not None, staged.voxel_origin) if out is None else out
        graph = self._graph(s, depth_hw, target) if self.graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._device_work(s, depth_hw, target)
        if self.pin:
            if s.uploaded is None or s.uploaded_lent:
                s.uploaded, s.uploaded_lent = torch.cuda.Event(), False  # one per slot, re-recorded each frame
            s.uploaded.record(stream)
        return FrameTensors(target.image, target.grid2img, target.depth if depth_hw is not None else None,
                            staged.voxel_origin, staged.slot)

    def frame_graph(self, staged: StagedFrame, out: FrameTensors, key: Any, make_tail: Callable[[], Callable[[], Any]],
                    make_pool: Callable[[], Any] = lambda: None) -> Any:
        """One CUDA graph of slot ``staged.slot``'s device work into ``out`` followed by the work of ``make_tail()``
        (the fused path: the network, post-processing and the copies back), captured on first use per input
        shape and ``key`` (the tail must do the same for a key), in the memory pool ``make_pool()`` gives, and
        dropped with the slot's other graphs when its staging buffers change. None when ``frame_graphs`` is
        off, or, logged and off from then on, when capture fails: the caller then runs ``run`` and its own
        work. After a replay the caller passes ``staging_done`` an event recorded after it."""
        s = self.slots[staged.slot]
        depth_hw = staged.depth_hw
        graph_key = ("frame", s.staged_shape(), s.bgr, depth_hw, out.image.data_ptr(), key)
        graph = s.graphs.get(graph_key)
        if graph is not None or not self.frame_graphs:
            return graph

        tail, pool = make_tail(), make_pool()

        def body() -> None:
            self._device_work(s, depth_hw, out)
            tail()

        try:
            with self._device_lock:  # no staging buffer of another slot is reallocated meanwhile (``_allocating``)
                graph = capture_graph(body, self.device, pool)
        except RuntimeError as exc:
            log.warning("frame graph: CUDA graph capture failed (%s); the preprocessing and the network are "
                        "replayed as two graphs from now on", exc)
            self.frame_graphs = False
            return None
        s.graphs[graph_key] = graph
        return graph

    def staging_done(self, slot: int, event: Any) -> None:
        """``event`` (recorded after a frame graph's replay) marks when slot ``slot``'s host staging may be
        rewritten: ``stage`` waits for it, and ``run`` records a slot event of its own again."""
        s = self.slots[slot]
        s.uploaded, s.uploaded_lent = event, True

    def _device_work(self, s: _Slot, depth_hw: tuple[int, int] | None, out: FrameTensors) -> None:
        """Uploads (CUDA) and resize / normalise / depth resize of slot ``s`` into ``out``'s tensors (and the grid
        origin into ``out.device_origin`` where it is given)."""
        if self.pin:
            rgb = s.dev_rgb.copy_(s.host_rgb, non_blocking=True)
            out.grid2img.copy_(s.host_g2i, non_blocking=True)
            dep = None if depth_hw is None else s.dev_depth.copy_(s.host_depth, non_blocking=True)
        else:
            rgb = s.host_rgb if s.frame_rgb is None else s.frame_rgb
            dep = s.host_depth
            if out.grid2img is not s.host_g2i:
                out.grid2img.copy_(s.host_g2i)
        if out.device_origin is not None:
            out.device_origin.copy_(s.host_origin, non_blocking=self.pin)
        self._resize_normalise(rgb, s, out.image)
        s.frame_rgb = None  # the slot does not keep the frame's message alive
        if depth_hw is not None:
            rows, cols = self._nearest_index(depth_hw)
            d = dep.index_select(0, rows).index_select(1, cols)
            bad = ~torch.isfinite(d) | (d < 0)
            torch.where(bad, torch.zeros((), dtype=d.dtype, device=d.device), d, out=out.depth[0, 0])

    def _graph(self, s: _Slot, depth_hw: tuple[int, int] | None, out: FrameTensors) -> Any:
        """The slot's captured device work for this input shape and these output tensors (captured on first
        use); None, with the preprocessor back on eager launches for good, if capture fails."""
        key = (tuple(s.host_rgb.shape), s.bgr, depth_hw, out.image.data_ptr(), out.device_origin is not None)
        graph = s.graphs.get(key)
        if graph is not None:
            return graph
        try:
            with self._device_lock:  # no staging buffer of another slot is reallocated meanwhile (``_allocating``)
                graph = capture_graph(lambda: self._device_work(s, depth_hw, out), self.device)
        except RuntimeError as exc:
            log.warning("preprocessing: CUDA graph capture failed (%s); eager launches from now on", exc)
            self.graphs = False
            return None
        s.graphs[key] = graph
        return graph

    def _resize_normalise(self, rgb_hwc: torch.Tensor, s: _Slot, out: torch.Tensor) -> None:
        """Resize + normalise slot ``s``'s staged bytes into ``out`` (RGB order, whatever the bytes')."""
        x = rgb_hwc.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) uint8 view
        order = (2, 1, 0) if s.bgr else (0, 1, 2)
        if tuple(x.shape[-2:]) != self.size_hw:
            if (self.uint8_resize and self.native_resize and rgb_hwc.device.type == "cpu" and rgb_hwc.is_contiguous()
                    and out.is_contiguous()
                    and native_postprocess.resize_normalise(rgb_hwc.numpy(), out.numpy(), order, self.scale_f,
                                                            self.shift_f)):
                return  # torch's uint8 resize bit for bit, and the normalisation below, in one call
            if self.uint8_resize:
                x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=self.size_hw,
                                  mode="bilinear", antialias=True, align_corners=False)
            else:
                x = F.interpolate(x.float(), size=self.size_hw, mode="bilinear", antialias=True, align_corners=False)
        if (x.device.type == "cpu" and x.dtype == torch.uint8 and x.is_contiguous()
                and native_postprocess.normalise_image(x.numpy(), out.numpy(), order, self.scale_f, self.shift_f)):
            return  # reorder, multiply and add in one pass, bit for bit the torch ops below
        if s.bgr:  # reorder the channels of the network-size image: cheaper than the input bytes on the host
            x = x.index_select(1, self.bgr_to_rgb)  # contiguous (1, 3, h, w)
        # a multiply and an add: on the CPU 2.5x faster than one addcmul with the broadcast constants (the
        # BGR path 0.10 -> 0.04 ms with the reorder, one thread); each is one rounding, so results may differ
        # from addcmul's in the last bit
        torch.mul(x, self.scale, out=out)  # uint8 (CPU) or float32 in, float32 out
        out.add_(self.shift)
