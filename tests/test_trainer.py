"""Trainer on a tiny synthetic dataset: overfit, exact resume, NaN stop, distillation with TGI, CLI, DDP."""
from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import models
from models.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model, trained_steps
from training.data import EpochBatchSampler, build_dataset, worker_context
from training.losses import TaskLoss
from training.train_config import TrainConfig
from training.trainer import NonFiniteLossError, Trainer

TINY = {"decoder": {"num_queries": 32, "num_refines": [2, 4]}, "image_size": [96, 128]}


def tiny_config(root, out, **kw) -> TrainConfig:
    kw = {"max_steps": 4, **kw}
    cfg = TrainConfig(name="tiny", model="lite", model_overrides=TINY, out_dir=str(out), progress=False,
                      device="cpu", ckpt_every=2, log_every=1, **kw)
    cfg.data.root, cfg.data.workers, cfg.data.frequency_frames = str(root), 0, 4
    cfg.optim.warmup_iters = 1
    return cfg.validate()


def datasets(cfg):
    m = cfg.model_config()
    return build_dataset(cfg.data.root, "train", m), build_dataset(cfg.data.root, "val", m)


def test_overfit_one_frame_drives_loss_down(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path, max_steps=25)
    cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.optim.warmup_iters, cfg.optim.min_lr_ratio = 3e-3, 1.0, 0, 1.0
    train, _ = datasets(cfg)
    train.ids = train.ids[:1]
    trainer = Trainer(cfg, train)
    batch = next(iter(trainer._loader()))
    losses = [trainer.train_step(batch)["loss"] for _ in range(25)]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_lr_schedule_is_the_reference_mmcv_policy_by_hand():
    """mmcv's CosineAnnealing (by_epoch, the reference's EpochBasedRunner) under its linear warm-up, worked
    out by hand: 10 epochs of 10 steps, warm-up 10 from 1/3, min ratio 1e-3. The cosine holds within an
    epoch; the last epoch runs at 1e-3 + 0.999 * (1 + cos(0.9 pi)) / 2 = 0.025447, not at the minimum."""
    from training.trainer import WarmupCosine

    by_epoch = WarmupCosine(100, 10, 1 / 3, 1e-3, steps_per_epoch=10, by_epoch=True)
    expected = {0: 1 / 3, 5: 2 / 3, 9: 0.933333, 10: 0.975553, 19: 0.975553, 20: 0.904604, 55: 0.500500,
                99: 0.025447}
    assert {step: by_epoch(step) for step in expected} == pytest.approx(expected, abs=1e-6)
    # per step (mmcv's by_epoch=False): progress from step 0, the warm-up ramp multiplies the cosine
    per_step = WarmupCosine(100, 10, 1 / 3, 1e-3, steps_per_epoch=10, by_epoch=False)
    expected = {0: 1 / 3, 5: 0.662567, 10: 0.975553, 50: 0.500500, 100: 1e-3}
    assert {step: per_step(step) for step in expected} == pytest.approx(expected, abs=1e-6)


def test_trainer_steps_the_cosine_per_epoch_where_asked_and_warns_on_few_epochs(data_root, tmp_path, caplog):
    """The paper configs step it per epoch as the reference does; elsewhere per step, since a run of few
    epochs would keep a high lr to its end (800 lite steps over 2 epochs lost 5 IoU points)."""
    from training.train_config import load_train_config

    assert all(load_train_config(name, ["teacher_checkpoint=t.pt"]).optim.lr_by_epoch
               for name in ("paper_teacher", "paper_student", "paper_distill"))
    cfg = tiny_config(data_root, tmp_path, max_steps=10)
    schedule = Trainer(cfg, datasets(cfg)[0]).scheduler.lr_lambdas[0]
    assert not schedule.by_epoch and schedule.total == 10 and not caplog.records
    cfg.optim.lr_by_epoch = True
    schedule = Trainer(cfg, datasets(cfg)[0]).scheduler.lr_lambdas[0]
    assert schedule.by_epoch and schedule.steps_per_epoch == 4  # 4 training frames: 3 epochs
    assert "this run has 3 epoch(s): the last runs at 0.25 x lr" in caplog.text


