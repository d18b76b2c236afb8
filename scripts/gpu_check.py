#!/usr/bin/env python
"""GPU check (issue 11, point 6): what a CPU cannot settle, measured on one GPU in under 6 minutes -> one JSON.

On the GPU machine (Python 3.12, torch 2.11, tqdm, tensorboard, PyYAML; no internet), from a bare checkout that
carries the git-ignored folder .whl/ along:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT/gpu_check.json

.whl/ holds the pure-Python wheels that machine lacks, made on a machine that reaches PyPI (`/.whl/` is in
.git/info/exclude); antlr4-python3-runtime 4.9.3 (what hydra 1.3 pins) is an sdist only, so its wheel is built:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
    python3 -m pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl

(hydra's one other requirement, `packaging`, comes with tensorboard.) On a CPU, with tiny sizes, all sections in
well under 2 minutes on 2 cores (what tests/test_gpu_check.py runs):

    python scripts/gpu_check.py --device cpu --quick

Sections (`--sections a,b` runs a subset and keeps the other sections of an existing --out file):
  bench        CvT-13 at 224, bf16: training and inference images/s eager and compiled (cvt_train.bench.run),
               MFU against the bf16 matmul peak timed in the same run, peak memory; which SDPA kernel ran
               (torch.profiler op and kernel names).
  precision    fp32, bf16, fp16 + GradScaler training of the quickstart recipe from one seed through the real
               Trainer: the loss curves (trainer.log_history) against fp32's, steps skipped; plus fp32 with
               another seed, which measures how far two equally good runs drift apart.
  resume       `python -m cvt_train.train` with EMA SIGKILLed in its second epoch (CVT_FAULT_INJECT), resumed
               with trainer.resume=auto, against an uninterrupted run.
  syncs        host reads per optimizer step (HostReads; on CUDA also torch.cuda.set_sync_debug_mode warnings):
               (count over B steps - count over A steps) / (B - A), EMA off and on; expected 0.
  cifar_speed  cvt_cifar_tiny and cvt13_cifar at 32x32, batch 256: training images/s eager vs
               torch.compile(mode="reduce-overhead") (CUDA graphs), timed alternately.
  loader       the ImageNet input pipeline (issue 12) on generated 500x375 JPEGs, aug=imagenet, batch 256:
               images/s of Data.train_batches with data.decode=scaled (CPU workers) and =gpu (nvJPEG); the batch
               stage's time per batch on the device (CUDA events) and its CUDA syncs (set_sync_debug_mode, expected
               none); nvJPEG's batches against libjpeg-turbo's on the same crops.

Each section runs in a subprocess of its own (`--section NAME`, which writes its figures to a part file as it
measures them) under its own time cap, and the whole run under --budget; the parent merges each section into
--out as it ends. A section that fails, or hangs and is killed, keeps whatever it had measured, with its status
(ok, failed: a check did not hold, error, timeout, skipped) and its last output lines.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("bench", "precision", "resume", "syncs", "cifar_speed", "loader")  # the report's order
# The run's order: the checks first (each well under a minute on a GPU), then the measurements whose time goes
# mostly into torch.compile (CvT-13's training and inference graphs, two training graphs in cifar_speed), so that
# a slow compile costs figures of its own section only.
RUN_ORDER = ("precision", "resume", "syncs", "loader", "bench", "cifar_speed")
# Time cap of each section in seconds, (GPU, CPU). The whole run stops at --budget: on a GPU under 6 minutes with
# start-up and pip install, so that a rerun fits in 15 minutes of device time.
CAPS = {
    "bench": (170, 90),
    "precision": (70, 60),
    "resume": (70, 60),
    "syncs": (50, 50),
    "cifar_speed": (130, 60),
    "loader": (60, 60),
}
BUDGET_S = 380
# CvT-13's geometry with small widths and depths (tests/conftest.py's TINY): the --quick CPU stand-in for CvT-13.
TINY = (
    "model.stages.0.dim_embed=16",
    "model.stages.1.dim_embed=32",
    "model.stages.2.dim_embed=48",
    "model.stages.1.num_heads=2",
    "model.stages.2.num_heads=3",
    "model.stages.1.depth=1",
    "model.stages.2.depth=2",
)
LOSS_TOLERANCE = 0.10  # precision: mean loss of the last log windows within 10% of fp32's (see section_precision)


# ------------------------------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each section runs: the real thing on a GPU, a handful of tiny steps with --quick."""

    bench_model: tuple[str, ...]  # bench: model overrides
    bench_resolution: int
    bench_batch: dict  # per bench.mode
    bench_steps: int
    bench_warmup: int
    peak_size: int | None  # side of the peak matmul (None: bench's default, 4096 on CUDA)
    train_epochs: int  # precision: epochs x steps per epoch optimizer steps
    train_steps_per_epoch: int
    log_every: int
    resume_steps_per_epoch: int  # resume: 2 epochs of this many steps
    sync_steps: tuple[int, int]  # syncs: the two run lengths A < B
    cifar_models: dict  # cifar_speed: model -> its overrides
    cifar_batch: int
    cifar_steps: int
    cifar_warmup: int

    @staticmethod
    def pick(device: str, quick: bool) -> Sizes:
        if not quick:
            return GPU_SIZES
        return GPU_QUICK if device == "cuda" else CPU_QUICK


