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
- ``distilled``: TGI + EFA + query + prior + anchor (DiScene);
- with --depth-rows, for the first seed: ``student_depth`` (the student with its depth branch fed by the
  dataset's depth, the robot's depth sensor in place of the paper's depth network: OPUS-dagger) and
  ``distilled_depth`` (DiScene with that student under the RGB teacher; TGI leaves the student's
  depth branch at its initialisation: the miniature DiScene-dagger, whose paper teacher has depth too).

``student``, ``student_tgi`` and ``distilled`` run once per --seeds entry with the same step budget.
Everything is written under --out (default runs/ablation; ablation.md/.json in --out/results).
Only --publish replaces the shipped artefacts: docs/results/ablation.{md,json} and the best
distilled checkpoint as discene_ros/data/lite_distilled.pt, and only when every row ran.

``--jobs N`` trains N rows at once, each in its own process (the same weights as in one process; logs
under --out/logs). ``--fit-s S`` sizes the steps per row to end within S seconds: a calibration wave
(``--calibrate-steps``, the slowest rows first) measures the step time with the same process layout,
and each row also stops at its share of the time left (its record then says ``finished: false``).

Measured on the 2-core build machine (batch 1, one torch thread): lite teacher 0.31-0.37 s/step,
lite student 0.19-0.28 s/step, distillation step 0.38 s/step: --steps 800 took 48 min for the
four original rows. On the GPU, see docs/results/README.md and scripts/device_ablation_call.sh.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoint import atomic_write, load_checkpoint, model_from_payload, trained_steps  # noqa: E402
from training.data import build_dataset  # noqa: E402
from training.device_run import checkpoint_file  # noqa: E402
from training.evaluate import evaluate_model  # noqa: E402
from training.interrupt import TrainingInterrupted  # noqa: E402
from training.scene_format import SPLIT_FILES, parse_split_line  # noqa: E402
from training.synth import generate  # noqa: E402
from training.train_config import TrainConfig, load_train_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CONFIGS = ROOT / "training" / "configs"
SHIPPED_CHECKPOINT = ROOT / "discene_ros" / "data" / "lite_distilled.pt"
SHIPPED_DEPTH_CHECKPOINT = ROOT / "discene_ros" / "data" / "lite_distilled_depth.pt"  # --depth-rows
SHIPPED_RESULTS = ROOT / "docs" / "results"
DEPTH = "model_overrides.use_depth=true"  # the depth branch fed by the dataset's (the robot's) depth
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
    "student_depth": ("lite_student.yaml", [DEPTH], "Student + depth sensor, no distillation (OPUS-dagger)", ""),
    "distilled_depth": ("lite_distill.yaml", ["tgi=true", DEPTH],
                        "DiScene + depth sensor in the student (DiScene-dagger; RGB teacher)", "QPATE"),
}
SEEDED = ("student", "student_tgi", "distilled")     # run for every --seeds entry
LEVELS = ("student_query", "student_prior", "student_anchor")  # run for every --level-seeds entry
DEPTH_ROWS = ("student_depth", "distilled_depth")  # --depth-rows: for the first seed
WARM_STEPS = 5            # steps left out of a run's median step time (start-up, first allocations)
RESULTS_RESERVE_S = 20.0  # of --fit-s, kept for writing the results and publishing
CHILD_STOP_S = 30.0       # after Ctrl-C, how long the children get to save their last.pt before they are killed
ORDER = ("teacher", "student", "student_query", "student_prior", "student_anchor", "student_tgi", "distilled",
         *DEPTH_ROWS)


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
                teacher: Path | None = None, out: Path | None = None) -> TrainConfig:
    """A train config of this ablation: ``base`` with the row's overrides, --set, and the shared setup; its run
    folder under ``out`` (default --out)."""
    sets = list(overrides) + list(args.overrides) + [f"name={name}", f"seed={seed}", f"max_steps={steps}", f"device={args.device}",
                              f"out_dir={Path(out or args.out) / name}", f"data.root={args.data}",
                              f"data.max_train_frames={args.train_frames}", f"data.max_val_frames={args.val_frames}",
                              f"data.workers={args.workers}", f"batch_size={args.batch}", f"amp={args.amp}",
                              "eval_every=0", f"progress={not args.quiet}",
                              f"model_overrides.score_threshold={args.score_threshold}"]
    if teacher is not None:
        sets.append(f"teacher_checkpoint={teacher}")
    cfg = load_train_config(CONFIGS / base, sets)
    cfg.model_overrides.setdefault("name", cfg.model)  # still "lite" when only the threshold changes
    return cfg.validate()


