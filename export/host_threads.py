"""Intra-op thread count of torch's CPU ops for the calling thread only (the OpenMP backend).

The frame path's CPU-side stages (preprocessing in the prepare thread, post-processing after the
inference) are many small torch ops. With 2 intra-op threads every op above torch's grain size
(32768 elements) wakes a second OpenMP thread, which on a 2-core machine is the one the inference of
the other pipeline stage runs on; under ``OMP_WAIT_POLICY=PASSIVE`` each wake-up also goes through
the kernel. Measured on the 2-core build machine (lite, bgr8, 80 frames): preprocess 1.87 -> 1.37 ms,
post-process 10.4 -> 7.4 ms per frame with these stages on one thread, inference unchanged. One
thread also keeps the prepare thread from owning an OpenMP worker pool of its own, which would
halve the inference's speed (``release_openmp_team``).

``torch.set_num_threads`` cannot do this: it is process-wide (it also sets the count that threads
started later inherit, and resizes torch's pthreadpool). With ATen's OpenMP backend, torch asks
``omp_get_max_threads()`` of the calling thread on every parallel op, and OpenMP keeps that count
(the ``nthreads-var`` ICV) per thread, so ``omp_set_num_threads`` called from one thread leaves the
inference thread's count alone. Other backends (TBB, native): a no-op, logged once.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_OPENMP_LIBS = ("libgomp", "libiomp5", "libomp")


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (the same library instance, found in /proc/self/maps), or None."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        log.info("torch's intra-op backend is not OpenMP: pre/post-processing keep torch's thread count")
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:
        paths = set()
    torch_dir = os.path.dirname(torch.__file__)
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):  # torch's own copy first
        if os.path.basename(path).startswith(_OPENMP_LIBS):
            lib = ctypes.CDLL(path)  # already loaded: dlopen returns the same instance
            if hasattr(lib, "omp_set_num_threads") and hasattr(lib, "omp_get_max_threads"):
                return lib
    log.info("torch's OpenMP runtime not found among the loaded libraries: pre/post-processing keep torch's "
             "thread count")
    return None


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads for torch CPU ops issued by this thread; other threads
    keep theirs. ``None`` (or a non-OpenMP torch) leaves everything as it is."""
    lib = _openmp() if n is not None else None
    if lib is None:
        yield
        return
    if n < 1:
        raise ValueError(f"intra-op threads must be >= 1, got {n}")
    torch.get_num_threads()  # torch's lazy per-thread set-up first: it sets the count on a thread's first use
    before = int(lib.omp_get_max_threads())
    lib.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        lib.omp_set_num_threads(before)


OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep the settings


def release_openmp_team() -> bool:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all(omp_pause_soft)``).

    libgomp keeps a pool of worker threads per thread that ever ran a parallel region. When the
    threads of all pools outnumber the cores, every pool's workers stop spinning between parallel
    regions and sleep in the kernel instead, so each of the hundreds of small ops of a forward pays a
    wake-up: measured on the 2-core build machine, lite's inference on the frame loop's thread took
    57 ms while the main thread's pool (left from loading the model) existed, 25 ms without it. A
    thread that hands its torch work to other threads calls this; its next parallel op makes a new
    pool. False (logged once) where the OpenMP runtime lacks it or torch does not use OpenMP.
    """
    lib = _openmp()
    if lib is None or not hasattr(lib, "omp_pause_resource_all"):
        _log_no_pause()
        return False
    return int(lib.omp_pause_resource_all(OMP_PAUSE_SOFT)) == 0


@functools.cache
def _log_no_pause() -> None:
    log.info("OpenMP runtime without omp_pause_resource_all: the frame loop may share the cores with idle "
             "worker threads of the thread that built the model")