GPU_SIZES = Sizes(
    bench_model=("model=cvt13",),
    bench_resolution=224,
    bench_batch={"train": 128, "infer": 256},
    bench_steps=20,
    bench_warmup=5,
    peak_size=None,
    train_epochs=15,
    train_steps_per_epoch=20,
    log_every=10,
    resume_steps_per_epoch=20,
    sync_steps=(8, 16),
    cifar_models={"cvt_cifar_tiny": (), "cvt13_cifar": ()},
    cifar_batch=256,
    cifar_steps=20,
    cifar_warmup=5,
)
# --quick on a GPU: the same models, a few steps (reduce-overhead needs ~3 warm-up calls to record its graphs).
GPU_QUICK = dataclasses.replace(
    GPU_SIZES,
    bench_batch={"train": 32, "infer": 64},
    bench_steps=5,
    bench_warmup=3,
    train_epochs=2,
    train_steps_per_epoch=10,
    log_every=5,
    resume_steps_per_epoch=6,
    sync_steps=(4, 8),
    cifar_batch=64,
    cifar_steps=5,
    cifar_warmup=3,
)
# --quick on a CPU: tiny models too.
CPU_QUICK = dataclasses.replace(
    GPU_QUICK,
    bench_model=("model=cvt13", *TINY),
    bench_resolution=32,
    bench_batch={"train": 4, "infer": 4},
    bench_steps=3,
    bench_warmup=1,
    peak_size=256,
    train_epochs=1,
    train_steps_per_epoch=6,
    log_every=2,
    resume_steps_per_epoch=4,
    sync_steps=(2, 4),
    cifar_models={"cvt_cifar_tiny": (), "cvt13_cifar": TINY},
    cifar_batch=8,
    cifar_steps=3,
)


# ------------------------------------------------------------------------------------------------- helpers
def say(*parts) -> None:
    print(*parts, flush=True)


def compose(config: str, overrides: list[str]):
    """A config of the project as its CLI would compose it (nothing runs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        return hydra_compose(config_name=config, overrides=list(overrides))


def train_config(args, overrides: list[str]):
    """The quickstart recipe (cvt_cifar_tiny on the embedded digits, offline) on args.device, quiet."""
    return compose(
        "train", ["experiment=quickstart", f"trainer.device={args.device}", "trainer.progress=false", *overrides]
    )


def free_memory() -> None:
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def default_compile_backend(backend: str):
    """cvt_train.bench calls torch.compile(model) with no options; with --backend other than inductor (the CPU
    --quick default, aot_eager: Inductor's code generation takes minutes per graph on 2 cores) it gets that one."""
    import torch

    original = torch.compile
    if backend != "inductor":
        torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else math.inf


class Results(dict):
    """A section's figures, written to its part file at every top-level assignment: a section killed by its cap
    leaves what it had measured."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        write_json(self.path, dict(self))


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- 1. bench
def section_bench(args, sizes: Sizes, res: Results, work: Path) -> None:
    """cvt-bench's own measurement (bench.run) four times: train / infer x eager / compiled."""
    import torch

    from cvt_train import bench

    torch.backends.cudnn.benchmark = True  # as the trainer runs on CUDA
    res["sdpa"] = sdpa = sdpa_backends(args, sizes)  # first: seconds, and kept if a compile runs out of time
    say(f"SDPA: {sdpa['summary']}")
    runs = {}
    for compiled in (False, True):
        for mode in ("train", "infer"):
            name = f"{mode}_{'compiled' if compiled else 'eager'}"
            cfg = compose(
                "bench",
                [
                    *sizes.bench_model,
                    f"device={args.device}",
                    "trainer.precision=bf16",
                    f"bench.mode={mode}",
                    f"bench.batch_size={sizes.bench_batch[mode]}",
                    f"bench.resolution={sizes.bench_resolution}",
                    f"bench.steps={sizes.bench_steps}",
                    f"bench.warmup={sizes.bench_warmup}",
                    f"bench.compile={str(compiled).lower()}",
                    *([f"bench.peak_size={sizes.peak_size}"] if sizes.peak_size else []),
                ],
            )
            t = time.perf_counter()
            with default_compile_backend(args.backend):
                r = bench.run(cfg)
            r.update(
                seconds=round(time.perf_counter() - t, 1),
                mfu=r["peak_fraction"],
                compile_backend=args.backend if compiled else None,
            )
            runs[name] = r
            res["runs"] = runs
            say(
                f"{name}: {r['images_per_s']:.1f} img/s, {r['tflops']:.2f} TFLOP/s = {100 * r['mfu']:.1f}% of "
                f"{r['peak_tflops']:.1f} (matmul peak), peak memory {r['peak_memory_mb']:.0f} MB ({r['seconds']} s)"
            )
            free_memory()
    res["compile_speedup"] = {
        m: runs[f"{m}_compiled"]["images_per_s"] / runs[f"{m}_eager"]["images_per_s"] for m in ("train", "infer")
    }
    res["checks"] = {
        "all_runs_measured": all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in runs.values()),
        "sdpa_seen": bool(sdpa["ops"]["infer"]),
    }
    res["summary"] = [
        *(
            f"{m}: eager {runs[m + '_eager']['images_per_s']:,.0f} img/s (MFU {100 * runs[m + '_eager']['mfu']:.1f}%), "
            f"compiled {runs[m + '_compiled']['images_per_s']:,.0f} (MFU {100 * runs[m + '_compiled']['mfu']:.1f}%) "
            f"x{res['compile_speedup'][m]:.2f}; peak mem {runs[m + '_eager']['peak_memory_mb']:,.0f} / "
            f"{runs[m + '_compiled']['peak_memory_mb']:,.0f} MB"
            for m in ("train", "infer")
        ),
        f"{runs['train_eager']['model']} {sizes.bench_resolution}px bf16, batch {sizes.bench_batch['train']} / "
        f"{sizes.bench_batch['infer']}; matmul peak {runs['train_eager']['peak_tflops']:.1f} TFLOP/s "
        f"({runs['train_eager']['peak_matmul']})",
        f"SDPA ran: {sdpa['summary']}",
    ]


