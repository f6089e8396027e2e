"""DiScene networks and everything inference needs (imports only torch, numpy and yaml)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import BackboneConfig, DecoderConfig, ModelConfig, load_config
from .postprocess import OccupancyFrame, labels_batch, points_to_occupancy
from .preprocess import NetworkInputs, normalize_image, preprocess

if TYPE_CHECKING:  # pragma: no cover
    import torch


def build_model(config: ModelConfig | str) -> torch.nn.Module:
    """Build the DiScene network (backbone + FPN + sparse decoder [+ depth branch]) for a config."""
    from .network import DiSceneNet

    if not isinstance(config, ModelConfig):
        config = load_config(config)
    return DiSceneNet(config.validate())


__all__ = ["BackboneConfig", "DecoderConfig", "NetworkInputs", "ModelConfig", "OccupancyFrame", "build_model",
           "labels_batch", "load_config", "normalize_image", "points_to_occupancy", "preprocess"]