def row_config(name: str, seed: int, args: argparse.Namespace, teacher: Path, steps: int, out: Path) -> TrainConfig:
    """The train config of one Table III row (not the teacher) for one seed, its run folder under ``out``."""
    base, overrides, _, _ = ROWS[name]
    extra = args.distill_set if name in ("distilled", "distilled_depth") else []
    return make_config(base, overrides + extra, args, f"{name}_s{seed}", seed, steps,
                       teacher if base == "lite_distill.yaml" else None, out)


def evaluate(model: torch.nn.Module, model_cfg, args: argparse.Namespace, device: torch.device | str) -> dict:
    val = build_dataset(args.data, "val", model_cfg, args.val_frames)
    result = evaluate_model(model, val, model_cfg, device, batch_size=args.batch, workers=args.workers, amp=args.amp)
    return {"iou": float(result["iou"]), "miou": float(result["miou"]), "val_frames": int(result["frames"])}


def given_teacher_record(teacher: Path, args: argparse.Namespace) -> dict:
    """The teacher row of a teacher trained elsewhere (--teacher): evaluated on the val split, with its own steps
    and those of the checkpoints it was warm-started from, and no training time of this run. Reads the file once."""
    payload = load_checkpoint(teacher)
    model, model_cfg = model_from_payload(payload, teacher)
    model_cfg.score_threshold = args.score_threshold
    record = evaluate(model.to(args.device), model_cfg, args, args.device)
    record.update(checkpoint=str(teacher), steps=trained_steps(payload), seconds_per_step=0.0, train_seconds=0.0)
    return record


