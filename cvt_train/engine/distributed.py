"""torchrun support: process group set-up, rank helpers, reductions, and what the trainer needs of them: rank-0 writes
that fail on every rank, rank 0's buffers for every rank, a check that the ranks ended with the same weights."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch import nn

from ..errors import UserError
from .allocation import export_srun_env

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
    """Join the process group torchrun (or a multi-task submitit job, or a plain `srun --ntasks=N`) describes in the
    environment (NCCL on GPU, gloo on CPU); else single process. timeout_min: how long a collective waits for the
    slowest rank (eight ranks compiling at once, or rank 0 writing a multi-GB checkpoint, can take well over torch's
    10-minute default)."""
    export_submitit_env() or export_srun_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not tdist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(minutes=timeout_min)
        store = group_store(rank, timeout)  # under torchrun; else env:// (MASTER_ADDR/PORT)
        tdist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **({"store": store, "rank": rank, "world_size": world_size} if store is not None else {}),
        )
    return DistInfo(rank, world_size, local_rank, device)


def group_store(rank: int, timeout: timedelta, connect_s: float = 10.0) -> tdist.Store | None:
    """Under torchrun: a store of this worker group's own, hosted by global rank 0 on a free port. None elsewhere.

    torchrun's agent hosts one store for every worker group it starts (`TORCHELASTIC_USE_AGENT_STORE=True`), and
    the group it starts after a worker died (`--max-restarts`) finds the dead group's keys still there: gloo's ranks
    read the dead workers' addresses and retry them ("failed to connect"), so the restarted group fails, using up
    the restarts, or waits out the collective timeout. Rank 0 publishes its store's port with a random token in the
    agent's store; every other rank skips the value it (as the rank's previous process) took before, and takes the
    value only once the store it names answers with the same token: a dead group's store is gone with its rank 0.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = tdist.PrefixStore(
        f"cvt_train/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/", tdist.TCPStore(host, port, None, False, timeout)
    )
    if rank == 0:
        store = tdist.TCPStore(host, 0, None, True, timeout, wait_for_workers=False)
        token = f"{store.port} {secrets.token_hex(8)}"
        store.set("token", token)
        agent.set("group_store", token)
        return store
    taken, deadline = f"taken/{rank}", time.monotonic() + timeout.total_seconds()
    while True:
        token = agent.get("group_store").decode()  # waits for the first rank 0 to publish
        if not agent.check([taken]) or agent.get(taken).decode() != token:
            try:
                store = tdist.TCPStore(host, int(token.split()[0]), None, False, timedelta(seconds=connect_s))
                if store.get("token").decode() == token:
                    agent.set(taken, token)
                    store.set_timeout(timeout)
                    return store
            except tdist.DistError as e:  # a dead group's rank 0 (its rank died before taking it)
                log.debug("rank %d: no store at port %s (%s); waiting for rank 0", rank, token.split()[0], e)
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: rank 0 published no process-group store within {timeout}")
        time.sleep(0.05)


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


def cleanup(graceful: bool = True) -> None:
    """Leave the process group. After an error (graceful=False) the group is left as it is for the exit to end: a
    group with a dead rank can hang in its teardown (NCCL), where the next thing should be torchrun's restart."""
    if graceful and tdist.is_initialized():
        tdist.destroy_process_group()


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective or the store failing because another rank is gone (killed, crashed, its node
    lost): gloo's transport errors ("Connection reset by peer", "Connection closed by peer"), torch's DistError
    (NCCL's errors and time-outs, the store's)."""
    return tdist.is_initialized() and (isinstance(error, tdist.DistError) or "gloo/transport" in str(error))


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
    if not dist.is_main:  # each rank says what it holds (on its own output: its node's log under multi-node)
        log.info("weight checksum of rank %d: %r", dist.rank, local.item())
    if dist.is_main:
        same = all(s == sums[0] for s in sums)
        log.info("weight checksums per rank: %s (%s)", sums, "identical" if same else "DIFFERENT")
        if not same:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")
