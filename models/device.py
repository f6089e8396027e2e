"""The torch device a run asks for: ``auto``, ``cpu``, ``cuda[:N]``, checked against the machine."""
from __future__ import annotations

import re

import torch

DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N a GPU index)"
_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda when available else cpu; any other form than ``DEVICE_FORMS`` (torch's other
    device types, "gpu", "cuda:x") or an unavailable CUDA device is a ValueError saying what is accepted."""
    text = "auto" if device is None else str(device)
    if not _DEVICE.fullmatch(text):
        raise ValueError(f"device '{device}' is not one this project runs on; use {DEVICE_FORMS}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but this PyTorch build has no usable CUDA "
                         f"(torch {torch.__version__}); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev
