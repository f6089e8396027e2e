"""Ctrl-C and SIGTERM during training: stop at the next step boundary and keep the run resumable.

A signal that lands inside a step could leave the optimizer half-way through an update, so the first
SIGINT or SIGTERM only raises a flag; the training loop sees it after the step, saves ``last.pt`` and
ends with ``TrainingInterrupted``. A second Ctrl-C interrupts at once (``KeyboardInterrupt``): the last
checkpoint written before it is intact, since each is replaced atomically. Under ``torchrun`` the
terminal's Ctrl-C reaches every worker, and the agent then sends each the signal it got (its
``SignalException`` handling, torch/distributed/elastic/agent/server/api.py): a repeat within
``REPEAT_WINDOW_S`` of the first, and any later SIGTERM, count as the same request.
"""
from __future__ import annotations

import functools
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0  # a SIGINT this soon after the first is its echo (torchrun's agent), not a second Ctrl-C


class TrainingInterrupted(Exception):
    """Training stopped early on a signal, after saving a resumable checkpoint."""

    def __init__(self, signal_name: str, step: int, total_steps: int, checkpoint: str) -> None:
        super().__init__(f"{signal_name} at step {step} of {total_steps}: {checkpoint} saved at that step")
        self.signal_name, self.step, self.total_steps, self.checkpoint = signal_name, step, total_steps, checkpoint


class StopRequest:
    """While entered (on the main thread): SIGINT / SIGTERM set ``signal_name`` instead of interrupting;
    a second SIGINT, more than REPEAT_WINDOW_S after the first, raises KeyboardInterrupt. Elsewhere (a
    thread) it installs nothing and never asks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.signal_name: str | None = None
        self.clock, self.first_s = clock, 0.0  # when the first signal came
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name, self.first_s = signal.Signals(signum).name, self.clock()
        elif signum == signal.SIGINT and self.clock() - self.first_s > REPEAT_WINDOW_S:
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
    """DataLoader ``worker_init_fn``: leave a stop to the training process, which then stops its workers.

    A terminal's Ctrl-C reaches the whole process group, and so does the SIGTERM that torchrun's agent
    sends each rank (``os.killpg``, torch/distributed/elastic/multiprocessing/subprocess_handler); a
    loader worker either signal killed would end the run with "DataLoader worker ... is killed by signal"
    before the training process could save. SIGINT is ignored; the first SIGTERM is too, and any later
    one (the loader's own ``terminate()`` of a worker that did not exit) ends the worker as usual."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _first_sigterm_ignored)


def _first_sigterm_ignored(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def training_worker_init(trainer_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of the training loader: ``ignore_interrupts``, and end with the training process."""
    ignore_interrupts(worker_id)
    exit_with(trainer_pid)


def worker_init_for_this_process() -> Callable[[int], None]:
    """The ``worker_init_fn`` of a loader made by this (the training) process: ``training_worker_init``
    bound to its pid, so that the workers end with it."""
    return functools.partial(training_worker_init, os.getpid())


def exit_with(pid: int) -> None:
    """End this process as soon as process ``pid`` ends (Linux pidfd; elsewhere nothing). A loader worker starts
    from the fork server, which stays while the worker does, and the worker's own check watches the server: a
    trainer killed outright (SIGKILL, the OOM killer) would leave both holding their memory for good."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except (AttributeError, OSError):  # not Linux
        return
    threading.Thread(target=_exit_when_readable, args=(handle,), name="exit-with-trainer", daemon=True).start()


def _exit_when_readable(handle: int) -> None:
    select.select([handle], [], [])
    os._exit(1)
