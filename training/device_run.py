"""One call of a training run on a lent accelerator machine: data, train within a wall-time budget, hand back.

    python -m training.device_run --config lite_student --name lite_student --steps 4000 \\
        --batch 32 --amp bf16 --workers "$(nproc)" --device cuda --budget-s 510 \\
        --out "$OUT" [--resume runs/device/lite_student] [--teacher runs/device/teacher/final.pt] \\
        [--init runs/device/teacher]

Each call (a) generates the synthetic dataset from a fixed seed on all cores unless ``--data``
already holds the same one, (b) builds the run from a train config, resuming exactly (weights,
optimiser, lr schedule, scaler, data position, RNG) from the files a previous call handed back,
(c) trains until ``--steps`` or until the wall-time budget of the call is spent, and (d) writes to
``--out/NAME``: the resumable checkpoint split into parts of at most ``--part-mib`` (the device tool
returns files up to 16 MiB), the model-only final.pt (split the same way), the train config, and
``runs.jsonl`` with one record per call (config, steps, device, wall time, throughput, metrics).
The next call gets that folder back as ``--resume`` (carried as a git-ignored path). ``--init`` instead
starts a new run from a finished one's weights (its final.pt; fresh optimiser, lr schedule and step), and
its checkpoints and records count the steps behind those weights as ``steps_before``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_checkpoint

from .data import build_dataset
from .distributed import usable_cpus
from .evaluate import evaluate_model
from .interrupt import TrainingInterrupted
from .synth import generate
from .train_config import TrainConfig, load_train_config
from .trainer import Trainer

PART_SUFFIX = ".part"
MANIFEST_SUFFIX = ".parts.json"


# ---------------------------------------------------------------------------------- split files
def split_file(path: Path, dest: Path, part_bytes: int) -> list[Path]:
    """Copy ``path`` into ``dest`` as NAME.part000, NAME.part001, ... of at most ``part_bytes`` each, plus a
    NAME.parts.json manifest (size and sha256 of the whole file). Returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    digest, written, size = hashlib.sha256(), [], 0
    with path.open("rb") as src:
        while chunk := src.read(part_bytes):
            part = dest / f"{path.name}{PART_SUFFIX}{len(written):03d}"
            part.write_bytes(chunk)
            digest.update(chunk)
            size += len(chunk)
            written.append(part)
    manifest = dest / f"{path.name}{MANIFEST_SUFFIX}"
    manifest.write_text(json.dumps({"name": path.name, "size": size, "sha256": digest.hexdigest(),
                                    "parts": [p.name for p in written]}, indent=1) + "\n")
    return [*written, manifest]


def join_file(manifest: Path, dest: Path) -> Path:
    """Reassemble a split file next to ``dest`` (atomically) and check its size and sha256."""
    info = json.loads(manifest.read_text())
    digest, tmp = hashlib.sha256(), dest.with_name(f".{dest.name}.joining")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as out:
        for name in info["parts"]:
            part = manifest.parent / name
            if not part.is_file():
                raise FileNotFoundError(f"{manifest}: part {name} is missing")
            chunk = part.read_bytes()
            digest.update(chunk)
            out.write(chunk)
    if tmp.stat().st_size != info["size"] or digest.hexdigest() != info["sha256"]:
        tmp.unlink()
        raise ValueError(f"{manifest}: the joined file does not match its size/sha256 (a part is damaged)")
    os.replace(tmp, dest)
    return dest


def find_checkpoint(folder: Path, name: str, scratch: Path) -> Path | None:
    """``folder/name`` whole, or joined from its parts into ``scratch``; None when neither is there."""
    if (folder / name).is_file():
        return folder / name
    manifest = folder / f"{name}{MANIFEST_SUFFIX}"
    return join_file(manifest, scratch / name) if manifest.is_file() else None


# ---------------------------------------------------------------------------------- data
def ensure_synth(root: Path, scenes: int, frames_per_scene: int, seed: int, width: int, height: int,
                 val_fraction: float, workers: int) -> dict[str, Any]:
    """The synthetic dataset's metadata; generated (all ``workers`` cores) unless ``root`` already holds it."""
    meta_path = root / "synth_meta.json"
    wanted = {"seed": seed, "scenes": scenes, "frames_per_scene": frames_per_scene, "width": width, "height": height}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in wanted.items()):
            return meta
        raise ValueError(f"{root} holds another synthetic set ({meta}); give a new --data folder for {wanted}")
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(f"--data {root} is not empty but holds no finished synthetic set (no synth_meta.json: a "
                         "generation that was stopped, or another dataset); remove it or give a new --data folder")
    generate(root, scenes, frames_per_scene, seed, width, height, val_fraction, workers=max(1, workers),
             progress=False)
    return json.loads(meta_path.read_text())


