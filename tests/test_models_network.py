"""DiSceneNet contract: per-layer shapes, external init points, depth branch, gradients, sampling rules."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import models
from models.decoder import DistanceBiasedAttention
from models.sampling import AdaptiveSampling, pixels_to_grid, sample_levels


def _inputs(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = config.image_size
    return torch.randn(batch, 3, h, w, generator=g)


def test_forward_shapes_per_layer(lite_model, lite_config, lite_grid2img):
    b = 2
    with torch.no_grad():
        out = lite_model(_inputs(lite_config, b), lite_grid2img.expand(b, -1, -1))
    h, w = lite_config.image_size
    c = lite_config.fpn_channels
    assert [tuple(f.shape) for f in out["features"]] == [(b, c, h // s, w // s) for s in (4, 8, 16, 32)]
    q, d, k = lite_config.decoder.num_queries, lite_config.decoder.embed_dims, lite_config.num_classes
    assert out["init_points"].shape == (b, q, 3)
    assert len(out["layers"]) == len(lite_config.decoder.num_refines)
    for layer, r in zip(out["layers"], lite_config.decoder.num_refines, strict=True):
        assert layer["points"].shape == (b, q, r, 3)
        assert layer["logits"].shape == (b, q, r, k)
        assert layer["query_features"].shape == (b, q, d)
        torch.testing.assert_close(layer["centers"], layer["points"].mean(dim=2))
        assert torch.isfinite(layer["points"]).all() and torch.isfinite(layer["logits"]).all()


def test_default_init_points_are_the_learned_positions_and_decode_matches_forward(lite_model, lite_config, lite_grid2img):
    pos = lite_model.init_positions()
    assert pos.shape == (lite_config.decoder.num_queries, 3)
    assert pos.min() >= 0 and pos.max() <= 1
    image = _inputs(lite_config, 1)
    with torch.no_grad():
        out = lite_model(image, lite_grid2img)
        again = lite_model.decode(lite_model.extract_features(image), lite_grid2img)
    torch.testing.assert_close(out["init_points"][0], pos)
    assert "features" not in again
    torch.testing.assert_close(again["layers"][-1]["points"], out["layers"][-1]["points"])


def test_external_init_points_of_another_size(lite_model, lite_config, lite_grid2img):
    init = torch.rand(2, 7, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = lite_model(_inputs(lite_config, 2), lite_grid2img.expand(2, -1, -1), init_points=init)
    assert out["init_points"] is init
    assert [tuple(layer["points"].shape[:3]) for layer in out["layers"]] == [
        (2, 7, r) for r in lite_config.decoder.num_refines
    ]
    # the first layer refines around the given points: its centre is the init point plus the head's offset
    with torch.no_grad():
        shifted = lite_model(_inputs(lite_config, 2), lite_grid2img.expand(2, -1, -1), init_points=init + 0.1)
    assert not torch.allclose(shifted["layers"][0]["centers"], out["layers"][0]["centers"])
    with pytest.raises(ValueError, match="init_points"):
        lite_model(_inputs(lite_config, 2), lite_grid2img.expand(2, -1, -1), init_points=init[..., :2])


def test_depth_branch_forward_and_depth_required(lite_config, lite_grid2img):
    torch.manual_seed(0)
    cfg = dataclasses.replace(lite_config, use_depth=True)
    model = models.build_model(cfg).eval()
    assert all(layer.depth_branch is not None for layer in model.decoder.layers)
    h, w = cfg.image_size
    image = _inputs(cfg, 1)
    with torch.no_grad():
        near = model(image, lite_grid2img, depth=torch.full((1, 1, h, w), 1.0))
        far = model(image, lite_grid2img, depth=torch.full((1, 1, h, w), 4.0))
    assert near["layers"][-1]["points"].shape == (1, cfg.decoder.num_queries, cfg.decoder.num_refines[-1], 3)
    assert not torch.allclose(near["layers"][0]["query_features"], far["layers"][0]["query_features"])
    with pytest.raises(ValueError, match="depth"):
        model(image, lite_grid2img)
    with pytest.raises(ValueError, match="depth must be"):
        model(image, lite_grid2img, depth=torch.ones(1, 1, h // 2, w // 2))


def test_gradients_reach_backbone_and_decoder_and_points_are_detached(lite_config, lite_grid2img):
    torch.manual_seed(0)
    model = models.build_model(lite_config).train()
    out = model(_inputs(lite_config, 1), lite_grid2img)
    last = out["layers"][-1]
    (last["logits"].sigmoid().mean() + last["points"].square().mean()).backward()
    assert model.backbone.conv1.weight.grad is not None and model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.neck.fpn_convs[0].weight.grad.abs().sum() > 0
    layer1 = model.decoder.layers[1]
    assert layer1.sampling.offsets.weight.grad.abs().sum() > 0  # layer 1 has 2 points: non-zero scale
    assert layer1.mixing.param_generator.weight.grad.abs().sum() > 0
    assert layer1.self_attn.gen_tau.weight.grad.abs().sum() > 0  # the temperature is generated from the query
    # points are detached at the start of every layer: earlier regression heads get no gradient
    # from later layers' outputs (their own losses train them)
    assert model.decoder.layers[0].reg_head[-1].weight.grad is None
    assert model.decoder.layers[-2].reg_head[-1].weight.grad is None
    assert model.decoder.layers[-1].reg_head[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_depth", [False, True])
def test_query_features_carry_gradient_to_earlier_layers_only_without_depth(lite_config, lite_grid2img, use_depth):
    """The reference detaches the query features between layers in its depth variant only
    (discene_md_transformer.py); the plain decoder passes them on with their gradient."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(lite_config, use_depth=use_depth)
    model = models.build_model(cfg).train()
    h, w = cfg.image_size
    depth = torch.full((1, 1, h, w), 2.0) if use_depth else None
    out = model(_inputs(cfg, 1), lite_grid2img, depth=depth)
    out["layers"][-1]["logits"].sigmoid().mean().backward()
    earlier = model.decoder.layers[0].ffn[0].weight.grad
    assert (earlier is None) == use_depth
    assert model.decoder.layers[-1].ffn[0].weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0  # the image features still learn from every layer


def test_single_point_has_zero_scale_and_sampling_points_sit_on_the_center():
    sampler = AdaptiveSampling(embed_dims=8, num_groups=2, num_points=3, num_levels=2)
    query = torch.randn(1, 5, 8)
    prev = torch.rand(1, 5, 1, 3)
    pts = sampler.sampling_points(query, prev)
    assert pts.shape == (1, 5, 2, 3, 3)
    torch.testing.assert_close(pts, prev[:, :, None].expand_as(pts))
    # two points: scale is the per-axis std; zero-init offset weights give the same offsets for every query
    prev2 = torch.tensor([[[[0.2, 0.5, 0.5], [0.4, 0.5, 0.5]]]])
    pts2 = sampler.sampling_points(torch.randn(1, 1, 8), prev2)
    bias = sampler.offsets.bias.view(2, 3, 3)
    torch.testing.assert_close(pts2[0, 0], torch.tensor([0.3, 0.5, 0.5]) + bias * torch.tensor([0.1, 0.0, 0.0]))


def test_points_behind_camera_or_outside_the_image_contribute_zeros():
    sampler = AdaptiveSampling(embed_dims=8, num_groups=2, num_points=1, num_levels=2)
    features = [torch.ones(1, 4, 24, 32), torch.ones(1, 4, 12, 16)]
    # grid2img = identity: point (x, y, z) projects to pixel (x/z, y/z) at depth z
    g = torch.eye(4)[None]
    prev = torch.tensor([[[[10.0, 10.0, 1.0]], [[10.0, 10.0, -1.0]], [[500.0, 10.0, 1.0]]]])  # in, behind, outside
    out = sampler(torch.zeros(1, 3, 8), prev, features, g, (96, 128))
    assert out.shape == (1, 3, 2, 1, 2)
    torch.testing.assert_close(out[0, 0], torch.ones(2, 1, 2))  # constant features, level weights sum to 1
    assert out[0, 1].abs().max() == 0 and out[0, 2].abs().max() == 0


def test_bilinear_sampling_reads_the_pixel_under_the_projected_point():
    h, w = 6, 8
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 2, h, w)
    rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 2, h, w)
    feat = torch.cat([cols, rows], dim=1)  # (1, 4, h, w): groups 0 -> column index, 1 -> row index
    uv = torch.tensor([[[[[2.5, 3.25]]]]]).expand(1, 1, 2, 1, 2)  # (B,N,G,P,2)
    grid = pixels_to_grid(uv, (h, w))
    out = sample_levels([feat], grid, torch.ones(1, 1, 2, 1, 1), num_groups=2)  # (1,1,2,1,2)
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(out[0, 0, 1, 0], torch.tensor([3.25, 3.25]))