def test_training_images_get_the_reference_photometric_distortion_drawn_per_step(data_root, tmp_path, monkeypatch):
    """Distorted on the device as the reference trains (training/augment.py), from draws seeded by the step:
    the same step gives the same images (an exact resume), the next step others; off: plain normalising."""
    from models.preprocess import normalize_image, pixel_values
    from training import trainer as trainer_module
    from training.data import prepare_inputs

    seen = []

    def recording(*args, **kwargs):
        inputs = prepare_inputs(*args, **kwargs)
        seen.append(inputs["image"].clone())
        return inputs

    monkeypatch.setattr(trainer_module, "prepare_inputs", recording)
    cfg = tiny_config(data_root, tmp_path)
    trainer = Trainer(cfg, datasets(cfg)[0])
    batch = next(iter(trainer._loader()))
    trainer.loss_terms(batch)
    trainer.loss_terms(batch)
    trainer.step += 1
    trainer.loss_terms(batch)
    plain = batch["image"]  # the dataset's images are normalised already
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert not torch.allclose(seen[0], plain, atol=1e-3) or not torch.allclose(seen[2], plain, atol=1e-3)
    # the way back to pixel values and again is exact to float rounding: an image drawn with no step applied
    assert torch.allclose(normalize_image(pixel_values(plain) / 255.0), plain, atol=1e-5)
    cfg.data.photometric = False
    Trainer(cfg, datasets(cfg)[0]).loss_terms(batch)
    assert torch.equal(seen[-1], plain)


def teacher_checkpoint(data_root, out):
    cfg = tiny_config(data_root, out, mode="teacher", max_steps=2)
    train, _ = datasets(cfg)
    return Trainer(cfg, train).fit()


@pytest.fixture(scope="module")
def tiny_teacher(data_root, tmp_path_factory) -> Path:
    """final.pt of ``teacher_checkpoint``'s 2-step run, trained once for the tests here (read only: a test that
    moves or changes it works on a copy)."""
    return teacher_checkpoint(data_root, tmp_path_factory.mktemp("teacher"))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly_in_distill_mode(data_root, tmp_path, deterministic, tiny_teacher):
    teacher = tiny_teacher
    exact = {"mode": "distill", "teacher_checkpoint": str(teacher), "max_steps": 5, "deterministic": True}
    cfg = tiny_config(data_root, tmp_path / "full", **exact)
    train, _ = datasets(cfg)
    t_model, _ = load_model(teacher)  # before the Trainer (which seeds): building a model draws from the RNG
    full = Trainer(cfg, train)
    for k, v in t_model.decoder.state_dict().items():  # TGI copied the teacher decoder
        assert torch.equal(full.student.decoder.state_dict()[k], v)
    full.fit()
    part_cfg = tiny_config(data_root, tmp_path / "part", **exact)
    Trainer(part_cfg, train).fit(stop_at_step=3)
    resumed = Trainer(part_cfg, train)
    resumed.resume(tmp_path / "part" / "last.pt")
    assert resumed.step == 3
    resumed.fit()
    assert resumed.step == full.step == 5
    a, b = params(full.student), params(resumed.student)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert resumed.scheduler.state_dict()["last_epoch"] == full.scheduler.state_dict()["last_epoch"]
    model, mcfg = load_model(tmp_path / "part" / "final.pt")  # the format export and the node read
    assert mcfg.decoder.num_queries == 32 and all(torch.equal(model.state_dict()[k], b[k]) for k in b)
    load_model(tmp_path / "part" / "last.pt")  # full training checkpoints load with weights_only=True too


def test_resume_accepts_other_post_processing_settings_but_not_another_network(data_root, tmp_path):
    """A changed score threshold or closing default must not block a resume; a changed network must."""
    cfg = tiny_config(data_root, tmp_path, max_steps=2)
    train, _ = datasets(cfg)
    Trainer(cfg, train).fit()
    other_post = tiny_config(data_root, tmp_path, max_steps=3)
    other_post.model_overrides = {**TINY, "score_threshold": 0.2, "closing": not cfg.model_config().closing}
    Trainer(other_post, train).resume(tmp_path / "last.pt")
    other_net = tiny_config(data_root, tmp_path, max_steps=3)
    other_net.model_overrides = {**TINY, "decoder": {"num_queries": 16, "num_refines": [2, 4]}}
    with pytest.raises(ValueError, match="another model config"):
        Trainer(other_net, train).resume(tmp_path / "last.pt")


