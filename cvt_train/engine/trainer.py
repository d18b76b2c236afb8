"""The training loop: plain PyTorch, one function per concern, the loop itself in `fit`.

Reproducibility: data order and augmentation are a pure function of (seed, epoch, step) (see cvt_train.data), and
the global RNG (dropout, drop path) is reseeded from (seed, epoch, step, rank) before every batch, so a run resumed
from any checkpoint, at an epoch boundary or mid-epoch, continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from ..data import build_data
from ..errors import UserError
from ..flops import count_macs
from ..models import CvT, model_config
from ..models.convert import extract_state_dict, head_classes, load_checkpoint, read_file
from .checks import check_config, flatten, resume_mismatch
from .checkpoint import FORMAT_VERSION, fault_point, load_training_checkpoint, remove_stale_temporaries, save_atomic
from .distributed import DistInfo, all_reduce_sum, broadcast_object, init_distributed
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, learning_rate
from .precision import autocast, autocast_dtype

log = logging.getLogger("cvt_train")
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + step * 101 + rank) % (2**63)


def ema_avg_fn(decay: float, warmup: bool):
    """EMA update for AveragedModel; with warmup the decay ramps as min(decay, (1 + n) / (10 + n))."""

    def update(ema_params, params, num_averaged):
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        floats = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - d)
        for e, p in zip(ema_params, params):
            if not e.is_floating_point():  # BatchNorm's num_batches_tracked: copied, not averaged
                e.copy_(p)

    return update


class StopRequest:
    """Turns SIGTERM / SIGINT / SIGUSR1 into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def requested(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)  # every rank stops at the same step


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain data, so weights_only loading accepts it
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def init_weights(model: CvT, path: str, verbose: bool) -> None:
    """trainer.init_from: start from the weights of another run or a release (ours, official or HF format), with a
    fresh classifier when the file's class count differs (fine-tuning); optimizer and schedule start anew."""
    sd = extract_state_dict(read_file(path), source=path)
    classes = head_classes(sd)
    drop_head = classes is not None and classes != model.cfg.num_classes
    try:
        fmt = load_checkpoint(model, sd, drop_head=drop_head)
    except UserError as e:
        raise UserError(f"trainer.init_from={path}: {e}; pass the model= (and model.* overrides) the weights were "
                        "made for") from e
    if verbose:
        head = f"classifier re-initialised ({classes} classes in the file, {model.cfg.num_classes} here)" \
            if drop_head else "classifier included"
        log.info("initial weights from %s (%s format), %s", path, fmt, head)


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as `cfg` says, writing into `run_dir`; returns the best validation top-1 (percent)."""
    check_config(cfg)
    dist = init_distributed(cfg.trainer.device)
    run_dir = Path(broadcast_object(str(run_dir)))
    tcfg = cfg.trainer
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(tcfg.seed)

    resume_path = None
    if tcfg.resume == "auto":
        resume_path = run_dir / "last.pt" if (run_dir / "last.pt").is_file() else None
        if resume_path is None and dist.is_main:
            log.info("trainer.resume=auto: no %s yet, starting fresh", run_dir / "last.pt")
    elif tcfg.resume:
        resume_path = Path(str(tcfg.resume))
    ckpt = load_training_checkpoint(resume_path) if resume_path else None
    if dist.is_main:
        for tmp in remove_stale_temporaries(run_dir):
            log.info("removed %s, left by a process killed while writing a checkpoint", tmp)

    data = build_data(cfg, rank=dist.rank, world_size=dist.world_size, device=dist.device)
    if data.num_classes != cfg.data.num_classes:
        raise UserError(f"data.num_classes={cfg.data.num_classes} but {cfg.data.root} holds {data.num_classes} "
                        f"classes; set data.num_classes={data.num_classes}")

    model = CvT(model_config(cfg.model))
    if tcfg.init_from and ckpt is None:  # a resumed run has its weights in the checkpoint
        init_weights(model, str(tcfg.init_from), verbose=dist.is_main)
    model = model.to(dist.device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tcfg.sync_bn and dist.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp_dtype = autocast_dtype(tcfg.precision, dist.device)
    steps_per_epoch = data.steps_per_epoch
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(tcfg.max_steps_per_epoch))
    # only whole accumulation windows: a partial one at the end of an epoch would leak its gradients into the next
    # epoch (and a run restarted from that epoch boundary would not have them)
    optim_steps_per_epoch = steps_per_epoch // tcfg.accum_steps
    if optim_steps_per_epoch == 0:
        raise UserError(f"trainer.accum_steps={tcfg.accum_steps}: more than the {steps_per_epoch} batches of an epoch; "
                        "lower trainer.accum_steps or data.batch_size")
    steps_per_epoch = optim_steps_per_epoch * tcfg.accum_steps
    global_batch = cfg.data.batch_size * dist.world_size * tcfg.accum_steps
    lr = learning_rate(cfg.optim, global_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, cfg.sched, lr, optim_steps_per_epoch, tcfg.epochs)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    ema = None
    if tcfg.ema.enabled:
        ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(tcfg.ema.decay, tcfg.ema.warmup), use_buffers=True)

    start_epoch, start_step, best_top1, metrics, global_step = 0, 0, 0.0, {}, 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if ema is not None and ckpt.get("ema_state") is not None:
                ema.load_state_dict(ckpt["ema_state"])
            restore_rng(ckpt["rng"])
            start_epoch, start_step = ckpt["epoch"], ckpt.get("step", 0)
            best_top1, metrics, global_step = ckpt.get("best_top1", 0.0), ckpt.get("metrics", {}), ckpt["global_step"]
        except (KeyError, ValueError, RuntimeError, TypeError) as e:  # resumed with other overrides than it was made
            raise resume_mismatch(resume_path, ckpt, cfg, e) from e
        if dist.is_main:
            log.info("resumed from %s at epoch %d step %d", resume_path, start_epoch + 1, start_step)

    train_model = model
    if dist.enabled:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    if tcfg.compile:
        train_model = torch.compile(train_model)

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2fM params | data %s: %d train / %d val images, %d classes | lr %.3g (global batch %d)",
                 cfg.model.name, n_params / 1e6, cfg.data.name, data.num_train, data.num_val, data.num_classes,
                 lr, global_batch)

    config_dict = OmegaConf.to_container(cfg, resolve=True)
    run_info = {"params": sum(p.numel() for p in model.parameters()),
                "gmacs": count_macs(model, (cfg.model.in_chans, cfg.data.image_size, cfg.data.image_size)) / 1e9}
    wall_start = time.perf_counter() - (metrics.get("wall_time_s", 0.0) if metrics else 0.0)

    def last_good() -> str:
        path = run_dir / "last.pt"
        return f"the last good checkpoint, {path}, is intact" if path.is_file() else "no checkpoint was written"

    def ensure_finite(epoch: int, step: int) -> None:
        """Never evaluate or save weights that went NaN/inf (BatchNorm statistics can, even when every step with a
        non-finite loss was skipped)."""
        for prefix, module in (("", model), ("ema.", ema.module if ema is not None else None)):
            for name, t in (module.state_dict().items() if module is not None else ()):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise UserError(f"training diverged: {prefix}{name} holds NaN/inf at epoch {epoch + 1} step "
                                    f"{step}; {last_good()}; lower optim.lr, set trainer.grad_clip, or use "
                                    "trainer.precision=bf16/fp32")

    def save(name: str, epoch: int, step: int) -> None:
        ensure_finite(epoch, step)
        if not dist.is_main:
            return
        save_atomic({
            "format_version": FORMAT_VERSION, "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_state": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch, "step": step, "global_step": global_step, "best_top1": best_top1,
            "metrics": metrics, "rng": rng_states(), "config": config_dict,
        }, run_dir / name)

    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
    nonfinite = 0
    profiler = make_profiler(run_dir) if tcfg.profile and dist.is_main else None
    with StopRequest() as stop, profiler or contextlib.nullcontext():
        for epoch in range(start_epoch, tcfg.epochs):
            train_model.train()
            first = start_step if epoch == start_epoch else 0
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                       disable=not (dist.is_main and tcfg.progress), dynamic_ncols=True, leave=False, mininterval=1.0)
            batches = data.train_batches(epoch, start_step=first)
            for step, (images, targets) in enumerate(batches, start=first):
                if step >= steps_per_epoch:
                    break
                torch.manual_seed(step_seed(tcfg.seed, epoch, step, dist.rank))
                boundary = (step + 1) % tcfg.accum_steps == 0
                sync = contextlib.nullcontext() if boundary or not dist.enabled else train_model.no_sync()
                with sync:
                    with autocast(dist.device, amp_dtype):
                        logits = train_model(images)
                    loss = loss_fn(logits.float(), targets)
                    scaler.scale(loss / tcfg.accum_steps).backward()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    nonfinite += 1
                    if nonfinite >= tcfg.max_nonfinite:
                        raise UserError(
                            f"training diverged: non-finite loss for {nonfinite} consecutive steps (epoch {epoch + 1}, "
                            f"step {step + 1}); {last_good()}; lower optim.lr, set trainer.grad_clip, or use "
                            "trainer.precision=bf16/fp32")
                else:
                    nonfinite = 0
                if not boundary:
                    continue
                if tcfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                if math.isfinite(loss_value) or scaler.is_enabled():
                    scaler.step(optimizer)  # with fp16 the scaler itself skips steps with inf/nan gradients
                    scaler.update()
                    if ema is not None:
                        ema.update_parameters(model)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                fault_point("step", global_step)  # test hook (fault injection), see checkpoint.py
                if profiler is not None:
                    profiler.step()
                seen += images.shape[0]
                loss_sum += loss_value if math.isfinite(loss_value) else 0.0
                ips = seen * dist.world_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", img_s=f"{ips:.0f}")
                bar.update(tcfg.accum_steps)
                if writer is not None and global_step % tcfg.log_every == 0:
                    writer.add_scalar("train/loss", loss_value, global_step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_step)
                    writer.add_scalar("train/images_per_s", ips, global_step)
                if stop.requested(dist.device):
                    save("last.pt", epoch, step + 1)
                    bar.close()
                    if dist.is_main:
                        log.warning("stopped by signal %s at epoch %d step %d; last.pt written. Resume with: "
                                    "cvt-train <same overrides> hydra.run.dir=%s trainer.resume=auto",
                                    stop.signum, epoch + 1, step + 1, run_dir)
                    return best_top1
            bar.close()
            epoch_time = time.perf_counter() - t0
            last_epoch = epoch + 1 == tcfg.epochs
            if (epoch + 1) % tcfg.eval_every == 0 or last_epoch:
                ensure_finite(epoch, steps_per_epoch)
                metrics = run_evaluation(model, ema, data, dist, amp_dtype, tcfg.progress, epoch + 1)
                metrics.update(epoch=epoch + 1, **run_info, wall_time_s=time.perf_counter() - wall_start,
                               images_per_s=seen * dist.world_size / max(epoch_time, 1e-9))
                improved = metrics["top1"] > best_top1
                best_top1 = max(best_top1, metrics["top1"])
                metrics["best_top1"] = best_top1
                if dist.is_main:
                    log.info("epoch %d/%d: train loss %.4f | val top1 %.2f top5 %.2f loss %.4f%s | %.0f img/s",
                             epoch + 1, tcfg.epochs, loss_sum / max(1, seen // cfg.data.batch_size), metrics["top1"],
                             metrics["top5"], metrics["loss"],
                             f" | ema top1 {metrics['ema_top1']:.2f}" if "ema_top1" in metrics else "",
                             seen * dist.world_size / max(epoch_time, 1e-9))
                    for key in ("top1", "top5", "loss", "ema_top1", "ema_top5"):
                        if key in metrics:
                            writer.add_scalar(f"val/{key}", metrics[key], epoch + 1)
                    writer.add_scalar("train/epoch_time_s", epoch_time, epoch + 1)
                    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
                if improved:  # best.pt first: a kill before last.pt is written redoes the epoch and best.pt with it
                    save("best.pt", epoch + 1, 0)
                save("last.pt", epoch + 1, 0)
            else:
                save("last.pt", epoch + 1, 0)
    if profiler is not None:
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (run_dir / "profile.txt").write_text(table)
        log.info("profile of the first training steps: %s (trace for TensorBoard in %s)", run_dir / "profile.txt",
                 run_dir / "profile")
    if dist.enabled:
        check_ranks_agree(model, dist)
    if writer is not None:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten(config_dict).items() if not k.startswith("hydra")}
        writer.add_hparams(hparams, {"hparam/top1": metrics.get("top1", 0.0), "hparam/best_top1": best_top1},
                           run_name=".")
        writer.close()
    return best_top1


def make_profiler(run_dir: Path) -> torch.profiler.profile:
    """torch.profiler over training steps 2-7 (after a warm-up), trace written for TensorBoard's profiler view."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=1, warmup=1, active=5, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir / "profile")))


