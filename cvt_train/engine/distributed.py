"""torchrun support: process group set-up, rank helpers, reductions, and what the trainer needs of them: rank-0 writes
that fail on every rank, rank 0's buffers for every rank, a check that the ranks ended with the same weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import UserError

log = logging.getLogger("cvt_train")


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
    for key, value in (
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
    ):
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
    if world_size > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_min),
            device_id=device if device.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank: one answer on every rank, so all of them take the same branch."""
    return bool(all_reduce_max(torch.tensor([int(flag)], device=device)).item())


def broadcast_object(obj, src: int = 0):
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def on_main(work: Callable[[], object], dist: DistInfo) -> None:
    """Run `work` (writing files) on rank 0 alone. If it fails there, the other ranks stop too, rather than wait
    for rank 0 in their next collective until the timeout (where no torchrun agent ends them: submitit).
    Call it on every rank (under DDP it is a collective)."""
    error = None
    if dist.is_main:
        try:
            work()
        except Exception as e:  # noqa: BLE001 (raised again below, after the other ranks know)
            error = e
    if dist.enabled and any_rank(error is not None, dist.device):
        if error is None:
            raise UserError("rank 0 stopped with an error (its message is in rank 0's output); stopping too")
    if error is not None:
        raise error


def sync_buffers(modules: Iterable[nn.Module], dist: DistInfo, weights_of: Iterable[nn.Module] = ()) -> None:
    """Give every rank rank 0's buffers of `modules` (BatchNorm statistics), and the weights of `weights_of` too
    (an EMA: no DDP keeps those equal). DDP broadcasts the model's buffers before each forward, but each rank's last
    forward then updates its own copy: without this, ranks would evaluate shards with different statistics, and
    differ from the model rank 0 saves. Every tensor must be on the rank's device (NCCL takes CUDA tensors only)."""
    if not dist.enabled:
        return
    for module in modules:
        for t in module.buffers():
            tdist.broadcast(t, src=0)
    for module in weights_of:
        for t in module.parameters():
            tdist.broadcast(t.data, src=0)


def check_ranks_agree(model: nn.Module, dist: DistInfo) -> None:
    """After a distributed run every rank must hold the same weights and buffers; compare float64 checksums."""
    local = torch.stack([t.detach().double().sum() for t in model.state_dict().values()]).sum().reshape(1)
    gathered = [torch.zeros_like(local) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, local)
    sums = [g.item() for g in gathered]
    if dist.is_main:
        same = all(s == sums[0] for s in sums)
        log.info("weight checksums per rank: %s (%s)", sums, "identical" if same else "DIFFERENT")
        if not same:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")
