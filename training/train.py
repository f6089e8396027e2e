"""``discene-train``: train a teacher, a plain student or a distilled student from a YAML config.

Single process:  discene-train --config training/configs/lite_student.yaml
Multi-GPU:       torchrun --nproc_per_node 8 -m training.train --config training/configs/paper_distill.yaml
Resume exactly:  discene-train --resume runs/NAME/last.pt   (the run's own config, data root and step budget)
Start over:      discene-train --config CFG --overwrite       (replaces the checkpoints in an existing out_dir)
Warm start:      discene-train --config CFG --init runs/NAME/final.pt  (its weights; optimiser and step fresh)
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from models.checkpoint import check_output_folder, load_checkpoint

from .data import build_dataset
from .distributed import is_main_process, teardown_distributed
from .evaluate import check_scorable
from .interrupt import TrainingInterrupted
from .train_config import TrainConfig, apply_overrides, load_train_config
from .trainer import NonFiniteLossError, Trainer

RUN_FILES = ("last.pt", "best.pt", "final.pt", "train_config.yaml")  # what a run writes into its out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="discene-train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default=None,
                        help="train config YAML (path, or a name under training/configs); required unless --resume")
    parser.add_argument("--resume", default=None,
                        help="continue exactly from a last.pt: its saved train config (data root, step budget) is used, "
                             "command-line options still override it; it writes into the checkpoint's folder "
                             "unless --out is given")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an out_dir that holds another run's checkpoints (they are replaced once this run "
                             "writes its first checkpoint)")
    parser.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    parser.add_argument("--data", default=None, help="dataset root (overrides data.root)")
    parser.add_argument("--steps", type=int, default=None,
                        help="total optimiser steps (overrides epochs); with --resume the lr schedule follows the new "
                             "total from the checkpoint's step")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (distill mode)")
    parser.add_argument("--init", default=None,
                        help="warm start: the weights of this checkpoint (final.pt or last.pt of the same network), "
                             "with a fresh optimiser, lr schedule and step (sets init_checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set distill.prior=false --set optim.lr=1e-4")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop (with last.pt written) at this step without changing the lr schedule")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    for flag, key in (("out", "out_dir"), ("data", "data.root"), ("steps", "max_steps"), ("device", "device"),
                      ("seed", "seed"), ("teacher", "teacher_checkpoint"), ("init", "init_checkpoint")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return overrides


def previous_run(args: argparse.Namespace, cfg: TrainConfig) -> list[Path]:
    """Files of another run in ``cfg.out_dir`` that this run would replace (none when resuming in the
    checkpoint's own folder)."""
    out = Path(cfg.out_dir)
    if args.resume and out.resolve() == Path(args.resume).resolve().parent:
        return []
    return [out / name for name in RUN_FILES if (out / name).exists()]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the YAML (fresh run) or the checkpoint's saved train config (``--resume``, writing
    into the checkpoint's folder unless ``--out`` says otherwise), with the command-line overrides applied.
    ValueError for an out_dir holding another run's files (without ``--overwrite``) and for ``--steps``
    below the step a resumed checkpoint is at."""
    for flag in ("resume", "teacher", "init"):
        path = getattr(args, flag)
        if path and Path(path).is_dir():
            name = "last.pt" if flag == "resume" else "final.pt"
            raise ValueError(f"--{flag} {path} is a directory; give the checkpoint file in it ({Path(path) / name}?)")
    if args.stop_at_step is not None and args.stop_at_step < 1:
        raise ValueError(f"--stop-at-step must be a positive step, got {args.stop_at_step}")
    if args.resume:
        if args.init:
            raise ValueError(f"--init {args.init} with --resume {args.resume}: a resume continues from the weights "
                             "of its last.pt; give one of the two")
        out = [] if args.out else [f"out_dir={Path(args.resume).parent}"]
        cfg = resume_config(args.resume, out + _overrides(args), args.stop_at_step)
    elif not args.config:
        raise ValueError("--config is required (or --resume runs/NAME/last.pt to continue a run)")
    else:
        cfg = load_train_config(args.config, _overrides(args))
    check_output_folder(cfg.out_dir, "output folder")
    if args.teacher and cfg.mode != "distill":
        raise ValueError(f"--teacher is only used by mode 'distill', and this run's mode is '{cfg.mode}' (add "
                         "--set mode=distill to distil, or leave --teacher out)")
    existing = previous_run(args, cfg)
    if existing and not args.overwrite:
        hint = f"continue it with --resume {Path(cfg.out_dir) / 'last.pt'}, " if not args.resume else ""
        raise ValueError(f"output folder {cfg.out_dir} already holds {', '.join(p.name for p in existing)} of "
                         f"another run; {hint}replace them with --overwrite, or choose another --out")
    if cfg.init_checkpoint and any(Path(cfg.init_checkpoint).resolve() == path.resolve() for path in existing):
        raise ValueError(f"--init {cfg.init_checkpoint} is one of the files --overwrite replaces; copy it elsewhere "
                         "first or choose another --out")
    return cfg


def resume_config(checkpoint: str, overrides: list[str], stop_at_step: int | None = None) -> TrainConfig:
    """The train config saved in ``checkpoint`` (a last.pt) with ``overrides``; checks the step budget and
    that ``stop_at_step`` lies ahead."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    saved = state.get("train_config")
    if not isinstance(saved, dict) or "step" not in state:
        raise ValueError(f"checkpoint {checkpoint} cannot be resumed: it has no saved train config or step "
                         "(a model-only checkpoint such as final.pt?); resume from the run's last.pt")
    cfg = TrainConfig.from_dict(apply_overrides(saved, overrides))
    step = int(state["step"])
    if cfg.max_steps is not None and cfg.max_steps < step:
        raise ValueError(f"--steps {cfg.max_steps} is below the step {step} checkpoint {checkpoint} is at; give at "
                         f"least {step} (or leave --steps out to keep the run's budget)")
    if stop_at_step is not None and stop_at_step <= step:
        raise ValueError(f"--stop-at-step {stop_at_step} is not after the step {step} checkpoint {checkpoint} is at; "
                         "give a later step")
    return cfg


def run(cfg: TrainConfig, resume: str | None = None, stop_at_step: int | None = None,
        replaces: list[Path] | None = None) -> str:
    """Build datasets from the config, train, and return the path of the final model checkpoint; ``replaces``
    (an earlier run's files) are removed once this run has written its first checkpoint."""
    model_cfg = cfg.model_config()
    train_set = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, cfg.data.max_train_frames,
                              load_depth=cfg.needs_depth())
    try:
        val_set = build_dataset(cfg.data.root, cfg.data.val_split, model_cfg, cfg.data.max_val_frames)
        check_scorable(val_set)  # found now, not after the training it would otherwise end without final.pt
    except (ValueError, FileNotFoundError) as exc:
        print(f"discene-train: no evaluation ({exc})", file=sys.stderr)
        val_set = None
    trainer = Trainer(cfg, train_set, val_set, resume=resume, replaces=replaces)  # a resume never reloads init_checkpoint
    return str(trainer.fit(stop_at_step=stop_at_step))


INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # out of disk, quota or file-size limit


def write_failure_advice(exc: OSError) -> str:
    """What to do about a failed write: free space where the disk, a quota or a size limit was hit; else fix
    what the error names (a folder where a file goes, a read-only disk, a permission)."""
    return "free space" if exc.errno in SPACE_ERRNOS else "fix what the error names"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = 0
    try:
        cfg = config_from_args(args)
        final = run(cfg, args.resume, args.stop_at_step, previous_run(args, cfg))
        if is_main_process():
            print(f"discene-train: done; model checkpoint {final}")
    except NonFiniteLossError as exc:
        print(f"discene-train: stopped: {exc}", file=sys.stderr)
        code = 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"discene-train: error: {exc}", file=sys.stderr)
        code = 2
    except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: stopped after a step, last.pt saved there
        if is_main_process():
            print(f"discene-train: interrupted by {exc}; continue with --resume {exc.checkpoint}", file=sys.stderr)
        code = INTERRUPTED_EXIT
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("discene-train: interrupted at once; checkpoints written before it are intact (each is replaced "
              "atomically): continue with --resume <out_dir>/last.pt", file=sys.stderr)
        code = INTERRUPTED_EXIT
    except OSError as exc:  # a full disk or quota while writing a checkpoint or log, or another write failure
        print(f"discene-train: stopped: {exc}. Checkpoints written before it are intact (each is replaced "
              f"atomically): {write_failure_advice(exc)}, then continue with --resume <out_dir>/last.pt",
              file=sys.stderr)
        code = 4
    finally:
        teardown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
