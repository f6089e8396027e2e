"""Ctrl-C and SIGTERM during training: stop at the next step boundary and keep the run resumable.

A signal that lands inside a step could leave the optimizer half-way through an update, so the first
SIGINT or SIGTERM only raises a flag; the training loop sees it after the step, saves ``last.pt`` and
ends with ``TrainingInterrupted``. A second Ctrl-C interrupts at once (``KeyboardInterrupt``): the last
checkpoint written before it is intact, since each is replaced atomically. Further SIGTERMs are
ignored: ``torchrun`` sends one to every worker after the terminal's Ctrl-C has reached them.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped early on a signal, after saving a resumable checkpoint."""

    def __init__(self, signal_name: str, step: int, total_steps: int, checkpoint: str) -> None:
        super().__init__(f"{signal_name} at step {step} of {total_steps}: {checkpoint} saved at that step")
        self.signal_name, self.step, self.total_steps, self.checkpoint = signal_name, step, total_steps, checkpoint


class StopRequest:
    """While entered (on the main thread): SIGINT / SIGTERM set ``signal_name`` instead of interrupting;
    a second SIGINT raises KeyboardInterrupt. Elsewhere (a thread) it installs nothing and never asks."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group, and a loader
    worker it killed would end the run with "DataLoader worker exited unexpectedly" before the training
    process could save. The workers leave the signal to that process, which stops them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