def test_resume_with_a_larger_budget_follows_the_new_schedule_from_the_saved_step(data_root, tmp_path, caplog):
    """--steps 8 (and another lr) on a resume of a 4-step run: the cosine spans 8 steps at the new lr from
    step 2 on, the moments come from the checkpoint; the old schedule would run steps 4..8 at min_lr."""
    from training.trainer import WarmupCosine

    cfg = tiny_config(data_root, tmp_path, max_steps=4)
    Trainer(cfg, datasets(cfg)[0]).fit(stop_at_step=2)
    longer = tiny_config(data_root, tmp_path, max_steps=8)
    longer.optim.lr = 2 * cfg.optim.lr
    resumed = Trainer(longer, datasets(longer)[0], resume=tmp_path / "last.pt")
    factor = WarmupCosine(8, 1, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
    rest = next(g for g in resumed.optimizer.param_groups if g["name"] == "rest")
    assert rest["lr"] == pytest.approx(longer.optim.lr * factor(2)) and resumed.scheduler.last_epoch == 2
    assert all(s["step"] == 2 for s in resumed.optimizer.state.values())  # AdamW's moments: restored
    assert "total 4 -> 8" in caplog.text and "it continues at step 2" in caplog.text
    resumed.train_step(next(iter(resumed._loader())))
    assert rest["lr"] == pytest.approx(longer.optim.lr * factor(3))
    with pytest.raises(ValueError, match="budget of 1 steps is below the step 2"):
        Trainer(tiny_config(data_root, tmp_path, max_steps=1), datasets(cfg)[0], resume=tmp_path / "last.pt")


def _epoch_order(cfg, train, epoch: int = 0) -> list[int]:
    """Every frame of the epoch in the order all ranks together read it, whatever the batch geometry."""
    return EpochBatchSampler(len(train), 1, seed=cfg.seed).epoch_indices(epoch)


def test_resume_with_another_batch_size_continues_at_the_first_frame_not_yet_read(data_root, tmp_path, caplog):
    """3 steps of batch 1 read the epoch's first 3 of 4 frames; with batch 2 (2 steps an epoch) the run reads
    frames 2-3 (frame 2 again: a partial batch is read again, never skipped), where the saved epoch_step 3 lies
    outside the new epoch. Budget max_steps: the step stays 3, the optimiser steps taken."""
    cfg = tiny_config(data_root, tmp_path, max_steps=8)
    train, _ = datasets(cfg)
    Trainer(cfg, train).fit(stop_at_step=3)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert (saved["epoch"], saved["epoch_step"], saved["batch_size"], saved["world"]) == (0, 3, 1, 1)
    wider = tiny_config(data_root, tmp_path, max_steps=8, batch_size=2)
    resumed = Trainer(wider, train, resume=tmp_path / "last.pt")
    assert (resumed.step, resumed.epoch, resumed.epoch_step, resumed.scheduler.last_epoch) == (3, 0, 1, 3)
    assert next(iter(resumed._loader().batch_sampler)) == _epoch_order(cfg, train)[2:4]
    assert ("batch_size 1 x 1 process(es) -> 2 x 1: epoch 0, 3 frames in (step 3), continues at epoch 0 step 1 "
            "(1 frames read again); the step count stays 3") in caplog.text


def test_resume_with_another_batch_size_and_an_epochs_budget_counts_steps_of_the_new_size(data_root, tmp_path):
    """Budget 2 epochs: 1 step of batch 2 read frames 0-1; with batch 1 the run continues at frame 2, and its
    step (the cosine's position) becomes 2 of 8, the steps of batch 1 those frames fill, not 1 of 8."""
    cfg = tiny_config(data_root, tmp_path, max_steps=None, epochs=2, batch_size=2)
    train, _ = datasets(cfg)
    Trainer(cfg, train).fit(stop_at_step=1)
    narrow = tiny_config(data_root, tmp_path, max_steps=None, epochs=2, batch_size=1)
    resumed = Trainer(narrow, train, resume=tmp_path / "last.pt")
    assert (resumed.step, resumed.epoch, resumed.epoch_step) == (2, 0, 2)
    assert (resumed.total_steps, resumed.scheduler.last_epoch) == (8, 2)
    assert next(iter(resumed._loader().batch_sampler)) == _epoch_order(cfg, train)[2:3]


def test_resume_from_a_checkpoint_without_its_batch_geometry(data_root, tmp_path):
    """Checkpoints of older code hold no batch_size / world: their saved train config and per-rank RNG states
    tell; where neither is there (older still) the geometry is taken as this run's, as before."""
    cfg = tiny_config(data_root, tmp_path, max_steps=8, batch_size=2)
    train, _ = datasets(cfg)
    Trainer(cfg, train).fit(stop_at_step=1)  # epoch 0 step 1: frames 0-1 read
    state = load_checkpoint(tmp_path / "last.pt")
    del state["batch_size"], state["world"]
    save_checkpoint(tmp_path / "old.pt", state)
    order = _epoch_order(cfg, train)
    narrow = tiny_config(data_root, tmp_path, max_steps=8, batch_size=1)
    resumed = Trainer(narrow, train, resume=tmp_path / "old.pt")
    assert (resumed.step, resumed.epoch, resumed.epoch_step) == (1, 0, 2)
    assert next(iter(resumed._loader().batch_sampler)) == order[2:3]
    del state["train_config"]
    state["rng"] = state["rng"]["ranks"][0]  # one process's RNG states, as the oldest checkpoints hold them
    save_checkpoint(tmp_path / "old.pt", state)
    resumed = Trainer(cfg, train, resume=tmp_path / "old.pt")
    assert (resumed.step, resumed.epoch, resumed.epoch_step) == (1, 0, 1)
    assert next(iter(resumed._loader().batch_sampler)) == order[2:4]


def test_resume_with_fp16_from_a_run_without_it_starts_a_fresh_loss_scaler(data_root, tmp_path, caplog):
    """amp none/bf16 checkpoints hold a disabled scaler's empty state, which an enabled scaler refuses. CPU
    stand-in for the CUDA scaler that amp fp16 enables (GradScaler("cuda") disables itself without CUDA)."""
    cfg = tiny_config(data_root, tmp_path)
    trainer = Trainer(cfg, datasets(cfg)[0])
    trainer.save("last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["scaler"] == {}
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
    trainer.resume(tmp_path / "last.pt")
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16
    assert "no fp16 loss-scaler state" in caplog.text


def test_init_checkpoint_warm_starts_the_weights_and_counts_the_steps_behind_them(data_root, tmp_path, tiny_teacher):
    """Weights only: the network starts as the checkpoint's, the optimiser, lr schedule and step fresh; every
    checkpoint the run saves carries the steps behind its weights, summed over generations."""
    first = tiny_teacher  # 2 steps from scratch
    cfg = tiny_config(data_root, tmp_path / "g2", mode="teacher", max_steps=3, init_checkpoint=str(first))
    trainer = Trainer(cfg, datasets(cfg)[0])
    saved = load_checkpoint(first)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in trainer.student.state_dict().items())
    assert (trainer.step, trainer.steps_before, trainer.optimizer.state_dict()["state"]) == (0, 2, {})
    assert trainer.scheduler.last_epoch == 0 and trainer.optimizer.param_groups[0]["lr"] < cfg.optim.lr  # warm-up
    second = trainer.fit()
    for name in ("final.pt", "last.pt"):
        payload = load_checkpoint(tmp_path / "g2" / name)
        assert (payload["step"], payload["steps_before"], trained_steps(payload)) == (3, 2, 5), name
    cfg = tiny_config(data_root, tmp_path / "g3", mode="teacher", max_steps=1, init_checkpoint=str(second))
    Trainer(cfg, datasets(cfg)[0]).fit()
    assert trained_steps(load_checkpoint(tmp_path / "g3" / "final.pt")) == 1 + 3 + 2
    assert trained_steps({"step": 7, "config": {}, "model": {}}) == 7  # a checkpoint of older code: no steps_before


def test_resume_restores_its_own_weights_and_lineage_and_never_reloads_init(data_root, tmp_path, tiny_teacher):
    init = Path(shutil.copy(tiny_teacher, tmp_path / "init.pt"))
    cfg = tiny_config(data_root, tmp_path / "run", mode="teacher", init_checkpoint=str(init))
    Trainer(cfg, datasets(cfg)[0]).fit(stop_at_step=2)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert not all(torch.equal(v, load_checkpoint(init)["model"][k]) for k, v in last["model"].items())
    init.rename(tmp_path / "moved.pt")  # a resume needs only its last.pt
    resumed = Trainer(cfg, datasets(cfg)[0], resume=tmp_path / "run" / "last.pt")
    assert (resumed.step, resumed.steps_before) == (2, 2)
    assert all(torch.equal(v, last["model"][k]) for k, v in resumed.student.state_dict().items())
    resumed.fit()
    assert load_checkpoint(tmp_path / "run" / "final.pt")["steps_before"] == 2


def test_init_checkpoint_of_another_network_is_one_clear_error(data_root, tmp_path):
    other = tiny_config(data_root, tmp_path)
    other.model_overrides = {**TINY, "decoder": {"num_queries": 16, "num_refines": [2, 4]}}
    model_cfg = other.model_config()
    save_model(tmp_path / "other.pt", models.build_model(model_cfg), model_cfg, step=3)
    cfg = tiny_config(data_root, tmp_path, init_checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match=r"init_checkpoint .*other\.pt \(model 'lite\+overrides', this run builds "
                                              r"'lite\+overrides'\) does not match the model: .*shape mismatches"):
        Trainer(cfg, datasets(cfg)[0])


def test_init_checkpoint_and_tgi_are_refused_together_in_distill_mode(data_root, tmp_path):
    kw = {"mode": "distill", "teacher_checkpoint": "t.pt", "init_checkpoint": "s.pt"}
    with pytest.raises(ValueError, match="init_checkpoint and tgi would both set the student's weights"):
        tiny_config(data_root, tmp_path, **kw)
    assert not tiny_config(data_root, tmp_path, tgi=False, **kw).tgi
    assert tiny_config(data_root, tmp_path, mode="teacher", init_checkpoint="s.pt").tgi  # tgi is for distill only


def test_cli_init_sets_init_checkpoint_and_is_refused_with_resume(data_root, tmp_path, capsys):
    import yaml

    from training import train

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config(data_root, tmp_path / "run").to_dict()))
    args = train.build_parser().parse_args(["--config", str(tmp_path / "cfg.yaml"), "--init", "runs/t/final.pt"])
    assert train.config_from_args(args).init_checkpoint == "runs/t/final.pt"
    assert train.main(["--resume", "runs/t/last.pt", "--init", "runs/t/final.pt"]) == 2
    assert "a resume continues from the weights of its last.pt; give one of the two" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final.pt").write_bytes(b"x")
    assert train.main(["--config", str(tmp_path / "cfg.yaml"), "--init", str(tmp_path / "run" / "final.pt"),
                       "--overwrite"]) == 2
    assert "is one of the files --overwrite replaces" in capsys.readouterr().err
    assert (tmp_path / "run" / "final.pt").is_file()


