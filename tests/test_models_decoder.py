"""Decoder details as the reference builds them: query-adaptive attention temperature, offsets in metres,
position encoder and heads, dropout, sampling offsets and std, no host tensors built in forward."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models import sampling
from models.config import paper_student
from models.decoder import DistanceBiasedAttention, PointSetSampling


def _types(seq: nn.Sequential) -> list[type]:
    return [type(m) for m in seq]


def test_layer_structure_matches_the_reference(lite_config):
    model = models.build_model(lite_config)
    layer = model.decoder.layers[1]
    assert _types(layer.pos_encoder) == [nn.Linear, nn.LayerNorm, nn.ReLU] * 2
    assert _types(layer.cls_head) == [nn.Linear, nn.LayerNorm, nn.ReLU] * 2 + [nn.Linear]
    assert _types(layer.reg_head) == [nn.Linear, nn.ReLU] * 2 + [nn.Linear]
    assert lite_config.decoder.dropout == 0.1 and paper_student().decoder.dropout == 0.1
    assert layer.self_attn.dropout.p == 0.1 and [m.p for m in layer.ffn if isinstance(m, nn.Dropout)] == [0.1, 0.1]
    tau = layer.self_attn.gen_tau
    assert tau.weight.abs().max() == 0 and 0.0 <= tau.bias.min() and tau.bias.max() <= 2.0
    bias = layer.sampling.offsets.bias
    assert layer.sampling.offsets.weight.abs().max() == 0 and bias.abs().max() <= 0.5 and bias.std() > 0.1
    assert layer.cls_head[-1].bias[0].item() == pytest.approx(-math.log(99.0))


def test_temperature_is_generated_per_query():
    attn = DistanceBiasedAttention(embed_dims=8, num_heads=2, grid_extent=[4.8, 4.8, 2.88]).eval()
    with torch.no_grad():  # tau = 1e4 * x[..., 0]: query 0 very local, query 1 (x[...,0] = 0) unbiased
        attn.gen_tau.weight.zero_()
        attn.gen_tau.bias.zero_()
        attn.gen_tau.weight[:, 0] = 1e4
    x = torch.randn(1, 3, 8)
    x[0, 0, 0], x[0, 1, 0], x[0, 2, 0] = 1.0, 0.0, 1.0
    centers = torch.tensor([[[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [0.9, 0.9, 0.9]]])
    out = attn(x, centers)
    q, k, v = attn.qkv(x).reshape(1, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    plain = (q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v  # head dim 4: scale 1/sqrt(4)
    plain = attn.out(plain.transpose(1, 2).reshape(1, 3, 8))
    torch.testing.assert_close(out[0, 0], attn.out(v.transpose(1, 2).reshape(1, 3, 8))[0, 0])  # attends to itself
    torch.testing.assert_close(out[0, 1], plain[0, 1])  # tau 0: no distance bias


def test_regression_offsets_are_metres_times_half(lite_config, lite_grid2img):
    model = models.build_model(lite_config).eval()
    offset = torch.tensor([1.0, 0.0, -0.4])  # metres
    with torch.no_grad():
        head = model.decoder.layers[0].reg_head[-1]
        head.weight.zero_()
        head.bias.copy_(offset.repeat(lite_config.decoder.num_refines[0]))
        out = model(torch.zeros(1, 3, *lite_config.image_size), lite_grid2img)
    extent = torch.tensor([4.8, 4.8, 2.88])
    expected = out["init_points"][:, :, None] + 0.5 * offset / extent
    torch.testing.assert_close(out["layers"][0]["points"], expected.expand_as(out["layers"][0]["points"]))


def test_sampling_scale_is_torch_std_and_zero_for_one_point():
    sampler = PointSetSampling(embed_dims=8, num_groups=2, num_points=3, num_levels=2)
    prev1 = torch.rand(1, 4, 1, 3)
    pts = sampler.sampling_points(torch.randn(1, 4, 8), prev1)
    torch.testing.assert_close(pts, prev1[:, :, None].expand_as(pts))
    prev2 = torch.tensor([[[[0.2, 0.5, 0.5], [0.4, 0.5, 0.5]]]])
    pts2 = sampler.sampling_points(torch.randn(1, 1, 8), prev2)
    bias = sampler.offsets.bias.view(2, 3, 3)
    unbiased_std = math.sqrt(2 * 0.1 ** 2 / (2 - 1))  # torch.std divides by R - 1
    torch.testing.assert_close(pts2[0, 0], torch.tensor([0.3, 0.5, 0.5]) + bias * torch.tensor([unbiased_std, 0.0, 0.0]))
    prev = torch.rand(2, 5, 4, 3)
    query = torch.randn(2, 5, 8)
    offsets = sampler.offsets(query).reshape(2, 5, 2, 3, 3)
    expected = prev.mean(2)[:, :, None, None] + offsets * prev.std(dim=2)[:, :, None, None]
    torch.testing.assert_close(sampler.sampling_points(query, prev), expected)


class _HostTensorSpy(TorchDispatchMode):
    """Counts tensors built from host data (``torch.tensor`` / ``new_tensor`` lower to ``aten.lift_fresh``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "lift_fresh" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_decoder_forward_builds_no_host_tensor(lite_config, lite_grid2img, monkeypatch):
    """CUDA-graph capture forbids host-to-device copies in forward: constants are registered buffers.

    ``pixels_to_grid`` (models/sampling.py) is replaced by a buffer-free equivalent so this test checks
    the decoder's own code.
    """
    def pixels_to_grid(uv, image_hw):
        h, w = image_hw
        u = uv[..., :1] * (2.0 / max(w - 1, 1)) - 1.0
        v = uv[..., 1:] * (2.0 / max(h - 1, 1)) - 1.0
        return torch.cat([u, v], dim=-1).clamp(-sampling.GRID_CLAMP, sampling.GRID_CLAMP)

    monkeypatch.setattr(sampling, "pixels_to_grid", pixels_to_grid)
    model = models.build_model(lite_config).eval()
    image = torch.zeros(1, 3, *lite_config.image_size)
    with torch.no_grad():
        features = model.extract_features(image)
        spy = _HostTensorSpy()
        with spy:
            model.decoder(features, lite_grid2img, model.init_positions()[None], tuple(lite_config.image_size))
    assert spy.count == 0


def test_initialisation_follows_the_reference_attention_and_level_weights():
    """The reference's self-attention is nn.MultiheadAttention: xavier-uniform packed q/k/v (bound
    sqrt(6 / (d + 3d))), zero biases; its level weights (scale_weights) keep nn.Linear's default init, so
    each group and point starts with its own softmax over the levels, not 1/L everywhere."""
    torch.manual_seed(0)
    d = 256
    attn = DistanceBiasedAttention(d, 8, [4.8, 4.8, 2.88])
    bound = math.sqrt(6.0 / (d + 3 * d))
    assert attn.qkv.weight.abs().max() <= bound and attn.qkv.weight.abs().max() > 0.95 * bound
    assert attn.qkv.bias.abs().sum() == 0 and attn.out.bias.abs().sum() == 0
    sampler = PointSetSampling(embed_dims=d, num_groups=4, num_points=16, num_levels=4)
    default_bound = 1.0 / math.sqrt(d)  # nn.Linear's kaiming-uniform(a=sqrt(5)) weight and bias bound
    assert 0.9 * default_bound < sampler.level_weights.weight.abs().max() <= default_bound
    assert 0.9 * default_bound < sampler.level_weights.bias.abs().max() <= default_bound
