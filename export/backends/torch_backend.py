"""Eager PyTorch backend (CPU or CUDA, optional FP16 autocast on CUDA): the reference the others match."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.config import ModelConfig

from ..wrapper import ExportWrapper
from .base import Backend, input_feed

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" -> cuda when available else cpu; an unavailable CUDA device is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but this PyTorch build has no usable CUDA "
                         f"(torch {torch.__version__}); use device='cpu'")
    return dev


class TorchBackend(Backend):
    """Runs ``DiSceneNet`` through ``ExportWrapper`` in eval mode under ``torch.inference_mode``.

    FP16 uses CUDA autocast (matmuls/convs in half, reductions and softmax in float) rather than
    ``model.half()``, so the camera projection keeps float32 precision. FP32 on CUDA is true FP32:
    TF32 convolutions/matmuls are switched off during ``infer`` unless ``tf32=True`` (measured on an
    H100 with random-but-active weights: TF32 moved paper_student points by up to 0.2 grid units and
    changed half of the occupied voxel labels, IEEE FP32 by 0.001 and 0.2 %).
    """

    name = "torch"

    def __init__(self, model: nn.Module, config: ModelConfig, device: str | None = None, fp16: bool = False,
                 tf32: bool = False):
        dev = resolve_device(device)
        if fp16 and dev.type != "cuda":
            raise ValueError("fp16 with the torch backend needs a CUDA device (CPU half precision is slow "
                             "and inaccurate); pass device='cuda' or drop fp16")
        super().__init__(config, str(dev) + (" fp16" if fp16 else " tf32" if tf32 and dev.type == "cuda" else ""))
        self.torch_device = dev
        self.fp16 = fp16
        self.tf32 = tf32
        self.wrapper = ExportWrapper(model, config.use_depth).to(dev).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, fp16: bool = False,
                        config: ModelConfig | None = None) -> TorchBackend:
        """Load with ``models.checkpoint.load_model`` (which refuses corrupt files) and wrap."""
        from models.checkpoint import load_model

        model, ckpt_config = load_model(str(path), map_location="cpu")
        if config is not None and config.to_dict() != ckpt_config.to_dict():
            log.warning("config passed to the torch backend differs from the checkpoint's; using the checkpoint's")
        return cls(model, ckpt_config, device=device, fp16=fp16)

    @torch.inference_mode()
    def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        feed = input_feed(inputs, self.config)
        tensors = {k: torch.from_numpy(v).to(self.torch_device, non_blocking=True) for k, v in feed.items()}
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.tf32
        try:
            with torch.autocast(device_type=self.torch_device.type, dtype=torch.float16, enabled=self.fp16):
                points, scores = self.wrapper(**tensors)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        # .cpu() synchronises the CUDA stream, so timings around infer() are honest.
        return self._check_outputs({"points": points.float().cpu().numpy(), "scores": scores.float().cpu().numpy()})

    def close(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
