"""Sparse query decoder (OPUS / DiScene design, DESIGN.md section 2): layers of point-set refinement.

Each layer: position encoding of the (detached) previous points -> [depth branch] -> adaptive
sampling -> adaptive mixing -> self-attention biased by minus the centre distance times a
query-generated temperature -> FFN -> class / regression heads. Layer l predicts
``num_refines[l]`` points per query: offsets in metres (x ``offset_scale``) added to the mean of the
previous points in metres.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig
from .depth_branch import DepthBranch
from .mixing import AdaptiveMixing
from .sampling import AdaptiveSampling

SAMPLING_OFFSET_INIT = 0.5  # sampling offset biases start U(-0.5, 0.5), in units of the point-set std
TAU_INIT_MAX = 2.0          # attention temperature biases start U(0, 2) per metre


class DistanceBiasedAttention(nn.Module):
    """Multi-head self-attention with additive bias ``-distance(centre_i, centre_j) * tau_h(query_i)``.

    The temperature of each head is generated from the attending query (``gen_tau``: Linear, zero
    weights, bias U(0, 2)), so each query chooses how local its attention is. Dropout acts on the
    attention weights; the residual and the norm are the caller's.
    """

    def __init__(self, embed_dims: int, num_heads: int, grid_extent: list[float], dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads, self.head_dims = num_heads, embed_dims // num_heads
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims)
        self.out = nn.Linear(embed_dims, embed_dims)
        # as nn.MultiheadAttention (the reference's attention) initialises its packed projection and biases
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)
        self.gen_tau = nn.Linear(embed_dims, num_heads)
        nn.init.zeros_(self.gen_tau.weight)
        nn.init.uniform_(self.gen_tau.bias, 0.0, TAU_INIT_MAX)
        self.register_buffer("extent", torch.tensor(grid_extent, dtype=torch.float32), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        """x (B,N,D) queries, centres (B,N,3) normalised -> (B,N,D) attended values (no residual)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4).unbind(0)
        metric = centers * self.extent.to(centers.dtype)
        dist = (metric.unsqueeze(2) - metric.unsqueeze(1)).square().sum(-1).clamp_min(1e-12).sqrt()  # (B,N,N)
        tau = self.gen_tau(x).transpose(1, 2)  # (B,H,N): one temperature per head and attending query
        bias = -dist.unsqueeze(1).to(x.dtype) * tau.unsqueeze(-1)  # (B,H,N,N)
        attn = (torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dims) + bias).softmax(dim=-1)
        y = torch.matmul(self.dropout(attn), v).transpose(1, 2).reshape(b, n, d)
        return self.out(y)


class PointSetSampling(AdaptiveSampling):
    """Adaptive sampling with the reference's point-set scale: the unbiased ``torch.std`` of the previous points.

    Offsets start U(-0.5, 0.5) (zero weights); a single previous point has scale 0.
    """

    def __init__(self, embed_dims: int, num_groups: int, num_points: int, num_levels: int) -> None:
        super().__init__(embed_dims, num_groups, num_points, num_levels)
        with torch.no_grad():
            self.offsets.bias.uniform_(-SAMPLING_OFFSET_INIT, SAMPLING_OFFSET_INIT)

    def point_scale(self, prev_points: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """The unbiased std (B,N,3) of the previous points (B,N,R,3); 0 for a single point."""
        count = int(prev_points.shape[2])  # static per layer
        if count == 1:
            return torch.zeros_like(center)
        # torch.std (unbiased), spelled out: the exported torch.std uses ReduceProd, which TensorRT lacks
        return ((prev_points - center.unsqueeze(2)).square().sum(dim=2) / (count - 1)).sqrt()


def _mlp_head(embed_dims: int, out_dims: int, hidden_layers: int, layer_norm: bool) -> nn.Sequential:
    """``hidden_layers`` x [Linear, (LayerNorm), ReLU] then a Linear to ``out_dims``."""
    layers: list[nn.Module] = []
    for _ in range(hidden_layers):
        layers.append(nn.Linear(embed_dims, embed_dims))
        if layer_norm:
            layers.append(nn.LayerNorm(embed_dims))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(embed_dims, out_dims))
    return nn.Sequential(*layers)


