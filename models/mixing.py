"""AdaMixer-style adaptive mixing: query-generated channel and point mixing, then output projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptiveMixing(nn.Module):
    """Mixes the sampled features (B,N,G,P,c) of each query with weights generated from the query."""

    def __init__(self, embed_dims: int, num_groups: int, in_points: int, out_points: int) -> None:
        super().__init__()
        self.groups, self.group_dims = num_groups, embed_dims // num_groups
        self.in_points, self.out_points = in_points, out_points
        self.channel_params = self.group_dims * self.group_dims
        self.param_generator = nn.Linear(embed_dims, num_groups * (self.channel_params + in_points * out_points))
        self.out_proj = nn.Linear(num_groups * self.group_dims * out_points, embed_dims)
        nn.init.zeros_(self.param_generator.weight)  # starts as a static (bias-only) mixing

    def forward(self, sampled: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        b, n = query.shape[:2]
        params = self.param_generator(query).reshape(b, n, self.groups, -1)
        channel_mix = params[..., : self.channel_params].reshape(b, n, self.groups, self.group_dims, self.group_dims)
        point_mix = params[..., self.channel_params :].reshape(b, n, self.groups, self.in_points, self.out_points)
        x = torch.matmul(sampled, channel_mix)  # (B, N, G, P, c)
        x = F.relu(F.layer_norm(x, (self.in_points, self.group_dims)))
        x = torch.matmul(x.transpose(-1, -2), point_mix)  # (B, N, G, c, O)
        x = F.relu(F.layer_norm(x, (self.group_dims, self.out_points)))
        return self.out_proj(x.reshape(b, n, -1))  # (B, N, D)
