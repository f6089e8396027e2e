"""Trainer for the teacher, the plain student and the distilled student (single process or torchrun DDP).

One optimiser step: (distill mode) frozen teacher forward under no_grad -> student forward (main,
prior and anchor passes) -> task loss + eq. 10 -> finite check -> backward -> clip -> AdamW ->
warm-up/cosine lr. Checkpoints (last.pt, best.pt, final.pt) are written atomically by rank 0 and
hold everything ``--resume`` needs to continue exactly.

This module is the loop (``TrainModule``, ``Trainer``), the weight table and the lr schedule; batches
and datasets come from training/data.py, process group, seeding and RNG state from
training/distributed.py, validation from training/evaluate.py. The entry points (training/train.py,
training/device_run.py) build the datasets and run a Trainer.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import models
from models.checkpoint import load_checkpoint, load_model, load_state_strict, save_checkpoint, save_model, trained_steps
from models.config import POSTPROCESS_FIELDS, ModelConfig

from .compiled import NetworkCalls, describe_failure, is_compile_error
from .data import EpochBatchSampler, build_train_loader, class_frequencies, prepare_inputs, resize_inputs
from .distill import Distiller, sample_anchors
from .distributed import (
    any_rank,
    autocast_dtype,
    barrier,
    gather_rng_states,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_distributed,
    step_seed,
    use_deterministic_algorithms,
)
from .evaluate import evaluate_model
from .interrupt import StopRequest, TrainingInterrupted
from .losses import TaskLoss
from .occscannet import BadSampleError
from .tgi import freeze_teacher, teacher_context, teacher_guided_init
from .train_config import TrainConfig

TASK_PREFIXES = ("chamfer_", "focal_")  # task-loss terms; every other term is a distillation term
# the uses of randomness, each with its own seeds (distributed.step_seed): per step, and the loader's per epoch
ANCHOR_STREAM, PHOTOMETRIC_STREAM, LOADER_STREAM = 1, 2, 3
COARSE_SCHEDULE_EPOCHS = 5  # lr_by_epoch over fewer epochs than this draws a warning
log = logging.getLogger(__name__)


def _saved_geometry(state: dict[str, Any], batch_size: int, world: int) -> tuple[int, int]:
    """(batch_size, processes) of the run that wrote a checkpoint. Older checkpoints lack both fields: their
    saved train config and their RNG states (one per rank) tell, else this run's (``batch_size``, ``world``)."""
    saved = state.get("train_config") or {}
    ranks = (state.get("rng") or {}).get("ranks")
    batch = state.get("batch_size", saved.get("batch_size", batch_size))
    return int(batch), int(state.get("world", len(ranks) if ranks else world))


