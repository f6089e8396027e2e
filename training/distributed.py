"""Process and device set-up of a run: usable CPUs, torchrun process group, rank helpers, seeding, RNG state, autocast dtype.

Single process runs need none of the process-group calls: the helpers below are no-ops (or return the
local answer) unless a process group of more than one process is initialised.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def usable_cpus() -> int:
    """CPUs this process may run on: the device machine lets its container use 4 of 16 cores, and
    ``os.cpu_count()`` counts all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (gloo on CPU, nccl on GPU).
    ValueError for a CUDA device this machine does not have."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device_name}' requested but CUDA is not available (use --device cpu)")
        device = torch.device("cuda", local_rank if world > 1 or device_name == "cuda" else int(device_name.split(":")[1]))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' requested but there are {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, device


def teardown_distributed() -> None:
    """Destroy the process group if one was initialised (end of a torchrun run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints, logs and writes checkpoints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any process, so that all processes take the same branch."""
    if not is_distributed():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    """Wait for every process (no-op in a single process run)."""
    if is_distributed():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, stream: int, step: int, rank: int) -> int:
    """The seed of one use (``stream``) of randomness at one step of one rank: numpy's SeedSequence of the four,
    so that no two of them share a seed (a product ``seed * stream`` gives every stream the same at seed 0)."""
    return int(np.random.SeedSequence([seed % 2**64, stream, step, rank]).generate_state(1, np.uint64)[0])


def use_deterministic_algorithms(device: torch.device) -> None:
    """Bitwise-repeatable kernels (cuBLAS needs a fixed workspace for that on CUDA)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: Python's, numpy's, torch's CPU generator and, on CUDA, the generator of its
    own ``device`` (as tensors and plain Python values, so checkpoints stay loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_states(device: torch.device) -> list[dict[str, Any]] | None:
    """Every rank's ``rng_state``, in rank order, on rank 0 (None on the others); a collective under DDP, so
    every rank calls it. The checkpoint's ``rng`` holds this list."""
    own = rng_state(device)
    if not is_distributed():
        return [own]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(own, gathered, dst=0)
    return gathered


def set_rng_state(saved: dict[str, Any], rank: int, world: int, device: torch.device) -> str | None:
    """Restore this rank's own RNG states from a checkpoint's ``rng`` (``{"ranks": [...]}``, or one process's
    states as older checkpoints hold them). Returns None when all were restored, else what was left as
    seeded and why (another world size, CUDA on one side only, fewer GPUs): the run continues either way."""
    ranks = saved["ranks"] if "ranks" in saved else [saved]
    if len(ranks) != world:
        return (f"the checkpoint holds the RNG states of {len(ranks)} process(es) and this run has {world}: "
                "continuing with freshly seeded generators")
    own = ranks[rank]
    torch.set_rng_state(own["torch"])
    n = own["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(own["python"])
    cuda = own.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every GPU the saving process saw, by device index
        index = (torch.cuda.current_device() if device.index is None else device.index) if device.type == "cuda" else 0
        if device.type == "cuda" and index >= len(cuda):
            return (f"the checkpoint holds CUDA RNG states of {len(cuda)} GPU(s) and this run uses {device}: "
                    "continuing with its generator freshly seeded")
        cuda = cuda[index] if device.type == "cuda" else (cuda or None)
    if cuda is None and device.type == "cuda":
        return f"the checkpoint holds no CUDA RNG state (saved on CPU): {device}'s generator stays freshly seeded"
    if cuda is not None and device.type != "cuda":
        return f"the checkpoint's CUDA RNG state is not restored: this run is on {device}"
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    return None


def autocast_dtype(amp: str, device: torch.device, on_cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype of a run: ``amp`` on CUDA; on CPU fp32 (None) unless ``on_cpu`` asks for bf16."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device.type == "cuda" or dtype is None:
        return dtype
    if not on_cpu:
        return None
    if dtype != torch.bfloat16:
        raise ValueError(f"mixed precision on {device.type} supports bf16 only, got amp={amp!r}")
    return dtype
