"""scripts/gpu_check.py on a CPU with tiny sizes (`--device cpu --quick`, about a minute and a half on 2 cores):
every section runs in its own process and ends with status ok and the figures the GPU run fills in, no optimizer
step reads from the device; a section that runs past its time cap is recorded as such, the others kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
SECTIONS = ("bench", "precision", "resume", "syncs", "cifar_speed", "loader")


def gpu_check(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc = gpu_check("--out", str(out))
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), out


def test_every_section_ok(quick_run):
    proc, report, _ = quick_run
    status = {name: report["sections"][name]["status"] for name in SECTIONS}
    details = {
        n: report["sections"][n].get("failed_checks") or report["sections"][n].get("output_tail")
        for n, s in status.items()
        if s != "ok"
    }
    assert status == dict.fromkeys(SECTIONS, "ok"), details
    assert proc.returncode == 0
    meta = report["meta"]
    assert meta["quick"] is True and meta["device"] == "cpu" and meta["compile_backend"] == "aot_eager"
    assert meta["total_s"] < meta["budget_s"]
    for name in SECTIONS:  # the final table: one row per section
        assert any(line.startswith(name) and " ok " in line for line in proc.stdout.splitlines()), name


def test_bench(quick_run):
    bench = quick_run[1]["sections"]["bench"]
    assert set(bench["runs"]) == {"train_eager", "train_compiled", "infer_eager", "infer_compiled"}
    for name, run in bench["runs"].items():
        for key in ("images_per_s", "tflops", "peak_tflops", "mfu", "peak_memory_mb", "flops_per_step"):
            assert run[key] > 0, (name, key)
        assert run["precision"] == "bf16" and run["compile"] == name.endswith("compiled")
        assert run["mfu"] == pytest.approx(run["tflops"] / run["peak_tflops"])
    assert set(bench["compile_speedup"]) == {"train", "infer"}
    sdpa = bench["sdpa"]
    # CPU: inference runs SDPA (its flash kernel) in every block; training uses matmul-softmax-matmul there
    assert sdpa["backends"]["infer"] == ["flash"] and sdpa["sdpa_calls"]["infer"] == sdpa["attention_blocks"]
    assert sdpa["backends"]["train"] == [] and "summary" in sdpa


def test_precision(quick_run):
    prec = quick_run[1]["sections"]["precision"]
    assert set(prec["curves"]) == {"fp32", "bf16", "fp16", "fp32_seed1"}
    steps = [h["step"] for h in prec["curves"]["fp32"]]
    assert steps == [2, 4, 6]  # --quick: 6 steps, a log point every 2
    for name in ("bf16", "fp16", "fp32_seed1"):
        comparison = prec["vs_fp32"][name]
        assert comparison["same_log_steps"] and comparison["max_rel_diff"] >= comparison["last_windows_rel_diff"] >= 0
    assert prec["runs"]["bf16"]["skipped"] == 0 and prec["runs"]["fp32"]["skipped"] == 0
    assert prec["vs_fp32"]["bf16"]["last_windows_rel_diff"] <= prec["tolerance"]["rel"] == 0.10


def test_resume(quick_run):
    resume = quick_run[1]["sections"]["resume"]
    assert resume["exit_codes"] == {"killed": -9, "resumed": 0, "uninterrupted": 0}
    assert resume["at_kill"] == {"epoch": 1, "step": 0, "global_step": 4}  # epoch 1 done and saved, then killed
    assert resume["resumed"]["epoch"] == 2 and resume["resumed"]["global_step"] == 8
    assert resume["weights_identical"] and resume["resumed"] == resume["uninterrupted"]  # bit-exact on CPU
    assert resume["resumed"]["ema_top1"] is not None


def test_no_host_read_per_optimizer_step(quick_run):
    syncs = quick_run[1]["sections"]["syncs"]
    assert set(syncs["per_step"]) == {"ema_off", "ema_on"}
    for ema, figures in syncs["per_step"].items():
        assert figures["host_reads"] == 0, (ema, figures["growing_reads"])
        assert figures["cuda_sync_warnings"] is None  # CPU: HostReads only
    assert all(run["host_reads"] > 0 for run in syncs["runs"].values())  # evaluation and saving do read


def test_cifar_speed(quick_run):
    models = quick_run[1]["sections"]["cifar_speed"]["models"]
    assert set(models) == {"cvt_cifar_tiny", "cvt13_cifar"}
    for m in models.values():
        assert m["eager"]["images_per_s"] > 0 and m["compiled"]["images_per_s"] > 0
        assert m["speedup"] == pytest.approx(m["compiled"]["images_per_s"] / m["eager"]["images_per_s"])


def test_timeout_keeps_the_other_sections(quick_run, tmp_path):
    """`--sections syncs` with a 1-second cap: syncs is killed and recorded as a timeout with its last output;
    the other sections of the existing report stay as they were."""
    _, report, out = quick_run
    copy = tmp_path / "gpu_check.json"
    shutil.copy(out, copy)
    proc = gpu_check("--out", str(copy), "--sections", "syncs", "--cap", "syncs=1", timeout=60)
    assert proc.returncode == 1
    updated = json.loads(copy.read_text())
    syncs = updated["sections"]["syncs"]
    assert syncs["status"] == "timeout" and syncs["returncode"] is None and "output_tail" in syncs
    assert {n: updated["sections"][n] for n in SECTIONS if n != "syncs"} == {
        n: report["sections"][n] for n in SECTIONS if n != "syncs"
    }
    assert any(line.startswith("syncs") and "timeout" in line for line in proc.stdout.splitlines())


def test_unknown_section_is_refused(tmp_path):
    proc = gpu_check("--out", str(tmp_path / "x.json"), "--sections", "bench,speed", timeout=60)
    assert proc.returncode != 0 and "unknown speed" in proc.stderr


def test_loader(quick_run):
    loader = quick_run[1]["sections"]["loader"]
    assert set(loader["runs"]) == {"scaled"}  # decode=gpu only where CUDA is
    assert loader["runs"]["scaled"]["images_per_s"] > 0 and loader["runs"]["scaled"]["augment_on"] == "workers"
    assert loader["stage"]["ms_per_batch"] > 0 and loader["stage"]["syncs"] == 0