# ---------------------------------------------------------------------------------- run
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} ({usable_cpus()} usable cores, {torch.get_num_threads()} threads)"


def build_config(args: argparse.Namespace, work: Path) -> TrainConfig:
    sets = list(args.overrides) + [f"name={args.name}", f"out_dir={work}", f"data.root={args.data}",
                                   f"device={args.device}", "progress=false"]
    for flag, key in (("steps", "max_steps"), ("batch", "batch_size"), ("amp", "amp"), ("workers", "data.workers"),
                      ("seed", "seed"), ("teacher", "teacher_checkpoint"), ("init", "init_checkpoint")):
        if getattr(args, flag) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    return load_train_config(args.config, sets)


def checkpoint_file(path: Path, scratch: Path, flag: str) -> Path:
    """A checkpoint given as a file, or as a run's handed-back folder holding final.pt (whole or in parts)."""
    if path.is_file():
        return path
    found = find_checkpoint(path, "final.pt", scratch) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{flag} {path} is neither a checkpoint file nor a folder holding final.pt "
                                "(whole or in parts)")
    return found


def has_last(folder: Path | None) -> bool:
    """Whether a handed-back folder holds a resumable last.pt (whole or in parts)."""
    return folder is not None and any((folder / n).is_file() for n in ("last.pt", f"last.pt{MANIFEST_SUFFIX}"))


def saved_step(path: Path, default: int) -> int:
    """The step of a resumable checkpoint (``default`` when none was written)."""
    return int(load_checkpoint(path)["step"]) if path.is_file() else default