def test_distance_bias_with_large_temperature_attends_to_itself():
    attn = DistanceBiasedAttention(embed_dims=8, num_heads=2, grid_extent=[4.8, 4.8, 2.88])
    with torch.no_grad():
        attn.gen_tau.bias.fill_(1e4)
    x = torch.randn(1, 3, 8)
    centers = torch.tensor([[[0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [0.9, 0.9, 0.9]]])
    v = attn.qkv(x)[..., 16:]
    torch.testing.assert_close(attn(x, centers), attn.out(v))


def test_lite_is_small(lite_model):
    n = sum(p.numel() for p in lite_model.parameters() if p.requires_grad)
    assert n < 3_000_000, n


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_levels": 5}, "num_levels"),
        ({"image_size": [190, 256]}, "multiples of 32"),
        ({"decoder": {"num_refines": []}}, "num_refines"),
        ({"decoder": {"embed_dims": 66}}, "divisible"),
        ({"backbone": {"depth": 42}}, "backbone.depth"),
        ({"decoder": {"bogus": 1}}, "unknown decoder config keys"),
        # wrong types, as a hand-edited file gives them: each named, not a TypeError deep in validate or torch
        ({"decoder": {"num_queries": 240.0}}, "decoder config key 'num_queries' must be an int, got 240.0"),
        ({"num_classes": "11"}, "'num_classes' must be an int, got '11'"),
        ({"voxel_size": "0.08"}, "'voxel_size' must be a number"),
        ({"use_depth": "false"}, "'use_depth' must be true or false"),
        ({"image_size": [192.0, 256.0]}, "'image_size' must be a list of ints"),
        ({"backbone": {"depth": True}}, "backbone config key 'depth' must be an int"),
        ({"decoder": None}, "'decoder' must be a mapping, got NoneType"),
    ],
)
def test_bad_configs_are_rejected_with_clear_messages(lite_config, change, message):
    data = lite_config.to_dict()
    for key, value in change.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ValueError, match=message):
        models.build_model(models.ModelConfig.from_dict(data))


@pytest.mark.parametrize("data", [None, [1, 2], "lite"])
def test_a_config_that_is_not_a_mapping_is_a_value_error(data):
    with pytest.raises(ValueError, match="'model' must be a mapping"):
        models.ModelConfig.from_dict(data)


def test_unknown_config_name_and_basic_block_width_rejected(lite_config):
    with pytest.raises(ValueError, match="unknown model config"):
        models.load_config("paper_stduent")
    cfg = dataclasses.replace(lite_config, backbone=dataclasses.replace(lite_config.backbone, width_per_group=128))
    with pytest.raises(ValueError, match="width_per_group must be 64"):
        models.build_model(cfg)


@pytest.mark.parametrize("what", ["binary", "folder", "invalid"])
def test_model_and_train_config_files_that_are_no_yaml_text_are_named_in_one_error(tmp_path, monkeypatch, what):
    """A binary file gave a decoding error naming no file, a folder an IsADirectoryError (export, train CLIs)."""
    from training.train_config import load_train_config

    path = tmp_path / "my.yaml"
    if what == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff" if what == "binary" else b"a: [1, 2\n")
    said = {"binary": "cannot be read as text: 'utf-8' codec", "folder": "cannot be read as text: [Errno 21]",
            "invalid": "is not valid YAML"}[what]
    with pytest.raises(ValueError, match=re.escape(f"model config {path} {said}")):
        models.load_config(path)
    with pytest.raises(ValueError, match=re.escape(f"train config {path} {said}")):
        load_train_config(path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lite_student").mkdir()  # a folder named as a packaged config does not hide it
    assert load_train_config("lite_student").name == "lite_student"


def test_image_and_grid2img_shapes_checked(lite_model, lite_config, lite_grid2img):
    with pytest.raises(ValueError, match="image must be"):
        lite_model(torch.zeros(1, 1, 64, 64), lite_grid2img)
    with pytest.raises(ValueError, match="grid2img must be"):
        lite_model(_inputs(lite_config, 1), torch.eye(3)[None])
