"""Training with ``compile``: the same step as eager, checkpoints unchanged, compile failures fall back to eager.

The tests compile with ``aot_eager`` (dynamo's graph capture and AOTAutograd's forward/backward split, no
code generation): the parts that decide whether the networks compile as one graph and train the same. The
``inductor`` backend adds code generation, which takes minutes on this machine's 2 cores and is measured in
docs/results/README.md instead.
"""
from __future__ import annotations

import logging

import pytest
import torch
from test_trainer import datasets, teacher_checkpoint, tiny_config  # noqa: F401 - fixture
from torch._dynamo.backends.common import aot_autograd

import models
from models.config import lite
from training.compiled import NetworkCalls, is_compile_error
from training.trainer import Trainer


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = lite()
    cfg.decoder.num_queries, cfg.decoder.num_refines, cfg.decoder.dropout = 16, [2, 4], 0.0
    cfg.image_size = [64, 96]
    return models.build_model(cfg).train()


def net_inputs(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    g2i = torch.zeros(b, 4, 4)
    g2i[:, 0, 0], g2i[:, 1, 1], g2i[:, 0, 2], g2i[:, 1, 2], g2i[:, 2, 2], g2i[:, 3, 3] = 40, 40, 48, 32, 1, 1
    g2i[:, 2, 3] = 0.5
    return torch.randn(b, 3, 64, 96), g2i


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler on this machine")


def test_a_forward_that_fails_to_compile_runs_eagerly_from_then_on(caplog):
    net = tiny_net()
    calls = NetworkCalls(net, "aot_eager", "student")
    calls._compiled["forward"] = torch.compile(net, backend=_failing_backend, fullgraph=True)
    image, g2i = net_inputs()
    with caplog.at_level(logging.WARNING, logger="training.compiled"):
        out = calls.forward(image, g2i, None)
    assert not calls.compiled and len(out["layers"]) == 2
    assert "torch.compile of the student is off" in caplog.text and "no compiler on this machine" in caplog.text
    eager = net(image, g2i)
    torch.testing.assert_close(out["layers"][-1]["points"], eager["layers"][-1]["points"])


def test_the_models_own_errors_are_not_taken_for_compile_failures():
    net = tiny_net()
    calls = NetworkCalls(net, "aot_eager")
    image, _ = net_inputs()
    with pytest.raises(ValueError, match="grid2img must be"):
        calls.forward(image, torch.eye(4)[None], None)  # batch of 2 images, one matrix
    assert not is_compile_error(ValueError("x"))


def test_unknown_backend_is_refused(data_root, tmp_path):
    with pytest.raises(ValueError, match="compile must be one of"):
        tiny_config(data_root, tmp_path, compile="tensorrt")


def test_distill_step_with_compile_equals_the_eager_step_and_keeps_the_checkpoint_format(data_root, tmp_path):
    """Same loss terms over two steps and the same gradients at the first (dropout on: the compiled graphs draw
    the same masks on the CPU), with both networks' ``forward`` and ``decode`` compiled (the student's decode runs
    the prior and anchor levels' layers: every compiled call is in the loss and its gradients). Not the weights after it: AdamW moves a weight whose gradient is rounding noise
    (a key bias's, zero in exact arithmetic) by the full lr either way."""
    teacher = teacher_checkpoint(data_root, tmp_path / "teacher")
    runs = {}
    for backend in ("none", "aot_eager"):
        cfg = tiny_config(data_root, tmp_path / backend, mode="distill", teacher_checkpoint=str(teacher),
                          compile=backend)
        trainer = Trainer(cfg, datasets(cfg)[0])
        batch = next(iter(trainer._loader()))
        first = trainer.train_step(batch)
        grads = {k: p.grad.clone() for k, p in trainer.student.named_parameters() if p.grad is not None}
        runs[backend] = ([first, trainer.train_step(batch)], grads, trainer)
    (eager_values, eager_grads, eager), (values, grads, compiled) = runs["none"], runs["aot_eager"]
    assert compiled.module_calls.compiled and compiled.teacher_calls.compiled
    for a, b in zip(eager_values, values, strict=True):
        assert b.keys() == a.keys() and {"query_feature", "prior_feature", "anchor_feature"} <= a.keys()
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) > 50
    for k in grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert compiled.student.state_dict().keys() == eager.student.state_dict().keys()  # no _orig_mod. prefixes
    assert compiled.save("last.pt").is_file()


def test_a_backward_that_fails_to_compile_redoes_the_step_eagerly(data_root, tmp_path, caplog):
    cfg = tiny_config(data_root, tmp_path, compile="aot_eager")
    trainer = Trainer(cfg, datasets(cfg)[0])
    failing = aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=_failing_backend)
    net = trainer.student
    trainer.module_calls._compiled = {"forward": torch.compile(net, backend=failing, fullgraph=True),
                                      "decode": torch.compile(net.decode, backend=failing, fullgraph=True)}
    batch = next(iter(trainer._loader()))
    with caplog.at_level(logging.WARNING, logger="training.compiled"):
        values = trainer.train_step(batch)
    assert trainer.step == 1 and torch.isfinite(torch.tensor(values["loss"]))
    assert not trainer.module_calls.compiled and "the backward pass failed to compile" in caplog.text