def test_param_groups_lower_the_lr_of_backbone_and_sampling_offsets(data_root, tmp_path):
    cfg = tiny_config(data_root, tmp_path)
    cfg.optim.backbone_lr_mult, cfg.optim.sampling_offsets_lr_mult = 0.1, 0.1
    trainer = Trainer(cfg, datasets(cfg)[0])
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["backbone"]["initial_lr"] == groups["offsets"]["initial_lr"] == pytest.approx(0.1 * cfg.optim.lr)
    offsets = {id(layer.sampling.offsets.weight) for layer in trainer.student.decoder.layers}
    assert offsets == {id(p) for p in groups["offsets"]["params"] if p.dim() == 2}
    assert groups["rest"]["initial_lr"] == pytest.approx(cfg.optim.lr)
    # one fused AdamW kernel on CUDA (8 ops a step against foreach's 471 and 442 host reads, lite); foreach here
    assert trainer.optimizer.defaults["foreach"] and not trainer.optimizer.defaults["fused"]
    trainer.device = torch.device("cuda")  # the choice only: CPU parameters take the fused kernel too (torch >= 2.4)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4):  # a fused AdamW there is CUDA's alone
        with pytest.raises(RuntimeError, match="fused=True` requires"):
            trainer._build_optimizer(trainer.module)
        return
    fused = trainer._build_optimizer(trainer.module)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    assert [g["name"] for g in fused.param_groups] == [g["name"] for g in trainer.optimizer.param_groups]


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(data_root, tmp_path, monkeypatch):
    cfg = tiny_config(data_root, tmp_path, max_steps=6)
    train, _ = datasets(cfg)
    original, calls = TaskLoss.forward, {"n": 0}

    def poisoned(self, outputs, gts):
        terms = original(self, outputs, gts)
        calls["n"] += 1
        if calls["n"] in (3, 4):  # the third step of the first run, the first of the second
            terms["focal_1"] = terms["focal_1"] * float("nan")
        return terms

    monkeypatch.setattr(TaskLoss, "forward", poisoned)
    trainer = Trainer(cfg, train)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*focal_1=nan.*the last good checkpoint .*last\.pt "
                                                 r"\(step 2\) is kept"):
        trainer.fit()
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*no checkpoint of this run was written before it; "
                                                 r".*last\.pt is an earlier run's"):
        Trainer(cfg, train).fit()  # a run started over in that folder (what --overwrite does)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 2 and trainer.step == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    weights = dict(trainer.student.named_parameters())  # untouched by the poisoned step: still step 2's
    assert all(torch.equal(v, state["model"][k]) for k, v in weights.items())  # (BN statistics did move)
    assert all(p.grad is None for p in trainer.student.parameters())


