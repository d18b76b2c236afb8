"""What this process was given by whoever started it (SLURM, torchrun, the shell): the CPU threads it may use, and
under a plain `srun --ntasks=N`, its place in the process group (SLURM's variables as torchrun's)."""

from __future__ import annotations

import logging
import os
import re
import subprocess

import torch

log = logging.getLogger("cvt_train")
_default_threads = torch.get_num_threads()  # torch's choice at import, before anything changes it


def _ranks_on_this_node() -> int:
    """How many training processes share this node: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks of this step
    on this node (`2` or `2(x3)`), else 1."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or ""
    match = re.match(r"\d+", per_node)
    return int(match.group()) if match and os.environ.get("SLURM_STEP_ID") else 1


def intra_op_threads(requested: int | None) -> tuple[int, str]:
    """torch's intra-op threads for this process, and why: `trainer.threads` when set; else OMP_NUM_THREADS (set by
    the user, or by torchrun, which sets 1 per process unless it is set); else SLURM_CPUS_PER_TASK (what the job was
    given per task); else the CPUs this process may run on (its affinity, at most torch's default) shared among
    the ranks of this node.
    Loader workers are processes of their own and come on top (data.num_workers)."""
    if requested is not None:
        return requested, "trainer.threads"
    for var in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"{var}={value}"
    # torch's own default counts physical cores, the affinity logical CPUs (two per core with SMT): the fewer
    cpus, ranks = min(len(os.sched_getaffinity(0)), _default_threads), _ranks_on_this_node()
    return max(1, cpus // ranks), f"{cpus} CPUs for this process" + (f" / {ranks} ranks" if ranks > 1 else "")


MAX_AUTO_WORKERS = 16  # past this, more workers rarely help one GPU, and each holds its own buffers and file handles


def cpus_per_rank() -> int:
    """The CPUs this process may run on (its affinity: what SLURM, a container or taskset gave it), shared among the
    training ranks of this node."""
    return max(1, len(os.sched_getaffinity(0)) // _ranks_on_this_node())


def loader_workers(requested: int | None, device: torch.device) -> tuple[int, str]:
    """data.num_workers when set; else, on CUDA, this rank's CPUs but one (the training process needs a core for
    Python, kernel launches and copies), at most 16; on CPU 1 (the model's threads need the cores; one worker makes
    batches far faster than a CPU trains on them), 0 on a single CPU."""
    if requested is not None:
        return int(requested), "data.num_workers"
    cpus = cpus_per_rank()
    if device.type == "cuda":
        return min(MAX_AUTO_WORKERS, max(1, cpus - 1)), f"{cpus} CPUs for this rank, one kept for training"
    return (1 if cpus > 1 else 0), f"{cpus} CPUs for this rank, training on the CPU"


def set_threads(requested: int | None) -> int:
    """Apply intra_op_threads and log it once: two jobs that each start torch's default pool on a shared node
    thrash (seen on a 2-core SLURM node: 15 images/s per job instead of ~800)."""
    threads, why = intra_op_threads(requested)
    torch.set_num_threads(threads)
    log.info("threads: %d intra-op (%s)", threads, why)
    return threads


def export_srun_env() -> bool:
    """Under a plain `srun --ntasks=N cvt-train ...` (N > 1; no torchrun, no submitit), set the variables torchrun
    would from SLURM's: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID,
    MASTER_ADDR = the step's first host, MASTER_PORT from the job id (the same on every task, and apart between
    jobs); returns whether it did. Variables already set (by a site prolog, or torchrun) are kept."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if "RANK" in os.environ or tasks < 2 or "SLURM_PROCID" not in os.environ:
        return False
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or "localhost"
    os.environ.setdefault("MASTER_ADDR", first_host(nodes))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", str(tasks))
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(_ranks_on_this_node()))
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[03-05,09],cpu1` -> `gpu03`), by scontrol where it is installed."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^,\-\]]+))?", nodelist)  # without scontrol: the first name of the range
    return match.group(1) + (match.group(2) or "") if match else nodelist
