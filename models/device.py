"""The torch device a run asks for: ``auto``, ``cpu``, ``cuda[:N]``, checked against the machine."""
from __future__ import annotations

import torch


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" -> cuda when available else cpu; an unavailable CUDA device is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but this PyTorch build has no usable CUDA "
                         f"(torch {torch.__version__}); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev
