"""torch.distributed for the trainers: one process, or one per device under torchrun.

Nothing here starts processes: torchrun (or `accelerate launch`) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and init_from_env joins the group they describe. Before
a group exists every helper answers for a single process, so training code written with them
runs unchanged on one CPU, one GPU or several GPUs.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.lm.lm import pick_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs, writes checkpoints and saves results."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(prefer: str | torch.device = "auto") -> torch.device:
    """This process's device: pick_device's, and under DDP on CUDA the GPU numbered LOCAL_RANK."""
    device = pick_device(prefer) if isinstance(prefer, str) else torch.device(prefer)
    if device.type == "cuda" and device.index is None and is_distributed():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank() % torch.cuda.device_count())))
    return device


def init_from_env(prefer: str = "auto") -> torch.device:
    """Join the process group the launcher's environment describes (none when WORLD_SIZE is unset
    or 1): gloo on CPU, nccl on CUDA. Returns this process's device."""
    device = pick_device(prefer)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        if device.type == "cuda":
            # Before the group exists, so nccl binds each rank to its own GPU, not all to GPU 0.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return local_device(device)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DDP in a distributed run (which copies rank 0's weights to every rank), the
    model itself otherwise."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP: its attributes, and state_dict keys without DDP's `module.` prefix."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_ranks(model: torch.nn.Module) -> int:
    """How many ranks' gradients DDP averages in this model's backward (1 without DDP)."""
    return world_size() if isinstance(model, DistributedDataParallel) else 1


def sync_gradients(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward: without sync, DDP only accumulates
    locally; the step's last micro-batch syncs, averaging the accumulated gradients once."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Elementwise sums over the ranks (the values themselves in one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    # nccl reduces CUDA tensors only, gloo CPU ones: the tensor lives on this rank's device.
    total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def shard(index: Sequence[int], of_rank: int | None = None, ranks: int | None = None) -> list[int]:
    """A rank's rows of a step: the rank-th of `ranks` contiguous equal slices of the step's rows."""
    of_rank = rank() if of_rank is None else of_rank
    ranks = world_size() if ranks is None else ranks
    if len(index) % ranks:
        raise ValueError(f"a step of {len(index)} rows does not split evenly over {ranks} processes: "
                         f"make value_models.batch_size a multiple of the number of processes")
    size = len(index) // ranks
    return list(index[of_rank * size : (of_rank + 1) * size])
