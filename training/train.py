"""``discene-train``: train a teacher, a plain student or a distilled student from a YAML config.

Single process:  discene-train --config training/configs/lite_student.yaml
Multi-GPU:       torchrun --nproc_per_node 8 -m training.train --config training/configs/paper_distill.yaml
Resume exactly:  discene-train --config CFG --resume runs/NAME/last.pt
"""
from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from .train_config import TrainConfig, load_train_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="discene-train", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="train config YAML (path, or a name under training/configs)")
    parser.add_argument("--resume", default=None, help="continue exactly from a last.pt of the same config")
    parser.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    parser.add_argument("--data", default=None, help="dataset root (overrides data.root)")
    parser.add_argument("--steps", type=int, default=None, help="total optimiser steps (overrides epochs)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (distill mode)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set distill.prior=false --set optim.lr=1e-4")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop (with last.pt written) at this step without changing the lr schedule")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    for flag, key in (("out", "out_dir"), ("data", "data.root"), ("steps", "max_steps"), ("device", "device"),
                      ("seed", "seed"), ("teacher", "teacher_checkpoint")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_train_config(args.config, overrides)


def run(cfg: TrainConfig, resume: str | None = None, stop_at_step: int | None = None) -> str:
    """Build datasets from the config, train, and return the path of the final model checkpoint."""
    from .evaluate import build_dataset
    from .trainer import Trainer

    model_cfg = cfg.model_config()
    depth = model_cfg.use_depth
    if cfg.mode == "distill" and cfg.teacher_checkpoint:  # a depth-using teacher needs depth in the batches
        from models.checkpoint import load_checkpoint

        depth = depth or bool(load_checkpoint(cfg.teacher_checkpoint)["config"].get("use_depth", False))
    train_set = build_dataset(cfg.data.root, cfg.data.train_split, model_cfg, cfg.data.max_train_frames,
                              load_depth=depth)
    try:
        val_set = build_dataset(cfg.data.root, cfg.data.val_split, model_cfg, cfg.data.max_val_frames)
    except (ValueError, FileNotFoundError) as exc:
        print(f"discene-train: no evaluation ({exc})", file=sys.stderr)
        val_set = None
    trainer = Trainer(cfg, train_set, val_set)
    if resume:
        trainer.resume(resume)
    return str(trainer.fit(stop_at_step=stop_at_step))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import NonFiniteLossError

    code = 0
    try:
        cfg = config_from_args(args)
        final = run(cfg, args.resume, args.stop_at_step)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"discene-train: done; model checkpoint {final}")
    except NonFiniteLossError as exc:
        print(f"discene-train: stopped: {exc}", file=sys.stderr)
        code = 3
    except (ValueError, FileNotFoundError) as exc:
        print(f"discene-train: error: {exc}", file=sys.stderr)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
