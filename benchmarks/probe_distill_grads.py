"""One-frame probe: gradient norm, w.r.t. the student's parameters, of the task loss and of every weighted
distillation term, through the trainer's own path (TGI on, weights from the one weight table).

Issue 11 measured, before the fix (paper config, TGI on): task 63, EFA 0.035, query / prior / anchor feature
terms 0.011 / 0.011 / 0.048; with the reference's reductions and weights about 9.0, 13.6, 14.0, 24.5.
Weights are random (no trained teacher is needed to compare scales); the teacher is a randomly initialised
network of the teacher config, saved to a temporary checkpoint so the Trainer loads it as in training.

    python benchmarks/probe_distill_grads.py --student paper_student --teacher paper_teacher   # ~minutes on CPU
    python benchmarks/probe_distill_grads.py --student lite --teacher lite                     # seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.checkpoint import save_model  # noqa: E402
from training.data import build_dataset  # noqa: E402
from training.train_config import TrainConfig  # noqa: E402
from training.trainer import TASK_PREFIXES, Trainer  # noqa: E402

GROUPS = {  # printed name -> weighted terms summed into it
    "task": None,
    "efa": ("efa",),
    "query": ("query_center", "query_feature"),
    "query_center": ("query_center",),
    "query_feature": ("query_feature",),
    "prior": ("prior_center", "prior_feature"),
    "prior_center": ("prior_center",),
    "prior_feature": ("prior_feature",),
    "anchor": ("anchor_center", "anchor_feature"),
    "anchor_center": ("anchor_center",),
    "anchor_feature": ("anchor_feature",),
}


def grad_norm(value: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """L2 norm of d value / d params over all student parameters (unused ones count as zero)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="paper_student")
    parser.add_argument("--teacher", default="paper_teacher")
    parser.add_argument("--data", default=str(ROOT / "discene_ros" / "data" / "sample_dataset"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        teacher_cfg = models.load_config(args.teacher)
        teacher_path = Path(tmp) / "teacher.pt"
        save_model(teacher_path, models.build_model(teacher_cfg), teacher_cfg)
        cfg = TrainConfig(name="probe", mode="distill", model=args.student, teacher_checkpoint=str(teacher_path),
                          tgi=True, out_dir=tmp, progress=False, device="cpu", seed=args.seed, max_steps=1)
        cfg.data.root, cfg.data.workers, cfg.data.frequency_frames = args.data, 0, 4
        train = build_dataset(args.data, "train", cfg.model_config())
        trainer = Trainer(cfg.validate(), train)
        _, weighted = trainer.loss_terms(trainer._next_batch(iter(trainer._loader())))
        params = [p for p in trainer.student.parameters() if p.requires_grad]
        result = {}
        for name, keys in GROUPS.items():
            if keys is None:
                parts = [v for k, v in weighted.items() if k.startswith(TASK_PREFIXES)]
            else:
                parts = [weighted[k] for k in keys if k in weighted]
            if parts:
                result[name] = {"value": float(sum(parts).detach()), "grad_norm": grad_norm(sum(parts), params)}
    print(f"student {args.student}, teacher {args.teacher} (random weights, TGI on), one frame of {args.data}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{'term (weighted)':<16} {'value':>10} {'grad norm':>10}")
    for name, r in result.items():
        print(f"{name:<16} {r['value']:>10.4f} {r['grad_norm']:>10.4f}")
    print("weights:", {k: round(v, 3) for k, v in trainer.loss_weights.items() if not k.startswith(TASK_PREFIXES)})
    if args.json:
        Path(args.json).write_text(json.dumps({"student": args.student, "teacher": args.teacher, "terms": result},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