class DecoderLayer(nn.Module):
    """One refinement layer: R_prev points per query in, R points per query out."""

    def __init__(self, config: ModelConfig, in_points: int, out_points: int, num_levels: int) -> None:
        super().__init__()
        dec = config.decoder
        d, self.out_points, self.num_classes = dec.embed_dims, out_points, config.num_classes
        self.offset_scale = dec.offset_scale
        self.pos_encoder = nn.Sequential(nn.Linear(in_points * 3, d), nn.LayerNorm(d), nn.ReLU(inplace=True),
                                         nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU(inplace=True))
        self.depth_branch = DepthBranch(d) if config.use_depth else None
        self.sampling = PointSetSampling(d, dec.num_groups, dec.num_points, num_levels)
        self.mixing = AdaptiveMixing(d, dec.num_groups, dec.num_points, dec.out_points)
        self.norm_mix = nn.LayerNorm(d)
        extent = config.grid_extent
        self.register_buffer("extent", torch.tensor(extent, dtype=torch.float32), persistent=False)
        self.self_attn = DistanceBiasedAttention(d, dec.num_heads, extent, dec.dropout)
        self.norm_attn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, dec.ffn_dims), nn.ReLU(inplace=True), nn.Dropout(dec.dropout),
                                 nn.Linear(dec.ffn_dims, d), nn.Dropout(dec.dropout))
        self.norm_ffn = nn.LayerNorm(d)
        self.cls_head = _mlp_head(d, out_points * config.num_classes, dec.head_layers, layer_norm=True)
        self.reg_head = _mlp_head(d, out_points * 3, dec.head_layers, layer_norm=False)
        nn.init.constant_(self.cls_head[-1].bias, -math.log(99.0))  # focal-loss prior: p = 0.01

    def forward(
        self,
        query: torch.Tensor,
        prev_points: torch.Tensor,
        features: list[torch.Tensor],
        grid2img: torch.Tensor,
        image_hw: tuple[int, int],
        depth: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query (B,N,D), prev_points (B,N,R_prev,3) -> query, points (B,N,R,3), logits (B,N,R,C)."""
        b, n = query.shape[:2]
        prev_points = prev_points.detach()
        center = prev_points.mean(dim=2)
        query = query + self.pos_encoder(prev_points.reshape(b, n, -1))
        if self.depth_branch is not None:
            query = query + self.depth_branch(center, grid2img, depth)
        sampled = self.sampling(query, prev_points, features, grid2img, image_hw)
        query = self.norm_mix(query + self.mixing(sampled, query))
        query = self.norm_attn(query + self.self_attn(query, center))
        query = self.norm_ffn(query + self.ffn(query))
        logits = self.cls_head(query).reshape(b, n, self.out_points, self.num_classes)
        offsets = self.reg_head(query).reshape(b, n, self.out_points, 3)  # metres, before offset_scale
        extent = self.extent.to(offsets.dtype)
        points = center.unsqueeze(2) + self.offset_scale * offsets / extent
        return query, points, logits


class SparseDecoder(nn.Module):
    """All decoder layers (with heads and depth branches): the part TGI copies teacher -> student."""

    def __init__(self, config: ModelConfig, num_levels: int) -> None:
        super().__init__()
        refines = list(config.decoder.num_refines)
        self.embed_dims = config.decoder.embed_dims
        self.use_depth = config.use_depth
        self.layers = nn.ModuleList(
            DecoderLayer(config, r_in, r_out, num_levels) for r_in, r_out in zip([1] + refines[:-1], refines, strict=True)
        )

    def forward(
        self,
        features: list[torch.Tensor],
        grid2img: torch.Tensor,
        init_points: torch.Tensor,
        image_hw: tuple[int, int],
        depth: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """init_points (B,N,3) -> per layer {"points", "logits", "centers", "query_features"}."""
        b, n = init_points.shape[:2]
        query = init_points.new_zeros(b, n, self.embed_dims)
        points = init_points.unsqueeze(2)  # (B, N, 1, 3)
        outputs = []
        for i, layer in enumerate(self.layers):
            if self.use_depth and i > 0:
                # the reference's depth variant (DiScene-dagger) also cuts the query features between layers:
                # each layer's losses train that layer only, as the points do in both variants
                query = query.detach()
            query, points, logits = layer(query, points, features, grid2img, image_hw, depth)
            outputs.append({"points": points, "logits": logits, "centers": points.mean(dim=2),
                            "query_features": query})
        return outputs
