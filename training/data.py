"""Data plumbing of training and evaluation: datasets, frame collation, batch -> network inputs, class
frequencies, an endless resumable batch order, and the loader built once per run.

The training loader is created once per ``Trainer.fit`` call and iterated across epoch boundaries,
so worker processes start once (not once per epoch), keep their prefetch queue full, and hand
pinned batches to the GPU; they start from a fork server, not by forking the training process. The
batch order depends only on (seed, epoch, rank), so a resumed run that starts the sampler at the
saved (epoch, step) sees exactly the batches the uninterrupted run saw.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from models.config import ModelConfig
from models.preprocess import normalize_image, pixel_values

from .augment import PhotometricDraws, photometric_distortion
from .interrupt import worker_init_for_this_process
from .losses import class_frequencies_from_targets
from .occscannet import OccScanNetDataset, skipped_in

BATCH_KEYS = ("image", "grid2img", "depth", "target")

# Occ-ScanNet training frames: counts from a subset are scaled to this many frames, so the OPUS class
# weights (1/ln(count) - 0.05) * 400 do not depend on how many frames were counted.
REFERENCE_FRAMES = 45755


def build_dataset(root: str, split: str, model_cfg: ModelConfig, max_frames: int | None = None,
                  skip_bad: bool = True, load_depth: bool | None = None) -> Dataset:
    """An Occ-ScanNet-format split prepared for ``model_cfg`` (depth read only when the model uses it,
    unless ``load_depth`` says otherwise, e.g. for a depth-using teacher)."""
    return OccScanNetDataset(root, split, config=model_cfg, skip_bad=skip_bad, max_samples=max_frames,
                             load_depth=model_cfg.use_depth if load_depth is None else load_depth)


def collate_frames(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the network inputs and targets of a list of frames (depth may be missing); ``skipped`` (id ->
    reason) holds the bad frames they replaced, when there are any."""
    out: dict[str, Any] = {}
    for key in BATCH_KEYS:
        values = [item.get(key) for item in items]
        if all(v is None for v in values):
            out[key] = None
            continue
        if any(v is None for v in values):
            raise ValueError(f"some frames of the batch have no '{key}'")
        out[key] = torch.stack([torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for v in values])
    if out["image"] is None or out["grid2img"] is None or out["target"] is None:
        raise ValueError(f"frames must provide image, grid2img and target; got keys {sorted(items[0])}")
    skipped = skipped_in(items)
    if skipped:
        out["skipped"] = skipped
    return out


def prepare_inputs(batch: dict[str, torch.Tensor | None], device: torch.device, use_depth: bool,
                   photometric: torch.Generator | None = None) -> dict[str, Any]:
    """Batch -> device tensors: normalised image (uint8 images are normalised here), grid2img, depth, target.

    uint8 images cross to the device as uint8 (a quarter of the float bytes) and are normalised there;
    copies are non-blocking, which overlaps them with compute when the loader pins its batches. With a
    ``photometric`` generator (training) the images are distorted on the device first (training/augment.py).
    """
    image = batch["image"].to(device, non_blocking=True)
    if photometric is not None:  # on 0..255 values: uint8 as they come, float ones are normalised already
        pixels = image.float() if image.dtype == torch.uint8 else pixel_values(image.float())
        draws = PhotometricDraws.sample(image.shape[0], photometric)
        image = normalize_image(photometric_distortion(pixels, draws) / 255.0)
    else:
        image = normalize_image(image) if image.dtype == torch.uint8 else image.float()
    depth = batch["depth"]
    if use_depth and depth is None:
        raise ValueError("the model uses the depth branch but the dataset gives no depth")
    if depth is not None:
        depth = depth.to(device, non_blocking=True).float()
        depth = depth.unsqueeze(1) if depth.dim() == 3 else depth
    return {"image": image, "grid2img": batch["grid2img"].to(device, non_blocking=True).float(),
            "depth": depth if use_depth else None, "target": batch["target"].to(device, non_blocking=True)}


