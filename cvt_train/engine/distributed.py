"""torchrun support: process group set-up, rank helpers, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, key: str = "trainer.device") -> torch.device:
    """`auto`, `cpu`, `cuda` (this rank's GPU) or `cuda:N` as a device; one line naming `key` when it is not one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # modulo: a scheduler may show each task only its own GPU(s)
        name = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{key}={name!r}: not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}: CUDA was asked for but is not available; use {key}=cpu")
    return device


def export_submitit_env() -> bool:
    """In a submitit job of several tasks (hydra/launcher=submitit_slurm with tasks_per_node or nodes > 1), set the
    variables torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from SLURM's; returns whether it did."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR") or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return False
    from submitit.helpers import TorchDistributedEnvironment  # installed: this process is a submitit job

    env = TorchDistributedEnvironment()  # honours a MASTER_PORT set beforehand
    for key, value in (("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port), ("RANK", env.rank),
                       ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(key, str(value))  # what a site prolog or hydra.launcher.setup set stays
    return True


def init_distributed(device_name: str, timeout_min: float = 60) -> DistInfo:
    """Join the process group torchrun (or a multi-task submitit job) describes in the environment (NCCL on GPU,
    gloo on CPU); else single process. timeout_min: how long a collective waits for the slowest rank (eight ranks
    compiling at once, or rank 0 writing a multi-GB checkpoint, can take well over torch's 10-minute default)."""
    export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank: one answer on every rank, so all of them take the same branch."""
    return bool(all_reduce_max(torch.tensor([int(flag)], device=device)).item())


def broadcast_object(obj, src: int = 0):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
