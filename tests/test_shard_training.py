"""data.format=shards end to end: shards written by scripts/make_shards.py give the same images as the folder they
came from, keep the loader's contract (any number of workers, mid-epoch resume, disjoint ranks with equal steps),
read shard-locally, and train and resume exactly with one and with two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from fakedata import write_image_folder
from test_train import FAST, _stop_at

from cvt_train.data import build_data
from cvt_train.engine.trainer import train

pytest.importorskip("wids", reason="data.format=shards needs wids (pip install 'cvt-train[shards]')")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder_and_shards(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("shards")
    folder = write_image_folder(base / "folder", {"train": 240, "test": 60}, num_classes=4, size=16)
    shards = base / "shards"
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_shards.py"), str(folder), str(shards), "--shard-size", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert len(list((shards / "train").glob("*.tar"))) == 12
    return folder, shards


def cfg_for(root: Path, fmt: str, **over):
    overrides = [
        *FAST,
        "data=folder",
        f"data.root={root}",
        f"data.format={fmt}",
        "data.num_classes=4",
        "data.image_size=16",
        "data.batch_size=8",
        "data.in_memory=false",
        "aug=imagenet",
        "data.shard_window=2",
    ]
    return compose_train([*overrides, *(f"{k}={v}" for k, v in over.items())])


def batches(data, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in data.train_batches(epoch, start)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_shards_hold_the_folders_images(folder_and_shards):
    folder, shards = folder_and_shards
    from_shards, from_files = build_data(cfg_for(shards, "shards")), build_data(cfg_for(folder, "files"))
    assert from_shards.classes == from_files.classes and torch.equal(
        from_shards._train.labels, from_files._train.labels
    )
    val_s = [torch.cat(t) for t in zip(*from_shards.val_batches())]
    val_f = [torch.cat(t) for t in zip(*from_files.val_batches())]
    assert all(torch.equal(a, b) for a, b in zip(val_s, val_f)) and len(val_s[0]) == 60  # eval: fixed order


def test_shard_batches_any_workers_resume_and_ranks(folder_and_shards):
    _, shards = folder_and_shards
    ref = build_data(cfg_for(shards, "shards"))
    full = batches(ref, epoch=1)
    assert len(full) == 30 and full[0][1].shape == (8, 4)  # mixing on: soft targets
    assert same(batches(ref, epoch=1, start=17), full[17:])  # mid-epoch resume
    workers = build_data(cfg_for(shards, "shards", **{"data.num_workers": 2, "data.augment_on": "device"}))
    assert same(batches(workers, epoch=1), full)
    assert same(batches(workers, epoch=1, start=5), full[5:])
    workers.close()
    # shard-local order: with a window of 2 shards, each stretch of 40 samples comes from 2 shards
    shard_of = torch.arange(240) // 20
    order = ref.order.rank_order(1)
    windows = shard_of[order].view(-1, 40)
    assert all(len(set(w.tolist())) == 2 for w in windows)
    assert sorted(order.tolist()) == list(range(240))  # every sample once
    # two ranks: disjoint, together everything, the same number of steps
    ranks = [build_data(cfg_for(shards, "shards"), rank=r, world_size=2) for r in (0, 1)]
    mine = [set(d.order.rank_order(1).tolist()) for d in ranks]
    assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == 240
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 15


def test_shards_train_and_resume_exactly_one_rank(folder_and_shards, tmp_path, monkeypatch):
    _, shards = folder_and_shards
    over = {"trainer.epochs": 2, "trainer.precision": "fp32"}
    train(cfg_for(shards, "shards", **over), tmp_path / "full")
    with monkeypatch.context() as m:
        _stop_at(m, 40)  # mid-epoch 2 (30 steps per epoch)
        train(cfg_for(shards, "shards", **over), tmp_path / "cut")
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert cut["epoch"] == 1 and 0 < cut["step"] < 30  # stopped mid-epoch 2
    train(cfg_for(shards, "shards", **over, **{"trainer.resume": "auto"}), tmp_path / "cut")
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def torchrun(args: list[str], cwd: Path, port: int, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    return subprocess.run(
        [*cmd, "-m", "cvt_train.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_shards_train_and_resume_exactly_two_ranks(folder_and_shards, tmp_path):
    """Two ranks on shards: killed in epoch 2 (both ranks SIGKILL themselves at step 20), then resumed from epoch
    1's last.pt, the run ends with the uninterrupted run's weights and metrics."""
    _, shards = folder_and_shards
    args = [
        *FAST,
        "data=folder",
        f"data.root={shards}",
        "data.format=shards",
        "data.num_classes=4",
        "data.image_size=16",
        "data.batch_size=8",
        "data.in_memory=false",
        "aug=imagenet",
        "trainer.epochs=2",
        "trainer.precision=fp32",
    ]
    full = torchrun([*args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path, 29741)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "world size 2" in (tmp_path / "full" / "train.log").read_text()
    cut_args = [*args, f"hydra.run.dir={tmp_path / 'cut'}", "trainer.resume=auto"]
    killed = torchrun(cut_args, tmp_path, 29742, {"CVT_FAULT_INJECT": "kill_at=step:20"})
    assert killed.returncode != 0 and torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = torchrun(cut_args, tmp_path, 29743)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (tmp_path / "cut" / "train.log").read_text()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "cut")]
    assert metrics[0]["top1"] == metrics[1]["top1"] and metrics[0]["loss"] == metrics[1]["loss"]