def train_and_eval(cfg: TrainConfig, args: argparse.Namespace, budget_s: float | None = None) -> dict:
    """Train one configuration from scratch (stopping after ``budget_s`` seconds of training, if given) and
    evaluate its final model on the val split."""
    model_cfg = cfg.model_config()
    train = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, cfg.data.max_train_frames,
                          load_depth=cfg.needs_depth())
    start = time.perf_counter()
    trainer = Trainer(cfg, train, None)
    final = trainer.fit(time_budget_s=budget_s)
    train_s = time.perf_counter() - start
    record = evaluate(trainer.student, model_cfg, args, trainer.device)
    warm = trainer.step_seconds[min(WARM_STEPS, len(trainer.step_seconds) // 2):]
    record.update(checkpoint=str(final), train_seconds=round(train_s, 1), steps=trainer.step,
                  planned_steps=trainer.total_steps, finished=trainer.step >= trainer.total_steps,
                  seconds_per_step=round(train_s / max(1, trainer.step), 4),
                  step_seconds_median=round(statistics.median(warm), 4) if warm else None)
    torch.use_deterministic_algorithms(False)
    stopped = "" if record["finished"] else f", stopped by the time budget at step {trainer.step} of {trainer.total_steps}"
    print(f"[{cfg.name}] IoU {100 * record['iou']:.2f} mIoU {100 * record['miou']:.2f} "
          f"({record['train_seconds']} s, {record['seconds_per_step']} s/step{stopped})", flush=True)
    return record


# ---------------------------------------------------------------------------------- running the rows
class CalibrationError(Exception):
    """The calibration wave failed, or --fit-s leaves no time for a training step."""


class Job(NamedTuple):
    """One row for one seed, training in a child process that writes ``record`` and logs to ``log``."""

    name: str
    seed: int
    record: Path
    log: Path
    started: float
    process: subprocess.Popen


def child_command(argv: list[str], name: str, seed: int, record: Path, teacher: Path, steps: int, out: Path,
                  budget_s: float | None) -> list[str]:
    """This script's command line for one row in a child process: the parent's options, then the row's
    (argparse keeps the last value of an option given twice)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--row", name, str(seed), "--record", str(record),
           "--teacher", str(teacher), "--steps", str(steps), "--out", str(out), "--jobs", "1", "--quiet"]
    return cmd + (["--row-budget-s", f"{budget_s:.1f}"] if budget_s is not None else [])


def write_record(path: Path, record: dict) -> None:
    """Write a row's record atomically (the parent reads it once the child has exited)."""
    atomic_write(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def run_rows(plan: list[tuple[int, str]], args: argparse.Namespace, argv: list[str], teacher: Path, steps: int,
             out: Path, on_record: Callable[[str, int, dict], None], failures: list[dict], deadline: float | None = None,
             overhead_s: float = 0.0, tag: str = "") -> None:
    """Train and evaluate every (seed, row) of ``plan`` with ``steps`` steps, ``--jobs`` at a time (one child
    process each, logging to ``out``/logs; in this process when --jobs is 1). With ``deadline`` (a
    perf_counter time), each row's training stops early enough for the rows after it (``overhead_s``: a
    row's start-up and evaluation, outside its training). ``on_record`` gets
    each record as its row ends, ``failures`` each failed or interrupted row (row, seed, exit code, log)."""
    pending, running = list(plan), []
    jobs = max(1, args.jobs)

    def budget() -> float | None:  # this row's share of the time left, its waves counted
        if deadline is None:
            return None
        waves = math.ceil((len(pending) + len(running) + 1) / jobs)
        return max(1.0, (deadline - time.perf_counter()) / waves - overhead_s)

    try:
        while pending or running:
            while pending and len(running) < jobs:
                seed, name = pending.pop(0)
                record = out / "records" / f"{name}_s{seed}.json"
                log = out / "logs" / f"{name}_s{seed}.log"
                if jobs == 1:
                    cfg = row_config(name, seed, args, teacher, steps, out)
                    on_record(name, seed, train_and_eval(cfg, args, budget()))
                    continue
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("w") as sink:
                    process = subprocess.Popen(child_command(argv, name, seed, record, teacher, steps, out, budget()),
                                               stdout=sink, stderr=subprocess.STDOUT)
                running.append(Job(name, seed, record, log, time.perf_counter(), process))
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                if job.process.returncode == 0 and job.record.is_file():
                    rec = json.loads(job.record.read_text())
                    rec["wall_seconds"] = round(time.perf_counter() - job.started, 1)
                    print(f"[{tag}{job.name}_s{job.seed}] IoU {100 * rec['iou']:.2f} mIoU {100 * rec['miou']:.2f} "
                          f"({rec['steps']} steps, {rec['wall_seconds']} s)", flush=True)
                    on_record(job.name, job.seed, rec)
                else:
                    failures.append({"row": job.name, "seed": job.seed, "exit_code": job.process.returncode,
                                     "log": str(job.log)})
                    print(f"[{tag}{job.name}_s{job.seed}] failed (exit {job.process.returncode}); the end of "
                          f"{job.log}:\n{log_tail(job.log)}", file=sys.stderr, flush=True)
            if running:
                time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C or the device wrapper's SIGINT: the children got it too and save
        give_up = time.perf_counter() + CHILD_STOP_S
        for job in running:
            try:
                job.process.wait(timeout=max(0.1, give_up - time.perf_counter()))
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
            failures.append({"row": job.name, "seed": job.seed, "exit_code": job.process.returncode,
                             "log": str(job.log), "reason": "interrupted"})
        raise


def calibrate(plan: list[tuple[int, str]], args: argparse.Namespace, argv: list[str], teacher: Path,
              start: float) -> dict:
    """Steps per row that fit ``--fit-s``: the first wave of rows (``--jobs`` at once, the same process
    layout as the real runs) trains ``--calibrate-steps`` steps; the slowest row's median step time
    and the wave's start-up/evaluation overhead size the real runs, with 10 % spare."""
    wave = plan[:max(1, args.jobs)]
    out = Path(args.out) / "calibration"
    records: dict[str, dict] = {}
    t0 = time.perf_counter()
    failures: list[dict] = []
    run_rows(wave, args, argv, teacher, args.calibrate_steps, out,
             lambda name, seed, rec: records.__setitem__(f"{name}_s{seed}", rec), failures, tag="calibration ")
    if failures:
        raise CalibrationError(f"calibration failed for {[f['row'] for f in failures]}; see {out / 'logs'}")
    wall = time.perf_counter() - t0
    per_row = [r["step_seconds_median"] or r["seconds_per_step"] for r in records.values()]
    step_s = max(per_row)  # the slowest row
    overhead = max(0.0, wall - args.calibrate_steps * step_s)
    waves = math.ceil(len(plan) / max(1, args.jobs))
    left = args.fit_s - (time.perf_counter() - start) - RESULTS_RESERVE_S
    steps = int(0.9 * (left - waves * overhead) / (waves * step_s))
    return {"steps": args.calibrate_steps, "wall_seconds": round(wall, 1), "step_seconds": round(step_s, 4),
            "aggregate_samples_per_s": round(sum(args.batch / t for t in per_row), 1),  # all rows of the wave
            "overhead_seconds": round(overhead, 1), "waves": waves, "seconds_left": round(left, 1),
            "chosen_steps": max(0, min(args.steps, steps)),
            "rows": {key: {"step_seconds_median": r["step_seconds_median"], "seconds_per_step": r["seconds_per_step"]}
                     for key, r in records.items()}}


def summarise(runs: dict[str, list[tuple[int, dict]]]) -> dict:
    """Per row: mean and standard deviation over seeds (percent), the seeds and the per-seed records."""
    out = {}
    for name in ORDER:
        if name not in runs:
            continue
        records = sorted(runs[name], key=lambda item: item[0])  # child processes end in any order
        ious = [100 * r["iou"] for _, r in records]
        mious = [100 * r["miou"] for _, r in records]
        out[name] = {
            "iou": round(statistics.mean(ious), 2), "miou": round(statistics.mean(mious), 2),
            "iou_std": round(statistics.stdev(ious), 2) if len(ious) > 1 else 0.0,
            "miou_std": round(statistics.stdev(mious), 2) if len(mious) > 1 else 0.0,
            "seeds": [seed for seed, _ in records],
            "per_seed": [{"seed": seed, "iou": round(100 * r["iou"], 2), "miou": round(100 * r["miou"], 2),
                          "steps": r["steps"], "finished": r.get("finished", True),
                          "seconds_per_step": r["seconds_per_step"]} for seed, r in records],
        }
    return out


def write_markdown(path: Path, result: dict) -> None:
    setup, val = result["setup"], result["val_split"]
    given = setup.get("teacher_checkpoint")
    teacher_source = f" (given: {given}, trained before this run)" if given else ""
    lines = [
        "# Miniature ablation (paper Table III) on synthetic scenes",
        "",
        f"Command: `{setup['command']}`",
        "",
        f"Device {setup['device']}; batch {setup['batch']}, amp {setup['amp']}; student budget {setup['steps']} "
        f"steps per configuration, teacher {setup['teacher_steps']} steps{teacher_source}; score threshold "
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
            short = "" if r["finished"] else " (stopped short by the time budget)"
            lines.append(f"- {name} seed {r['seed']}: IoU {r['iou']:.2f}, mIoU {r['miou']:.2f}, {r['steps']} steps{short}, "
                         f"{r['seconds_per_step']} s/step")
    for f in result.get("failed", []):
        why = f.get("reason") or f"exit code {f['exit_code']}"
        lines.append(f"- {f['row']} seed {f['seed']}: failed ({why}), log {f['log']}")
    path.write_text("\n".join(lines) + "\n")


def write_results(runs: dict, args: argparse.Namespace, command: str, start: float, extra: dict | None = None) -> dict:
    """Write ablation.json and ablation.md for the rows finished so far into --out/results (``extra``: the
    calibration and the failures, when there are any)."""
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "score_threshold": args.score_threshold,
        "val_split": split_description(Path(args.data), "val", args.val_frames),
        "train_split": split_description(Path(args.data), "train", args.train_frames),
        "setup": {"command": command, "device": device, "batch": args.batch, "amp": args.amp, "steps": args.steps,
                  "teacher_steps": args.teacher_steps, "teacher_checkpoint": args.teacher, "seeds": args.seeds, "level_seeds": args.level_seeds,
                  "jobs": args.jobs, "fit_s": args.fit_s, "minutes": round((time.perf_counter() - start) / 60, 1)},
        **summarise(runs),
    }
    for key, value in (extra or {}).items():
        if key == "calibration":
            result["setup"][key] = value
        elif value:
            result[key] = value
    results = Path(args.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(results / "ablation.md", result)
    return result


def publish(runs: dict, args: argparse.Namespace) -> None:
    """Replace docs/results/ablation.{md,json} and the shipped lite_distilled.pt (and, after --depth-rows,
    lite_distilled_depth.pt) with the best seed's by val mIoU (--publish only)."""
    results = Path(args.out) / "results"
    SHIPPED_RESULTS.mkdir(parents=True, exist_ok=True)
    for name in ("ablation.md", "ablation.json"):
        shutil.copyfile(results / name, SHIPPED_RESULTS / name)
    for row, shipped in (("distilled", SHIPPED_CHECKPOINT), ("distilled_depth", SHIPPED_DEPTH_CHECKPOINT)):
        if row not in runs:
            continue
        best = max((r for _, r in runs[row]), key=lambda r: r["miou"])
        shutil.copyfile(best["checkpoint"], shipped)
        print(f"published {best['checkpoint']} (mIoU {100 * best['miou']:.2f}) as {shipped}")
    print(f"published {SHIPPED_RESULTS}/ablation.md and ablation.json")


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
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows trained at once, each in its own process (logs under --out/logs): on one GPU the "
                             "processes fill each other's host-bound gaps; give each fewer --workers and --threads")
    parser.add_argument("--fit-s", type=float, default=None,
                        help="wall-time budget of the rows (teacher excluded): a calibration wave of "
                             "--calibrate-steps steps picks the steps per row (at most --steps) so that every row "
                             "ends in time; each row also stops at its share of the time left")
    parser.add_argument("--calibrate-steps", type=int, default=30, help="steps of each calibration run (--fit-s)")
    parser.add_argument("--depth-rows", action="store_true",
                        help="also student_depth and distilled_depth (the depth branch fed by the dataset's depth; "
                             "first seed): the miniature OPUS-dagger and DiScene-dagger")
    parser.add_argument("--row", nargs=2, metavar=("NAME", "SEED"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)  # the child's record file
    parser.add_argument("--row-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    return parser


def run_child(args: argparse.Namespace) -> int:
    """One row for one seed (--row), its record written to --record: the parent's child process."""
    name, seed = args.row[0], int(args.row[1])
    if name not in ROWS or not args.record or not args.teacher:
        raise SystemExit(f"--row needs one of {sorted(ROWS)}, --record and --teacher")
    cfg = row_config(name, seed, args, Path(args.teacher), args.steps, Path(args.out))
    write_record(Path(args.record), train_and_eval(cfg, args, args.row_budget_s))
    return 0


def resolve_teacher(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    """--teacher as one checkpoint file (a device run's handed-back folder has final.pt in parts), or None."""
    if not args.teacher:
        return None
    try:
        return checkpoint_file(Path(args.teacher), Path(args.out) / "teacher_joined", "--teacher")
    except FileNotFoundError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.teacher_steps = args.teacher_steps or 4 * args.steps
    args.level_seeds = args.seeds[:1] if args.level_seeds is None else args.level_seeds
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.row:
        return run_child(args)
    if not args.seeds:
        parser.error("give at least one seed")
    command = "python benchmarks/reproduce_ablation.py " + shlex.join(argv)
    start = time.perf_counter()
    ensure_dataset(args)

    runs: dict[str, list[tuple[int, dict]]] = {}
    teacher = resolve_teacher(args, parser)
    if teacher is not None:
        record = given_teacher_record(teacher, args)
        args.teacher_steps = record["steps"]
        runs["teacher"] = [(args.seeds[0], record)]
    else:
        teacher_cfg = make_config("lite_teacher.yaml", [], args, "teacher", args.seeds[0], args.teacher_steps)
        runs["teacher"] = [(args.seeds[0], train_and_eval(teacher_cfg, args))]
        write_results(runs, args, command, start)
        teacher = Path(runs["teacher"][0][1]["checkpoint"])
    # the distilling rows first: the slowest, so a calibration wave smaller than the plan sees them
    plan = [(seed, name) for seed in args.seeds for name in reversed(SEEDED)]
    plan += [(seed, name) for seed in args.level_seeds for name in LEVELS]
    if args.depth_rows:
        plan = [(args.seeds[0], "distilled_depth"), *plan, (args.seeds[0], "student_depth")]
    extra: dict = {"failed": []}

    def keep(name: str, seed: int, record: dict) -> None:
        runs.setdefault(name, []).append((seed, record))
        write_results(runs, args, command, start, extra)

    try:
        deadline, overhead = None, 0.0
        if args.fit_s is not None:
            calibration = extra["calibration"] = calibrate(plan, args, argv, teacher, start)
            print(f"calibration: {calibration['step_seconds']} s/step for the slowest row, "
                  f"{calibration['overhead_seconds']} s of start-up and evaluation, {calibration['waves']} wave(s) "
                  f"-> {calibration['chosen_steps']} steps per row", flush=True)
            if calibration["chosen_steps"] < 1:
                raise CalibrationError(f"--fit-s {args.fit_s} leaves no time for a training step; rows not run")
            args.steps = calibration["chosen_steps"]
            deadline, overhead = start + args.fit_s - RESULTS_RESERVE_S, calibration["overhead_seconds"]
        run_rows(plan, args, argv, teacher, args.steps, Path(args.out), keep, extra["failed"], deadline, overhead)
    except (KeyboardInterrupt, TrainingInterrupted):  # in this process or in the children: keep what finished
        write_results(runs, args, command, start, extra)
        print(f"interrupted: {Path(args.out) / 'results'} holds the rows that finished", file=sys.stderr)
        return 130
    except CalibrationError as exc:
        write_results(runs, args, command, start, extra)
        print(str(exc), file=sys.stderr)
        return 1
    result = write_results(runs, args, command, start, extra)
    if extra["failed"]:
        print(f"{len(extra['failed'])} row run(s) failed (listed in ablation.json); nothing published", file=sys.stderr)
        return 1
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
