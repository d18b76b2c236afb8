"""The trainer end to end on tiny generated data: learning, resuming, sweeps, torchrun, cvt-eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from fakedata import write_cifar10_python, write_image_folder

from cvt_train.engine import trainer as trainer_module
from cvt_train.engine.trainer import train
from cvt_train.errors import UserError

# trainer.device=cpu: bit-exact comparisons (resume, ranks, eval) hold on CPU; on CUDA, cuDNN's algorithm choice
# and atomic adds change the last bits (README, Reproducibility)
FAST = [
    "trainer.device=cpu",
    "model=cvt_cifar_tiny",
    "trainer.progress=false",
    "data.num_workers=0",
    "data.batch_size=50",
    "optim.lr=2e-3",
    "sched.warmup_epochs=0",
]


def run_cli(args: list[str], cwd: Path, module: str = "cvt_train.train", timeout: int = 600, env=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def cifar_py(tmp_path_factory) -> Path:
    return write_cifar10_python(tmp_path_factory.mktemp("cifar"), n_train=500, n_test=200)


@pytest.mark.parametrize("layout", ["cifar_python", "image_folder"])
def test_learns_far_above_chance_on_unseen_data(layout, tmp_path, cifar_py):
    if layout == "cifar_python":
        root = cifar_py
    else:
        root = write_image_folder(tmp_path / "folder", {"train": 400, "test": 200})
    cfg = compose_train(
        [*FAST, "data=cifar10", f"data.root={root}", "trainer.epochs=3", f"data.cache_dir={tmp_path / 'cache'}"]
    )
    best = train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["images"] == 200  # the held-out test split, each image once
    assert metrics["top1"] > 60.0, metrics  # chance is 10%
    assert best == metrics["best_top1"] >= metrics["top1"]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 0 and isinstance(ckpt["config"], dict)
    assert (tmp_path / "run" / "best.pt").is_file() and list((tmp_path / "run" / "tb").iterdir())


def _stop_at(monkeypatch, global_step: int):
    """Make the loop see a stop request (as after SIGTERM) once `global_step` optimizer steps are done."""
    calls = {"n": 0}

    def requested(self, device):
        calls["n"] += 1
        return calls["n"] == global_step

    monkeypatch.setattr(trainer_module.StopRequest, "requested", requested)


@pytest.mark.parametrize(
    "stop_step,extra",
    [
        (10, []),
        (7, ["trainer.ema.enabled=true", "trainer.accum_steps=1", "aug.mixup_alpha=0.8", "aug.cutmix_alpha=1.0"]),
    ],
)
def test_resume_equals_uninterrupted(stop_step, extra, tmp_path, cifar_py, monkeypatch):
    """10 optimizer steps per epoch: stopping after 10 is the end of an epoch before its evaluation, 7 mid-epoch."""
    overrides = [
        *FAST,
        "data=cifar10",
        f"data.root={cifar_py}",
        "trainer.epochs=3",
        "trainer.precision=fp32",
        "model.stages.2.drop_path_rate=0.2",
        *extra,
    ]
    train(compose_train(overrides), tmp_path / "full")

    with monkeypatch.context() as m:
        _stop_at(m, stop_step)
        train(compose_train(overrides), tmp_path / "cut")
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (cut["epoch"], cut["step"]) == (0, stop_step)
    train(compose_train([*overrides, "trainer.resume=auto"]), tmp_path / "cut")

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        if full[key] is not None:
            for name, tensor in full[key].items():
                assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    for name in ("top1", "top5", "loss", "best_top1"):
        assert (
            json.loads((tmp_path / "full" / "metrics.json").read_text())[name]
            == json.loads((tmp_path / "cut" / "metrics.json").read_text())[name]
        )


@pytest.mark.parametrize("fmt,file_classes", [("official", 1000), ("hf", 10)])
def test_init_from_loads_weights_and_swaps_a_foreign_head(fmt, file_classes, tmp_path, cifar_py, caplog):
    """trainer.init_from: every weight of the file is where training starts (lr 0 keeps it there); a head for
    another class count is replaced by a fresh one."""
    from conftest import randomize

    from cvt_train import create_model
    from cvt_train.models.convert import to_format

    source = randomize(create_model("cvt_cifar_tiny", num_classes=file_classes), seed=3)
    torch.save(to_format(source.state_dict(), fmt), tmp_path / "weights.pth")
    cfg = compose_train(
        [
            *FAST,
            "data=cifar10",
            f"data.root={cifar_py}",
            "trainer.epochs=1",
            "optim.lr=0",
            "sched=constant",
            "trainer.max_steps_per_epoch=2",
            f"trainer.init_from={tmp_path / 'weights.pth'}",
        ]
    )
    with caplog.at_level("INFO", logger="cvt_train"):
        train(cfg, tmp_path / "run")
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    for name, p in source.named_parameters():
        if name.startswith("head.") and file_classes != 10:
            assert trained[name].shape[0] == 10 and not torch.equal(trained[name][:10], p[:10])
        else:
            assert torch.equal(trained[name], p), name
    assert f"({fmt} format), classifier {'re-initialised' if file_classes != 10 else 'included'}" in caplog.text


def test_init_from_of_another_model_names_the_key(tmp_path, cifar_py):
    from cvt_train import create_model

    torch.save(create_model("cvt_cifar_small").state_dict(), tmp_path / "small.pt")
    cfg = compose_train([*FAST, "data=cifar10", f"data.root={cifar_py}", f"trainer.init_from={tmp_path / 'small.pt'}"])
    with pytest.raises(UserError, match=r"trainer.init_from=.*small.pt: .*shape mismatch"):
        train(cfg, tmp_path / "run")
    cfg.trainer.init_from = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"trainer.init_from: .*missing.pt does not exist"):
        train(cfg, tmp_path / "run")


def test_sweep_writes_every_run_and_a_summary(tmp_path, cifar_py):
    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "-m",
            *FAST,
            "data=cifar10",
            f"data.root={cifar_py}",
            "trainer.epochs=1",
            "model.stages.0.patch_stride=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file() and (sweep / job / "last.pt").is_file()
    summary = (sweep / "summary.md").read_text()
    assert "model.stages.0.patch_stride" in summary and "top1" in summary
    assert len((sweep / "summary.csv").read_text().strip().splitlines()) == 3
    gmacs = [json.loads((sweep / j / "metrics.json").read_text())["gmacs"] for j in ("0", "1")]
    assert gmacs[0] > 2 * gmacs[1]  # stride 1 keeps a 4x larger first map


def test_torchrun_two_processes_match_single_process_eval(tmp_path, cifar_py):
    """Run as a (one-job) sweep, which is where rank 1 used to write Hydra's files into the working dir."""
    sweep = tmp_path / "ddp"
    run_dir = sweep / "0"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29731",
        "-m",
        "cvt_train.train",
        "-m",
        *FAST,
        "data=cifar10",
        f"data.root={cifar_py}",
        "trainer.epochs=2",
        "trainer.precision=fp32",
        "trainer.device=cpu",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 wrote nothing here
    assert {"0", "multirun.yaml", "summary.md", "summary.csv"} <= {p.name for p in sweep.iterdir()}
    log = (run_dir / "train.log").read_text()
    assert "(identical)" in log, log[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images"] == 200

    evaluated = run_cli(
        [
            f"ckpt={run_dir / 'last.pt'}",
            "trainer.precision=fp32",
            "eval.progress=false",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
        module="cvt_train.eval",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    single = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert single["images"] == 200 and single["top1"] == metrics["top1"] and single["top5"] == metrics["top5"]
    # the same model on every rank (BatchNorm statistics included), so the same loss up to summation order
    assert single["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


JPEG_ROOT = Path(os.environ.get("CVT_CIFAR10_JPEG", "/tmp/cifar10"))  # ../shared/data/README: where it is unpacked


@pytest.mark.skipif(
    not (JPEG_ROOT / "train").is_dir(), reason=f"no CIFAR-10 JPEGs at {JPEG_ROOT} (set CVT_CIFAR10_JPEG)"
)
def test_cifar10_jpeg_training_images_with_a_held_out_split(tmp_path):
    """The README's command on the 50,000 training JPEGs (a few steps): a fixed 45,000 / 5,000 split."""
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "model=cvt13",
            "data=cifar10",
            f"data.root={JPEG_ROOT}",
            "data.val_split=0.1",
            "trainer.epochs=1",
            "trainer.max_steps_per_epoch=5",
            "data.val_subset=512",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "45000 train / 512 val images, 10 classes" in (run_dir / "train.log").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["images"] == 512 and metrics["epoch"] == 1 and 0 <= metrics["data_wait"] < 1
