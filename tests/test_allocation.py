"""Threads and ranks from what started the process (engine/allocation.py), with the variables set by hand."""

from __future__ import annotations

import os
import subprocess

import pytest

from cvt_train.engine import allocation
from cvt_train.engine.allocation import export_srun_env, first_host, intra_op_threads

VARS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_ID",
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
        "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")  # fmt: skip


@pytest.fixture
def env(monkeypatch):
    for var in VARS:  # set, then removed: monkeypatch restores each as it was, also those export_srun_env sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(allocation, "_default_threads", 16)
    return monkeypatch


def test_threads_come_from_the_first_source_that_says(env):
    assert intra_op_threads(None) == (16, "16 CPUs for this process")
    env.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: four ranks share the node's CPUs
    assert intra_op_threads(None) == (4, "16 CPUs for this process / 4 ranks")
    env.setenv("SLURM_CPUS_PER_TASK", "6")
    assert intra_op_threads(None) == (6, "SLURM_CPUS_PER_TASK=6")
    env.setenv("OMP_NUM_THREADS", "2")
    assert intra_op_threads(None) == (2, "OMP_NUM_THREADS=2")
    assert intra_op_threads(3) == (3, "trainer.threads")


def test_torchs_default_caps_the_affinity(env):  # SMT: two logical CPUs per core, torch counts the cores
    env.setattr(allocation, "_default_threads", 8)
    assert intra_op_threads(None) == (8, "8 CPUs for this process")


def test_srun_tasks_share_the_affinity_of_their_node(env):
    env.setenv("SLURM_STEP_ID", "0")
    env.setenv("SLURM_STEP_TASKS_PER_NODE", "8(x2)")
    assert intra_op_threads(None) == (2, "16 CPUs for this process / 8 ranks")


def test_plain_srun_sets_torchruns_variables(env):
    env.setenv("SLURM_STEP_NUM_TASKS", "4")
    env.setenv("SLURM_PROCID", "3")
    env.setenv("SLURM_LOCALID", "1")
    env.setenv("SLURM_STEP_ID", "0")
    env.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
    env.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    env.setenv("SLURM_JOB_ID", "123456")
    env.setattr(subprocess, "run", _no_scontrol)
    assert export_srun_env()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
    }  # fmt: skip
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)


@pytest.mark.parametrize("preset", [{"SLURM_STEP_NUM_TASKS": "1"}, {"RANK": "0"}, {}])
def test_srun_leaves_one_task_torchrun_and_batch_scripts_alone(preset, env):
    env.setenv("SLURM_PROCID", "0")
    for key, value in preset.items():
        env.setenv(key, value)
    assert not export_srun_env()
    assert os.environ.get("WORLD_SIZE") is None


def _no_scontrol(*args, **kwargs):
    raise OSError("scontrol: not found")


@pytest.mark.parametrize(
    "nodelist, first", [("gpu[03-05,09],cpu1", "gpu03"), ("node7", "node7"), ("a1,b2", "a1"), ("n[1,4]", "n1")]
)
def test_first_host_of_a_nodelist_without_scontrol(nodelist, first, monkeypatch):
    monkeypatch.setattr(allocation.subprocess, "run", _no_scontrol)
    assert first_host(nodelist) == first
