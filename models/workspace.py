"""Per-thread scratch buffers reused across frames by the CPU/GPU post-processing (``postprocess``,
``native_postprocess``).

Fresh multi-megabyte tensors each frame cost page faults on the CPU (900-1700 per frame, as much time
as the closing filters themselves); per-thread buffers keep concurrent callers apart.
"""
from __future__ import annotations

import threading

import torch

_BUFFERS = threading.local()
_KEPT_MAX = 1 << 22  # elements per buffer kept between frames (16 MB float32); larger ones are not kept


def workspace(device: torch.device, dtype: torch.dtype, numel: int, count: int = 3) -> list[torch.Tensor]:
    """``count`` flat buffers of ``numel`` elements per device and dtype, reused across frames by this
    thread; their contents are whatever the previous user of that device and dtype left."""
    if numel > _KEPT_MAX:
        return [torch.empty(numel, dtype=dtype, device=device) for _ in range(count)]
    cache = _BUFFERS.__dict__.setdefault("buffers", {})
    bufs = cache.get((device, dtype), [])
    if len(bufs) < count or bufs[0].numel() < numel:
        size = max([numel] + [buf.numel() for buf in bufs])
        with torch.inference_mode(False):  # normal tensors: writable in and outside inference mode
            bufs = cache[(device, dtype)] = [torch.empty(size, dtype=dtype, device=device)
                                             for _ in range(max(count, len(bufs)))]
    return [b[:numel] for b in bufs[:count]]
