"""Training throughput: samples per second of the lite student step and the distillation step, through the real loader.

    python benchmarks/bench_train_throughput.py [--device cuda] [--batch 8 32] [--amp bf16] [--workers 12] \\
        [--modes student distill] [--compile none inductor] [--steps 30] [--count-ops] [--set KEY=VALUE ...] \\
        [--json docs/results/train_throughput_cuda.json] [--profile DIR]

Each row builds the Trainer from training/configs/lite_student.yaml, lite_distill.yaml or
lite_teacher.yaml (``--modes teacher``: the teacher's own training step, to size a teacher run; the
teacher of the distillation rows is a randomly initialised lite_teacher network: its speed, not its
accuracy, matters here), iterates the run's own loader (persistent workers, prefetch, pinned
batches) and times ``--steps`` full optimiser steps after ``--warmup`` steps, loader waits
included. ``data_ms`` is the part of a step spent waiting for the next batch. Without ``--data``
a synthetic set of 256x192 frames is generated in a temporary folder (training.synth). On CPU,
``--amp bf16`` sets the config's ``amp_on_cpu`` (CPU runs are fp32 otherwise). ``--compile`` sets the
config's ``compile`` (training/compiled.py); its compile time falls in the warm-up steps and is given as
``first_steps_s``, and ``compiled`` says whether it still ran compiled at the end (a failed compile falls back to
eager). ``--count-ops`` adds ``ops_per_step`` to the eager rows: the ATen ops one step dispatches (forward,
backward, optimiser; view ops left out), the host work of an eager step on any device (under the counter,
a ``loss.nn_backend: fused`` search runs as the GEMM search: dynamo compiles nothing under a dispatch mode).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.checkpoint import atomic_write, save_model  # noqa: E402
from training.compiled import COMPILE_BACKENDS  # noqa: E402
from training.data import build_dataset  # noqa: E402
from training.synth import generate  # noqa: E402
from training.train_config import TrainConfig, load_train_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
BASE = {"student": "lite_student.yaml", "distill": "lite_distill.yaml", "teacher": "lite_teacher.yaml"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_teacher(path: Path) -> None:
    """A randomly initialised lite_teacher network (bigger backbone, lite decoder) saved as a model checkpoint."""
    cfg = load_train_config(CONFIGS / "lite_teacher.yaml").model_config()
    torch.manual_seed(0)
    save_model(path, models.build_model(cfg), cfg)


def row_config(mode: str, args: argparse.Namespace, batch: int, amp: str, workers: int, out: Path,
               teacher: Path, compile_backend: str = "none") -> TrainConfig:
    sets = [f"device={args.device}", f"batch_size={batch}", f"amp={amp}", f"data.workers={workers}",
            f"compile={compile_backend}",
            f"amp_on_cpu={amp != 'none'}",
            f"data.root={args.data}", f"out_dir={out}", "progress=false", "max_steps=100000",
            f"data.frequency_frames={min(16, args.frames)}", f"model={args.model}"]
    if mode == "distill":
        sets.append(f"teacher_checkpoint={teacher}")
    sets.extend(args.set)
    return load_train_config(BASE[mode], sets)


def profile_steps(trainer: Trainer, batches, steps: int, path: Path) -> None:
    """torch.profiler over ``steps`` more steps: the ops by device (GPU) time and by host time, as text."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step(trainer._next_batch(batches))
        _sync(trainer.device)
    table = prof.key_averages()
    device_key = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} steps\n\nby device time\n{table.table(sort_by=device_key, row_limit=40)}\n\n"
                    f"by host time\n{table.table(sort_by='self_cpu_time_total', row_limit=40)}\n")
    print(f"wrote {path}", flush=True)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active, view ops (metadata only, no kernel) left out."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def measure(cfg: TrainConfig, steps: int, warmup: int, profile_to: Path | None = None,
            count_ops: bool = False) -> dict:
    """samples/s, ms per step and ms per step waiting on the loader, over ``steps`` steps after ``warmup``
    (``first_steps_s``: the warm-up's wall time, compiling included); then, with ``count_ops``, the ops of one
    more step, and with ``profile_to`` a profiler table of a few more steps."""
    model_cfg = cfg.model_config()
    train = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, load_depth=cfg.needs_depth())
    trainer = Trainer(cfg, train)
    batches = iter(trainer._loader())
    first = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(trainer._next_batch(batches))
    _sync(trainer.device)
    first = time.perf_counter() - first
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        batch = trainer._next_batch(batches)
        waited += time.perf_counter() - tick
        trainer.train_step(batch)
    _sync(trainer.device)
    elapsed = time.perf_counter() - start
    extra = {"compiled": trainer.module_calls.compiled}
    if count_ops and cfg.compile == "none":  # compiled graphs cannot run under a Python dispatch mode
        batch = trainer._next_batch(batches)
        with OpCounter() as counter:
            trainer.train_step(batch)
        extra["ops_per_step"] = counter.count
    if profile_to is not None:
        profile_steps(trainer, batches, min(steps, 5), profile_to)
    del batches
    return {"samples_per_s": round(steps * cfg.batch_size / elapsed, 2), "step_ms": round(1000 * elapsed / steps, 1),
            "data_ms": round(1000 * waited / steps, 1), "steps": steps, "warmup": warmup,
            "first_steps_s": round(first, 1), **extra}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--modes", nargs="+", default=["student", "distill"], choices=sorted(BASE))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="loader worker processes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data", default=None, help="Occ-ScanNet-format root (default: generate --frames frames)")
    parser.add_argument("--frames", type=int, default=16, help="synthetic training frames to generate")
    parser.add_argument("--synth-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--profile", default=None, help="folder: a torch.profiler table per row, after its timing")
    parser.add_argument("--compile", nargs="+", default=["none"], choices=COMPILE_BACKENDS,
                        help="the train config's compile (one row each)")
    parser.add_argument("--count-ops", action="store_true", help="count the ops of one more step per row")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="train config overrides for every row, e.g. loss.nn_backend=cdist")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.frames < max(args.batch):
        parser.error(f"--frames {args.frames} is smaller than the largest --batch {max(args.batch)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data = str(Path(tmp) / "synth")
            scenes = -(-args.frames // 8)
            generate(args.data, scenes=scenes + 1, frames_per_scene=8, seed=0, width=256, height=192,
                     val_fraction=1.0 / (scenes + 1), workers=args.synth_workers, progress=False)
        teacher = Path(tmp) / "teacher.pt"
        if "distill" in args.modes:
            make_teacher(teacher)
        for mode in args.modes:
            for amp, workers, batch, backend in itertools.product(args.amp, args.workers, args.batch, args.compile):
                cfg = row_config(mode, args, batch, amp, workers, Path(tmp) / "out", teacher, backend)
                name = f"{mode}_b{batch}_{amp}_w{workers}" + ("" if backend == "none" else f"_{backend}")
                row = {"config": cfg.name, "model": args.model, "mode": mode, "batch": batch, "amp": amp,
                       "workers": workers, "compile": backend, "nn_backend": cfg.loss.nn_backend,
                       "image_size": cfg.model_config().image_size,
                       **measure(cfg, args.steps, args.warmup, Path(args.profile) / f"{name}.txt" if args.profile else None,
                                 args.count_ops)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                write_rows(args, rows)  # after every row: a run cut short by a timeout keeps what it measured
    if args.json:
        print(f"wrote {args.json}")
    return 0


def write_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows so far, with the device, to ``--json`` (atomically), when it is given."""
    if not args.json:
        return
    result = {"device": device_name(args.device), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "frames": args.frames, "set": args.set, "rows": rows}
    atomic_write(args.json, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))


if __name__ == "__main__":
    sys.exit(main())
