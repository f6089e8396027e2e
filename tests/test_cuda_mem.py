"""The CUDA memory providers of export/cuda_mem.py themselves.

cuda-python: against the real ``cuda.bindings.runtime`` where calls can be made without a GPU (on a
machine without a driver every call returns ``(cudaErrorInsufficientDriver, ...)`` after checking its
arguments), and over ``CudaRuntimeShim``, which passes each call through the real function first and
then emulates it. pycuda cannot be installed here (sdist only, needs the CUDA headers): its provider
runs against ``make_fake_pycuda_driver``, a double that follows pycuda's documented API (not pycuda).
The torch provider needs a CUDA device: benchmarks/check_cuda_providers.py runs it (and cuda-python)
for real on a GPU machine.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from fake_tensorrt import GPU, CudaRuntimeShim, DeviceHeap, DeviceOverrun, make_fake_pycuda_driver

from export.cuda_mem import CudaPythonMemory, DeviceBuffer, PyCudaMemory, create_device_memory, host_for_upload


def _real_runtime():
    rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda-bindings) not installed")
    err, _count = rt.cudaGetDeviceCount()
    return rt, int(err) == 0


@pytest.fixture()
def real_rt():
    """The real cuda-python runtime module, on a machine where it reports no usable driver/GPU."""
    rt, has_gpu = _real_runtime()
    if has_gpu:
        pytest.skip("a CUDA device is present: the real calls would run; use benchmarks/check_cuda_providers.py")
    return rt


def test_host_for_upload_checks_before_any_copy():
    buf = DeviceBuffer(0x1000, 4 * 6, (2, 3), np.dtype(np.float32))
    np.testing.assert_array_equal(host_for_upload(buf, np.ones((2, 3), np.float64)), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, 2\) does not fit"):
        host_for_upload(buf, np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="dtype <U1 cannot be copied"):
        host_for_upload(buf, np.full((2, 3), "a"))
    with pytest.raises(ValueError, match="complex128 cannot be copied"):
        host_for_upload(buf, np.ones((2, 3), np.complex128))


def test_cuda_python_provider_on_the_real_module_without_gpu(real_rt):
    with pytest.raises(RuntimeError, match=r"cuda-python cudaSetDevice failed: cudaError(InsufficientDriver|NoDevice)"):
        CudaPythonMemory()
    with pytest.raises(ImportError, match="cuda-python: cuda-python cudaSetDevice failed"):
        create_device_memory("cuda-python")


def test_real_cuda_python_call_conventions(real_rt):
    """What the shim and the provider rely on: tuples (err, *results), size_t arguments, stream objects."""
    assert isinstance(real_rt.cudaSetDevice(0), tuple) and len(real_rt.cudaSetDevice(0)) == 1
    err, ptr = real_rt.cudaMalloc(64)
    assert isinstance(err, real_rt.cudaError_t) and int(err) != 0 and ptr is None
    with pytest.raises(OverflowError):
        real_rt.cudaMalloc(-1)
    with pytest.raises(TypeError):
        real_rt.cudaStreamSynchronize("stream")
    stream = real_rt.cudaStream_t(0xC0FFEE)
    assert int(stream) == 0xC0FFEE
    code, text = real_rt.cudaGetErrorString(real_rt.cudaError_t.cudaErrorMemoryAllocation)
    assert int(code) == 0 and b"memory" in text


def test_cuda_python_provider_roundtrip_over_the_shim(real_rt):
    heap = DeviceHeap()
    shim = CudaRuntimeShim(heap, real=real_rt, passthrough=True)
    mem = CudaPythonMemory(runtime=shim)
    assert mem.gpu_info() == GPU
    a = mem.alloc((2, 3), np.float32)
    b = mem.alloc((4,), np.int32)
    assert isinstance(a.ptr, int) and a.nbytes == 24 and set(heap.allocs) == {a.ptr, b.ptr}
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    mem.upload(a, host)
    mem.upload(b, np.array([1, 2, 3, 4]))
    mem.wait()  # the real functions take the event and stream objects (passthrough)
    assert [c[0] for c in shim.calls[-2:]] == ["cudaEventRecord", "cudaEventSynchronize"]
    assert list(shim.events.values()) == [real_rt.cudaEventBlockingSync | real_rt.cudaEventDisableTiming]
    np.testing.assert_array_equal(mem.download(a), host)
    np.testing.assert_array_equal(mem.download(b), [1, 2, 3, 4])
    assert [c for c in heap.log] == [("memcpy", 1, 24), ("memcpy", 1, 16), ("memcpy", 2, 24), ("memcpy", 2, 16)]
    assert isinstance(mem.stream_handle(), int)
    with pytest.raises(ValueError, match="does not fit"):
        mem.upload(a, np.zeros((3, 3), np.float32))  # would over-read the host / overrun the device
    assert len(heap.log) == 4  # refused before any copy
    mem.close()
    assert heap.allocs == {} and mem.stream is None and shim.events == {} and mem.event is None


def test_cuda_python_event_failure_releases_the_stream():
    rt, _ = _real_runtime()
    shim = CudaRuntimeShim(DeviceHeap(), real=rt, fail={"cudaEventCreateWithFlags": "cudaErrorMemoryAllocation"})
    with pytest.raises(RuntimeError, match="cudaEventCreateWithFlags failed: cudaErrorMemoryAllocation"):
        CudaPythonMemory(runtime=shim)
    assert shim.streams == set()


def test_cuda_python_errors_are_runtime_errors_with_the_cuda_text():
    rt, _ = _real_runtime()
    mem = CudaPythonMemory(runtime=CudaRuntimeShim(DeviceHeap(), real=rt, fail={"cudaMalloc": "cudaErrorMemoryAllocation"}))
    with pytest.raises(RuntimeError, match="cudaMalloc failed: cudaErrorMemoryAllocation: out of memory"):
        mem.alloc((1024,), np.float32)
    mem.close()


def test_shim_catches_a_device_overrun():
    heap = DeviceHeap()
    shim = CudaRuntimeShim(heap)
    mem = CudaPythonMemory(runtime=shim)
    buf = mem.alloc((4,), np.float32)
    host = np.zeros(8, np.float32)
    with pytest.raises(DeviceOverrun):
        shim.cudaMemcpyAsync(buf.ptr, host.ctypes.data, host.nbytes, shim.cudaMemcpyKind.cudaMemcpyHostToDevice,
                             mem.stream)
    mem.close()


# ---- pycuda (documented-API double) --------------------------------------------------------------

def test_pycuda_provider_works_from_another_thread_and_detaches():
    heap = DeviceHeap()
    drv = make_fake_pycuda_driver(heap)
    mem = PyCudaMemory(driver=drv)
    assert drv.context_stack() == []  # not left current on the creating thread
    buf = mem.alloc((2, 2), np.float32)
    result = {}

    def worker():  # the ROS node infers on a worker thread
        try:
            mem.upload(buf, np.eye(2))
            mem.wait()
            result["out"] = mem.download(buf)
            assert drv.context_stack() == []
        except Exception as exc:  # noqa: BLE001 - reported to the main thread
            result["error"] = exc

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert "error" not in result, result.get("error")
    np.testing.assert_array_equal(result["out"], np.eye(2))
    assert heap.log == [("htod", 16), ("dtoh", 16)]
    blocking = drv.event_flags.BLOCKING_SYNC | drv.event_flags.DISABLE_TIMING
    assert drv.event_log == [("record", blocking), ("synchronize", blocking)]  # in the context, on the worker
    with pytest.raises(ValueError, match="does not fit"):
        mem.upload(buf, np.zeros((3, 3), np.float32))  # pycuda would copy all 36 bytes into 16
    assert mem.gpu_info() == GPU
    mem.close()
    assert drv.contexts == []  # no context of its own: the primary one, retained and released
    assert drv.primary.detached and heap.allocs == {} and drv.context_stack() == []
    mem.close()  # twice is fine


def test_pycuda_errors_become_runtime_errors(monkeypatch):
    heap = DeviceHeap()
    drv = make_fake_pycuda_driver(heap)
    mem = PyCudaMemory(driver=drv)

    def out_of_memory(nbytes):
        raise drv.MemoryError("cuMemAlloc failed: out of memory")

    monkeypatch.setattr(drv, "mem_alloc", out_of_memory)
    assert not issubclass(drv.MemoryError, RuntimeError)
    with pytest.raises(RuntimeError, match="pycuda mem_alloc failed: MemoryError: cuMemAlloc failed: out of memory"):
        mem.alloc((4,), np.float32)
    assert drv.context_stack() == []  # popped even on error
    mem.close()

    bad = make_fake_pycuda_driver(DeviceHeap())
    monkeypatch.setattr(bad, "init", lambda flags=0: (_ for _ in ()).throw(bad.LogicError("cuInit failed: no device")))
    with pytest.raises(RuntimeError, match="pycuda could not set up device 0: LogicError: cuInit failed"):
        PyCudaMemory(driver=bad)


def test_torch_provider_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: benchmarks/check_cuda_providers.py runs the torch provider for real")
    with pytest.raises(ImportError, match="torch: torch missing or built without CUDA"):
        create_device_memory("torch")
    with pytest.raises(ValueError, match="unknown device memory provider"):
        create_device_memory("opencl")


def test_device_check_script_runs_a_provider_end_to_end(monkeypatch):
    """benchmarks/check_cuda_providers.py over the shim: the checks it makes on a GPU pass on correct code."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "check_cuda_providers.py"
    spec = importlib.util.spec_from_file_location("check_cuda_providers", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    heap = DeviceHeap()
    monkeypatch.setattr(script, "create_device_memory", lambda name: CudaPythonMemory(runtime=CudaRuntimeShim(heap)))
    result = script.check_provider("cuda-python", repeats=2)
    assert result["status"] == "ok", result
    assert result["gpu"] == GPU and result["wrong_shape_refused"] and heap.allocs == {}
