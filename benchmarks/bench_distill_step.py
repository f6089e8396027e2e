"""Time of one distillation step vs one plain student step (lite), and the share in Hungarian matching.

    python benchmarks/bench_distill_step.py [--device cuda] [--repeats 10] [--data DIR]

Both steps run the full optimiser step (forward, losses, backward, AdamW) on the same frames; the
distillation step adds the frozen teacher passes, the prior and anchor student passes and eq. 10.
Without --data a few synthetic frames are generated in a temporary directory (training.synth).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import save_model  # noqa: E402
from training import matcher  # noqa: E402
from training.data import build_dataset, collate_frames  # noqa: E402
from training.train_config import TrainConfig  # noqa: E402
from training.trainer import Trainer  # noqa: E402

TEACHER_OVERRIDES = {"backbone": {"depth": 34, "base_channels": 32}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, batches: list, repeats: int) -> tuple[list[float], list[float]]:
    """Per-step wall times and the Hungarian matching seconds inside each step (after 2 warm-up steps)."""
    times, match = [], []
    for i in range(repeats + 2):
        batch = batches[i % len(batches)]
        matcher.stats.reset()
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.train_step(batch)
        _sync(trainer.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
            match.append(matcher.stats.seconds)
    return times, match


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data", default=None, help="Occ-ScanNet-format root (default: generate 4 synthetic frames)")
    parser.add_argument("--model", default="lite")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            from training.synth import generate

            root = str(Path(tmp) / "synth")
            generate(root, scenes=2, frames_per_scene=3, seed=0, width=256, height=192, val_fraction=0.34, progress=False)

        def config(**kw) -> TrainConfig:
            cfg = TrainConfig(name="bench", model=args.model, device=args.device, amp=args.amp, max_steps=1000,
                              out_dir=str(Path(tmp) / "out"), progress=False, **kw)
            cfg.data.root, cfg.data.workers = root, 0
            return cfg.validate()

        student_cfg = config(mode="student")
        teacher_cfg = config(mode="teacher", model_overrides=TEACHER_OVERRIDES)
        teacher = Trainer(teacher_cfg, build_dataset(root, "train", teacher_cfg.model_config()))
        teacher_path = Path(tmp) / "teacher.pt"
        save_model(teacher_path, teacher.student, teacher.model_cfg)
        train = build_dataset(root, "train", student_cfg.model_config())
        batches = [collate_frames([train[i]]) for i in range(min(4, len(train)))]
        plain = Trainer(student_cfg, train)
        distill = Trainer(config(mode="distill", teacher_checkpoint=str(teacher_path)), train)
        plain_t, _ = time_steps(plain, batches, args.repeats)
        dist_t, match_t = time_steps(distill, batches, args.repeats)
    p, d, m = statistics.median(plain_t), statistics.median(dist_t), statistics.median(match_t)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {args.device} ({name}, {torch.get_num_threads()} CPU threads), model {args.model}, teacher {args.model}+{TEACHER_OVERRIDES}, "
          f"amp {args.amp}, median of {args.repeats} steps")
    print(f"{'step':<28}{'ms':>10}")
    print(f"{'plain student':<28}{1000 * p:>10.1f}")
    print(f"{'distilled student':<28}{1000 * d:>10.1f}")
    print(f"ratio distill / plain: {d / p:.2f}x;  Hungarian matching {1000 * m:.1f} ms = "
          f"{100 * m / d:.1f}% of the distillation step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
