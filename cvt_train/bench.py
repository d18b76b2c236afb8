"""cvt-bench: training / inference throughput of CvT, achieved TFLOP/s against a matmul peak measured in the same
run, peak memory; `bench.compare=hf` runs HF transformers' CvT of the same configuration alternately with ours,
`bench.compare=eager` (with `bench.compile=true`) our compiled model alternately with the same model eager.

    cvt-bench model=cvt13 bench.batch_size=16 bench.mode=train trainer.precision=bf16
    cvt-bench model=cvt13 bench.compare=hf bench.mode=infer
    cvt-bench model=cvt13 bench.compile=true bench.compare=eager   # compiled vs eager, one run
    cvt-bench -m bench.batch_size=8,16,32            # a sweep: one bench.json per job

Method. Every implementation gets `bench.warmup` untimed steps, then `bench.steps` timed ones. With a comparison
the timed steps alternate between the implementations in ABBA order (ours, hf, hf, ours, ...), and a matmul of
the peak's size is timed once per round too, so that drift in clock speed or in the load of other processes
hits every figure alike. Throughput is the median over steps of batch / step time, spread the interquartile range.
FLOPs are counted (torch.utils.flop_counter) for the measured step: one forward, plus its backward in `train`;
the optimizer step is not counted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from . import create_model
from .cli import check_overrides, friendly_errors
from .config import BenchSection, BenchTrainer, check_group  # (importing config registers the schemas)
from .engine.distributed import resolve_device
from .engine.precision import autocast, autocast_dtype, precision_name
from .errors import UserError
from .flops import count_flops, count_macs
from .models import compile_model, model_config, num_params
from .models.convert import hf_config, to_format


# ----------------------------------------------------------------------------------------------- setup helpers
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


class HFLogits(nn.Module):
    """HF's CvtForImageClassification called like ours: images in, logits out."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def max_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------------------------- the runner
