"""Miniature reproduction of the paper's Table III on synthetic scenes (CPU or GPU).

    python benchmarks/reproduce_ablation.py [--device cuda --batch 16 --amp bf16 --workers 12] \\
        [--steps 1000] [--teacher-steps 4000] [--seeds 0 1] [--publish]

Rows, every one evaluated with SSCMetrics on the same synthetic val split at one score threshold
(the paper's 0.5 unless --score-threshold says otherwise):

- ``teacher``: the lite decoder behind the bigger lite_teacher backbone, longer schedule (trained
  once, first seed, shared by every distilled row; or --teacher CKPT);
- ``student``: the lite student without distillation (OPUS);
- ``student_query`` / ``student_prior`` / ``student_anchor``: one distillation level alone, each
  with EFA, without TGI (Table III rows 1-4; --level-seeds, default the first seed);
- ``student_tgi``: Teacher-Guided Initialisation alone;
- ``distilled``: TGI + EFA + query + prior + anchor (DiScene).

``student``, ``student_tgi`` and ``distilled`` run once per --seeds entry with the same step budget.
Everything is written under --out (default runs/ablation; ablation.md/.json in --out/results).
Only --publish replaces the shipped artefacts: docs/results/ablation.{md,json} and the best
distilled checkpoint as discene_ros/data/lite_distilled.pt.

Measured on the 2-core build machine (batch 1, one torch thread): lite teacher 0.31-0.37 s/step,
lite student 0.19-0.28 s/step, distillation step 0.38 s/step: --steps 800 took 48 min for the
four original rows. On the GPU, see docs/results/README.md.
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

from models.checkpoint import load_model  # noqa: E402
from training.data import build_dataset  # noqa: E402
from training.device_run import find_checkpoint  # noqa: E402
from training.evaluate import evaluate_model  # noqa: E402
from training.scene_format import SPLIT_FILES, parse_split_line  # noqa: E402
from training.synth import generate  # noqa: E402
from training.train_config import TrainConfig, load_train_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
SHIPPED_CHECKPOINT = ROOT / "discene_ros" / "data" / "lite_distilled.pt"
SHIPPED_RESULTS = ROOT / "docs" / "results"
NO_LEVELS = ["distill.efa=false", "distill.query=false", "distill.prior=false", "distill.anchor=false"]


def level_alone(level: str) -> list[str]:
    """Overrides of lite_distill.yaml for one distillation level with EFA, no TGI."""
    others = [f"distill.{name}=false" for name in ("query", "prior", "anchor") if name != level]
    return ["tgi=false", "distill.efa=true", f"distill.{level}=true", *others]


# name -> (base config, overrides, label, Table III marks: query, prior, anchor, TGI, EFA)
ROWS = {
    "student": ("lite_student.yaml", [], "Student, no distillation (OPUS)", ""),
    "student_query": ("lite_distill.yaml", level_alone("query"), "Student + query level (+ EFA)", "Q"),
    "student_prior": ("lite_distill.yaml", level_alone("prior"), "Student + prior level (+ EFA)", "P"),
    "student_anchor": ("lite_distill.yaml", level_alone("anchor"), "Student + anchor level (+ EFA)", "A"),
    "student_tgi": ("lite_distill.yaml", ["tgi=true", *NO_LEVELS], "Student + TGI", "T"),
    "distilled": ("lite_distill.yaml", ["tgi=true"], "Student + TGI + EFA/query/prior/anchor (DiScene)", "QPATE"),
}
SEEDED = ("student", "student_tgi", "distilled")     # run for every --seeds entry
LEVELS = ("student_query", "student_prior", "student_anchor")  # run for every --level-seeds entry
ORDER = ("teacher", "student", "student_query", "student_prior", "student_anchor", "student_tgi", "distilled")


def ensure_dataset(args: argparse.Namespace) -> None:
    """Generate the synthetic dataset (fixed seed) unless ``--data`` already has its split files."""
    root = Path(args.data)
    if (root / SPLIT_FILES["train"]).is_file() and (root / SPLIT_FILES["val"]).is_file():
        return
    scenes = -(-(args.train_frames + args.val_frames) // args.frames_per_scene)
    val_fraction = args.val_frames / float(args.train_frames + args.val_frames)
    print(f"generating {scenes} synthetic scenes x {args.frames_per_scene} frames in {root}", flush=True)
    generate(root, scenes=scenes, frames_per_scene=args.frames_per_scene, seed=args.synth_seed, width=args.width,
             height=args.height, val_fraction=val_fraction, workers=max(1, args.synth_workers),
             progress=not args.quiet)


def split_description(root: Path, split: str, max_frames: int) -> dict:
    """Generator, seed, scenes, frames and image size of the first ``max_frames`` frames of a split."""
    meta_path = root / "synth_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    lines = [line.strip() for line in (root / SPLIT_FILES[split]).read_text().splitlines() if line.strip()]
    lines = lines[:max_frames]
    return {"split": split, "root": str(root), "generator": meta.get("generator", "unknown"),
            "generator_seed": meta.get("seed"), "scenes": len({parse_split_line(line).split("/")[0] for line in lines}),
            "frames": len(lines), "size_wh": [meta.get("width"), meta.get("height")]}


def make_config(base: str, overrides: list[str], args: argparse.Namespace, name: str, seed: int, steps: int,
                teacher: Path | None = None) -> TrainConfig:
    sets = list(overrides) + list(args.overrides) + [f"name={name}", f"seed={seed}", f"max_steps={steps}", f"device={args.device}",
                              f"out_dir={Path(args.out) / name}", f"data.root={args.data}",
                              f"data.max_train_frames={args.train_frames}", f"data.max_val_frames={args.val_frames}",
                              f"data.workers={args.workers}", f"batch_size={args.batch}", f"amp={args.amp}",
                              "eval_every=0", f"progress={not args.quiet}",
                              f"model_overrides.score_threshold={args.score_threshold}"]
    if teacher is not None:
        sets.append(f"teacher_checkpoint={teacher}")
    cfg = load_train_config(CONFIGS / base, sets)
    cfg.model_overrides.setdefault("name", cfg.model)  # still "lite" when only the threshold changes
    return cfg.validate()


def evaluate(model: torch.nn.Module, model_cfg, args: argparse.Namespace, device: torch.device | str) -> dict:
    val = build_dataset(args.data, "val", model_cfg, args.val_frames)
    result = evaluate_model(model, val, model_cfg, device, batch_size=args.batch, workers=args.workers, amp=args.amp)
    return {"iou": float(result["iou"]), "miou": float(result["miou"]), "val_frames": int(result["frames"])}


def train_and_eval(cfg: TrainConfig, args: argparse.Namespace) -> dict:
    """Train one configuration from scratch and evaluate its final model on the val split."""
    model_cfg = cfg.model_config()
    train = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, cfg.data.max_train_frames,
                          load_depth=cfg.needs_depth())
    start = time.perf_counter()
    trainer = Trainer(cfg, train, None)
    final = trainer.fit()
    train_s = time.perf_counter() - start
    record = evaluate(trainer.student, model_cfg, args, trainer.device)
    record.update(checkpoint=str(final), train_seconds=round(train_s, 1), steps=trainer.step,
                  seconds_per_step=round(train_s / max(1, trainer.step), 4))
    torch.use_deterministic_algorithms(False)
    print(f"[{cfg.name}] IoU {100 * record['iou']:.2f} mIoU {100 * record['miou']:.2f} "
          f"({record['train_seconds']} s, {record['seconds_per_step']} s/step)", flush=True)
    return record


def summarise(runs: dict[str, list[tuple[int, dict]]]) -> dict:
    """Per row: mean and standard deviation over seeds (percent), the seeds and the per-seed records."""
    out = {}
    for name in ORDER:
        if name not in runs:
            continue
        records = runs[name]
        ious = [100 * r["iou"] for _, r in records]
        mious = [100 * r["miou"] for _, r in records]
        out[name] = {
            "iou": round(statistics.mean(ious), 2), "miou": round(statistics.mean(mious), 2),
            "iou_std": round(statistics.stdev(ious), 2) if len(ious) > 1 else 0.0,
            "miou_std": round(statistics.stdev(mious), 2) if len(mious) > 1 else 0.0,
            "seeds": [seed for seed, _ in records],
            "per_seed": [{"seed": seed, "iou": round(100 * r["iou"], 2), "miou": round(100 * r["miou"], 2),
                          "steps": r["steps"], "seconds_per_step": r["seconds_per_step"]} for seed, r in records],
        }
    return out


def write_markdown(path: Path, result: dict) -> None:
    setup, val = result["setup"], result["val_split"]
    lines = [
        "# Miniature ablation (paper Table III) on synthetic scenes",
        "",
        f"Command: `{setup['command']}`",
        "",
        f"Device {setup['device']}; batch {setup['batch']}, amp {setup['amp']}; student budget {setup['steps']} "
        f"steps per configuration, teacher {setup['teacher_steps']} steps; score threshold "
        f"{result['score_threshold']} for every model; total wall time {setup['minutes']:.1f} min. Val split: "
        f"{val['frames']} frames of {val['scenes']} scenes ({val['generator']}, generator seed "
        f"{val['generator_seed']}, {val['size_wh'][0]}x{val['size_wh'][1]}), the same for every row. IoU / mIoU "
        "(%) by SSCMetrics, mean +- standard deviation over seeds (the teacher is trained once and shared).",
        "",
        "| Configuration | Query | Prior | Anchor | TGI | EFA | IoU | mIoU | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER:
        if name not in result:
            continue
        s = result[name]
        if name == "teacher":
            label, marks = "Teacher (lite_teacher backbone + lite decoder)", ["-"] * 5
        else:
            label, code = ROWS[name][2], ROWS[name][3]
            marks = ["x" if c in code else "" for c in "QPATE"]
            marks[4] = "x" if any(c in code for c in "QPA") else ""
        lines.append(f"| {label} | {' | '.join(marks)} | {s['iou']:.2f} +- {s['iou_std']:.2f} "
                     f"| {s['miou']:.2f} +- {s['miou_std']:.2f} | {s['seeds']} |")
    lines += ["", "Per run:", ""]
    for name in ORDER:
        for r in result.get(name, {}).get("per_seed", []):
            lines.append(f"- {name} seed {r['seed']}: IoU {r['iou']:.2f}, mIoU {r['miou']:.2f}, {r['steps']} steps, "
                         f"{r['seconds_per_step']} s/step")
    path.write_text("\n".join(lines) + "\n")


def write_results(runs: dict, args: argparse.Namespace, command: str, start: float) -> dict:
    """Write ablation.json and ablation.md for the rows finished so far into --out/results."""
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "score_threshold": args.score_threshold,
        "val_split": split_description(Path(args.data), "val", args.val_frames),
        "train_split": split_description(Path(args.data), "train", args.train_frames),
        "setup": {"command": command, "device": device, "batch": args.batch, "amp": args.amp, "steps": args.steps,
                  "teacher_steps": args.teacher_steps, "seeds": args.seeds, "level_seeds": args.level_seeds,
                  "minutes": round((time.perf_counter() - start) / 60, 1)},
        **summarise(runs),
    }
    results = Path(args.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(results / "ablation.md", result)
    return result


def publish(runs: dict, args: argparse.Namespace) -> None:
    """Replace docs/results/ablation.{md,json} and the shipped lite_distilled.pt (--publish only)."""
    results = Path(args.out) / "results"
    SHIPPED_RESULTS.mkdir(parents=True, exist_ok=True)
    for name in ("ablation.md", "ablation.json"):
        shutil.copyfile(results / name, SHIPPED_RESULTS / name)
    best = max((r for _, r in runs["distilled"]), key=lambda r: r["miou"])
    shutil.copyfile(best["checkpoint"], SHIPPED_CHECKPOINT)
    print(f"published {SHIPPED_RESULTS}/ablation.md/.json and {best['checkpoint']} "
          f"(mIoU {100 * best['miou']:.2f}) as {SHIPPED_CHECKPOINT}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="batch size of every training run")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision (CUDA)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps of every student configuration")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default 4 x --steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of student, TGI and full rows")
    parser.add_argument("--level-seeds", type=int, nargs="*", default=None,
                        help="seeds of the one-level rows (default: the first of --seeds; none: skip them)")
    parser.add_argument("--train-frames", type=int, default=400)
    parser.add_argument("--val-frames", type=int, default=80)
    parser.add_argument("--frames-per-scene", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--synth-seed", type=int, default=1234, help="generator seed of the synthetic set")
    parser.add_argument("--synth-workers", type=int, default=1, help="processes generating the synthetic set")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data", default=str(ROOT / "runs" / "synth_ablation"),
                        help="synthetic dataset root (generated when missing)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablation"), help="run folders and results/")
    parser.add_argument("--publish", action="store_true",
                        help="replace docs/results/ablation.{md,json} and discene_ros/data/lite_distilled.pt")
    parser.add_argument("--teacher", default=None,
                        help="reuse this trained teacher (a checkpoint, or a device run's folder) instead of training one")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="post-processing score threshold of every model (the paper's 0.5)")
    parser.add_argument("--distill-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for the distilled runs, e.g. distill.lambdas=[2,0.4,0.4,1]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, teacher included (e.g. model_overrides.image_size=[96,128])")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.teacher_steps = args.teacher_steps or 4 * args.steps
    args.level_seeds = args.seeds[:1] if args.level_seeds is None else args.level_seeds
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.seeds:
        parser.error("give at least one seed")
    command = "python benchmarks/reproduce_ablation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    ensure_dataset(args)

    runs: dict[str, list[tuple[int, dict]]] = {}
    if args.teacher and Path(args.teacher).is_dir():  # a device run's handed-back folder (final.pt in parts)
        joined = find_checkpoint(Path(args.teacher), "final.pt", Path(args.out) / "teacher_joined")
        if joined is None:
            parser.error(f"--teacher {args.teacher} holds no final.pt (whole or in parts)")
        args.teacher = str(joined)
    if args.teacher:
        model, model_cfg = load_model(args.teacher)
        model_cfg.score_threshold = args.score_threshold
        record = evaluate(model.to(args.device), model_cfg, args, args.device)
        record.update(checkpoint=args.teacher, steps=0, seconds_per_step=0.0, train_seconds=0.0)
        runs["teacher"] = [(args.seeds[0], record)]
    else:
        teacher_cfg = make_config("lite_teacher.yaml", [], args, "teacher", args.seeds[0], args.teacher_steps)
        runs["teacher"] = [(args.seeds[0], train_and_eval(teacher_cfg, args))]
        write_results(runs, args, command, start)
    teacher_path = Path(runs["teacher"][0][1]["checkpoint"])
    plan = [(seed, name) for seed in args.seeds for name in SEEDED]
    plan += [(seed, name) for seed in args.level_seeds for name in LEVELS]
    for seed, name in plan:
        base, overrides, _, _ = ROWS[name]
        teacher = teacher_path if base == "lite_distill.yaml" else None
        extra = args.distill_set if name == "distilled" else []
        cfg = make_config(base, overrides + extra, args, f"{name}_s{seed}", seed, args.steps, teacher)
        runs.setdefault(name, []).append((seed, train_and_eval(cfg, args)))
        write_results(runs, args, command, start)
    result = write_results(runs, args, command, start)
    if args.publish:
        publish(runs, args)
    print(f"wrote {Path(args.out) / 'results'}/ablation.md and ablation.json in {result['setup']['minutes']:.1f} min")
    for name in ORDER:
        if name in result:
            s = result[name]
            print(f"  {name:<15} IoU {s['iou']:6.2f} +- {s['iou_std']:.2f}   mIoU {s['miou']:6.2f} +- {s['miou_std']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
