"""CUDA device buffers and a stream for the TensorRT backend, from whichever CUDA binding is installed.

Preference: PyTorch CUDA tensors (torch owns the memory; usual on a robot that also has torch), then
cuda-python (``cuda.bindings.runtime``, what TensorRT's own samples use since 10.x), then pycuda.
All three expose the same small interface: ``alloc``, ``upload``, ``download``, ``stream_handle``,
``synchronize``, ``gpu_info`` and ``close``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class DeviceBuffer:
    """One device allocation: raw pointer for ``set_tensor_address`` and the owning object."""

    ptr: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any = None


class TorchCudaMemory:
    """Buffers owned by torch CUDA tensors; a dedicated ``torch.cuda.Stream``."""

    name = "torch"

    def __init__(self, device_index: int = 0):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch is installed without a usable CUDA device")
        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(device=self.device)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        t = self.torch.empty(tuple(shape), dtype=_torch_dtype(self.torch, dtype), device=self.device)
        return DeviceBuffer(int(t.data_ptr()), t.numel() * t.element_size(), tuple(shape), np.dtype(dtype), t)

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self.stream):
            buf.owner.copy_(self.torch.from_numpy(np.ascontiguousarray(host, dtype=buf.dtype)), non_blocking=True)

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        with self.torch.cuda.stream(self.stream):
            host = buf.owner.to("cpu", non_blocking=True)
        self.synchronize()
        return host.numpy()

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def gpu_info(self) -> dict[str, str]:
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return {"name": self.torch.cuda.get_device_name(self.device), "compute_capability": f"{major}.{minor}"}

    def close(self) -> None:
        self.stream = None


class CudaPythonMemory:
    """Buffers from ``cudaMalloc`` through cuda-python (``cuda.bindings.runtime`` or legacy ``cuda.cudart``)."""

    name = "cuda-python"

    def __init__(self, device_index: int = 0):
        try:
            self.rt = importlib.import_module("cuda.bindings.runtime")
        except ImportError:
            self.rt = importlib.import_module("cuda.cudart")
        self.device_index = device_index
        self._check(self.rt.cudaSetDevice(device_index), "cudaSetDevice")
        self.stream = self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: list[DeviceBuffer] = []
        self._pending: list[np.ndarray] = []

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"{what} failed: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = self._check(self.rt.cudaMalloc(nbytes), "cudaMalloc")
        buf = DeviceBuffer(int(ptr), nbytes, tuple(shape), np.dtype(dtype), ptr)
        self._buffers.append(buf)
        return buf

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        self._pending.append(host)  # keep alive until the stream is synchronised
        self._check(self.rt.cudaMemcpyAsync(buf.ptr, host.ctypes.data, buf.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                    "cudaMemcpyAsync H2D")

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        host = np.empty(buf.shape, dtype=buf.dtype)
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, buf.ptr, buf.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                    "cudaMemcpyAsync D2H")
        self.synchronize()
        return host

    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._pending = []

    def gpu_info(self) -> dict[str, str]:
        props = self._check(self.rt.cudaGetDeviceProperties(self.device_index), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}

    def close(self) -> None:
        for buf in self._buffers:
            self.rt.cudaFree(buf.owner)
        self._buffers = []
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class PyCudaMemory:
    """Buffers from ``pycuda.driver.mem_alloc`` in a context this object creates and pops."""

    name = "pycuda"

    def __init__(self, device_index: int = 0):
        self.cuda = importlib.import_module("pycuda.driver")
        self.cuda.init()
        self.dev = self.cuda.Device(device_index)
        self.ctx = self.dev.make_context()
        self.stream = self.cuda.Stream()
        self._pending: list[np.ndarray] = []

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        mem = self.cuda.mem_alloc(nbytes)
        return DeviceBuffer(int(mem), nbytes, tuple(shape), np.dtype(dtype), mem)

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host, dtype=buf.dtype)
        self._pending.append(host)  # keep alive until the stream is synchronised
        self.cuda.memcpy_htod_async(buf.owner, host, self.stream)

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        host = np.empty(buf.shape, dtype=buf.dtype)
        self.cuda.memcpy_dtoh_async(host, buf.owner, self.stream)
        self.synchronize()
        return host

    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def synchronize(self) -> None:
        self.stream.synchronize()
        self._pending = []

    def gpu_info(self) -> dict[str, str]:
        major, minor = self.dev.compute_capability()
        return {"name": self.dev.name(), "compute_capability": f"{major}.{minor}"}

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.pop()
            self.ctx = None


def _torch_dtype(torch: Any, dtype: np.dtype) -> Any:
    table = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
             np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool, np.dtype(np.int8): torch.int8}
    return table[np.dtype(dtype)]


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def create_device_memory(prefer: str | None = None, device_index: int = 0):
    """A device-memory helper: ``prefer`` in {None, "torch", "cuda-python", "pycuda"}.

    Raises ImportError naming the packages when no CUDA binding is usable.
    """
    order = [prefer] if prefer else ["torch", "cuda-python", "pycuda"]
    errors = []
    for name in order:
        try:
            if name == "torch":
                if not _torch_has_cuda():
                    raise RuntimeError("torch missing or built without CUDA")
                return TorchCudaMemory(device_index)
            if name == "cuda-python":
                return CudaPythonMemory(device_index)
            if name == "pycuda":
                return PyCudaMemory(device_index)
            raise ValueError(f"unknown device memory provider '{name}'")
        except (ImportError, RuntimeError) as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("the tensorrt backend needs CUDA device memory from one of: a CUDA build of 'torch', "
                      "'cuda-python' (pip install cuda-python) or 'pycuda' (pip install pycuda); tried "
                      + "; ".join(errors))