@dataclass
class Runner:
    """One implementation: its model, optimizer and timed train / inference step."""

    name: str
    model: nn.Module  # as built (eager), used for counting FLOPs
    cfg: DictConfig
    device: torch.device
    x: torch.Tensor
    y: torch.Tensor
    amp_dtype: torch.dtype | None  # None = fp32, no autocast
    compiled: bool = False  # torch.compile the model (self.model stays the eager module)
    times: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None

    def __post_init__(self):
        b = self.cfg.bench
        self.fn = compile_model(self.model) if self.compiled else self.model
        self.sync = synchronizer(self.device)
        if b.mode == "train":
            self.model.train()
            # fused=True: one kernel over all parameters instead of a loop of small ops per tensor (CPU and CUDA).
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        else:
            self.model.eval()

    def step(self) -> None:
        if self.cfg.bench.mode == "train":
            with autocast(self.device, self.amp_dtype):
                loss = F.cross_entropy(self.fn(self.x).float(), self.y)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast(self.device, self.amp_dtype):
                self.fn(self.x)

    def timed_step(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t = time.perf_counter()
        self.step()
        self.sync()
        self.times.append(time.perf_counter() - t)
        if cuda:
            mem = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_mem_mb = max(self.peak_mem_mb or 0.0, mem)

    def warmup(self, steps: int) -> None:
        for _ in range(steps):
            try:
                self.step()
            except RuntimeError as e:
                if self.amp_dtype == torch.float16 and self.device.type == "cpu":
                    raise UserError(
                        f"trainer.precision=fp16: autocast on CPU failed in {self.name} "
                        f"({str(e).splitlines()[0]}); CPU lacks fp16 kernels for some ops, "
                        "use trainer.precision=bf16"
                    ) from e
                raise
        self.sync()

    def flops_per_step(self) -> int:
        """FLOPs of one measured step: forward (+ backward in train) at fp32, counted on two images, scaled to the
        batch (every op is per image; two, not one, as BatchNorm in training needs more than one value)."""
        train = self.cfg.bench.mode == "train"
        n = min(2, self.x.shape[0])
        was_training = self.model.training
        self.model.train(train)
        try:
            if train:
                flops = count_flops(self.model, self.x[:n].float(), backward=True)
                self.model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    flops = count_flops(self.model, self.x[:n].float())
        finally:
            self.model.train(was_training)
        return flops * self.x.shape[0] // n

    def stats(self) -> dict:
        ips = sorted(self.x.shape[0] / t for t in self.times)
        q1, _, q3 = statistics.quantiles(ips, n=4, method="inclusive") if len(ips) > 1 else (ips[0],) * 3
        return {
            "images_per_s": statistics.median(ips),
            "images_per_s_p25": q1,
            "images_per_s_p75": q3,
            "images_per_s_min": ips[0],
            "images_per_s_max": ips[-1],
            "step_ms_median": 1e3 * statistics.median(self.times),
        }


class MatmulPeak:
    """A square matmul in the benchmark's dtype, timed beside the model steps: each round keeps the best of three
    timings (the first after a model step can pay for caches and, on CPU, for waking the matrix units), and the
    peak is the median of the rounds."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int):
        self.n, self.dtype, self.sync = n, dtype, synchronizer(device)
        self.reps = 10 if device.type == "cuda" else 1
        self.a = torch.randn(n, n, device=device, dtype=dtype)
        self.b = torch.randn(n, n, device=device, dtype=dtype)
        self.samples: list[float] = []
        for _ in range(2):
            self.a @ self.b

    def measure(self) -> None:
        best = float("inf")
        for _ in range(3):
            self.sync()
            t = time.perf_counter()
            for _ in range(self.reps):
                self.a @ self.b
            self.sync()
            best = min(best, time.perf_counter() - t)
        self.samples.append(2 * self.n**3 * self.reps / best)

    def tflops(self) -> float:
        return statistics.median(self.samples) / 1e12


# --------------------------------------------------------------------------------------------------- the app
def validate(cfg: DictConfig) -> None:
    """cvt-bench's checks, once, before any model is built: the schema's ranges and choices of bench.* and
    trainer.precision, and the rule between bench.compare and bench.compile."""
    check_group(cfg, "bench", BenchSection)
    check_group(cfg, "trainer", BenchTrainer)
    if cfg.bench.compare == "eager" and not cfg.bench.compile:
        raise UserError("bench.compare=eager compares the compiled model with the eager one: add bench.compile=true")


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: other processes' work on the same cores is the main source of noise."""
    try:
        return [round(a, 2) for a in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    b = cfg.bench
    device = resolve_device(str(cfg.device), key="device")
    if b.threads is not None:
        torch.set_num_threads(b.threads)
    load_before = load_average()
    amp_dtype = autocast_dtype(cfg.trainer.precision, device)
    precision = precision_name(amp_dtype)  # "auto" resolved
    if amp_dtype == torch.float16 and device.type == "cpu":
        print(
            "note: fp16 autocast on CPU is partly supported (some ops have no fp16 kernel and it is often slower "
            "than bf16); prefer trainer.precision=bf16"
        )
    hf_cfg = (
        hf_config(
            dataclasses.replace(model_config(cfg.model), act="gelu"),  # both run exact GELU; eps does not change speed
            allow_approx=True,
            context="bench.compare=hf",
            advice="compare a variant HF can build",
        )
        if b.compare == "hf"
        else None
    )  # fail early, before timing; both run exact GELU
    torch.manual_seed(cfg.seed)
    overrides = {"act": "gelu"} if b.compare == "hf" else {}
    model = create_model(cfg.model, **overrides)
    memory_format = torch.channels_last if b.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    r = b.resolution
    x = torch.randn(b.batch_size, model.cfg.in_chans, r, r, device=device).contiguous(memory_format=memory_format)
    width = model.cfg.num_classes or model.num_features
    y = torch.randint(0, width, (b.batch_size,), device=device)
    gmacs = count_macs(model, (model.cfg.in_chans, r, r)) / 1e9  # also checks the resolution, with a clear error
    ours = Runner("ours", model, cfg, device, x, y, amp_dtype, compiled=bool(b.compile))
    flops = ours.flops_per_step()
    ours.warmup(b.warmup)
    runners = [ours]
    cpu_rss_ours = max_rss_mb()  # on CPU the process high-water mark, taken before HF's model exists

    result: dict = {}
    if hf_cfg is not None:
        import transformers

        hf = transformers.CvtForImageClassification(hf_cfg)
        hf.load_state_dict(to_format(model.state_dict(), "hf"))  # the same weights and BatchNorm statistics
        hf = HFLogits(hf).to(device=device, memory_format=memory_format)
        result["hf_max_abs_diff"] = same_math(model, hf, x)
        theirs = Runner("hf", hf, cfg, device, x, y, amp_dtype, compiled=bool(b.compile))
        result["hf_flops_per_step"] = theirs.flops_per_step()
        theirs.warmup(b.warmup)
        runners.append(theirs)
    elif b.compare == "eager":  # the same weights in a second module with its own optimizer, not compiled
        theirs = Runner("eager", copy.deepcopy(model), cfg, device, x, y, amp_dtype)
        result["eager_flops_per_step"] = flops  # the same model
        theirs.warmup(b.warmup)
        runners.append(theirs)

    peak = MatmulPeak(device, amp_dtype or torch.float32, b.peak_size or (4096 if device.type == "cuda" else 2048))
    for i in range(b.steps):  # ABBA: ours, ref, ref, ours, ...
        for runner in runners if i % 2 == 0 else runners[::-1]:
            runner.timed_step()
        peak.measure()

    s = ours.stats()
    tflops = flops / (s["step_ms_median"] / 1e3) / 1e12
    result = {
        **s,
        "gmacs": gmacs,
        "params": num_params(model),
        "tflops": tflops,
        "peak_tflops": peak.tflops(),
        "peak_fraction": tflops / peak.tflops(),
        "flops_per_step": flops,
        "peak_memory_mb": ours.peak_mem_mb if device.type == "cuda" else cpu_rss_ours,
        "peak_memory_kind": (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else f"process max RSS (ours: before the {b.compare} model existed; {b.compare}: at the end, both resident)"
            if b.compare
            else "process max RSS"
        ),
        "device": device_name(device),
        "device_type": device.type,
        "model": model.cfg.name,
        "act": model.cfg.act,
        "mode": b.mode,
        "precision": precision,
        "batch_size": b.batch_size,
        "resolution": r,
        "steps": b.steps,
        "warmup": b.warmup,
        "compile": bool(b.compile),
        "channels_last": bool(b.channels_last),
        "peak_matmul": f"{peak.n}x{peak.n} {str(peak.dtype).removeprefix('torch.')}",
        "compare": b.compare,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "torch_version": torch.__version__,
        **result,
    }
    if len(runners) > 1:  # the reference's figures under its name: hf_images_per_s, eager_images_per_s, ...
        ref, h = theirs.name, theirs.stats()
        ref_tflops = result[f"{ref}_flops_per_step"] / (h["step_ms_median"] / 1e3) / 1e12
        result.update({f"{ref}_{k}": v for k, v in h.items()})
        result.update(
            {
                f"{ref}_tflops": ref_tflops,
                f"{ref}_peak_fraction": ref_tflops / peak.tflops(),
                f"{ref}_peak_memory_mb": theirs.peak_mem_mb if device.type == "cuda" else max_rss_mb(),
                f"ratio_vs_{ref}": s["images_per_s"] / h["images_per_s"],
            }
        )
        if ref == "hf":
            result["transformers_version"] = transformers.__version__
    return result


@torch.no_grad()
def same_math(ours: nn.Module, hf: nn.Module, x: torch.Tensor) -> float:
    """Max |logit difference| between the two at fp32 in eval mode on two images: both must be one model."""
    modes = ours.training, hf.training
    ours.eval(), hf.eval()
    try:
        return (ours(x[:2]) - hf(x[:2])).abs().max().item()
    finally:
        ours.train(modes[0]), hf.train(modes[1])


def report(res: dict) -> str:
    def row(name: str, p: str = "") -> str:
        mem = res.get(f"{p}peak_memory_mb")
        return (
            f"{name:<12}{res[p + 'images_per_s']:>10.1f}  [{res[p + 'images_per_s_p25']:.1f}, "
            f"{res[p + 'images_per_s_p75']:.1f}]{'':<4}{res[p + 'tflops']:>8.3f}{100 * res[p + 'peak_fraction']:>9.1f}%"
            f"{(f'{mem:>10.0f}' if mem is not None else '         -')}"
        )

    lines = [
        f"cvt-bench  {res['model']} (act={res['act']})  {res['mode']}  {res['precision']}  batch {res['batch_size']}"
        f"  {res['resolution']}x{res['resolution']}  on {res['device']}"
        + ("  [compiled]" if res["compile"] else "")
        + ("  [channels_last]" if res["channels_last"] else ""),
        f"{'':<12}{'images/s':>10}  [IQR]{'':<11}{'TFLOP/s':>8}{'of peak':>10}{'mem MB':>10}",
        row("ours"),
    ]
    if "ratio_vs_hf" in res:
        lines += [
            row("hf", "hf_"),
            f"{'ours / hf':<12}{res['ratio_vs_hf']:>10.2f}x   (alternating steps; "
            f"both exact GELU; max |logit diff| vs HF {res['hf_max_abs_diff']:.1e})",
        ]
    if "ratio_vs_eager" in res:
        lines += [
            row("eager", "eager_"),
            f"{'ours / eager':<12}{res['ratio_vs_eager']:>10.2f}x   (alternating "
            "steps; ours compiled, eager the same weights uncompiled)",
        ]
    lines.append(
        f"GMACs/image {res['gmacs']:.3f}   params {res['params']:,}   matmul peak {res['peak_tflops']:.2f} "
        f"TFLOP/s ({res['peak_matmul']}, median of rounds)"
    )
    lines.append(f"mem MB: {res['peak_memory_kind']}")
    if res["device_type"] == "cpu" and res["load_average_before"]:
        lines.append(
            f"{res['threads']} threads; 1-min load average {res['load_average_before'][0]} before, "
            f"{res['load_average_after'][0]} after (other processes on these cores skew timings)"
        )
    return "\n".join(lines)


@hydra.main(config_path="conf", config_name="bench", version_base="1.3")
@friendly_errors
def app(cfg: DictConfig) -> float:
    res = run(cfg)
    print(report(res))
    out = Path(HydraConfig.get().runtime.output_dir) / "bench.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res["images_per_s"]


def main() -> None:
    check_overrides("bench")
    app()


if __name__ == "__main__":
    main()
