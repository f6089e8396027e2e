"""Miniature reproduction of the paper's Table III on synthetic scenes (CPU-sized, about an hour on 2 cores).

    python benchmarks/reproduce_ablation.py [--device cpu] [--steps 1000] [--teacher-steps 4000] [--seeds 0 1]

Budget (measured on the 2-core build machine, one torch thread, other jobs running): lite teacher
0.31 s/step (4000 steps in 20.7 min), lite student 0.19-0.21 s/step, distillation step 0.38 s/step. The
defaults give about 21 min of teacher training plus 2 seeds x (1000 + 1000 + 1000 distillation) student
steps (about 26 min), plus data generation (about 1.5 min) and evaluation: about 50-55 min. One torch
thread and no loader workers by default: on the shared 2-core machine, oversubscribed OpenMP threads
made steps up to 25x slower.

Trains the lite teacher (bigger backbone, longer schedule) once, then with the same budget per seed:
the lite student without distillation (``student``), with Teacher-Guided Initialisation only
(``student_tgi``), and with the full DiScene recipe (``distilled``: TGI + EFA + query + prior + anchor
levels). Every model is evaluated with SSCMetrics on the synthetic val split. Writes
docs/results/ablation.md and ablation.json and ships the best distilled checkpoint (--ship).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluate import build_dataset, evaluate_model  # noqa: E402
from training.train_config import TrainConfig, load_train_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
VARIANTS = {  # name -> (base config, overrides)
    "student": ("lite_student.yaml", []),
    "student_tgi": ("lite_distill.yaml", ["tgi=true", "distill.efa=false", "distill.query=false",
                                          "distill.prior=false", "distill.anchor=false"]),
    "distilled": ("lite_distill.yaml", ["tgi=true"]),
}
LABELS = {"teacher": "Teacher (ResNet-34/2 + lite decoder)", "student": "Student, no distillation (OPUS)",
          "student_tgi": "Student + TGI", "distilled": "Student + TGI + EFA/query/prior/anchor (DiScene)"}


def ensure_dataset(root: Path, train_frames: int, val_frames: int, workers: int, frames_per_scene: int = 8) -> None:
    """Generate the synthetic dataset with training.synth unless ``root`` already has its split files."""
    if (root / "train_subscenes.txt").is_file() and (root / "val_subscenes.txt").is_file():
        return
    from training.synth import generate

    scenes = -(-(train_frames + val_frames) // frames_per_scene)
    val_fraction = val_frames / float(train_frames + val_frames)
    print(f"generating {scenes} synthetic scenes x {frames_per_scene} frames in {root}", flush=True)
    generate(root, scenes=scenes, frames_per_scene=frames_per_scene, seed=1234, width=256, height=192,
             val_fraction=val_fraction, workers=max(1, workers))


def make_config(base: str, overrides: list[str], args: argparse.Namespace, name: str, seed: int, steps: int,
                teacher: Path | None = None) -> TrainConfig:
    sets = list(overrides) + [f"name={name}", f"seed={seed}", f"max_steps={steps}", f"device={args.device}",
                              f"out_dir={Path(args.out) / name}", f"data.root={args.data}",
                              f"data.max_train_frames={args.train_frames}", f"data.max_val_frames={args.val_frames}",
                              f"data.workers={args.workers}", "eval_every=0", f"progress={not args.quiet}"]
    if teacher is not None:
        sets.append(f"teacher_checkpoint={teacher}")
    if args.score_threshold is not None:
        sets.append(f"model_overrides.score_threshold={args.score_threshold}")
    cfg = load_train_config(CONFIGS / base, sets)
    cfg.model_overrides.setdefault("name", cfg.model)  # still "lite" when only the threshold changes
    return cfg.validate()


def train_and_eval(cfg: TrainConfig) -> dict:
    """Train one configuration from scratch and evaluate its final model on the val split."""
    model_cfg = cfg.model_config()
    train = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, cfg.data.max_train_frames)
    val = build_dataset(cfg.data.root, cfg.data.val_split, model_cfg, cfg.data.max_val_frames)
    start = time.perf_counter()
    trainer = Trainer(cfg, train, None)
    final = trainer.fit()
    train_s = time.perf_counter() - start
    result = evaluate_model(trainer.student, val, model_cfg, trainer.device, workers=cfg.data.workers, amp=cfg.amp)
    record = {"iou": float(result["iou"]), "miou": float(result["miou"]), "checkpoint": str(final),
              "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(1, trainer.step), 3),
              "steps": trainer.step, "val_frames": int(result["frames"])}
    print(f"[{cfg.name}] IoU {100 * record['iou']:.2f} mIoU {100 * record['miou']:.2f} "
          f"({record['train_seconds']} s, {record['seconds_per_step']} s/step)", flush=True)
    return record


def summarise(runs: dict[str, list[dict]], seeds: dict[str, list[int]]) -> dict:
    out = {}
    for name, records in runs.items():
        ious = [r["iou"] for r in records]
        mious = [r["miou"] for r in records]
        out[name] = {
            "iou": statistics.mean(ious), "miou": statistics.mean(mious),
            "iou_std": statistics.stdev(ious) if len(ious) > 1 else 0.0,
            "miou_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
            "seeds": seeds[name], "per_seed": records,
        }
    return out


def write_markdown(path: Path, summary: dict, command: str, args: argparse.Namespace, minutes: float) -> None:
    lines = [
        "# Miniature ablation (paper Table III) on synthetic scenes",
        "",
        f"Command: `{command}`",
        "",
        f"Device `{args.device}`; {args.train_frames} train / {args.val_frames} val synthetic frames (256x192, "
        f"discene-synth); student budget {args.steps} steps per configuration (batch 1), teacher "
        f"{args.teacher_steps} steps; post-processing score threshold {args.score_threshold} for every model; "
        f"total wall time {minutes:.1f} min. IoU / mIoU (%) by SSCMetrics on the "
        "val split in percent (ablation.json holds the same numbers), mean +- standard deviation over seeds (the teacher is trained once, seed "
        f"{summary['teacher']['seeds'][0]}, and shared by all student seeds).",
        "",
        "| Configuration | TGI | EFA | Query | Prior | Anchor | IoU | mIoU | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    flags = {"teacher": "", "student": "| | | | | ", "student_tgi": "| x | | | | ", "distilled": "| x | x | x | x | x "}
    for name in ("teacher", "student", "student_tgi", "distilled"):
        if name not in summary:
            continue
        s = summary[name]
        cells = flags[name] if name != "teacher" else "| - | - | - | - | - "
        lines.append(f"| {LABELS[name]} {cells}| {100 * s['iou']:.2f} +- {100 * s['iou_std']:.2f} "
                     f"| {100 * s['miou']:.2f} +- {100 * s['miou_std']:.2f} | {s['seeds']} |")
    lines += ["", "Per run (seconds per step measured on this machine):", ""]
    for name, s in summary.items():
        for seed, r in zip(s["seeds"], s["per_seed"], strict=True):
            lines.append(f"- {name} seed {seed}: IoU {100 * r['iou']:.2f}, mIoU {100 * r['miou']:.2f}, "
                         f"{r['steps']} steps, {r['seconds_per_step']} s/step")
    path.write_text("\n".join(lines) + "\n")


def write_results(runs: dict[str, list[dict]], seeds: dict[str, list[int]], command: str,
                  args: argparse.Namespace, start: float) -> dict:
    """Write ablation.json (percent) and ablation.md for the runs finished so far; returns the summary."""
    summary = summarise(runs, seeds)
    minutes = (time.perf_counter() - start) / 60
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    as_percent = {name: {"iou": round(100 * s["iou"], 2), "miou": round(100 * s["miou"], 2),
                         "iou_std": round(100 * s["iou_std"], 2), "miou_std": round(100 * s["miou_std"], 2),
                         "seeds": s["seeds"],
                         "per_seed": [{"seed": seed, "iou": round(100 * r["iou"], 2), "miou": round(100 * r["miou"], 2),
                                       "steps": r["steps"], "seconds_per_step": r["seconds_per_step"]}
                                      for seed, r in zip(s["seeds"], s["per_seed"], strict=True)]}
                  for name, s in summary.items()}
    (results / "ablation.json").write_text(json.dumps(as_percent, indent=1) + "\n")
    write_markdown(results / "ablation.md", summary, command, args, minutes)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps of every student configuration")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default 4 x --steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-frames", type=int, default=400)
    parser.add_argument("--val-frames", type=int, default=80)
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (synth uses at least 1 process)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data", default=str(ROOT / "runs" / "synth_ablation"),
                        help="synthetic dataset root (generated when missing)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablation"), help="run directories")
    parser.add_argument("--results", default=str(ROOT / "docs" / "results"), help="where ablation.md/.json go")
    parser.add_argument("--ship", default=str(ROOT / "discene_ros" / "data" / "lite_distilled.pt"),
                        help="copy the best distilled checkpoint here ('' to skip)")
    parser.add_argument("--teacher", default=None, help="reuse this trained teacher checkpoint instead of training one")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="post-processing score threshold of every model here (design default 0.5; the "
                             "short schedules leave the focal-loss scores under-confident)")
    parser.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for the distilled runs, e.g. distill.lambdas=[2,0.4,0.4,1]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    args.teacher_steps = args.teacher_steps or 4 * args.steps
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if len(args.seeds) < 1:
        parser.error("give at least one seed")
    command = "python benchmarks/reproduce_ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    ensure_dataset(Path(args.data), args.train_frames, args.val_frames, args.workers)

    runs: dict[str, list[dict]] = {}
    seeds: dict[str, list[int]] = {}
    if args.teacher:
        from models.checkpoint import load_model

        model, model_cfg = load_model(args.teacher)
        if args.score_threshold is not None:
            model_cfg.score_threshold = args.score_threshold
        val = build_dataset(args.data, "val", model_cfg, args.val_frames)
        res = evaluate_model(model.to(args.device), val, model_cfg, args.device)
        runs["teacher"] = [{"iou": float(res["iou"]), "miou": float(res["miou"]), "checkpoint": args.teacher,
                            "steps": 0, "seconds_per_step": 0.0, "train_seconds": 0.0, "val_frames": res["frames"]}]
        teacher_path = Path(args.teacher)
    else:
        teacher_cfg = make_config("lite_teacher.yaml", [], args, "teacher", args.seeds[0], args.teacher_steps)
        runs["teacher"] = [train_and_eval(teacher_cfg)]
        seeds["teacher"] = [args.seeds[0]]
        write_results(runs, seeds, command, args, start)
        teacher_path = Path(runs["teacher"][0]["checkpoint"])
    seeds["teacher"] = [args.seeds[0]]
    for seed in args.seeds:
        for name, (base, overrides) in VARIANTS.items():
            teacher = teacher_path if base == "lite_distill.yaml" else None
            extra = args.distill_set if name == "distilled" else []
            cfg = make_config(base, overrides + extra, args, f"{name}_s{seed}", seed, args.steps, teacher)
            runs.setdefault(name, []).append(train_and_eval(cfg))
            seeds.setdefault(name, []).append(seed)
            write_results(runs, seeds, command, args, start)
    summary = write_results(runs, seeds, command, args, start)
    if args.ship:
        best = max(runs["distilled"], key=lambda r: r["miou"])
        Path(args.ship).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best["checkpoint"], args.ship)
        print(f"shipped {best['checkpoint']} (mIoU {100 * best['miou']:.2f}) to {args.ship}")
    print(f"wrote {Path(args.results) / 'ablation.md'} and ablation.json in {(time.perf_counter() - start) / 60:.1f} min")
    for name in ("teacher", "student", "student_tgi", "distilled"):
        s = summary[name]
        print(f"  {name:<12} IoU {100 * s['iou']:6.2f} +- {100 * s['iou_std']:.2f}   "
              f"mIoU {100 * s['miou']:6.2f} +- {100 * s['miou_std']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