def _network_fields(config: dict | None) -> dict | None:
    """A model config without its post-processing settings: what must match for an exact resume."""
    return None if config is None else {k: v for k, v in config.items() if k not in POSTPROCESS_FIELDS}


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term is NaN or inf; the last good checkpoint is left in place."""


# ---------------------------------------------------------------------------------- modules
class TrainModule(nn.Module):
    """Student + task loss (+ distiller): one forward gives every UNWEIGHTED loss term, so DDP syncs all of it."""

    def __init__(self, student: nn.Module, task_loss: TaskLoss, distiller: Distiller | None,
                 compile_backend: str = "none") -> None:
        super().__init__()
        self.student = student
        self.task_loss = task_loss
        self.distiller = distiller
        self.calls = NetworkCalls(student, compile_backend, "student")  # not a submodule: same state dict

    def forward(self, image: torch.Tensor, grid2img: torch.Tensor, depth: torch.Tensor | None, target: torch.Tensor,
                teacher: dict | None = None, prior_init: torch.Tensor | None = None,
                anchors: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.calls.forward(image, grid2img, depth)
        terms = self.task_loss(out, self.task_loss.ground_truth(target))
        if self.distiller is not None and teacher is not None:
            if prior_init is not None:
                out["prior_layers"] = self.calls.decode(out["features"], grid2img, depth, prior_init)["layers"]
            out["anchor_layers"] = None
            if anchors is not None:
                feats = [f[keep] for f in out["features"]]
                sub_depth = depth[keep] if depth is not None else None
                out["anchor_layers"] = self.calls.decode(feats, grid2img[keep], sub_depth, anchors)["layers"]
            terms.update(self.distiller(out, teacher))
        return terms


def loss_weights(task_loss: TaskLoss, num_layers: int, distiller: Distiller | None) -> dict[str, float]:
    """The one weight table: effective weight of every loss term (task terms, then eq. 10 multiplied out)."""
    weights = task_loss.weight_dict(num_layers)
    if distiller is not None:
        weights.update(distiller.weight_dict())
    return weights


def weighted_terms(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each term times its weight (terms without a weight are an error: a term nobody weighs is a bug)."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f"loss terms without a weight in the weight table: {missing}")
    return {key: value * weights[key] for key, value in terms.items()}


class WarmupCosine:
    """lr factor at a step, as the reference's mmcv policy (``CosineAnnealing`` with a linear warm-up) gives it.

    The cosine runs from 1 to ``min_ratio`` over the whole run, stepped once per epoch (``by_epoch``, mmcv's
    default under the reference's EpochBasedRunner: the last of 10 epochs runs at 0.0254 with
    ``min_lr_ratio`` 1e-3, never at the
    minimum) or at every step; over the first ``warmup`` steps it is scaled by a ramp from ``warmup_ratio``
    to 1.
    """

    def __init__(self, total: int, warmup: int, warmup_ratio: float, min_ratio: float,
                 steps_per_epoch: int = 1, by_epoch: bool = False) -> None:
        self.total, self.warmup, self.warmup_ratio, self.min_ratio = total, warmup, warmup_ratio, min_ratio
        self.steps_per_epoch, self.by_epoch = max(1, steps_per_epoch), by_epoch

    @property
    def epochs(self) -> int:
        """Epochs of the run, the last one possibly partial."""
        return math.ceil(self.total / self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        if self.by_epoch:
            progress = min(step // self.steps_per_epoch, self.epochs) / self.epochs
        else:
            progress = min(step, self.total) / max(1, self.total)
        factor = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if step < self.warmup:
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * step / self.warmup
        return factor


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds models, optimiser and data from a TrainConfig and runs the training loop.

    ``resume`` (a last.pt) restores the run it holds instead of warm-starting from ``init_checkpoint``;
    ``replaces`` (an earlier run's files in the out_dir) stay until this run writes its first checkpoint."""

    def __init__(self, config: TrainConfig, train_set: Dataset, val_set: Dataset | None = None,
                 resume: str | Path | None = None, replaces: list[Path] | None = None) -> None:
        self.cfg = config.validate()
        self.rank, self.world, self.device = setup_distributed(config.device)
        self.is_main = self.rank == 0
        self.train_set, self.val_set = train_set, val_set
        if len(train_set) < self.world * config.batch_size:
            raise ValueError(f"training set has {len(train_set)} frames, fewer than one batch on each of {self.world} processes")
        self.skipped_frames: dict[str, str] = {}  # bad training frames this rank's loader skipped: id -> reason
        if hasattr(train_set, "log_skipped"):  # OccScanNetDataset: its batches name its bad frames; logged here once
            train_set.log_skipped = False
        try:
            first = train_set[0]  # skips bad frames; fails only when none is readable, which a loader worker says less clearly
        except BadSampleError as exc:
            raise ValueError(f"no training frame is readable: {exc}") from exc
        # the frames skipped here stay skipped in the dataset (and the loader workers' copies of it): counted now
        self._count_skipped(first.get("skipped", {}) if isinstance(first, dict) else {}, "before training")
        self.out_dir = Path(config.out_dir)
        self.replaces = list(replaces or [])
        self.claimed = False  # whether this run's train_config.yaml and first checkpoint are written
        seed_everything(config.seed)
        if config.deterministic:
            use_deterministic_algorithms(self.device)
        self.model_cfg = config.model_config()
        self.student = models.build_model(self.model_cfg).to(self.device)
        self.teacher, self.teacher_cfg = self._load_teacher()
        self.steps_before = self._warm_start() if resume is None else 0  # training behind the initial weights
        self.teacher_calls = NetworkCalls(self.teacher, config.compile, "teacher") if self.teacher is not None else None
        self.task_loss = self._build_task_loss()
        self.distiller = self._build_distiller()
        if config.compile == "inductor" and self.device.type != "cuda" and self.is_main:
            log.warning("compile=inductor on %s: it is meant for CUDA; on a 2-core CPU it ran slower than eager "
                        "(docs/results/README.md)", self.device)
        module = TrainModule(self.student, self.task_loss, self.distiller, config.compile).to(self.device)
        self.module = module
        self.module_calls = module.calls  # the student's network calls, DDP's wrapper or not
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                              find_unused_parameters=config.find_unused_parameters)
        self.loss_weights = loss_weights(self.task_loss, len(self.model_cfg.decoder.num_refines), self.distiller)
        self.optimizer = self._build_optimizer(module)
        self.steps_per_epoch = EpochBatchSampler(len(train_set), config.batch_size, self.world, self.rank).steps_per_epoch
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = self._build_scheduler()
        self._warn_coarse_schedule(self.scheduler.lr_lambdas[0])
        self.amp_dtype = autocast_dtype(config.amp, self.device, config.amp_on_cpu)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.best_miou = -1.0
        self.val_skipped: tuple[int, dict[str, str]] = (0, {})  # the last evaluation's bad frames: count, first ids
        self.last_saved: tuple[Path, int] | None = None  # (this run's latest last.pt, its step), for messages
        self.step_seconds: list[float] = []  # wall time of each step of this process, loader wait included
        self.writer = None
        self._prior_init: torch.Tensor | None = None  # the frozen teacher's initial query positions (constant)
        if resume is not None:
            self.resume(resume)

    # ---- construction
    def _load_teacher(self) -> tuple[nn.Module | None, ModelConfig | None]:
        if self.cfg.mode != "distill":
            return None, None
        path = self.cfg.teacher_checkpoint
        if not path or not Path(path).is_file():
            raise ValueError(f"distill mode: teacher checkpoint '{path}' not found")
        teacher, tcfg = load_model(path, map_location="cpu")
        teacher = freeze_teacher(teacher.to(self.device))
        if self.cfg.tgi:
            teacher_guided_init(self.student, teacher, keep_student_depth=self.model_cfg.use_depth and not tcfg.use_depth)
        return teacher, tcfg

    def _warm_start(self) -> int:
        """Load ``init_checkpoint``'s weights into the network this run trains (strictly: another architecture
        is an error naming what differs); returns the steps they were trained for (0 without one)."""
        path = self.cfg.init_checkpoint
        if not path:
            return 0
        payload = load_checkpoint(path, map_location="cpu")
        theirs = payload["config"].get("name", "?")
        load_state_strict(self.student, payload["model"],
                          f"init_checkpoint {path} (model '{theirs}', this run builds '{self.model_cfg.name}')")
        mine = _network_fields(self.model_cfg.to_dict())
        differs = sorted(k for k, v in mine.items() if k != "name" and payload["config"].get(k) != v)
        if differs and self.is_main:
            log.warning("init_checkpoint %s: its weights fit, but it was trained with other model settings: %s",
                        path, ", ".join(differs))
        return trained_steps(payload)

    def _step_generator(self, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator (on ``device``) for one use (``stream``) at one step of this rank, seeded from the run's
        seed: a resumed run draws what an uninterrupted one would."""
        return torch.Generator(device=device).manual_seed(step_seed(self.cfg.seed, stream, step, self.rank))

    def _warn_coarse_schedule(self, schedule: WarmupCosine) -> None:
        """A cosine stepped per epoch over a few epochs keeps a high lr to the end (2 epochs: the second at
        half of it; 800 lite steps on 2 epochs lost 5 IoU points against stepping it every step)."""
        epochs = schedule.epochs
        if schedule.by_epoch and epochs < COARSE_SCHEDULE_EPOCHS and self.is_main:
            last = schedule((epochs - 1) * schedule.steps_per_epoch)
            log.warning("optim.lr_by_epoch steps the cosine once per epoch and this run has %d epoch(s): the last "
                        "runs at %.2f x lr; optim.lr_by_epoch=false steps it every step", epochs, last)

    def _build_task_loss(self) -> TaskLoss:
        loss_cfg = self.cfg.loss
        if loss_cfg.class_frequencies is None and self.cfg.data.frequency_frames > 0:
            loss_cfg.class_frequencies = class_frequencies(self.train_set, self.cfg.data.frequency_frames)
        return TaskLoss(loss_cfg, self.model_cfg.num_classes, self.model_cfg.grid_shape, self.model_cfg.voxel_size)

    def _build_distiller(self) -> Distiller | None:
        if self.teacher is None or not self.cfg.distill.any_enabled:
            return None
        s, t = self.model_cfg, self.teacher_cfg
        if s.num_levels != t.num_levels and self.cfg.distill.efa:
            raise ValueError(f"EFA needs equal FPN levels: student {s.num_levels}, teacher {t.num_levels}")
        return Distiller(self.cfg.distill, s.fpn_channels, t.fpn_channels, s.num_levels,
                         s.decoder.embed_dims, t.decoder.embed_dims, s.grid_extent)

    def _build_optimizer(self, module: TrainModule) -> torch.optim.Optimizer:
        """AdamW with three lr groups: the rest, the backbone (x backbone_lr_mult) and the decoder's sampling
        offsets (x sampling_offsets_lr_mult), as the reference's paramwise custom keys."""
        o = self.cfg.optim
        groups: dict[str, list[nn.Parameter]] = {"rest": [], "backbone": [], "offsets": []}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("student.backbone."):
                groups["backbone"].append(param)
            elif name.startswith("student.decoder.") and ".sampling.offsets." in name:
                groups["offsets"].append(param)
            else:
                groups["rest"].append(param)
        mult = {"rest": 1.0, "backbone": o.backbone_lr_mult, "offsets": o.sampling_offsets_lr_mult}
        param_groups = [{"params": params, "lr": o.lr * mult[key], "name": key} for key, params in groups.items() if params]
        # fused on CUDA: 8 ops a step for every parameter, where foreach dispatches 471 for lite, 442 of them host
        # reads of the parameters' step counts; foreach elsewhere
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(param_groups, lr=o.lr, weight_decay=o.weight_decay, foreach=not fused, fused=fused)

    def _build_scheduler(self, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
        """The warm-up/cosine schedule of this run's config over ``total_steps``, at step ``last_epoch + 1``
        (a resume: the optimiser's ``initial_lr`` must be this config's lr by then)."""
        o = self.cfg.optim
        schedule = WarmupCosine(self.total_steps, o.warmup_iters, o.warmup_ratio, o.min_lr_ratio,
                                self.steps_per_epoch, o.lr_by_epoch)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule, last_epoch=last_epoch)

    # ---- checkpoints
    def state_dict(self, rng: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything ``resume`` restores; ``rng``: every rank's RNG states (``gather_rng_states``), else this
        process's own."""
        return {
            "config": self.model_cfg.to_dict(),
            "model": self.student.state_dict(),
            "distiller": self.distiller.state_dict() if self.distiller is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "batch_size": self.cfg.batch_size,  # the batch geometry epoch_step counts in (see _resume_position)
            "world": self.world,
            "best_miou": self.best_miou,
            "steps_before": self.steps_before,
            "rng": {"ranks": rng if rng is not None else [rng_state(self.device)]},
            "train_config": self.cfg.to_dict(),
        }

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` (rank 0); every rank calls it, since it gathers every rank's RNG states."""
        path = self.out_dir / name
        rng = gather_rng_states(self.device)
        if self.is_main:
            save_checkpoint(path, self.state_dict(rng))
            self._claim_out_dir(path)
        if name == "last.pt":
            self.last_saved = (path, self.step)
        return path

    def _claim_out_dir(self, written: Path) -> None:
        """After this run's first checkpoint (``written``): its train_config.yaml, and the earlier run's other
        files gone. Until then a run that fails to start leaves that run whole."""
        if self.claimed:
            return
        self.cfg.save(self.out_dir / "train_config.yaml")
        for path in self.replaces:
            if path.name not in (written.name, "train_config.yaml"):
                path.unlink(missing_ok=True)
        self.claimed = True

    def save_final(self) -> Path:
        """Model-only checkpoint (config + weights) that models.checkpoint.load_model, export and the node read."""
        path = self.out_dir / "final.pt"
        if self.is_main:
            save_model(path, self.student, self.model_cfg, step=self.step, steps_before=self.steps_before,
                       train_config=self.cfg.to_dict())
            self._claim_out_dir(path)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore model, distiller, optimiser, scheduler, scaler, position and RNG from a last.pt."""
        state = load_checkpoint(path, map_location="cpu")
        for key in ("model", "optimizer", "scheduler", "step", "epoch", "epoch_step", "rng"):
            if key not in state:
                raise ValueError(f"checkpoint {path} cannot be resumed: it has no '{key}' (model-only checkpoint?)")
        if _network_fields(state.get("config")) != _network_fields(self.model_cfg.to_dict()):
            raise ValueError(f"checkpoint {path} was trained with another model config than '{self.model_cfg.name}'")
        step, self.epoch, self.epoch_step = self._resume_position(state, path)
        if self.total_steps < step:
            raise ValueError(f"this run's budget of {self.total_steps} steps is below the step {step} "
                             f"checkpoint {path} is at (max_steps or epochs too small)")
        self.student.load_state_dict(state["model"])
        if self.distiller is not None:
            if state.get("distiller") is None:
                raise ValueError(f"checkpoint {path} has no distiller state but this run distils")
            self.distiller.load_state_dict(state["distiller"])
        self._restore_optimizer(state["optimizer"], state["scheduler"], step, path)
        scaler = state.get("scaler") or {}  # a disabled scaler's state (amp none or bf16) is {}
        if scaler or not self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler)
        elif self.is_main:
            log.warning("resume from %s: the checkpoint has no fp16 loss-scaler state (its run trained without "
                        "amp fp16): the scaler starts afresh", path)
        self.step = step
        self.last_saved = (Path(path), self.step)
        self.best_miou = state.get("best_miou", -1.0)
        self.steps_before = int(state.get("steps_before", 0))
        skipped = set_rng_state(state["rng"], self.rank, self.world, self.device)
        if skipped is not None and self.is_main:
            log.warning("resume from %s: %s", path, skipped)

    def _resume_position(self, state: dict[str, Any], path: str | Path) -> tuple[int, int, int]:
        """(step, epoch, epoch_step) to continue at. A checkpoint's epoch_step counts batches of its own run's
        batch_size x processes; under another geometry the run continues at the frame of the epoch it had reached
        (``EpochBatchSampler.position_after``: a partial batch is read again). The step (the lr schedule's
        position) stays the optimiser steps taken when ``max_steps`` is the budget, since it counts those; with an
        ``epochs`` budget it becomes the steps of the new size that the frames read so far fill, so that the
        schedule and the end of the run follow the data, as the budget does."""
        step, epoch, epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
        batch, world = _saved_geometry(state, self.cfg.batch_size, self.world)
        if (batch, world) == (self.cfg.batch_size, self.world):
            return step, epoch, epoch_step
        consumed = epoch_step * batch * world
        sampler = EpochBatchSampler(len(self.train_set), self.cfg.batch_size, self.world, self.rank)
        new_epoch, new_step = sampler.position_after(epoch, consumed)
        if self.cfg.max_steps is None:
            data_step = new_epoch * sampler.steps_per_epoch + new_step
            counted = (f"the step count {step} -> {data_step}, in steps of the new size (the budget is "
                       f"{self.cfg.epochs} epochs)")
            step = data_step
        else:
            counted = f"the step count stays {step} (max_steps counts optimiser steps)"
        if self.is_main:
            again = consumed - new_step * self.cfg.batch_size * self.world if new_epoch == epoch else 0
            log.warning("resume from %s: batch_size %d x %d process(es) -> %d x %d: epoch %d, %d frames in (step "
                        "%d), continues at epoch %d step %d%s; %s", path, batch, world, self.cfg.batch_size,
                        self.world, epoch, consumed, epoch_step, new_epoch, new_step,
                        f" ({again} frames read again)" if again else "", counted)
        return step, new_epoch, new_step

    def _restore_optimizer(self, optimizer_state: dict[str, Any], scheduler_state: dict[str, Any], step: int,
                           path: str | Path) -> None:
        """The optimiser's moments and the schedule's position from a checkpoint; its settings (lr, weight
        decay) and the schedule's shape (total steps, warm-up) from this run's config, which ``--steps`` and
        ``--set`` may have changed since: the checkpoint's schedule would run the extra steps at min_lr."""
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        mine = {"base_lrs": list(self.scheduler.base_lrs), **vars(self.scheduler.lr_lambdas[0])}
        self.optimizer.load_state_dict(optimizer_state)
        for group, setting in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(setting)
        self.scheduler = self._build_scheduler(last_epoch=step - 1)
        saved_schedule = (scheduler_state.get("lr_lambdas") or [None])[0] or {}
        theirs = {"base_lrs": list(scheduler_state.get("base_lrs", [])), **saved_schedule}
        differs = [f"{k} {theirs.get(k)} -> {v}" for k, v in mine.items() if theirs.get(k) != v]
        if differs and self.is_main:
            log.warning("resume from %s: the lr schedule follows this run's config, not the checkpoint's (%s); "
                        "it continues at step %d", path, ", ".join(differs), step)

    # ---- one step
    def _teacher_outputs(self, inputs: dict[str, Any], step: int) -> tuple[dict | None, dict[str, Any]]:
        """Frozen teacher passes (main + anchors) and the extra student inputs (prior init, anchors)."""
        extra: dict[str, Any] = {}
        if self.distiller is None:
            return None, extra
        dcfg = self.cfg.distill
        t_in = resize_inputs(inputs, self.teacher_cfg.image_size)
        b = inputs["image"].shape[0]
        with teacher_context(self.device, self.amp_dtype):
            teacher = self.teacher_calls.forward(t_in["image"], t_in["grid2img"], t_in["depth"])
            teacher["anchor_layers"] = None
            if dcfg.prior:
                if self._prior_init is None:
                    self._prior_init = self.teacher.init_positions().detach().float()
                extra["prior_init"] = self._prior_init.unsqueeze(0).expand(b, -1, -1).contiguous()
            if dcfg.anchor:
                gen = self._step_generator(step, ANCHOR_STREAM, inputs["target"].device)
                count = dcfg.num_anchors or self.model_cfg.decoder.num_queries
                anchors, keep = sample_anchors(inputs["target"], count, self.task_loss.class_weights, gen)
                if anchors is not None:
                    feats = [f[keep] for f in teacher["features"]]
                    depth = t_in["depth"][keep] if t_in["depth"] is not None else None
                    teacher["anchor_layers"] = self.teacher_calls.decode(feats, t_in["grid2img"][keep], depth, anchors)["layers"]
                    extra["anchors"], extra["keep"] = anchors, keep
        teacher = _detach_float(teacher)
        return teacher, extra

    def loss_terms(self, batch: dict[str, torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The forward half of a training step (train mode, autocast): (unweighted terms, weighted terms)."""
        self.module.train()
        needs_depth = self.model_cfg.use_depth or (self.teacher_cfg is not None and self.teacher_cfg.use_depth)
        photometric = self._step_generator(self.step, PHOTOMETRIC_STREAM) if self.cfg.data.photometric else None
        inputs = prepare_inputs(batch, self.device, needs_depth, photometric)
        teacher, extra = self._teacher_outputs(inputs, self.step)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else contextlib.nullcontext()
        with autocast:
            terms = self.module(inputs["image"], inputs["grid2img"], inputs["depth"], inputs["target"],
                                teacher, extra.get("prior_init"), extra.get("anchors"), extra.get("keep"))
        return terms, weighted_terms(terms, self.loss_weights)

    def train_step(self, batch: dict[str, torch.Tensor | None]) -> dict[str, float]:
        """One optimiser step; raises NonFiniteLossError (before touching the weights) on NaN/inf.

        With ``compile`` on, a graph that fails to build in the backward pass (forward failures are handled
        by ``NetworkCalls``) turns compiling off and the step is redone eagerly: the weights are untouched
        until the optimiser step."""
        try:
            return self._train_step(batch)
        except Exception as exc:
            calls = [self.module_calls, self.teacher_calls]
            if not is_compile_error(exc) or not any(c is not None and c.compiled for c in calls):
                raise
            for c in calls:
                if c is not None:
                    c.disable(f"the backward pass failed to compile: {describe_failure(exc)}")
            return self._train_step(batch)

    def _train_step(self, batch: dict[str, torch.Tensor | None]) -> dict[str, float]:
        terms, weighted = self.loss_terms(batch)
        parts = torch.stack([v.float() for v in weighted.values()])
        loss = parts.sum()
        # every logged number, the gradient norm included, crosses to the host in one copy after the backward
        # pass is queued: one device sync per step, and none between the forward and the backward pass
        logged = [torch.stack([v.detach().float() for v in terms.values()]), parts.detach(), loss.detach()[None]]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # the gradient norm of every step, clipped or not: a non-finite gradient must never reach AdamW
        self.scaler.unscale_(self.optimizer)
        # grad_clip 0: max_norm inf gives the norm and scales by 1 (torch < 2.6, JetPack 6's 2.3, has no get_total_norm)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        logged.append(grad_norm.float()[None])
        numbers = torch.cat(logged).tolist()
        n, w = len(terms), len(weighted)
        values = dict(zip(terms, numbers[:n], strict=True))
        scaled = list(zip(weighted, numbers[n:n + w], strict=True))
        values["task"] = sum(x for k, x in scaled if k.startswith(TASK_PREFIXES))
        values["distill"] = sum(x for k, x in scaled if not k.startswith(TASK_PREFIXES))
        values["loss"] = numbers[n + w]
        if any_rank(not all(math.isfinite(v) for v in values.values()), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} (terms: {shown}); training stopped, {self._kept()}")
        values["grad_norm"] = numbers[-1]
        if not math.isfinite(values["grad_norm"]) and not self.scaler.is_enabled():  # fp16's scaler skips the step
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient norm at step {self.step + 1} (loss {values['loss']:.4g}); training stopped, "
                f"{self._kept()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return values

    def _kept(self) -> str:
        """What a stopped run leaves to resume from: this run's last good checkpoint, or that it has none."""
        if self.last_saved is not None:
            path, step = self.last_saved
            return f"the last good checkpoint {path} (step {step}) is kept"
        earlier = self.out_dir / "last.pt"
        note = f"; {earlier} is an earlier run's" if earlier.exists() else ""
        return f"no checkpoint of this run was written before it{note}"

    # ---- loop
    def _loader(self) -> DataLoader:
        """The run's loader, starting at the current (epoch, epoch_step); it never runs out (see EpochBatchSampler)."""
        sampler = EpochBatchSampler(len(self.train_set), self.cfg.batch_size, self.world, self.rank, self.cfg.seed,
                                    start_epoch=self.epoch, start_step=self.epoch_step)
        data = self.cfg.data
        return build_train_loader(self.train_set, sampler, data.workers, data.pin_memory and self.device.type == "cuda",
                                  data.prefetch_factor, step_seed(self.cfg.seed, LOADER_STREAM, self.epoch, self.rank))

    def _advance_position(self) -> None:
        self.epoch_step += 1
        if self.epoch_step >= self.steps_per_epoch:
            self.epoch, self.epoch_step = self.epoch + 1, 0

    def _should_stop(self, start: float, budget_s: float | None, stop: StopRequest) -> bool:
        """True once ``budget_s`` seconds have passed since ``start`` or a stop signal came, on any rank, so
        that all ranks stop after the same step (one all-reduce of a flag per step when distributed)."""
        out_of_time = budget_s is not None and time.perf_counter() - start >= budget_s
        return any_rank(out_of_time or stop.requested, self.device)

    def fit(self, stop_at_step: int | None = None, time_budget_s: float | None = None) -> Path:
        """Train until ``total_steps``, ``stop_at_step`` or ``time_budget_s`` seconds, whichever comes first.

        Stopping early (the end of a device call) leaves a resumable last.pt; the lr schedule still runs to
        ``total_steps``. At ``total_steps`` last.pt is saved, then the final evaluation runs (best.pt), then
        final.pt is written. Returns the model-only final.pt. Ctrl-C or SIGTERM (``interrupt.StopRequest``)
        stops after the current step, saves last.pt and raises ``TrainingInterrupted``.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard: the [train] extra

            self.writer = SummaryWriter(str(self.out_dir / "tb"))
        end = min(self.total_steps, stop_at_step) if stop_at_step is not None else self.total_steps
        bar = None
        if self.is_main and self.cfg.progress:
            bar = tqdm(total=end, initial=self.step, desc=self.cfg.name, dynamic_ncols=True)
        with StopRequest() as stop:
            try:
                self._train_steps(end, started, time_budget_s, stop, bar)
                if self.step < end and any_rank(stop.requested, self.device):  # every rank, whichever got it
                    path = self.save("last.pt")
                    barrier()  # no rank ends (and has torchrun stop the others) while rank 0 still writes
                    raise TrainingInterrupted(stop.signal_name or "a stop signal on another rank", self.step,
                                              self.total_steps, str(path))
                self.save("last.pt")  # before the evaluation: one that fails or is interrupted loses no step
                if self.step >= self.total_steps:
                    best = self.best_miou
                    self.evaluate_and_keep_best()
                    if any_rank(self.best_miou != best, self.device):  # a resume with more steps compares with it
                        self.save("last.pt")
                final = self.save_final()
                if self.skipped_frames:
                    first_id = next(iter(self.skipped_frames))
                    log.warning("%d bad training frames were skipped on rank %d; first: %s", len(self.skipped_frames),
                                self.rank, self.skipped_frames[first_id])
                # on success only: a rank that failed leaves at once with its own error (torchrun then ends the
                # others), where a barrier would hold it, error unreported, until the process group timed out
                barrier()
            finally:
                if bar is not None:
                    bar.close()
                if self.writer is not None:
                    self.writer.close()
        return final

    def _train_steps(self, end: int, started: float, budget_s: float | None, stop: StopRequest, bar: Any) -> None:
        """Steps up to ``end``, until the time budget is spent or a stop signal came; the loader (and its
        workers) lives as long as this call."""
        if self.step >= end:
            return
        samples_per_step = self.cfg.batch_size * self.world
        batches = iter(self._loader())
        tick = time.perf_counter()
        try:
            while self.step < end:
                values = self.train_step(self._next_batch(batches))
                self._advance_position()
                now = time.perf_counter()
                self.step_seconds.append(now - tick)
                rate = samples_per_step / max(1e-9, now - tick)
                tick = now
                self._log(values, rate, bar)
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate_and_keep_best()
                if self.step % self.cfg.ckpt_every == 0 and self.step < end:
                    self.save("last.pt")
                if self._should_stop(started, budget_s, stop):
                    break
        finally:
            # now, not when the iterator is collected: an exception's traceback keeps it alive, and at exit
            # multiprocessing would wait for workers that ignore its first SIGTERM (interrupt.ignore_interrupts)
            shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator only
            if shutdown is not None:
                shutdown()

    def _next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The next batch; ValueError naming the problem and the checkpoint kept when no frame is readable any
        more (files removed under a running job), where a loader worker's error is a traceback of the worker."""
        try:
            batch = next(batches)
        except BadSampleError as exc:
            reason = str(exc).strip().splitlines()[-1]  # a worker's error: its traceback's last line
            raise ValueError(f"training stopped before step {self.step + 1}: {reason}; {self._kept()}") from exc
        self._count_skipped(batch.pop("skipped", {}), f"step {self.step + 1}")
        return batch

    def _count_skipped(self, skipped: dict[str, str], when: str) -> None:
        """Count and log, once each, the bad frames (id -> reason) that the data loading skipped ``when``."""
        for sample_id, reason in skipped.items():
            if sample_id not in self.skipped_frames:
                self.skipped_frames[sample_id] = reason
                log.warning("%s: bad training frame skipped (%d so far on rank %d): %s", when,
                            len(self.skipped_frames), self.rank, reason)

    def _log(self, values: dict[str, float], rate: float, bar) -> None:
        if not self.is_main:
            return
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", samples_s=f"{rate:.2f}")
        if self.writer is not None and (self.step % self.cfg.log_every == 0 or self.step == 1):
            for key, value in values.items():
                self.writer.add_scalar(f"loss/{key}" if key != "grad_norm" else "train/grad_norm", value, self.step)
            self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
            self.writer.add_scalar("train/samples_per_s", rate, self.step)
            self.writer.add_scalar("train/skipped_frames", len(self.skipped_frames), self.step)

    def evaluate_and_keep_best(self) -> dict[str, Any] | None:
        """Rank 0 evaluates on the val set with SSCMetrics, logs, and writes best.pt on a new best mIoU.
        In fp32 whatever the training's ``amp``: the reference validates in fp32, and so does discene-eval,
        whose numbers best.pt's choice should agree with."""
        result, improved = None, False
        if self.is_main and self.val_set is not None and len(self.val_set) > 0:
            result = evaluate_model(self.student, self.val_set, self.model_cfg, self.device,
                                    batch_size=self.cfg.batch_size, workers=self.cfg.data.workers, amp="none")
            self._log_bad_val_frames(result)
            if self.writer is not None:
                self.writer.add_scalar("val/iou", result["iou"], self.step)
                self.writer.add_scalar("val/miou", result["miou"], self.step)
                self.writer.add_scalar("val/skipped_frames", result["skipped_frames"], self.step)
            improved = result["miou"] > self.best_miou
            self.best_miou = max(self.best_miou, result["miou"])
        if any_rank(improved, self.device):  # every rank saves: the checkpoint gathers their RNG states
            self.save("best.pt")
        return result

    def _log_bad_val_frames(self, result: dict[str, Any]) -> None:
        """One line for the validation frames an evaluation could not score, when they differ from the last
        evaluation's: every evaluation meets the same ones, and they would repeat the line each time."""
        skipped = (result["skipped_frames"], dict(result["skipped"]))
        if skipped[0] and skipped != self.val_skipped:
            first_id, reason = next(iter(skipped[1].items()))
            log.warning("step %d: validation: %d bad frames not scored; first: %s: %s", self.step, skipped[0],
                        first_id, reason)
        self.val_skipped = skipped


def _detach_float(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().float()
    if isinstance(value, dict):
        return {k: _detach_float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_detach_float(v) for v in value]
    return value