# The ops SDPA dispatches to, by backend (forward names; their backward ops carry the same words).
SDPA_BACKENDS = {
    "flash": "flash",
    "efficient": "efficient_attention",
    "cudnn": "cudnn_attention",
    "math": "attention_math",
    "overrideable": "overrideable",
}


def sdpa_backends(args, sizes: Sizes) -> dict:
    """Which SDPA implementation runs in the model, eager, bf16: one training step (forward and backward) and one
    inference forward under torch.profiler; the aten ops scaled_dot_product_attention dispatched to are counted,
    and on CUDA the attention kernels' names kept. (On CPU the model computes small training attentions as
    matmul-softmax-matmul, not SDPA: see cvt_train/models/layers.py.)"""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from cvt_train import create_model

    device = torch.device(args.device)
    cfg = compose("bench", list(sizes.bench_model))
    torch.manual_seed(0)
    model = create_model(cfg.model).to(device)
    batch = min(8, sizes.bench_batch["train"])
    x = torch.randn(batch, 3, sizes.bench_resolution, sizes.bench_resolution, device=device)
    y = torch.randint(0, model.cfg.num_classes, (batch,), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    blocks = sum(s.depth for s in model.cfg.stages)

    def step(mode: str) -> None:
        if mode == "train":
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                model(x)

    ops, kernels = {}, {}
    for mode in ("train", "infer"):
        step(mode)  # warm-up: lazy initialisation, cuDNN autotuning
        with profile(activities=activities) as prof:
            step(mode)
            if device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        ops[mode] = {
            e.key: e.count
            for e in events
            if e.key.startswith(("aten::_scaled_dot_product", "aten::scaled_dot_product"))
        }
        kernels[mode] = sorted(
            {
                e.key[:120]
                for e in events
                if device.type == "cuda"
                and e.device_type.name == "CUDA"
                and any(w in e.key.lower() for w in ("flash", "fmha", "attention", "sdpa", "attn"))
            }
        )
    backends = {
        mode: sorted({b for b, word in SDPA_BACKENDS.items() for op in ops[mode] if word in op}) for mode in ops
    }
    sdpa_calls = {mode: ops[mode].get("aten::scaled_dot_product_attention", 0) for mode in ops}
    summary = "; ".join(
        f"{mode} {'+'.join(backends[mode]) or 'none'} ({sdpa_calls[mode]} of {blocks} attention blocks)" for mode in ops
    )
    head_dims = sorted({s.dim_embed // s.num_heads for s in model.cfg.stages})
    model = None  # frees it (`step` shares the variable, so it is emptied rather than deleted)
    free_memory()
    return {
        "backends": backends,
        "sdpa_calls": sdpa_calls,
        "attention_blocks": blocks,
        "ops": ops,
        "kernels": kernels,
        "expected": "flash" if device.type == "cuda" else None,
        "as_expected": (all(b == ["flash"] for b in backends.values()) if device.type == "cuda" else None),
        "head_dims": head_dims,
        "summary": summary,
    }


# ------------------------------------------------------------------------------------------ 2. precision
def section_precision(args, sizes: Sizes, res: Results, work: Path) -> None:
    """The quickstart recipe through the real Trainer at fp32, bf16 and fp16 (GradScaler) from seed 0, and fp32
    from seed 1; the loss curves are trainer.log_history (mean loss per window of trainer.log_every steps).

    Tolerance: bf16 and fp16 pass when the mean loss over the last (up to) 5 windows is within 10% of fp32's.
    One seed means one data order, initialisation and dropout, so the precisions follow one trajectory and drift
    apart by rounding alone: on CPU, 300 steps of this recipe end 1.5% apart (bf16 vs fp32, loss ~0.1 over the
    last 50 steps), while another seed ends 10-22% away (fp32 seeds 1 and 2 vs 0; the fp32_seed1 run measures it
    here too). 10% is the nearest other seed: a precision whose run drifts like a different run, or stalls or
    diverges (an overflow, a lost loss scale, a wrong cast: tens of percent to orders of magnitude), fails. The
    largest per-window difference is reported as well (single windows of 10 steps are noisier)."""
    from cvt_train.engine.trainer import Trainer

    runs = {"fp32": ("fp32", 0), "bf16": ("bf16", 0), "fp16": ("fp16", 0), "fp32_seed1": ("fp32", 1)}
    epochs, steps = sizes.train_epochs, sizes.train_steps_per_epoch
    curves, finals = {}, {}
    for name, (precision, seed) in runs.items():
        # fp32 as IEEE fp32 (trainer.tf32=false): the reference, not TF32's 10-bit mantissa (CUDA's default here)
        cfg = train_config(
            args,
            [
                f"trainer.precision={precision}",
                f"trainer.seed={seed}",
                f"trainer.epochs={epochs}",
                f"trainer.tf32={str(precision != 'fp32').lower()}",
                f"trainer.max_steps_per_epoch={steps}",
                f"trainer.log_every={sizes.log_every}",
                f"trainer.eval_every={epochs}",
            ],
        )
        t = time.perf_counter()
        trainer = Trainer(cfg, work / name)
        trainer.fit()
        curves[name] = [{k: h[k] for k in ("step", "loss", "skipped")} for h in trainer.log_history]
        finals[name] = {
            "val_top1": trainer.progress.metrics.get("top1"),
            "steps": trainer.progress.global_step,
            "skipped": sum(h["skipped"] for h in trainer.log_history),
            "seconds": round(time.perf_counter() - t, 1),
        }
        res["curves"], res["runs"] = curves, finals
        f = finals[name]
        say(
            f"{name}: {f['steps']} steps, last window loss {curves[name][-1]['loss']:.4f}, {f['skipped']} skipped, "
            f"val top-1 {f['val_top1']:.1f} ({f['seconds']} s)"
        )

    ref = curves["fp32"]
    last = min(5, len(ref))
    mean_last = lambda c: sum(h["loss"] for h in c[-last:]) / last  # noqa: E731
    compare = {}
    for name in ("bf16", "fp16", "fp32_seed1"):
        c = curves[name]
        same_steps = [h["step"] for h in c] == [h["step"] for h in ref]
        compare[name] = {
            "same_log_steps": same_steps,
            "max_rel_diff": max(rel_diff(a["loss"], b["loss"]) for a, b in zip(c, ref)),
            "last_windows_rel_diff": rel_diff(mean_last(c), mean_last(ref)),
        }
    res["vs_fp32"] = compare
    res["tolerance"] = {
        "last_windows": last,
        "window_steps": sizes.log_every,
        "rel": LOSS_TOLERANCE,
        "rule": "mean loss over the last windows within rel of fp32's; fp32_seed1 (another seed) "
        "shows how far two equally good runs drift apart",
    }
    total = epochs * steps
    fp16_allowed = max(5, total // 20)  # GradScaler starts at 2^16 and halves on each overflow: a few early skips
    res["checks"] = {
        "same_log_steps": all(c["same_log_steps"] for c in compare.values()),
        "bf16_within_tolerance": compare["bf16"]["last_windows_rel_diff"] <= LOSS_TOLERANCE,
        "fp16_within_tolerance": compare["fp16"]["last_windows_rel_diff"] <= LOSS_TOLERANCE,
        "bf16_no_skipped_step": finals["bf16"]["skipped"] == 0,
        "fp32_no_skipped_step": finals["fp32"]["skipped"] == 0,
        f"fp16_skipped_at_most_{fp16_allowed}": finals["fp16"]["skipped"] <= fp16_allowed,
    }
    res["summary"] = [
        f"{total} steps each; loss vs fp32, last {last} windows of {sizes.log_every}: "
        + ", ".join(f"{n} {100 * compare[n]['last_windows_rel_diff']:.1f}%" for n in compare)
        + f" (tolerance "
        f"{100 * LOSS_TOLERANCE:.0f}%); largest per window: "
        + ", ".join(f"{n} {100 * compare[n]['max_rel_diff']:.1f}%" for n in compare),
        "skipped steps: "
        + ", ".join(f"{n} {finals[n]['skipped']}" for n in runs)
        + "; val top-1: "
        + ", ".join(f"{n} {finals[n]['val_top1']:.1f}" for n in runs),
    ]


# --------------------------------------------------------------------------------------------- 3. resume
def section_resume(args, sizes: Sizes, res: Results, work: Path) -> None:
    """`python -m cvt_train.train` with EMA, 2 epochs of S steps: one run SIGKILLed right after global step
    S + S/2 (in the second epoch, after epoch 1's evaluation and last.pt), then resumed with trainer.resume=auto;
    an uninterrupted run beside it. On CPU the resumed run must equal it bit for bit; on CUDA (not bit-exact:
    atomics, autotuned kernels) the same steps and a top-1 within a few points."""
    import torch

    from cvt_train.engine.checkpoint import load_training_checkpoint

    s = sizes.resume_steps_per_epoch
    kill_at = s + s // 2
    overrides = [
        "experiment=quickstart",
        "trainer.ema.enabled=true",
        "trainer.epochs=2",
        f"trainer.max_steps_per_epoch={s}",
        f"trainer.device={args.device}",
        "trainer.progress=false",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("CVT_FAULT_INJECT", None)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)  # (two runs side by side)

    def start(name: str, extra: list[str], fault: str | None = None) -> subprocess.Popen:
        log = open(work / f"{name}.out", "w")  # a file, not a pipe: nothing to drain
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cvt_train.train",
                *overrides,
                *extra,
                f"hydra.run.dir={work / ('ref' if name == 'ref' else 'run')}",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, **({"CVT_FAULT_INJECT": fault} if fault else {})},
        )

    def tail(name: str) -> list[str]:
        return (work / f"{name}.out").read_text(errors="replace").splitlines()[-15:]

    t = time.perf_counter()
    ref, killed = start("ref", []), start("killed", [], f"kill_at=step:{kill_at}")
    codes = {"killed": killed.wait()}
    at_kill = load_training_checkpoint(work / "run" / "last.pt") if (work / "run" / "last.pt").is_file() else {}
    res["at_kill"] = {k: at_kill.get(k) for k in ("epoch", "step", "global_step")}
    say(
        f"killed run: exit {codes['killed']}, last.pt at epoch {at_kill.get('epoch')} global step "
        f"{at_kill.get('global_step')} (kill at step {kill_at})"
    )
    codes["resumed"] = start("resumed", ["trainer.resume=auto"]).wait()
    codes["uninterrupted"] = ref.wait()
    res["exit_codes"] = codes
    res["seconds"] = round(time.perf_counter() - t, 1)
    for name, code in codes.items():
        if code != (-signal.SIGKILL if name == "killed" else 0):
            res[f"{name}_output_tail"] = tail(name)

    def final(folder: str) -> dict:
        ckpt_path, metrics_path = work / folder / "last.pt", work / folder / "metrics.json"
        ckpt = load_training_checkpoint(ckpt_path) if ckpt_path.is_file() else {}
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        return {"ckpt": ckpt, "metrics": metrics}

    run, ref_run = final("run"), final("ref")
    keys = ("top1", "top5", "loss", "ema_top1", "best_top1", "epoch")
    res["resumed"] = {
        "epoch": run["ckpt"].get("epoch"),
        "global_step": run["ckpt"].get("global_step"),
        **{k: run["metrics"].get(k) for k in keys},
    }
    res["uninterrupted"] = {
        "epoch": ref_run["ckpt"].get("epoch"),
        "global_step": ref_run["ckpt"].get("global_step"),
        **{k: ref_run["metrics"].get(k) for k in keys},
    }
    same_weights = (
        bool(run["ckpt"])
        and bool(ref_run["ckpt"])
        and all(
            torch.equal(a, b)
            for part in ("model", "ema")
            for a, b in zip(run["ckpt"][part].values(), ref_run["ckpt"][part].values())
        )
    )
    top1_diff = (
        abs(run["metrics"]["top1"] - ref_run["metrics"]["top1"])
        if "top1" in run["metrics"] and "top1" in ref_run["metrics"]
        else math.inf
    )
    res["weights_identical"], res["top1_diff"] = same_weights, top1_diff
    checks = {
        "killed_by_sigkill": codes["killed"] == -signal.SIGKILL,
        "killed_after_epoch_1_saved": at_kill.get("epoch") == 1 and at_kill.get("global_step") == s,
        "resumed_exit_0": codes["resumed"] == 0,
        "uninterrupted_exit_0": codes["uninterrupted"] == 0,
        "last_pt_epoch_is_trainer_epochs": run["ckpt"].get("epoch") == 2,
        "metrics_json_written": run["metrics"].get("epoch") == 2,
        "ema_saved_and_evaluated": run["ckpt"].get("ema") is not None and "ema_top1" in run["metrics"],
        "same_steps_as_uninterrupted": run["ckpt"].get("global_step") == ref_run["ckpt"].get("global_step") == 2 * s,
    }
    if args.device == "cpu":
        checks["bit_exact_on_cpu"] = same_weights and all(
            run["metrics"].get(k) == ref_run["metrics"].get(k) for k in keys
        )
    else:
        checks["top1_within_5_points"] = top1_diff <= 5.0
    res["checks"] = checks
    r, u = res["resumed"], res["uninterrupted"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    res["summary"] = [
        f"exits: killed {codes['killed']} (at step {kill_at}), resumed {codes['resumed']}, uninterrupted "
        f"{codes['uninterrupted']}; last.pt epoch {r['epoch']}/2, step {r['global_step']} vs {u['global_step']}",
        f"top-1 resumed {fmt(r['top1'])} vs uninterrupted {fmt(u['top1'])} (EMA {fmt(r['ema_top1'])} vs "
        f"{fmt(u['ema_top1'])}); weights identical: {same_weights}",
    ]


# ---------------------------------------------------------------------------------------------- 4. syncs
def section_syncs(args, sizes: Sizes, res: Results, work: Path) -> None:
    """Host reads per optimizer step: the Trainer for one epoch of A and of B steps (log_every > B, so no log point
    inside), everything else equal, counted over fit(); set-up, evaluation and saving are the same in both, so
    (count_B - count_A) / (B - A) is what each training step adds. Counted with HostReads (any device:
    aten._local_scalar_dense and device-to-host copies) and, on CUDA, as torch.cuda.set_sync_debug_mode("warn")
    warnings. `growing_reads` lists where the extra reads of the longer run come from."""
    import torch

    from cvt_train.engine.hostsync import HostReads
    from cvt_train.engine.trainer import Trainer

    a, b = sizes.sync_steps
    cuda = args.device.startswith("cuda")
    runs, per_step = {}, {}
    for ema in (False, True):
        counts = {}
        for steps in (a, b):
            name = f"ema_{'on' if ema else 'off'}_{steps}_steps"
            cfg = train_config(
                args,
                [
                    "trainer.precision=bf16",
                    "trainer.epochs=1",
                    f"trainer.log_every={10 * b}",
                    f"trainer.max_steps_per_epoch={steps}",
                    f"trainer.ema.enabled={str(ema).lower()}",
                ],
            )
            trainer = Trainer(cfg, work / name)
            with warnings.catch_warnings(record=True) as caught, HostReads(trace=True) as reads:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    trainer.fit()
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            counts[steps] = {
                "host_reads": reads.count,
                "where": collections.Counter(reads.where),
                "cuda_sync_warnings": len(syncs) if cuda else None,
                "sync_where": collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs),
                "global_step": trainer.progress.global_step,
            }
            runs[name] = {k: v for k, v in counts[steps].items() if k not in ("where", "sync_where")}
            res["runs"] = runs
            say(f"{name}: {reads.count} host reads" + (f", {len(syncs)} CUDA sync warnings" if cuda else ""))
        steps_done = counts[b]["global_step"] - counts[a]["global_step"]
        key = f"ema_{'on' if ema else 'off'}"
        per_step[key] = {
            "host_reads": (counts[b]["host_reads"] - counts[a]["host_reads"]) / steps_done,
            "cuda_sync_warnings": (
                (counts[b]["cuda_sync_warnings"] - counts[a]["cuda_sync_warnings"]) / steps_done if cuda else None
            ),
            "growing_reads": dict((counts[b]["where"] - counts[a]["where"]).most_common(8)),
            "growing_sync_warnings": dict((counts[b]["sync_where"] - counts[a]["sync_where"]).most_common(8)),
        }
        res["per_step"] = per_step
    res["method"] = {"steps": [a, b], "precision": "bf16", "log_every": 10 * b}
    checks = {f"{k}_no_host_read_per_step": v["host_reads"] == 0 for k, v in per_step.items()}
    if cuda:
        checks.update({f"{k}_no_cuda_sync_per_step": v["cuda_sync_warnings"] == 0 for k, v in per_step.items()})
    res["checks"] = checks
    res["summary"] = [
        ", ".join(
            f"EMA {k.removeprefix('ema_')}: {v['host_reads']:g} host reads/step"
            + (f", {v['cuda_sync_warnings']:g} CUDA syncs/step" if cuda else "")
            for k, v in per_step.items()
        )
        + f" (runs of {a} and {b} steps)"
    ]
    for k, v in per_step.items():
        if v["growing_reads"]:
            res["summary"].append(f"EMA {k.removeprefix('ema_')} reads from: {', '.join(v['growing_reads'])}")


# ---------------------------------------------------------------------------------------- 5. cifar_speed
def section_cifar_speed(args, sizes: Sizes, res: Results, work: Path) -> None:
    """CIFAR-sized models on random 32x32 data: training images/s eager vs torch.compile(mode="reduce-overhead")
    (CUDA graphs: small models are launch-bound), the two timed step by step alternately (ABBA) with
    cvt_train.bench's Runner. cvt-bench has no compile-mode option, so the compiled Runner gets its model here."""
    import torch

    from cvt_train import create_model
    from cvt_train.bench import Runner
    from cvt_train.engine.precision import autocast_dtype

    torch.backends.cudnn.benchmark = True  # as the trainer runs on CUDA
    device = torch.device(args.device)
    models = {}
    for name, overrides in sizes.cifar_models.items():
        cfg = compose(
            "bench",
            [
                f"model={name}",
                *overrides,
                f"device={args.device}",
                "trainer.precision=bf16",
                "bench.mode=train",
                "bench.resolution=32",
                f"bench.batch_size={sizes.cifar_batch}",
                "bench.compile=false",
            ],
        )

        def runner(label: str, compiled: bool, cfg=cfg) -> Runner:  # (called within this iteration)
            torch.manual_seed(cfg.seed)
            model = create_model(cfg.model).to(device)
            x = torch.randn(sizes.cifar_batch, model.cfg.in_chans, 32, 32, device=device)
            y = torch.randint(0, model.cfg.num_classes, (sizes.cifar_batch,), device=device)
            r = Runner(label, model, cfg, device, x, y, autocast_dtype("bf16", device))
            if compiled:
                r.fn = reduce_overhead(model, args.backend)
            return r

        skips_before, t = cudagraph_skips(), time.perf_counter()
        eager, compiled = runner("eager", False), runner("reduce-overhead", True)
        eager.warmup(sizes.cifar_warmup)
        compiled.warmup(sizes.cifar_warmup)  # compiles, then records the CUDA graphs
        for i in range(sizes.cifar_steps):
            for r in (eager, compiled) if i % 2 == 0 else (compiled, eager):
                r.timed_step()
        e, c = eager.stats(), compiled.stats()
        models[name] = {
            "eager": {**e, "peak_memory_mb": eager.peak_mem_mb},
            "compiled": {**c, "peak_memory_mb": compiled.peak_mem_mb},
            "speedup": c["images_per_s"] / e["images_per_s"],
            "compile_mode": "reduce-overhead" if args.backend == "inductor" else f"backend={args.backend}",
            "cudagraph_skips": cudagraph_skips() - skips_before,
            "params": sum(p.numel() for p in eager.model.parameters()),
            "overrides": list(overrides),
            "batch_size": sizes.cifar_batch,
            "steps": sizes.cifar_steps,
            "seconds": round(time.perf_counter() - t, 1),
        }
        res["models"] = models
        say(
            f"{name}: eager {e['images_per_s']:.0f} img/s, compiled {c['images_per_s']:.0f} "
            f"(x{models[name]['speedup']:.2f}; {models[name]['cudagraph_skips']} cudagraph skips, "
            f"{models[name]['seconds']} s)"
        )
        del eager, compiled
        free_memory()
    res["checks"] = {
        "all_measured": all(
            m["eager"]["images_per_s"] > 0 and m["compiled"]["images_per_s"] > 0 for m in models.values()
        )
    }
    res["summary"] = [
        f"{n}: eager {m['eager']['images_per_s']:,.0f} img/s, {m['compile_mode']} "
        f"{m['compiled']['images_per_s']:,.0f} (x{m['speedup']:.2f}, cudagraph skips "
        f"{m['cudagraph_skips']}), batch {m['batch_size']}"
        for n, m in models.items()
    ]


# ---------------------------------------------------------------------------------------------- 6. loader
def section_loader(args, sizes: Sizes, res: Results, work: Path) -> None:
    """The ImageNet pipeline on generated JPEGs (random smooth fields plus noise, 500x375, quality 90; --quick on
    a CPU: 64x48): images/s per decode mode, the batch stage on the device, its syncs, nvJPEG vs the CPU decoders."""
    import numpy as np
    import torch
    from PIL import Image

    from cvt_train.data import build_data

    cuda = args.device.startswith("cuda")
    big = not args.quick or cuda
    count, size, batch = (768, (500, 375), 256) if big else (24, (64, 48), 8)
    image_size = 224 if big else 32
    rng = np.random.default_rng(0)
    for k in range(count):
        d = work / "jpegs" / "train" / f"c{k % 4}"
        d.mkdir(parents=True, exist_ok=True)
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(smooth, np.int16) + rng.integers(-24, 25, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(d / f"{k}.jpg", quality=90)
    base = [
        "data=imagenet",
        f"data.root={work / 'jpegs'}",
        "data.num_classes=4",
        "data.val_split=0.05",
        f"data.image_size={image_size}",
        f"data.batch_size={batch}",
        "aug=imagenet",
        f"trainer.device={args.device}",
    ]
    modes = ["scaled", "gpu"] if cuda else ["scaled"]
    runs = {}
    for mode in modes:
        data = build_data(compose("train", [*base, f"data.decode={mode}"]), device=args.device)
        t0, images, first = time.perf_counter(), 0, None
        for step, (x, _) in enumerate(data.train_batches(0)):
            if step == 1:  # after the workers' start-up
                if cuda:
                    torch.cuda.synchronize()
                t0, images = time.perf_counter(), 0
            images += x.shape[0]
            first = x if first is None else first
        if cuda:
            torch.cuda.synchronize()
        runs[mode] = {
            "images_per_s": images / (time.perf_counter() - t0),
            "workers": data.num_workers,
            "steps": data.steps_per_epoch,
            "augment_on": data.augment_on,
        }
        data.close()
        res["runs"] = runs
        say(f"decode={mode}: {runs[mode]['images_per_s']:.0f} images/s with {data.num_workers} workers")

    # the batch stage alone on a uint8 batch on the device: time and syncs
    data = build_data(compose("train", [*base, "data.num_workers=0", "data.augment_on=device"]), device=args.device)
    stage = data.stage
    x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=args.device)
    y = torch.randint(0, 4, (batch,), device=args.device)
    plans = [stage.plan(batch, image_size, image_size, torch.Generator().manual_seed(k), k, k) for k in range(12)]
    stage(x, y, plans[0])  # warm-up
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    syncs = 0
    for p in plans[1:]:
        t = time.perf_counter()
        try:
            stage(x, y, p)
        except RuntimeError as e:  # a synchronizing op under sync debug mode "error"
            syncs += 1
            say(f"batch stage synchronised: {str(e).splitlines()[0]}")
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        times.append(time.perf_counter() - t)
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
    res["stage"] = {"ms_per_batch": 1000 * sorted(times)[len(times) // 2], "batch": batch, "syncs": syncs}
    say(f"batch stage: {res['stage']['ms_per_batch']:.2f} ms per batch of {batch}, {syncs} synchronising calls")
    checks = {"all_measured": all(r["images_per_s"] > 0 for r in runs.values()), "stage_never_syncs": syncs == 0}
    if cuda:  # nvJPEG against libjpeg-turbo on the same crops (no random photometric ops, no mixing)
        plain = ["aug.auto_augment=null", "aug.random_erasing=0", "aug.mixup_alpha=0", "aug.cutmix_alpha=0"]
        got = {}
        for mode in ("gpu", "full"):
            d = build_data(
                compose("train", [*base, *plain, f"data.decode={mode}", "data.num_workers=2"]), device=args.device
            )
            got[mode] = next(iter(d.train_batches(0)))[0].float().cpu()
            d.close()
        res["gpu_vs_cpu_decode_mean_abs"] = float((got["gpu"] - got["full"]).abs().mean())
        checks["gpu_decode_close_to_cpu"] = res["gpu_vs_cpu_decode_mean_abs"] < 0.05
    res["checks"] = checks
    res["summary"] = [
        ", ".join(f"decode={m}: {r['images_per_s']:,.0f} img/s ({r['workers']} workers)" for m, r in runs.items())
        + f"; batch stage {res['stage']['ms_per_batch']:.2f} ms/batch of {batch}, {syncs} syncs"
    ]


def reduce_overhead(model, backend: str):
    """torch.compile(mode="reduce-overhead"), each call marked as a new step: the previous step's outputs (CUDA
    graph memory, overwritten by the next replay) are dead by then. Other backends (CPU --quick) take no mode."""
    import torch

    compiled = (
        torch.compile(model, mode="reduce-overhead") if backend == "inductor" else torch.compile(model, backend=backend)
    )

    def step(x):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    return step


SECTION_FUNCS = {
    "loader": section_loader,
    "bench": section_bench,
    "precision": section_precision,
    "resume": section_resume,
    "syncs": section_syncs,
    "cifar_speed": section_cifar_speed,
}


# ------------------------------------------------------------------------------------------------ driver
def run_section(args) -> None:
    """Child process: one section, its figures in args.part as they come."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler's start/stop lines on stderr: errors only
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    res = Results(Path(args.part))
    work = Path(args.workdir) / args.section
    work.mkdir(parents=True, exist_ok=True)
    SECTION_FUNCS[args.section](args, Sizes.pick(args.device.split(":")[0], args.quick), res, work)


def stream(cmd: list[str], timeout: float, prefix: str, env: dict) -> tuple[int | None, list[str]]:
    """Run cmd (in a process group of its own), echo its output with a prefix, keep its last lines; kill the
    group at the timeout. Returns (exit code or None on timeout, last lines)."""
    tail = collections.deque(maxlen=30)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env,
        start_new_session=True,
    )

    def pump() -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            print(f"[{prefix}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section and whatever it started (trainers, compile workers)
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, list(tail)


def machine_info(device: str, threads: int) -> dict:
    import torch

    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["cpu_threads"] = threads
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def drive(args) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",") if args.sections else list(RUN_ORDER)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    caps = {name: cap[0] if args.device.startswith("cuda") else cap[1] for name, cap in CAPS.items()}
    for item in args.cap or []:
        name, _, seconds = item.partition("=")
        caps[name] = float(seconds)
    # A subset updates an existing report; a full run starts a new one.
    report = json.loads(out.read_text()) if args.sections and out.is_file() else {}
    report["meta"] = {
        **machine_info(args.device, args.threads),
        "quick": args.quick,
        "compile_backend": args.backend,
        "budget_s": args.budget,
        "caps_s": caps,
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report.setdefault("sections", {})
    write_json(out, report)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    for name in sections:
        left = args.budget - (time.perf_counter() - start)
        timeout = min(caps[name], left)
        if left < 10:
            report["sections"][name] = {"status": "skipped", "reason": f"budget of {args.budget} s spent"}
            write_json(out, report)
            continue
        part = work / f"{name}.json"
        part.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--section",
            name,
            "--part",
            str(part),
            "--device",
            args.device,
            "--backend",
            args.backend,
            "--threads",
            str(args.threads),
            "--workdir",
            str(work),
            *(["--quick"] if args.quick else []),
        ]
        say(f"== {name} (cap {timeout:.0f} s)")
        t = time.perf_counter()
        code, tail = stream(cmd, timeout, name, env)
        entry = json.loads(part.read_text()) if part.is_file() else {}
        failed = [k for k, ok in entry.get("checks", {}).items() if not ok]
        status = (
            "timeout"
            if code is None
            else "error"
            if code != 0
            else "failed"
            if failed
            else "ok"
            if "checks" in entry
            else "error"
        )
        entry = {
            "status": status,
            "seconds": round(time.perf_counter() - t, 1),
            "cap_s": round(timeout),
            "returncode": code,
            **entry,
        }
        if failed:
            entry["failed_checks"] = failed
        if status in ("timeout", "error"):
            entry["output_tail"] = tail
        report["sections"][name] = entry
        report["meta"]["total_s"] = round(time.perf_counter() - start, 1)
        write_json(out, report)
        say(f"== {name}: {status} in {entry['seconds']} s" + (f" (failed: {', '.join(failed)})" if failed else ""))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    say(table(report, out))
    return 0 if all(report["sections"][s]["status"] == "ok" for s in sections) else 1


def table(report: dict, out: Path) -> str:
    m = report["meta"]
    threads = m.get("cpu_threads")
    where = m.get("gpu") or f"CPU ({threads} thread{'s' if threads != 1 else ''} per process)"
    lines = [
        f"gpu_check  {where}  torch {m['torch']}  quick={m['quick']}  total {m.get('total_s', 0):.0f} s  -> {out}",
        f"{'section':<12}{'status':<9}{'time':>6}  figures",
    ]
    for name in SECTIONS:
        e = report["sections"].get(name)
        if e is None:
            continue
        notes = list(e.get("summary", []))
        if e.get("failed_checks"):
            notes.append("failed checks: " + ", ".join(e["failed_checks"]))
        if e["status"] in ("timeout", "error", "skipped"):
            notes.append(e.get("reason") or f"last output: {(e.get('output_tail') or ['(none)'])[-1][:150]}")
        seconds = f"{e['seconds']:.0f}s" if "seconds" in e else "-"
        for i, note in enumerate(notes or [""]):
            lines.append(f"{name:<12}{e['status']:<9}{seconds:>6}  {note}" if i == 0 else f"{'':<29}{note}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    p.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a handful of steps (CPU: tiny models)")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)}; updates an existing --out")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S})")
    p.add_argument("--cap", action="append", metavar="SECTION=SECONDS", help="override a section's time cap")
    p.add_argument(
        "--backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU with --quick)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process on --device cpu (default 1: with another busy process on a 2-core "
        "machine, 2-thread steps run 5-10x slower)",
    )
    p.add_argument("--workdir", help="where sections write their runs (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # child process: run one section
    p.add_argument("--part", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.backend is None:
        args.backend = "aot_eager" if args.device == "cpu" and args.quick else "inductor"
    if args.section:
        run_section(args)
    else:
        sys.exit(drive(args))


if __name__ == "__main__":
    main()