def resize_inputs(inputs: dict[str, Any], size_hw: list[int]) -> dict[str, Any]:
    """Inputs for a network of another input size (the teacher's): resized image/depth and grid2img with K
    scaled, resized as inference resizes them (``models.preprocess``): the image antialiased, the depth
    nearest-neighbour with pixel centres aligned (``resize_depth``), never blending valid with invalid depth."""
    h, w = inputs["image"].shape[-2:]
    if (h, w) == tuple(size_hw):
        return inputs
    scale = torch.diag(inputs["grid2img"].new_tensor([size_hw[1] / w, size_hw[0] / h, 1.0, 1.0]))
    out = dict(inputs)
    out["image"] = F.interpolate(inputs["image"], size=tuple(size_hw), mode="bilinear", align_corners=False,
                                 antialias=True)
    out["grid2img"] = scale @ inputs["grid2img"]
    if inputs["depth"] is not None:
        out["depth"] = F.interpolate(inputs["depth"], size=tuple(size_hw), mode="nearest-exact")
    return out


def class_frequencies(dataset: Dataset, frames: int) -> list[float]:
    """Voxel counts of classes 1..C, counted on ``frames`` frames spread evenly over the split (its first
    frames would be its first few scenes) and scaled to REFERENCE_FRAMES."""
    n = min(frames, len(dataset))
    picked = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(int)) if n > 0 else []
    if hasattr(dataset, "read_target") and hasattr(dataset, "ids"):  # OccScanNetDataset: labels only, no images
        targets = (t for t in (_target_or_none(dataset, int(i)) for i in picked) if t is not None)
    else:
        targets = (dataset[int(i)]["target"] for i in picked)
    counts = class_frequencies_from_targets(targets)
    return [c * REFERENCE_FRAMES / max(1, len(picked)) for c in counts]


def _target_or_none(dataset: Any, index: int) -> Any:
    try:
        return dataset.read_target(dataset.ids[index])
    except RuntimeError:  # a bad sample (BadSampleError) does not count
        return None


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, epoch after epoch without end, starting at (``start_epoch``, ``start_step``).

    Epoch ``e`` shuffles with ``torch.randperm`` seeded ``seed + e`` (the order DistributedSampler
    gives), drops the tail so every rank gets ``len(dataset) // num_replicas`` frames, takes every
    ``num_replicas``-th index from ``rank``, and yields ``steps_per_epoch`` full batches of them.
    """

    def __init__(self, size: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, start_epoch: int = 0, start_step: int = 0) -> None:
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler settings: batch {batch_size}, rank {rank} of {num_replicas}")
        self.size, self.batch_size, self.num_replicas, self.rank = size, batch_size, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = size // num_replicas
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"{size} frames give no full batch of {batch_size} on each of {num_replicas} processes")
        if not 0 <= start_step < self.steps_per_epoch or start_epoch < 0:
            raise ValueError(f"start position epoch {start_epoch}, step {start_step} is outside an epoch of "
                             f"{self.steps_per_epoch} steps")
        self.start_epoch, self.start_step = start_epoch, start_step

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's frame indices of ``epoch`` in order (only the part that fills whole batches)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        total = self.per_rank * self.num_replicas
        return order[:total][self.rank:total:self.num_replicas][:self.steps_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, step = self.start_epoch, self.start_step
        while True:
            indices = self.epoch_indices(epoch)
            for s in range(step, self.steps_per_epoch):
                yield indices[s * self.batch_size:(s + 1) * self.batch_size]
            epoch, step = epoch + 1, 0

    def position_after(self, epoch: int, samples: int) -> tuple[int, int]:
        """The (epoch, step) at which to continue after ``samples`` frames of ``epoch`` were taken, in any batch
        size and number of processes: all ranks together take each epoch's one order from its front, so they
        are its first ``samples`` frames. Rounded down: a partial batch is read again, never skipped; an epoch
        this sampler has no whole batch left of continues at the next one."""
        step = samples // (self.batch_size * self.num_replicas)
        return (epoch, step) if step < self.steps_per_epoch else (epoch + 1, 0)


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where loader workers start: a fork server (Python 3.14's default on Linux), a process with one thread
    that imports torch and this package once. Forking the training process itself would copy it while its
    TensorBoard writer, queue feeders, pin-memory and matching threads run, any of which may hold a lock
    (Python 3.12 warns about exactly that). None (the platform's default) where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "training.data", "training.evaluate"])
    return context


def build_train_loader(dataset: Dataset, sampler: EpochBatchSampler, workers: int, pin_memory: bool,
                       prefetch_factor: int, seed: int) -> DataLoader:
    """One DataLoader for the whole run: persistent workers, prefetch queue, pinned batches (on CUDA)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor,
                 "multiprocessing_context": worker_context()}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_frames,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=worker_init_for_this_process(), **extra)