def previous_records(resume: Path | None) -> list[dict[str, Any]]:
    log = resume / "runs.jsonl" if resume is not None else None
    if log is None or not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One call: returns the record appended to runs.jsonl."""
    t0 = time.perf_counter()
    out = Path(args.out) / args.name
    work = Path(args.work) / args.name
    resume = Path(args.resume) if args.resume else None
    if args.init and has_last(resume):
        raise ValueError(f"--init {args.init} with --resume {resume}, which holds a last.pt: the resume continues "
                         "from its weights; drop --init")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    meta = ensure_synth(Path(args.data), args.scenes, args.frames_per_scene, args.synth_seed, args.width,
                        args.height, args.val_fraction, args.synth_workers)
    data_s = time.perf_counter() - t0
    if args.teacher:  # a checkpoint, or a teacher run's folder: final.pt, whole or in parts
        args.teacher = str(checkpoint_file(Path(args.teacher), work / "teacher", "--teacher"))
    init_given = args.init
    if args.init:
        args.init = str(checkpoint_file(Path(args.init), work / "init", "--init"))
    cfg = build_config(args, work)
    model_cfg = cfg.model_config()
    train = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, cfg.data.max_train_frames,
                          load_depth=cfg.needs_depth())
    val = build_dataset(cfg.data.root, cfg.data.val_split, model_cfg, cfg.data.max_val_frames)
    history = previous_records(resume)
    last = None
    if resume is not None:
        last = find_checkpoint(resume, "last.pt", work / "resume")
        if last is None:
            raise FileNotFoundError(f"--resume {resume} holds no last.pt (whole or in parts)")
    trainer = Trainer(cfg, train, None, resume=last)
    start_step = trainer.step
    budget = None
    if args.budget_s is not None:
        budget = max(0.0, args.budget_s - args.reserve_s - (time.perf_counter() - t0))
    t_train = time.perf_counter()
    interrupted = False
    try:
        trainer.fit(stop_at_step=args.stop_at_step, time_budget_s=budget)
    except TrainingInterrupted:  # the wrapper's timeout (SIGINT): the step ended and last.pt holds it
        interrupted = True
    except KeyboardInterrupt:  # a second SIGINT within a step: hand back the last checkpoint written
        interrupted = True
    train_s = time.perf_counter() - t_train
    end_step = saved_step(work / "last.pt", start_step) if interrupted else trainer.step
    finished = end_step >= trainer.total_steps
    metrics = None
    if not interrupted and (finished or args.eval_each_call):
        result = evaluate_model(trainer.student, val, model_cfg, trainer.device, batch_size=cfg.batch_size,
                                workers=cfg.data.workers)  # fp32, as the trainer's validation
        metrics = {"iou": round(100 * float(result["iou"]), 2), "miou": round(100 * float(result["miou"]), 2),
                   "val_frames": int(result["frames"]), "val_skipped": int(result["skipped_frames"]),
                   "score_threshold": model_cfg.score_threshold}
    steps = end_step - start_step
    init_checkpoint = init_given or (history[-1].get("init_checkpoint") if history else None)  # the run's, kept
    record = {
        "call": len(history) + 1, "name": cfg.name, "config": cfg.to_dict(), "device": device_name(trainer.device),
        "torch": torch.__version__, "init_checkpoint": init_checkpoint, "steps_before": trainer.steps_before,
        "start_step": start_step, "end_step": end_step,
        "total_steps": trainer.total_steps, "finished": finished, "batch_size": cfg.batch_size, "amp": cfg.amp,
        "data": {"root": str(args.data), **{k: meta[k] for k in ("generator", "seed", "scenes", "frames_per_scene",
                                                                  "width", "height", "train", "val")}},
        "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "samples_per_s": round(steps * cfg.batch_size / train_s, 2) if steps else None,
        "metrics": metrics, "interrupted": interrupted,
    }
    written, notes = hand_back(work, out, finished, args.part_mib, args.max_files, args.max_total_mib)
    record.update(handed_back=written, left_out=notes, wall_seconds=round(time.perf_counter() - t0, 1))
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history + [record]))
    for note in notes:
        print(f"device_run: warning: {note}", file=sys.stderr)
    return record


def hand_back(work: Path, out: Path, finished: bool, part_mib: float, max_files: int,
              max_total_mib: float) -> tuple[list[str], list[str]]:
    """Split the checkpoints of ``work`` into ``out`` within the device tool's return limits.

    A finished run hands back final.pt first, an unfinished one last.pt (what the next call needs);
    one file is kept for runs.jsonl. Returns (files written, notes on checkpoints left out).
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    part_bytes = int(part_mib * 2**20)
    files_left, bytes_left = max_files - 1, int(max_total_mib * 2**20)
    written: list[str] = []
    notes: list[str] = []
    for name in ("final.pt", "last.pt") if finished else ("last.pt", "final.pt"):
        if not (work / name).is_file():
            notes.append(f"{name}: not written in this call")
            continue
        size = (work / name).stat().st_size
        needed = -(-size // part_bytes) + 1  # parts + manifest
        if needed > files_left or size > bytes_left:
            notes.append(f"{name} ({size / 2**20:.1f} MiB, {needed} files) left out: over the return limits "
                         f"({max_files} files, {max_total_mib:g} MiB)")
            continue
        written += [f.name for f in split_file(work / name, out, part_bytes)]
        files_left, bytes_left = files_left - needed, bytes_left - size
    return written, notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.device_run", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="train config (path or name under training/configs)")
    parser.add_argument("--name", required=True, help="run name: the folder under --out and --work")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/device/out"), help="what comes back ($OUT)")
    parser.add_argument("--work", default="runs/device/work", help="scratch folder of this call")
    parser.add_argument("--resume", default=None, help="folder a previous call handed back (last.pt parts, runs.jsonl)")
    parser.add_argument("--init", default=None,
                        help="warm start from a checkpoint or a run's handed-back folder (its final.pt): its weights, "
                             "a fresh optimiser, lr schedule and step; not with a --resume holding a last.pt")
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint, or a teacher run's handed-back folder (distill configs)")
    parser.add_argument("--steps", type=int, default=None, help="total optimiser steps of the whole run")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=None, help="training loader workers")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-time budget of this call, data included")
    parser.add_argument("--reserve-s", type=float, default=45.0, help="part of the budget kept for eval and saving")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop this call at this step")
    parser.add_argument("--eval-each-call", action="store_true", help="evaluate on val even when not finished")
    parser.add_argument("--part-mib", type=float, default=15.0, help="largest file handed back, MiB (tool: 16)")
    parser.add_argument("--max-files", type=int, default=8, help="most files handed back (tool: 8)")
    parser.add_argument("--max-total-mib", type=float, default=60.0, help="most MiB handed back (tool: 64)")
    parser.add_argument("--data", default="runs/device/synth", help="synthetic dataset root (generated if missing)")
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--frames-per-scene", type=int, default=8)
    parser.add_argument("--synth-seed", type=int, default=1234)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--val-fraction", type=float, default=0.125)
    parser.add_argument("--synth-workers", type=int, default=usable_cpus(), help="default: the usable CPUs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"device_run: error: {exc}", file=sys.stderr)
        return 2
    shown = {k: record[k] for k in ("call", "start_step", "end_step", "total_steps", "finished", "samples_per_s",
                                    "train_seconds", "wall_seconds", "metrics", "device")}
    print(json.dumps(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
