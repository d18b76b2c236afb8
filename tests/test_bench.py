"""cvt-bench end to end: a tiny CvT at 32x32 in a 2-job Hydra multirun (train and infer, each against HF)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# CvT-13's geometry with small widths; depth 3 in the last stage because HF's CvT needs depth > stage index.
TINY = [
    "model.stages.0.dim_embed=16",
    "model.stages.1.dim_embed=32",
    "model.stages.2.dim_embed=48",
    "model.stages.1.num_heads=2",
    "model.stages.2.num_heads=3",
    "model.stages.2.depth=3",
    "model.num_classes=10",
]
FAST = ["bench.resolution=32", "bench.batch_size=4", "bench.steps=2", "bench.warmup=1", "bench.peak_size=256"]


def cvt_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvt_train.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = cvt_bench("-m", *TINY, *FAST, "bench.mode=train,infer", "bench.compare=hf", f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.parametrize("job, mode", [(0, "train"), (1, "infer")])
def test_bench_json_against_hf(sweep, job, mode):
    proc, out = sweep
    res = json.loads((out / str(job) / "bench.json").read_text())
    assert res["mode"] == mode and res["compare"] == "hf" and res["act"] == "gelu"
    for key in (
        "images_per_s",
        "hf_images_per_s",
        "gmacs",
        "params",
        "tflops",
        "hf_tflops",
        "peak_tflops",
        "peak_fraction",
        "peak_memory_mb",
        "images_per_s_p25",
        "images_per_s_p75",
        "step_ms_median",
    ):
        assert res[key] > 0, key
    assert res["images_per_s_min"] <= res["images_per_s"] <= res["images_per_s_max"]
    assert res["ratio_vs_hf"] == pytest.approx(res["images_per_s"] / res["hf_images_per_s"])
    assert res["hf_max_abs_diff"] < 1e-4  # the same model: HF got our weights
    assert res["flops_per_step"] == res["hf_flops_per_step"]  # the same math, counted the same way
    assert res["params"] == 142_602 and isinstance(res["device"], str) and res["device"]
    assert res["peak_fraction"] == pytest.approx(res["tflops"] / res["peak_tflops"])
    if mode == "infer":  # GMACs are per image at the resolution; the measured step is one forward of the batch
        assert res["flops_per_step"] == pytest.approx(2e9 * res["gmacs"] * res["batch_size"])
    assert "ours / hf" in proc.stdout and "images/s" in proc.stdout


def test_train_step_flops_are_about_three_forwards(sweep):
    res = json.loads((sweep[1] / "0" / "bench.json").read_text())
    assert res["mode"] == "train"
    # forward + backward = 3 forwards, less the input gradient of the first conv (the images need none)
    assert res["flops_per_step"] == pytest.approx(3 * 2e9 * res["gmacs"] * res["batch_size"], rel=0.05)


def test_bench_without_compare_fp32(tmp_path):
    proc = cvt_bench(*TINY, *FAST, "trainer.precision=fp32", "bench.mode=infer", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["act"] == "quick_gelu" and "ratio_vs_hf" not in res and res["precision"] == "fp32"
    assert res["images_per_s"] > 0 and res["peak_matmul"] == "256x256 float32"


def test_bench_bad_input_is_one_line(tmp_path):
    proc = cvt_bench(*TINY, "bench.mode=fly", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: bench.mode='fly': unknown mode; choose one of train, infer (e.g. bench.mode=train)"
    ]


def test_bench_compare_without_transformers(tmp_path):
    fake = tmp_path / "fake"
    (fake / "transformers").mkdir(parents=True)
    (fake / "transformers" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")]))}
    proc = cvt_bench(*TINY, "bench.compare=hf", f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: bench.compare=hf needs HF transformers: pip install 'cvt-train[hf]'"
    ]


def test_bench_compare_eager_needs_compile(tmp_path):
    proc = cvt_bench(*TINY, "bench.compare=eager", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: bench.compare=eager compares the compiled model with the eager one: add bench.compile=true"
    ]


@pytest.mark.slow  # compiles the tiny model's forward: 15-35 s cold on 2 CPU cores
def test_bench_compiled_against_eager(tmp_path):
    proc = cvt_bench(
        *TINY, *FAST, "bench.mode=infer", "bench.compile=true", "bench.compare=eager", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["compile"] is True and res["compare"] == "eager" and res["act"] == "quick_gelu"
    for key in ("images_per_s", "eager_images_per_s", "eager_tflops", "eager_peak_fraction", "eager_peak_memory_mb"):
        assert res[key] > 0, key
    assert res["ratio_vs_eager"] == pytest.approx(res["images_per_s"] / res["eager_images_per_s"])
    assert res["eager_flops_per_step"] == res["flops_per_step"] and "ratio_vs_hf" not in res
    assert "ours / eager" in proc.stdout
