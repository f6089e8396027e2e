"""PyTorch backend: eager, or replayed from static buffers (a CUDA graph on CUDA), optionally compiled.

Modes (``describe()`` and the start-up log say which one runs, and why a request fell back):
- eager: the reference the other backends match (CPU default).
- ``cuda_graph``: inputs are copied into static buffers and the network is replayed. On CUDA the
  forward is captured once per input shape into a ``torch.cuda.CUDAGraph`` after a warm-up on a
  side stream (the forward makes no host-to-device copy and no host sync, which capture requires);
  on the CPU there are no graphs, and the same static-buffer logic runs the eager forward.
- ``compile``: ``torch.compile`` (inductor) of the forward, CUDA only (CPU stays eager); it takes
  tens of seconds on the first frame of each precision, reused from inductor's on-disk FX graph
  cache on later starts.
- ``tf32`` / ``tf32_convolutions`` (off by default): FP32 on CUDA is IEEE; ``tf32_convolutions`` runs the cuDNN
  convolutions on TF32 tensor cores and keeps the matmuls IEEE (PyTorch's own default FP32), ``tf32`` both.
- ``cudnn_benchmark`` (off by default): on CUDA, ``torch.backends.cudnn.benchmark`` is on while this
  backend runs, so cuDNN times its convolution algorithms during the warm-up and the captured graph
  keeps the fastest; off, cuDNN's heuristic choice is used (and the global flag is left alone).
- ``run_fused``: with a CUDA graph, a fixed-shape post-processing function (``dense_occupancy``) is
  captured in the same graph as the network, so one replay gives the voxel grid with no host sync.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config import ModelConfig
from models.device import resolve_device

from ..wrapper import ExportWrapper
from .base import Backend, input_feed, input_shapes, own_config

log = logging.getLogger(__name__)

WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuDNN autotuning, lazy allocations)


@dataclass
class _Captured:
    """Static inputs/outputs for one input shape, and the CUDA graph that reads and writes them."""

    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...] = ()
    graph: Any = None
    replays: int = 0


class StaticRunner:
    """Runs ``fn(**inputs) -> (points, scores)`` from static input buffers into static output buffers.

    One entry per input-shape signature, created on first use. With ``use_graph`` (CUDA) the entry
    holds a captured CUDA graph that is replayed; without it (CPU) ``fn`` runs eagerly on the static
    inputs and its results are copied into the static outputs, so callers see the same contract:
    the returned tensors are overwritten by the next call.
    """

    def __init__(self, fn: Any, device: torch.device, use_graph: bool, context: Any) -> None:
        self.fn, self.device, self.use_graph, self.context = fn, device, use_graph, context
        self.entries: dict[tuple, _Captured] = {}

    @staticmethod
    def signature(tensors: dict[str, torch.Tensor]) -> tuple:
        return tuple((n, tuple(t.shape), t.dtype) for n, t in tensors.items())

    def _entry(self, tensors: dict[str, torch.Tensor]) -> _Captured:
        key = self.signature(tensors)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._build(tensors)
        return entry

    def static_inputs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The static input buffers for inputs shaped like ``tensors`` (built, and captured, from their
        values on first use): a caller that writes its inputs there saves ``__call__`` their copies."""
        return self._entry(tensors).inputs

    def __call__(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        entry = self._entry(tensors)
        for name, t in tensors.items():
            if t.data_ptr() != entry.inputs[name].data_ptr():
                entry.inputs[name].copy_(t, non_blocking=True)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            with self.context():
                out = self.fn(**entry.inputs)
            for dst, src in zip(entry.outputs, out, strict=True):
                dst.copy_(src)
        entry.replays += 1
        return entry.outputs

    def _build(self, tensors: dict[str, torch.Tensor]) -> _Captured:
        inputs = {n: torch.empty_like(t, device=self.device).copy_(t) for n, t in tensors.items()}
        if not self.use_graph:
            with self.context():
                out = self.fn(**inputs)
            return _Captured(inputs, tuple(torch.empty_like(o) for o in out))
        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self.context():
            for _ in range(WARMUP_RUNS):
                self.fn(**inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the frame pipeline's other thread may upload, allocate or synchronise meanwhile
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), self.context():
            out = self.fn(**inputs)
        torch.cuda.synchronize(self.device)
        log.info("captured a CUDA graph for inputs %s in %.1f s", {n: tuple(t.shape) for n, t in inputs.items()},
                 time.perf_counter() - t0)
        return _Captured(inputs, tuple(out), graph)


class TorchBackend(Backend):
    """Runs ``DiSceneNet`` through ``ExportWrapper`` in eval mode under ``torch.inference_mode``.

    FP16 uses CUDA autocast (matmuls/convs in half, reductions and softmax in float) rather than
    ``model.half()``; the camera projection and the sampling locations stay float32 under autocast
    (models/geometry.py, models/sampling.py). FP32 on CUDA is IEEE FP32: TF32 is switched off during
    ``infer`` unless ``tf32=True`` (convolutions and matmuls) or ``tf32_convolutions=True`` (convolutions
    only, PyTorch's default). Agreement with IEEE (``benchmarks/fp16_agreement.py --compare tf32
    tf32_convolutions``, H200, val split), trained paper_student / shipped lite: TF32 99.77 / 99.95 % of the
    voxel labels, TF32 convolutions only 99.993 / 99.999 %, SSC IoU/mIoU within 0.01 (on random-but-active
    weights, an earlier H100 run: TF32 changed half of the occupied labels). With ``fp16`` both stay off,
    so the float32 geometry under autocast stays IEEE.
    ``cudnn_benchmark=True`` autotunes cuDNN's convolution algorithms on CUDA (see the module
    docstring); neither option changes anything on the CPU.
    """

    name = "torch"

    def __init__(self, model: nn.Module, config: ModelConfig, device: str | None = None, fp16: bool = False,
                 tf32: bool = False, compile: bool = False, cuda_graph: bool = False,
                 cudnn_benchmark: bool = False, tf32_convolutions: bool = False):
        dev = resolve_device(device)
        if fp16 and dev.type != "cuda":
            raise ValueError("fp16 with the torch backend needs a CUDA device (CPU half precision is slow "
                             "and inaccurate; bfloat16 autocast on the CPU is a different, coarser format); "
                             "pass device='cuda' or drop fp16")
        self.torch_device = dev
        self._input_shapes = input_shapes(config)  # by input name, in input order (checked every frame)
        self.fp16 = fp16
        self.tf32 = tf32 and not fp16
        self.tf32_convolutions = (tf32 or tf32_convolutions) and not fp16
        self.cudnn_benchmark = cudnn_benchmark and dev.type == "cuda"
        self.wrapper = ExportWrapper(model, config.use_depth).to(dev).eval()
        self.notes: list[str] = []
        requested = "tf32" if tf32 else "tf32_convolutions" if tf32_convolutions else None
        if requested and (fp16 or dev.type != "cuda"):
            self.notes.append(f"{requested} requested with fp16: off (the float32 geometry stays IEEE)" if fp16 else
                              f"{requested} requested but the device is the CPU: no effect")
        if cudnn_benchmark:
            self.notes.append("cudnn.benchmark on: cuDNN times its convolution algorithms on the first frames"
                              if self.cudnn_benchmark else "cudnn_benchmark requested but the device is the CPU: "
                              "no effect")
        fn = self.wrapper
        self.compiled = False
        if compile and dev.type != "cuda":
            self.notes.append("compile requested but the device is the CPU: eager (CPU stays eager)")
        elif compile:
            fn = torch.compile(self.wrapper, dynamic=False, fullgraph=False)
            self.compiled = True
            self.notes.append("torch.compile on: the first frame compiles (tens of seconds; inductor's FX graph "
                              "cache makes later starts faster)")
        self.static = cuda_graph
        self.runner: StaticRunner | None = None
        if cuda_graph:
            graph = dev.type == "cuda"
            self.runner = StaticRunner(fn, dev, graph, self._context)
            if not graph:
                self.notes.append("cuda_graph requested but the device is the CPU: static-buffer eager replay")
        self._fn = fn
        self._first_call = True
        self._fused: dict[Any, StaticRunner] = {}
        mode = "+".join(m for m, on in (("compile", self.compiled), ("cuda_graph" if dev.type == "cuda" else
                                        "static", self.static)) if on) or "eager"
        super().__init__(config, str(dev) + (" fp16" if fp16 else f" {self.fp32_math}" if dev.type == "cuda" and
                                             self.tf32_convolutions else ""))
        self.mode = mode
        for note in self.notes:
            log.info("torch backend: %s", note)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, fp16: bool = False,
                        config: ModelConfig | None = None, **options: Any) -> TorchBackend:
        """Load with ``models.checkpoint.load_model`` (which refuses corrupt files) and wrap."""
        from models.checkpoint import load_model

        model, ckpt_config = load_model(str(path), map_location="cpu")
        config = own_config(ckpt_config, config, f"the checkpoint {Path(path).name}")
        return cls(model, config, device=device, fp16=fp16, **options)

    @property
    def fp32_math(self) -> str:
        """What FP32 runs as on CUDA: "tf32", "tf32 convolutions" (matmuls IEEE) or "ieee"."""
        return "tf32" if self.tf32 else "tf32 convolutions" if self.tf32_convolutions else "ieee"

    def describe(self) -> str:
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return f"{self.name} {self.mode} on {self.device} ({self.config.name}){notes}"

    @contextlib.contextmanager
    def _context(self):
        """TF32 switched as configured, cudnn.benchmark on where configured (CUDA; else left as it is),
        FP16 autocast (its weight-cast cache off: CUDA graph capture needs that)."""
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        saved_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.allow_tf32 = self.tf32_convolutions
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        try:
            with torch.autocast(device_type=self.torch_device.type, dtype=torch.float16, enabled=self.fp16,
                                cache_enabled=False if self.static else None):
                yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
            if self.cudnn_benchmark:
                torch.backends.cudnn.benchmark = saved_benchmark

    def tensors(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Input tensors on the device: ``FrameTensors`` pass through (checked), numpy is uploaded."""
        self.require_open()
        shapes = self._input_shapes
        if all(isinstance(getattr(inputs, n, None), torch.Tensor) for n in shapes):
            out = {}
            for n in shapes:
                t = getattr(inputs, n)
                if tuple(t.shape) != shapes[n] or t.dtype != torch.float32:
                    raise ValueError(f"input '{n}' is {tuple(t.shape)} {t.dtype}, model '{self.config.name}' "
                                     f"expects {shapes[n]} float32")
                out[n] = t if t.device == self.torch_device else t.to(self.torch_device, non_blocking=True)
            return out
        feed = input_feed(inputs, self.config)
        return {k: torch.from_numpy(v).to(self.torch_device, non_blocking=True) for k, v in feed.items()}

    @torch.inference_mode()
    def run(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Network outputs on the device (points, sigmoid scores); static buffers when ``cuda_graph``."""
        tensors = self.tensors(inputs)
        t0 = time.perf_counter()
        if self.runner is not None:
            out = self.runner(tensors)
        else:
            with self._context():
                out = self._fn(**tensors)
        if self._first_call:
            self._first_call = False
            if self.compiled or self.runner is not None:
                if self.torch_device.type == "cuda":
                    torch.cuda.synchronize(self.torch_device)
                log.info("torch backend (%s): first frame took %.1f s (compile/capture)", self.mode,
                         time.perf_counter() - t0)
        return out

    @property
    def can_fuse(self) -> bool:
        """True in the static-buffer mode: ``run_fused`` then captures post-processing into the network's
        CUDA graph (on the CPU: runs both eagerly into static outputs, the same contract)."""
        return self.runner is not None

    @torch.inference_mode()
    def run_fused(self, inputs: Any, post: Any) -> tuple[torch.Tensor, ...]:
        """``post(points, scores)`` of the network's outputs, captured with the network in one CUDA graph
        (``can_fuse``), replayed without a host sync; the returned static tensors are overwritten by the
        next call. ``post`` must be fixed-shape and sync-free; one graph per ``post`` object."""
        return self._fused_runner(post)(self.tensors(inputs))

    def fused_inputs(self, post: Any) -> dict[str, torch.Tensor]:
        """The static input tensors of ``run_fused(..., post)``'s graph (captured now, from zeros, if it is
        not yet): inputs written there in stream order before ``run_fused`` are replayed without a copy."""
        return self._fused_entry(post).inputs

    def _fused_entry(self, post: Any) -> _Captured:
        """The one entry of ``run_fused(..., post)``'s static runner (captured now, from zeros, if it is not yet)."""
        runner = self._fused_runner(post)
        if not runner.entries:
            with torch.inference_mode():  # the capture runs the network, as in run_fused
                runner.static_inputs({n: torch.zeros(shape, dtype=torch.float32, device=self.torch_device)
                                      for n, shape in self._input_shapes.items()})
        (entry,) = runner.entries.values()  # one: ``tensors`` admits only the config's shapes, in float32
        return entry

    def fused_step(self, post: Any) -> Any:
        """``run_fused``'s work on its static inputs (``fused_inputs``) as a plain call returning the static
        runner's outputs' values, for capture inside a larger graph (``TensorPreprocessor.frame_graph``):
        the network and ``post`` under this backend's precision settings."""
        runner = self._fused_runner(post)
        static = self.fused_inputs(post)

        def step() -> tuple[torch.Tensor, ...]:
            with runner.context():
                return runner.fn(**static)

        return step

    def fused_pool(self, post: Any) -> Any:
        """The memory pool of ``run_fused(..., post)``'s CUDA graph (None without one): graphs that run the same
        network one after the other on one stream can share its intermediates' memory (the frame graphs)."""
        graph = self._fused_entry(post).graph
        return graph.pool() if graph is not None else None

    def _fused_runner(self, post: Any) -> StaticRunner:
        """The static runner of network + ``post`` (one per ``post`` object, made on first use)."""
        self.require_open()
        if not self.can_fuse:
            raise RuntimeError(f"run_fused needs the static-buffer (cuda_graph) mode, this backend runs {self.mode}")
        runner = self._fused.get(post)
        if runner is None:
            network = self._fn

            def fused(**tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
                points, scores = network(**tensors)
                with torch.autocast(device_type=self.torch_device.type, enabled=False):  # post-processing in FP32
                    return post(points, scores)

            graph = self.torch_device.type == "cuda"
            runner = self._fused[post] = StaticRunner(fused, self.torch_device, graph, self._context)
        return runner

    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        points, scores = self.run(inputs)
        # .cpu() synchronises the CUDA stream, so timings around infer() are honest. Static CPU
        # buffers are copied: the next frame overwrites them.
        static_cpu = self.runner is not None and self.torch_device.type == "cpu"
        points, scores = points.float().cpu(), scores.float().cpu()
        if static_cpu:
            points, scores = points.clone(), scores.clone()
        return self._check_outputs({"points": points.numpy(), "scores": scores.numpy()})

    def close(self) -> None:
        super().close()
        self.runner = None
        self._fused.clear()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