def check_ranks_agree(model: nn.Module, dist: DistInfo) -> None:
    """After a distributed run every rank must hold the same weights; compare float64 checksums."""
    import torch.distributed as tdist

    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(local) for _ in range(dist.world_size)]
    tdist.all_gather(gathered, local)
    sums = [g.item() for g in gathered]
    if dist.is_main:
        same = all(s == sums[0] for s in sums)
        log.info("weight checksums per rank: %s (%s)", sums, "identical" if same else "DIFFERENT")
        if not same:
            raise RuntimeError(f"ranks hold different weights after training: checksums {sums}")


def run_evaluation(model, ema, data, dist: DistInfo, amp_dtype, progress: bool, epoch: int = 0) -> dict:
    bar = tqdm(total=data.num_val, desc="eval", disable=not (dist.is_main and progress), leave=False,
               dynamic_ncols=True)
    metrics = evaluate(model, _eval_fault_point(data.val_batches(), epoch), dist.device,
                       autocast(dist.device, amp_dtype), bar)
    if ema is not None:
        ema_metrics = evaluate(ema.module, data.val_batches(), dist.device, autocast(dist.device, amp_dtype))
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "images"})
    bar.close()
    return metrics


def _eval_fault_point(batches, epoch: int):
    """Test hook (fault injection, see checkpoint.py): `eval:N` fires after the first batch of epoch N's evaluation."""
    for i, batch in enumerate(batches):
        yield batch
        if i == 0:
            fault_point("eval", epoch)
