"""Data-parallel runs under ``torchrun``: process group set-up and the few collectives the stages need.

The paper trains on DataComp's 12.8 M pairs (METHOD.md section 3), which takes many GPUs; this project's
stages run the same code on one CPU process or on ``torchrun --nproc_per_node=N`` processes.
``init_distributed`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and starts
the process group: ``nccl`` when CUDA is available (one GPU per local rank), ``gloo`` on the CPU.
Started without torchrun it does nothing and reports rank 0 of 1, so every helper here is also a
no-op for a single process. Devices come from what is available, never from a constant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this machine (picks the GPU)
    device: torch.device  # where this process computes
    backend: str | None  # "nccl", "gloo", or None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def default_device(local_rank: int | None = None) -> torch.device:
    """``cuda:<local rank>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        if local_rank is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def model_device(model: object) -> torch.device:
    """Where ``model``'s parameters live (the first one's device); the CPU for a model without any."""
    parameters = getattr(model, "parameters", None)
    if parameters is not None:
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def init_distributed(timeout_seconds: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (once; later calls only report it); rank 0 of 1 without torchrun."""
    if not launched_by_torchrun():
        return DistInfo(rank=0, world_size=1, local_rank=0, device=default_device(0), backend=None)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = default_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_seconds)
        )
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=dist.get_backend()
    )


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: the process group's once it is initialized, torchrun's
    ``RANK``/``WORLD_SIZE`` before that, ``(0, 1)`` outside torchrun. The one source of rank."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def process_group_size() -> int:
    """Processes in the initialized process group, 1 before (or without) one: what a collective spans."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a process outside torchrun."""
    return rank_and_world_size()[0] == 0


def barrier() -> None:
    if process_group_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over all ranks (a new tensor; the input is left unchanged)."""
    result = tensor.detach().clone()
    world_size = process_group_size()
    if world_size > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= world_size
    return result


def all_reduce_min(value: int | float) -> int | float:
    """The smallest ``value`` over all ranks (e.g. the number of batches every rank can fill)."""
    if process_group_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    result = tensor.item()
    return int(result) if isinstance(value, int) else result


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    world_size = process_group_size()
    if world_size == 1:
        return [obj]
    gathered: list[object] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: each as given, else :func:`rank_and_world_size`'s; checked."""
    found = rank_and_world_size()
    rank = found[0] if rank is None else rank
    world_size = found[1] if world_size is None else world_size
    valid = isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size
    if not valid:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return rank, world_size


def cleanup() -> None:
    """Leave the process group (if any); safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where tensors of a collective must live: the current GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
