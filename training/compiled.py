"""The network calls of a training step, eager or through ``torch.compile`` (train config ``compile``).

On the GPU a lite distillation step is bound by the host: about 5,700 eager ops per step, each a Python
dispatch and a kernel launch (docs/results/README.md, "GPU training throughput"), and the networks'
forward and backward passes are most of them. Compiling the student's and the teacher's ``forward`` and
``decode`` (each one whole graph, ``fullgraph=True``) fuses those ops into a few generated kernels; the
losses, whose ground-truth size changes every batch, stay eager. Evaluation stays eager too.

A compile that fails (a backend or toolchain problem on the machine at hand) is logged once and that call
runs eagerly from then on, so a run never dies of it; a failure in a backward pass, where AOTAutograd
compiles the backward graph, makes the trainer turn compiling off and redo the step eagerly.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

COMPILE_BACKENDS = ("none", "inductor", "aot_eager")  # aot_eager: graph capture without code generation (tests)
log = logging.getLogger(__name__)


def is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of torch.compile's machinery and not of the model (whose own checks raise
    the same errors under dynamo as eagerly): an error type of dynamo, AOTAutograd or inductor (dynamo wraps
    every failure of a forward compile in one), or one raised under dynamo's compiler-backend wrappers, which
    is where AOTAutograd compiles a backward graph at its first backward pass."""
    if (type(exc).__module__ or "").startswith(("torch._dynamo", "torch._inductor", "torch._functorch")):
        return True
    backends = os.path.join("torch", "_dynamo", "backends", "")
    tb = exc.__traceback__
    while tb is not None:
        if backends in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def describe_failure(exc: BaseException) -> str:
    """One line for the log: the error and, for a backend's failure, the error the backend raised."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__
    shown = inner if inner is not None else exc
    lines = [line for line in str(shown).splitlines() if line.strip()] or [""]
    text = f"{type(shown).__name__}: {lines[0]}"
    return (f"{type(exc).__name__} ({text})" if shown is not exc else text)[:300]


class NetworkCalls:
    """``forward`` and ``decode`` of one network as a training step calls them.

    Not an ``nn.Module``: the network stays the registered submodule, so state dicts and checkpoints are
    the same with and without compiling.
    """

    def __init__(self, net: nn.Module, backend: str = "none", name: str = "network") -> None:
        if backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile must be one of {COMPILE_BACKENDS}, got {backend!r}")
        self.net, self.name = net, name
        self._compiled: dict[str, Callable[..., Any]] = {}
        if backend != "none":
            self._compiled = {"forward": torch.compile(net, backend=backend, fullgraph=True),
                              "decode": torch.compile(net.decode, backend=backend, fullgraph=True)}

    @property
    def compiled(self) -> bool:
        """Whether any call still runs compiled."""
        return bool(self._compiled)

    def forward(self, *args: Any) -> dict[str, Any]:
        """The network's ``forward(image, grid2img, depth)``."""
        return self._call("forward", self.net, *args)

    def decode(self, *args: Any) -> dict[str, Any]:
        """The network's ``decode(features, grid2img, depth, init_points)``."""
        return self._call("decode", self.net.decode, *args)

    def disable(self, reason: str) -> None:
        """Run every call eagerly from now on."""
        if self._compiled:
            log.warning("torch.compile of the %s is off from now on (%s); its calls run eagerly", self.name, reason)
        self._compiled = {}

    def _call(self, which: str, eager: Callable[..., Any], *args: Any) -> dict[str, Any]:
        compiled = self._compiled.get(which)
        if compiled is None:
            return eager(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # noqa: BLE001 - only compile failures are caught, the rest re-raised
            if not is_compile_error(exc):
                raise
            self.disable(f"{which} failed to compile: {describe_failure(exc)}")
            return eager(*args)
