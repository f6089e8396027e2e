"""Checkpoint round trip, atomic writes, and clear errors for bad files."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model


@pytest.fixture()
def tiny():
    cfg = dataclasses.replace(models.load_config("lite"), name="tiny")
    cfg.decoder = dataclasses.replace(cfg.decoder, num_queries=16, num_refines=[2, 4])
    torch.manual_seed(0)
    return models.build_model(cfg).eval(), cfg


def test_round_trip_restores_config_weights_and_outputs(tmp_path, tiny, lite_grid2img):
    model, cfg = tiny
    path = tmp_path / "ckpt" / "model.pt"
    save_model(path, model, cfg, step=7, epoch=1)
    assert load_checkpoint(path)["step"] == 7
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg and not loaded.training
    image = torch.randn(1, 3, *cfg.image_size)
    with torch.no_grad():
        a = model(image, lite_grid2img)["layers"][-1]["points"]
        b = loaded(image, lite_grid2img)["layers"][-1]["points"]
    torch.testing.assert_close(a, b)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(2)}})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - any pickling error
        save_checkpoint(path, {"config": {}, "model": {}, "bad": lambda x: x})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_missing_corrupt_and_truncated_files(tmp_path, tiny):
    model, cfg = tiny
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder; give the checkpoint file in it"):
        load_model(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(garbage)
    good = tmp_path / "good.pt"
    save_model(good, model, cfg)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(cut)


def test_incomplete_or_mismatched_checkpoints_name_the_problem(tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "x.pt"
    save_checkpoint(path, {"model": model.state_dict()})
    with pytest.raises(CheckpointError, match=r"lacks the keys \['config'\]"):
        load_model(path)
    state = dict(model.state_dict())
    del state["decoder.layers.1.reg_head.2.weight"]
    save_checkpoint(path, {"config": cfg.to_dict(), "model": state})
    with pytest.raises(CheckpointError, match=r"1 missing keys, first \['decoder\.layers\.1\.reg_head\.2\.weight'\]"):
        load_model(path)
    other = dataclasses.replace(cfg, num_classes=5)
    save_checkpoint(path, {"config": other.to_dict(), "model": model.state_dict()})
    with pytest.raises(CheckpointError, match=r"shape mismatches, first \['decoder\.layers\.0\.cls_head\.6\.weight"):
        load_model(path)
    bad_cfg = cfg.to_dict()
    bad_cfg["decoder"]["embed_dims"] = 63
    save_checkpoint(path, {"config": bad_cfg, "model": model.state_dict()})
    with pytest.raises(CheckpointError, match="invalid config"):
        load_model(path)


def test_hostile_entries_and_config_types_are_checkpoint_errors_naming_the_file(tmp_path, tiny):
    model, cfg = tiny
    path = tmp_path / "x.pt"
    state = dict(model.state_dict())
    first = next(iter(state))
    save_checkpoint(path, {"config": cfg.to_dict(), "model": {**state, first: state[first].tolist()}})
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: .* 1 entries that are not tensors, first "
                                              rf"\['{first} \(list\)'\]"):
        load_model(path)
    floats = cfg.to_dict()
    floats["decoder"]["num_queries"] = 16.0  # a config written by JSON/YAML tooling
    save_checkpoint(path, {"config": floats, "model": state})
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} has an invalid config: .*'num_queries' must be an int"):
        load_model(path)
    wide = cfg.to_dict()
    wide["backbone"]["width_per_group"] = 128  # validates, but a basic-block ResNet has no wide variant
    save_checkpoint(path, {"config": wide, "model": state})
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: its config 'tiny' builds no model \(ValueError: "):
        load_model(path)