def test_a_failing_final_evaluation_keeps_the_last_step_in_last_pt(data_root, tmp_path):
    """The end-of-run evaluation comes after last.pt is saved: a val split it cannot read loses no step
    (final.pt, written when fit ends, is not)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    for name in (root / "val_subscenes.txt").read_text().split():
        (root / name).write_bytes((root / name).read_bytes()[:100])  # truncated pickles
    cfg = tiny_config(root, tmp_path / "run", max_steps=1)  # ckpt_every 2: no checkpoint inside the loop
    train, val = datasets(cfg)
    with pytest.raises(ValueError, match="no frame could be scored"):
        Trainer(cfg, train, val).fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 1
    assert not (tmp_path / "run" / "final.pt").exists()


@pytest.mark.parametrize("grad_clip", [35.0, 0.0])
def test_non_finite_gradient_norm_stops_before_the_optimiser_step(data_root, tmp_path, grad_clip):
    """Clipping on or off (optim.grad_clip 0): the gradient norm is checked at every step."""
    cfg = tiny_config(data_root, tmp_path, max_steps=6)
    cfg.optim.grad_clip = grad_clip
    trainer = Trainer(cfg, datasets(cfg)[0])
    batches = iter(trainer._loader())
    trainer.train_step(next(batches))
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    param = next(p for p in trainer.student.parameters() if p.requires_grad)
    param.register_hook(lambda grad: grad * float("inf"))  # finite loss, infinite gradient
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm at step 2 \(loss \d"):
        trainer.train_step(next(batches))
    assert trainer.step == 1 and all(torch.equal(v, before[k]) for k, v in trainer.student.named_parameters())
    assert all(p.grad is None for p in trainer.student.parameters())


def test_cli_trains_and_evaluates(data_root, tmp_path, capsys):
    import yaml

    from training import evaluate, train

    cfg = tiny_config(data_root, tmp_path / "run", max_steps=2).to_dict()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(tmp_path / "cfg.yaml"), "--set", "distill.prior=false"]) == 0
    for name in ("final.pt", "last.pt", "best.pt", "train_config.yaml"):
        assert (tmp_path / "run" / name).is_file(), name
    last, best = (load_checkpoint(tmp_path / "run" / name) for name in ("last.pt", "best.pt"))
    assert last["best_miou"] == best["best_miou"] >= 0  # saved again after the final evaluation found it
    assert list((tmp_path / "run" / "tb").glob("events.*"))
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "final.pt"), "--data", str(data_root),
                          "--json", str(tmp_path / "m.json")]) == 0
    assert "mIoU" in capsys.readouterr().out and (tmp_path / "m.json").is_file()
    assert train.main(["--config", str(tmp_path / "cfg.yaml"), "--set", "mode=distill"]) == 2  # no teacher: clear error


def _ddp_worker(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    cfg = tiny_config(root, out, max_steps=3)
    train, _ = datasets(cfg)
    trainer = Trainer(cfg, train)
    trainer.fit()
    # parameters (not BatchNorm running statistics, which are per-rank buffers)
    state = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    for _ in range(rank + 1):  # the ranks' generators part ways (as data-dependent draws make them)
        torch.rand(1), np.random.rand(), random.random()
    trainer.save("last.pt")
    saved = _draws()
    _draws()
    dist.barrier()  # rank 0 has written it
    trainer.resume(os.path.join(out, "last.pt"))
    torch.save({"params": state, "saved": saved, "resumed": _draws()}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _start_two_ranks(worker, *args) -> None:
    """``mp.spawn`` of two ranks forked from the fork server the loader workers start from (torch and the training
    modules imported there once), not two fresh interpreters that import them again (3 s each)."""
    worker_context()  # what the fork server imports, where it is not running yet
    mp.start_processes(worker, args=args, nprocs=2, join=True, start_method="forkserver")


def _draws() -> list[float]:
    return [*torch.rand(2).tolist(), *np.random.rand(2).tolist(), random.random()]


def test_ddp_two_processes_gloo_keep_parameters_identical_and_each_rank_resumes_its_own_rng(data_root, tmp_path,
                                                                                           caplog):
    """Parameters equal on both ranks; last.pt holds each rank's RNG states and each rank gets its own back
    (not rank 0's); a resume with another world size keeps its fresh seeding, with one log line."""
    _start_two_ranks(_ddp_worker, 2, _free_port(), str(data_root), str(tmp_path))
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a["saved"] != b["saved"] and (a["resumed"], b["resumed"]) == (a["saved"], b["saved"])
    a, b = a["params"], b["params"]
    single = Trainer(tiny_config(data_root, tmp_path / "x"), datasets(tiny_config(data_root, tmp_path))[0])
    init = params(single.student)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert any(not torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())  # they did train
    seeded = torch.get_rng_state()
    single.resume(tmp_path / "last.pt")
    assert torch.equal(torch.get_rng_state(), seeded)
    assert "RNG states of 2 process(es) and this run has 1: continuing with freshly seeded generators" in caplog.text


def test_rng_states_of_another_device_or_fewer_gpus_are_left_out_never_a_crash():
    """A checkpoint of older code holds every GPU's CUDA state; one saved on CUDA may be resumed on CPU."""
    from training.distributed import rng_state, set_rng_state

    cpu = rng_state(torch.device("cpu"))
    draws = torch.rand(3)
    older = {**cpu, "cuda": [torch.get_rng_state(), torch.get_rng_state()]}  # as get_rng_state_all: one per GPU
    message = set_rng_state(older, 0, 1, torch.device("cuda", 2))
    assert "CUDA RNG states of 2 GPU(s) and this run uses cuda:2" in message
    assert torch.equal(torch.rand(3), draws)  # the CPU generators were restored all the same
    assert "this run is on cpu" in set_rng_state({"ranks": [{**cpu, "cuda": torch.get_rng_state()}]}, 0, 1,
                                                 torch.device("cpu"))
    assert set_rng_state({"ranks": [cpu]}, 0, 1, torch.device("cpu")) is None


def test_each_use_step_and_rank_draws_from_its_own_seed_the_default_seed_0_included(data_root, tmp_path):
    """The anchor sampling and the photometric distortion of a step must not draw the same numbers: a seed
    ``seed * stream + ...`` gave both streams one seed at the default seed 0. The loader's per-epoch seed (the
    epoch in the step's place) was ``seed * 7919 + epoch``: the epoch sampler's ``seed + epoch`` at seed 0."""
    from training.distributed import step_seed
    from training.trainer import ANCHOR_STREAM, LOADER_STREAM, PHOTOMETRIC_STREAM

    streams = (ANCHOR_STREAM, PHOTOMETRIC_STREAM, LOADER_STREAM)
    keys = [(seed, stream, step, rank) for seed in (0, 1, 2, -1) for stream in streams
            for step in range(64) for rank in range(4)]
    seeds = {step_seed(*key) for key in keys}
    assert len(seeds) == len(keys)
    assert step_seed(0, ANCHOR_STREAM, 5, 1) == step_seed(0, ANCHOR_STREAM, 5, 1)  # a resumed run draws the same
    cfg = tiny_config(data_root, tmp_path)
    loader = Trainer(cfg, datasets(cfg)[0])._loader()
    assert cfg.seed == 0 and loader.generator.initial_seed() == step_seed(0, LOADER_STREAM, 0, 0)


def _ddp_failing_save_worker(rank, world, port, root, out):
    """Trains under a 30 s process-group timeout and records the error ``fit`` ends with, if any."""
    import datetime

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    cfg = tiny_config(root, out, max_steps=4)
    cfg.ckpt_every = 1  # last.pt at step 1
    trainer = Trainer(cfg, datasets(cfg)[0])
    try:
        trainer.fit()
    except Exception as exc:
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise


def test_ddp_rank_whose_checkpoint_write_fails_exits_with_its_own_error(data_root, tmp_path, monkeypatch):
    """Rank 0 cannot write last.pt (a folder is in its place) while rank 1 goes on to the next step: rank 0
    must leave with that error at once (torchrun then ends the others), not wait in a barrier for rank 1
    until the process group times out and report the timeout instead."""
    import tempfile

    (tmp_path / "errors").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "errors"))  # where mp leaves the failed rank's error file
    (tmp_path / "last.pt").mkdir()
    (tmp_path / "last.pt" / "not_a_checkpoint").write_text("x")
    with pytest.raises(mp.ProcessRaisedException):
        _start_two_ranks(_ddp_failing_save_worker, 2, _free_port(), str(data_root), str(tmp_path))
    error = (tmp_path / "rank0.error").read_text()
    assert error.startswith("IsADirectoryError") and "last.pt" in error, error


