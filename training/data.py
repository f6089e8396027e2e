"""Training data plumbing: frame collation, an endless resumable batch order, and the loader built once per run.

The loader is created once per ``Trainer.fit`` call and iterated across epoch boundaries, so worker
processes are forked once (not once per epoch), keep their prefetch queue full, and hand pinned
batches to the GPU. The batch order depends only on (seed, epoch, rank), so a resumed run that
starts the sampler at the saved (epoch, step) sees exactly the batches the uninterrupted run saw.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

BATCH_KEYS = ("image", "grid2img", "depth", "target")


def collate_frames(items: list[dict[str, Any]]) -> dict[str, torch.Tensor | None]:
    """Stack the network inputs and targets of a list of frames (depth may be missing)."""
    out: dict[str, torch.Tensor | None] = {}
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
    return out


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


def build_train_loader(dataset: Dataset, sampler: EpochBatchSampler, workers: int, pin_memory: bool,
                       prefetch_factor: int, seed: int) -> DataLoader:
    """One DataLoader for the whole run: persistent workers, prefetch queue, pinned batches (on CUDA)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_frames,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed), **extra)
