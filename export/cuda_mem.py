"""CUDA device buffers and a stream for the TensorRT backend, from whichever CUDA binding is installed.

Preference: PyTorch CUDA tensors (torch owns the memory; usual on a robot that also has torch), then
cuda-python (``cuda.bindings.runtime``, what TensorRT's own samples use since 10.x), then pycuda.
All three expose the same small interface: ``alloc``, ``upload``, ``download``, ``stream_handle``,
``wait``, ``synchronize``, ``gpu_info`` and ``close``. ``wait`` sleeps until the stream's queued work is
done (a blocking-sync CUDA event): a stream synchronisation, or a copy to host memory, may spin a CPU core
for the whole inference, a core the robot's other nodes could use (the same change on the torch backend's
frame path: 13.7 -> 2.6 ms of process CPU time per 13.3 ms frame on H200, session 23). Every upload checks
the host array against the buffer (shape, dtype kind, byte count) before any copy, so a wrong frame can
neither over-read host memory nor overrun a device buffer. Binding errors (cuda-python error codes, ``pycuda.driver.Error``) are
raised as RuntimeError with the CUDA error text.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
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


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"cannot allocate a buffer of unresolved shape {tuple(shape)}")
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def host_for_upload(buf: DeviceBuffer, host: Any) -> np.ndarray:
    """``host`` as a C-contiguous array of the buffer's dtype, or ValueError before any copy.

    The shape must equal the buffer's; the dtype must cast to the buffer's within its kind
    (float64 -> float32 is accepted, strings, objects or complex values are not).
    """
    arr = np.asarray(host)
    if arr.shape != tuple(buf.shape):
        raise ValueError(f"host array of shape {arr.shape} does not fit the device buffer of shape {tuple(buf.shape)}")
    if not np.can_cast(arr.dtype, buf.dtype, casting="same_kind"):
        raise ValueError(f"host array of dtype {arr.dtype} cannot be copied into a {np.dtype(buf.dtype)} device buffer")
    arr = np.ascontiguousarray(arr, dtype=buf.dtype)
    if arr.nbytes != buf.nbytes:
        raise ValueError(f"host array has {arr.nbytes} bytes, the device buffer {buf.nbytes}")
    return arr


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
        self._done = torch.cuda.Event(blocking=True)  # enable_timing=False: the cheaper event

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        nbytes = _nbytes(shape, dtype)
        t = self.torch.empty(tuple(shape), dtype=_torch_dtype(self.torch, dtype), device=self.device)
        return DeviceBuffer(int(t.data_ptr()), nbytes, tuple(shape), np.dtype(dtype), t)

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        src = self.torch.from_numpy(host_for_upload(buf, host))
        with self.torch.cuda.stream(self.stream):
            buf.owner.copy_(src, non_blocking=False)  # pageable host memory: a synchronous copy is no slower

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        with self.torch.cuda.stream(self.stream):
            host = buf.owner.to("cpu")
        return host.numpy()

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def wait(self) -> None:
        self._done.record(self.stream)
        self._done.synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def gpu_info(self) -> dict[str, str]:
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return {"name": self.torch.cuda.get_device_name(self.device), "compute_capability": f"{major}.{minor}"}

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self.stream = None


class CudaPythonMemory:
    """Buffers from ``cudaMalloc`` through cuda-python (``cuda.bindings.runtime`` or legacy ``cuda.cudart``).

    cuda-python returns a tuple ``(cudaError_t, *results)`` from every call; ``_check`` turns a
    non-zero error into RuntimeError with ``cudaGetErrorString``'s text and unpacks the result.
    """

    name = "cuda-python"

    def __init__(self, device_index: int = 0, runtime: Any = None):
        if runtime is None:
            try:
                runtime = importlib.import_module("cuda.bindings.runtime")
            except ImportError:
                runtime = importlib.import_module("cuda.cudart")
        self.rt = runtime
        self.device_index = int(device_index)
        self.stream = None
        self.event = None
        self._buffers: list[DeviceBuffer] = []
        self._pending: list[np.ndarray] = []
        self._check(self.rt.cudaSetDevice(self.device_index), "cudaSetDevice")
        self.stream = self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        try:
            self.event = self._check(self.rt.cudaEventCreateWithFlags(
                self.rt.cudaEventBlockingSync | self.rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        except RuntimeError:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
            raise

    def _error_text(self, err: Any) -> str:
        try:
            code, text = self.rt.cudaGetErrorString(err)
            if int(code) == 0:
                return f"{getattr(err, 'name', err)}: {text.decode(errors='replace') if isinstance(text, bytes) else text}"
        except Exception:  # noqa: BLE001 - the message is best effort, the error itself is raised below
            pass
        return str(err)

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"cuda-python {what} failed: {self._error_text(err)}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        nbytes = _nbytes(shape, dtype)
        ptr = self._check(self.rt.cudaMalloc(nbytes), "cudaMalloc")
        buf = DeviceBuffer(int(ptr), nbytes, tuple(shape), np.dtype(dtype), ptr)
        self._buffers.append(buf)
        return buf

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        host = host_for_upload(buf, host)
        self._pending.append(host)  # keep alive until the stream is synchronised
        self._check(self.rt.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                    "cudaMemcpyAsync H2D")

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        host = np.empty(buf.shape, dtype=buf.dtype)
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, buf.ptr, host.nbytes,
                                            self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                    "cudaMemcpyAsync D2H")
        self.synchronize()
        return host

    def stream_handle(self) -> int:
        return int(self.stream)

    def wait(self) -> None:
        self._check(self.rt.cudaEventRecord(self.event, self.stream), "cudaEventRecord")
        self._check(self.rt.cudaEventSynchronize(self.event), "cudaEventSynchronize")
        self._pending = []

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._pending = []

    def gpu_info(self) -> dict[str, str]:
        props = self._check(self.rt.cudaGetDeviceProperties(self.device_index), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name.split("\x00")[0], "compute_capability": f"{props.major}.{props.minor}"}

    def close(self) -> None:
        errors = []
        if self.stream is not None:
            errors.append(self.rt.cudaStreamSynchronize(self.stream))
        for buf in self._buffers:
            errors.append(self.rt.cudaFree(buf.owner))
        self._buffers, self._pending = [], []
        if self.event is not None:
            errors.append(self.rt.cudaEventDestroy(self.event))
            self.event = None
        if self.stream is not None:
            errors.append(self.rt.cudaStreamDestroy(self.stream))
            self.stream = None
        for result in errors:  # everything is released first, then the first failure is reported
            self._check(result, "release")


class PyCudaMemory:
    """Buffers from ``pycuda.driver.mem_alloc`` in the device's primary context, usable from any thread.

    The primary context is the one the CUDA runtime uses, so TensorRT, torch and cuda-python share it:
    buffers and a stream from a context of pycuda's own (``make_context``) would be invalid handles to
    TensorRT (TensorRT issue #1133). It is retained with ``Device.retain_primary_context`` (pycuda
    >= 2020.1; not made current), pushed around every pycuda call, so the node's worker thread can
    use it, and ``detach``ed (released) on ``close`` after the buffers are freed.
    ``pycuda.driver.Error`` (which is not a Python RuntimeError) is re-raised as RuntimeError.
    """

    name = "pycuda"

    def __init__(self, device_index: int = 0, driver: Any = None):
        self.cuda = driver if driver is not None else importlib.import_module("pycuda.driver")
        self.ctx = None
        self._buffers: list[DeviceBuffer] = []
        self._pending: list[np.ndarray] = []
        try:
            self.cuda.init()
            self.dev = self.cuda.Device(device_index)
            if not hasattr(self.dev, "retain_primary_context"):
                raise RuntimeError("pycuda >= 2020.1 is needed (Device.retain_primary_context): pip install -U pycuda")
            self.ctx = self.dev.retain_primary_context()
            self.ctx.push()
            try:
                self.stream = self.cuda.Stream()
                flags = self.cuda.event_flags
                self.event = self.cuda.Event(flags.BLOCKING_SYNC | flags.DISABLE_TIMING)
            finally:
                self.cuda.Context.pop()
        except self.cuda.Error as exc:
            self._detach()
            raise RuntimeError(f"pycuda could not set up device {device_index}: {type(exc).__name__}: {exc}") from exc

    @contextlib.contextmanager
    def _active(self, what: str) -> Iterator[None]:
        if self.ctx is None:
            raise RuntimeError(f"pycuda {what}: device memory already closed")
        try:
            self.ctx.push()
        except self.cuda.Error as exc:
            raise RuntimeError(f"pycuda {what}: cannot make the context current: {exc}") from exc
        try:
            yield
        except self.cuda.Error as exc:
            raise RuntimeError(f"pycuda {what} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.cuda.Context.pop()

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> DeviceBuffer:
        nbytes = _nbytes(shape, dtype)
        with self._active("mem_alloc"):
            mem = self.cuda.mem_alloc(nbytes)
        buf = DeviceBuffer(int(mem), nbytes, tuple(shape), np.dtype(dtype), mem)
        self._buffers.append(buf)
        return buf

    def upload(self, buf: DeviceBuffer, host: np.ndarray) -> None:
        host = host_for_upload(buf, host)  # pycuda copies len(host) bytes: it must be exactly the buffer
        self._pending.append(host)  # keep alive until the stream is synchronised
        with self._active("memcpy_htod_async"):
            self.cuda.memcpy_htod_async(buf.owner, host, self.stream)

    def download(self, buf: DeviceBuffer) -> np.ndarray:
        host = np.empty(buf.shape, dtype=buf.dtype)
        with self._active("memcpy_dtoh_async"):
            self.cuda.memcpy_dtoh_async(host, buf.owner, self.stream)
            self.stream.synchronize()
        self._pending = []
        return host

    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def wait(self) -> None:
        with self._active("wait"):
            self.event.record(self.stream)
            self.event.synchronize()
        self._pending = []

    def synchronize(self) -> None:
        with self._active("synchronize"):
            self.stream.synchronize()
        self._pending = []

    def gpu_info(self) -> dict[str, str]:
        major, minor = self.dev.compute_capability()
        return {"name": self.dev.name(), "compute_capability": f"{major}.{minor}"}

    def _detach(self) -> None:
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            ctx.detach()

    def close(self) -> None:
        if self.ctx is None:
            return
        try:
            with self._active("close"):
                self.stream.synchronize()
                for buf in self._buffers:
                    buf.owner.free()
                self.event = None  # destroyed here, in its context
        finally:
            self._buffers, self._pending = [], []
            self._detach()


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
            raise ValueError(f"unknown device memory provider '{name}'; choose torch, cuda-python or pycuda")
        except (ImportError, RuntimeError) as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError("the tensorrt backend needs CUDA device memory from one of: a CUDA build of 'torch', "
                      "'cuda-python' (pip install cuda-python) or 'pycuda' (pip install pycuda); tried "
                      + "; ".join(errors))