def test_ctrl_c_stops_after_the_step_saves_last_and_resumes(data_root, tmp_path, monkeypatch, capsys):
    """SIGINT mid-run: the step finishes, last.pt is saved at it (not at the last ckpt_every), no final.pt,
    exit 130; --resume finishes the run."""
    import signal

    import yaml

    from training import train

    cfg = tiny_config(data_root, tmp_path / "run", max_steps=6)
    cfg.ckpt_every, cfg.data.workers = 100, 1  # a loader worker to shut down on the way out
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    original = Trainer.train_step

    def step_and_signal(self, batch):
        values = original(self, batch)
        if self.step == 4:
            signal.raise_signal(signal.SIGINT)  # on this thread, handled before the next step
        return values

    monkeypatch.setattr(Trainer, "train_step", step_and_signal)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background (nohup, ``&``)
    assert train.main(["--config", str(tmp_path / "cfg.yaml")]) == train.INTERRUPTED_EXIT == 130
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 4 and not (tmp_path / "run" / "final.pt").exists()
    assert "interrupted by SIGINT at step 4 of 6" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train.main(["--resume", str(tmp_path / "run" / "last.pt")]) == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 6
    assert (tmp_path / "run" / "final.pt").is_file()


def test_stop_request_second_ctrl_c_interrupts_at_once():
    import signal

    from training.interrupt import REPEAT_WINDOW_S, StopRequest

    now = [100.0]
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)  # SIGINT: SIG_IGN under nohup
    with StopRequest(clock=lambda: now[0]) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        now[0] += REPEAT_WINDOW_S / 2
        signal.raise_signal(signal.SIGINT)  # torchrun's agent passing the terminal's Ctrl-C on: the same request
        signal.raise_signal(signal.SIGTERM)
        now[0] += REPEAT_WINDOW_S  # a while later
        signal.raise_signal(signal.SIGTERM)  # a SIGTERM never interrupts a step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_loader_worker_outlives_the_first_sigterm_only():
    """The first SIGTERM is the group-wide stop meant for the training process; a second one (the loader's
    own terminate() of a worker that did not exit) still ends the worker."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys; from training.interrupt import ignore_interrupts; ignore_interrupts(0); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); print('alive', flush=True); "
            "os.kill(os.getpid(), signal.SIGTERM); print('still alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == -signal.SIGTERM and done.stdout == "alive\n", (done.returncode, done.stdout, done.stderr)


class _SigintDisposition(torch.utils.data.Dataset):
    """Frames whose image says whether the loader worker that made them ignores SIGINT."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import signal

        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        return {"image": torch.tensor(float(ignored)), "grid2img": torch.zeros(1), "target": torch.zeros(1)}


def test_loader_workers_leave_ctrl_c_to_the_training_process():
    """A terminal's Ctrl-C reaches the loader's workers too; one it killed would end the run ("DataLoader
    worker exited unexpectedly") before the trainer could save."""
    from training.data import EpochBatchSampler, build_train_loader

    loader = build_train_loader(_SigintDisposition(), EpochBatchSampler(4, 2, 1, 0, 0), workers=1, pin_memory=False,
                                prefetch_factor=1, seed=0)
    batch = next(iter(loader))
    assert batch["image"].tolist() == [1.0, 1.0]


def _stop_training_run(command: list[str], cfg_path, run_dir, signal_to_group: bool):
    """Start ``command`` in its own session, wait for its first checkpoint, send SIGTERM to its process
    group (a scheduler's stop, e.g. scancel) or to it alone (``kill <torchrun pid>``), return (rc, stderr)."""
    import signal
    import subprocess
    import time

    tmp = cfg_path.parent / "tmp"  # torchrun's agent leaves its torchelastic_* folders and error files in there
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__)),
           "TMPDIR": str(tmp)}
    proc = subprocess.Popen([*command, "--config", str(cfg_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        (os.killpg if signal_to_group else os.kill)(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("launcher", ["single", "torchrun"])
def test_sigterm_with_loader_workers_saves_last_at_the_step(data_root, tmp_path, launcher):
    """The SIGTERM a scheduler sends the process group, or torchrun's agent sends each rank's group
    (os.killpg), also reaches the loader workers; the run still stops after a step and saves last.pt."""
    import sys

    import yaml

    cfg = tiny_config(data_root, tmp_path / "run", max_steps=100_000)
    cfg.ckpt_every, cfg.data.workers = 2, 1
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    module = [sys.executable, "-m", "training.train"]
    if launcher == "single":
        rc, err = _stop_training_run(module, tmp_path / "cfg.yaml", tmp_path / "run", signal_to_group=True)
        assert rc == 130, err
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                    str(_free_port()), "-m", "training.train"]
        rc, err = _stop_training_run(torchrun, tmp_path / "cfg.yaml", tmp_path / "run", signal_to_group=False)
        assert "got signal: 15" in err, err  # torchrun itself ends on the signal it got (its own traceback)
    assert "is killed by signal" not in err and "exited unexpectedly" not in err, err
    step = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"]
    assert f"interrupted by SIGTERM at step {step} of 100000" in err, err
    assert step >= 2 and not (tmp_path / "run" / "final.pt").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loader_workers_never_fork_the_training_process(data_root, tmp_path, forks_of_this_process):
    """Training and evaluation workers start from the fork server: by the time the loaders start, the
    TensorBoard writer's thread runs (and later the queue feeders and the matching pool), and a fork then
    copies any lock they hold (the old code forked twice here, with other threads running)."""
    cfg = tiny_config(data_root, tmp_path, max_steps=2, eval_every=1)
    cfg.data.workers = 1
    train, val = datasets(cfg)
    Trainer(cfg, train, val).fit()
    assert forks_of_this_process == []
    assert (tmp_path / "best.pt").is_file()  # the evaluation ran, with its worker
