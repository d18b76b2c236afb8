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
from dataclasses import dataclass, field
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
from ..models import CvT, model_config, num_params
from ..models.convert import extract_state_dict, head_classes, load_checkpoint, read_file
from .checks import check_config, flatten, resume_mismatch
from .checkpoint import (FORMAT_VERSION, fault_point, load_training_checkpoint, remove_stale_temporaries, save_atomic,
                         write_text_atomic)
from .distributed import DistInfo, all_reduce_max, any_rank, broadcast_object, init_distributed
from .evaluate import evaluate
from .optim import build_optimizer, build_scheduler, learning_rate, load_optimizer_state
from .precision import autocast, autocast_dtype

log = logging.getLogger("cvt_train")
# SIGUSR1: what `sbatch --signal` sends by convention; SIGUSR2: submitit's preemption / time-out signal.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


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
    """Turns SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in STOP_SIGNALS:
            current = signal.getsignal(s)
            if s == signal.SIGTERM and getattr(current, "__module__", "").startswith("submitit"):
                continue  # submitit ignores SIGTERM on purpose and acts on its own signal (SIGUSR2): so do we
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def pass_on(self) -> None:
        """After last.pt is written: hand the signal to the handler that was there before, if Python installed one
        (submitit's requeues the job; a Hydra launcher's or the user's gets its say)."""
        previous = self._previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)

    def requested(self, device: torch.device) -> bool:
        """Whether any rank got a signal (so every rank stops at the same step); adopts its number."""
        signum = int(all_reduce_max(torch.tensor([self.signum or 0], device=device)).item())
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0


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
    fmt = load_checkpoint(model, sd, drop_head=drop_head, source=f"trainer.init_from={path}",
                          advice="pass the model= (and model.* overrides) the weights were made for")
    if verbose:
        head = f"classifier re-initialised ({classes} classes in the file, {model.cfg.num_classes} here)" \
            if drop_head else "classifier included"
        log.info("initial weights from %s (%s format), %s", path, fmt, head)


class StopWatch:
    """Adds up the time spent inside an iterator's next(): how long the loop waited for the data loader."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, iterable):
        iterator = iter(iterable)
        try:
            while True:
                start = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                self.seconds += time.perf_counter() - start
                yield item
        finally:  # an early break closes the loader's generator now (it stops its workers)
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""
    epoch: int = 0  # epochs completed
    step: int = 0  # batches done in the epoch after those (non-zero only when stopped by a signal mid-epoch)
    global_step: int = 0  # optimizer steps
    best_top1: float = 0.0
    metrics: dict = field(default_factory=dict)  # of the last evaluation


class Trainer:
    """Set-up in __init__, the loop in `fit`, one method per part of it."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        check_config(cfg)
        self.cfg, tcfg = cfg, cfg.trainer
        self.dist = dist = init_distributed(tcfg.device)
        self.run_dir = Path(broadcast_object(str(run_dir)))
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(tcfg.seed)

        resume_path = self._resume_path()
        ckpt = load_training_checkpoint(resume_path) if resume_path else None
        def clean_run_dir() -> None:
            for tmp in remove_stale_temporaries(self.run_dir):
                log.info("removed %s, left by a process killed while writing a checkpoint", tmp)

        self.on_main(clean_run_dir)

        self.data = data = build_data(cfg, rank=dist.rank, world_size=dist.world_size, device=dist.device)
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
        self.model = model
        self.amp_dtype = autocast_dtype(tcfg.precision, dist.device)
        steps = data.steps_per_epoch
        if tcfg.max_steps_per_epoch:
            steps = min(steps, int(tcfg.max_steps_per_epoch))
        # only whole accumulation windows: a partial one at the end of an epoch would leak its gradients into the
        # next epoch (and a run restarted from that epoch boundary would not have them)
        optim_steps = steps // tcfg.accum_steps
        if optim_steps == 0:
            raise UserError(f"trainer.accum_steps={tcfg.accum_steps}: more than the {steps} batches of an epoch; "
                            "lower trainer.accum_steps or data.batch_size")
        self.steps_per_epoch = optim_steps * tcfg.accum_steps
        global_batch = cfg.data.batch_size * dist.world_size * tcfg.accum_steps
        lr = learning_rate(cfg.optim, global_batch)
        self.optimizer = build_optimizer(model, cfg.optim, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, lr, optim_steps, tcfg.epochs)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if tcfg.ema.enabled:
            self.ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(tcfg.ema.decay, tcfg.ema.warmup), use_buffers=True)
        self.progress = Progress()
        if ckpt is not None:
            self._restore(ckpt, resume_path)

        self.train_model = model
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model)

        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
        self.nonfinite = 0  # consecutive steps with a non-finite loss
        self.train_loss = float("nan")  # mean over the last epoch
        self.data_wait = 0.0  # fraction of the last epoch spent waiting for the data loader
        self.stop_signal: int | None = None  # the signal that stopped the run early, if one did
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)
        n_params = num_params(model)
        self.run_info = {"params": n_params,
                         "gmacs": count_macs(model, (cfg.model.in_chans, cfg.data.image_size, cfg.data.image_size)) / 1e9}
        self.wall_start = time.perf_counter() - self.progress.metrics.get("wall_time_s", 0.0)
        self.writer = None

        def open_run_dir() -> None:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except OSError as e:
                raise UserError(f"{self.run_dir}: cannot write the run's files ({e.strerror or e}); free disk space "
                                "or fix the output dir's permissions") from e
            write_text_atomic(OmegaConf.to_yaml(self.config_dict), self.run_dir / "config.yaml")  # resolved
            log.info("model %s: %.2fM params | data %s: %d train / %d val images, %d classes | lr %.3g (global batch %d)",
                     cfg.model.name, n_params / 1e6, cfg.data.name, data.num_train, data.num_val, data.num_classes,
                     lr, global_batch)

        self.on_main(open_run_dir)

    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume == "auto":
            last = self.run_dir / "last.pt"
            if not last.is_file() and self.dist.is_main:
                log.info("trainer.resume=auto: no %s yet, starting fresh", last)
            return last if last.is_file() else None
        return Path(str(resume)) if resume else None

    def _restore(self, ckpt: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt.get("ema_state") is not None:
                self.ema.load_state_dict(ckpt["ema_state"])
            restore_rng(ckpt["rng"])
            self.progress = Progress(ckpt["epoch"], ckpt.get("step", 0), ckpt["global_step"],
                                     ckpt.get("best_top1", 0.0), ckpt.get("metrics", {}))
        except (KeyError, ValueError, RuntimeError, TypeError) as e:  # resumed with other overrides than it was made
            raise resume_mismatch(path, ckpt, self.cfg, e) from e
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d step %d", path, self.progress.epoch + 1, self.progress.step)

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> float:
        """Train to trainer.epochs (or until a stop signal); returns the best validation top-1 (percent)."""
        try:
            return self._fit()
        finally:  # an error or Ctrl-C too: flush the TensorBoard events written so far
            self.close(hparams=False)

    def _fit(self) -> float:
        tcfg, p = self.cfg.trainer, self.progress
        profiler = make_profiler(self.run_dir) if tcfg.profile and self.dist.is_main else None
        with StopRequest() as stop, profiler or contextlib.nullcontext():
            for epoch in range(p.epoch, tcfg.epochs):
                first = p.step if epoch == p.epoch else 0
                done = self.train_epoch(epoch, first, stop, profiler)
                if done is None:  # stopped by a signal, last.pt written
                    return p.best_top1
                seen, seconds = done
                p.epoch, p.step = epoch + 1, 0
                if p.epoch % tcfg.eval_every == 0 or p.epoch == tcfg.epochs:
                    improved = self.evaluate(seen, seconds)
                    if improved:  # best.pt first: a kill before last.pt is written redoes the epoch and best.pt
                        self.save("best.pt")
                self.save("last.pt")
                if p.epoch < tcfg.epochs and stop.requested(self.dist.device):  # it came during the evaluation
                    self.stopped(stop)
                    return p.best_top1
            if stop.requested(self.dist.device):  # during the last evaluation: the run is complete, but a sweep
                self.stop_signal = stop.signum   # must still stop (train.py)
        self.on_main(lambda: profiler is not None and write_profile(profiler, self.run_dir))
        if self.dist.enabled:
            check_ranks_agree(self.model, self.dist)
        self.close(hparams=True)
        return p.best_top1

    def train_epoch(self, epoch: int, first: int, stop: StopRequest, profiler) -> tuple[int, float] | None:
        """Batches `first`.. of `epoch`; returns (images seen, seconds), or None after a stop signal (any rank's),
        with last.pt written at the step reached."""
        tcfg, dist = self.cfg.trainer, self.dist
        self.train_model.train()
        t0, seen, loss_sum, batches_done = time.perf_counter(), 0, 0.0, 0
        loader_clock = StopWatch()  # time blocked waiting for the next batch
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                   disable=not (dist.is_main and tcfg.progress), dynamic_ncols=True, leave=False, mininterval=1.0)
        batches = loader_clock.timed(self.data.train_batches(epoch, start_step=first))
        for step, (images, targets) in enumerate(batches, start=first):
            if step >= self.steps_per_epoch:
                break
            loss, stepped = self.train_step(images, targets, epoch, step)
            seen += images.shape[0]
            if math.isfinite(loss):
                loss_sum, batches_done = loss_sum + loss, batches_done + 1
            if not stepped:  # inside an accumulation window
                continue
            if profiler is not None:
                profiler.step()
            elapsed = time.perf_counter() - t0
            ips = seen * dist.world_size / elapsed
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}",
                            data_wait=f"{loader_clock.seconds / elapsed:.0%}")
            bar.update(tcfg.accum_steps)
            if self.writer is not None and self.progress.global_step % tcfg.log_every == 0:
                for name, value in (("loss", loss), ("lr", lr), ("images_per_s", ips)):
                    self.writer.add_scalar(f"train/{name}", value, self.progress.global_step)
            if stop.requested(dist.device):
                self.progress.step = step + 1
                self.save("last.pt")
                bar.close()
                self.stopped(stop)
                return None
        bar.close()
        self.train_loss = loss_sum / max(1, batches_done)
        seconds = time.perf_counter() - t0
        self.data_wait = loader_clock.seconds / max(seconds, 1e-9)
        return seen, seconds

    def stopped(self, stop: StopRequest) -> None:
        """last.pt is written where the run stopped: say how to resume, then let an earlier handler have the signal."""
        p = self.progress
        self.stop_signal = stop.signum
        if self.dist.is_main:
            log.warning("stopped by signal %s at epoch %d step %d; last.pt written. Resume with: "
                        "cvt-train <same overrides> hydra.run.dir=%s trainer.resume=auto",
                        stop.signum, p.epoch + 1, p.step, self.run_dir)
        stop.pass_on()

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int) -> tuple[float, bool]:
        """Forward and backward of one batch, and the optimizer step at the end of an accumulation window; returns
        the batch's loss and whether the optimizer stepped."""
        tcfg, dist = self.cfg.trainer, self.dist
        torch.manual_seed(step_seed(tcfg.seed, epoch, step, dist.rank))
        boundary = (step + 1) % tcfg.accum_steps == 0
        sync = contextlib.nullcontext() if boundary or not dist.enabled else self.train_model.no_sync()
        with sync:
            with autocast(dist.device, self.amp_dtype):
                logits = self.train_model(images)
            loss = self.loss_fn(logits.float(), targets)
            self.scaler.scale(loss / tcfg.accum_steps).backward()
        loss_value = loss.item()
        finite = math.isfinite(loss_value)
        if dist.enabled:  # one decision for all ranks: a rank that skipped a step alone would hang the others later
            finite = not any_rank(not finite, dist.device)
        if finite:
            self.nonfinite = 0
        else:
            self.nonfinite += 1
            if self.nonfinite >= tcfg.max_nonfinite:
                raise UserError(
                    f"training diverged: non-finite loss for {self.nonfinite} consecutive steps (epoch {epoch + 1}, "
                    f"step {step + 1}); {self.last_good()}; lower optim.lr, set trainer.grad_clip, or use "
                    "trainer.precision=bf16/fp32")
        if not boundary:
            return loss_value, False
        if tcfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), tcfg.grad_clip)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # with fp16 the scaler itself skips steps with inf/nan gradients
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.progress.global_step += 1
        fault_point("step", self.progress.global_step)  # test hook (fault injection), see checkpoint.py
        return loss_value, True

    def evaluate(self, seen: int, seconds: float) -> bool:
        """Validate after an epoch, log and write metrics.json; returns whether top-1 improved on the best."""
        p, dist, tcfg = self.progress, self.dist, self.cfg.trainer
        self.sync_buffers()
        self.ensure_finite()
        images_per_s = seen * dist.world_size / max(seconds, 1e-9)
        metrics = run_evaluation(self.model, self.ema, self.data, dist, self.amp_dtype, tcfg.progress, p.epoch)
        metrics.update(epoch=p.epoch, **self.run_info, wall_time_s=time.perf_counter() - self.wall_start,
                       images_per_s=images_per_s, data_wait=self.data_wait)
        if self.data.skipped:  # data.skip_corrupt=true: how many unreadable images were left out so far
            metrics["skipped_images"] = len(self.data.skipped)
        improved = metrics["top1"] > p.best_top1
        p.best_top1 = metrics["best_top1"] = max(p.best_top1, metrics["top1"])
        p.metrics = metrics

        def report() -> None:
            log.info("epoch %d/%d: train loss %.4f | val top1 %.2f top5 %.2f loss %.4f%s | %.0f img/s, %.0f%% of the "
                     "time waiting for data", p.epoch, tcfg.epochs, self.train_loss, metrics["top1"], metrics["top5"],
                     metrics["loss"], f" | ema top1 {metrics['ema_top1']:.2f}" if "ema_top1" in metrics else "",
                     images_per_s, 100 * self.data_wait)
            for key in ("top1", "top5", "loss", "ema_top1", "ema_top5"):
                if key in metrics:
                    self.writer.add_scalar(f"val/{key}", metrics[key], p.epoch)
            self.writer.add_scalar("train/epoch_time_s", seconds, p.epoch)
            self.writer.add_scalar("train/data_wait", self.data_wait, p.epoch)  # fraction of the epoch
            write_text_atomic(json.dumps(metrics, indent=2), self.run_dir / "metrics.json")

        self.on_main(report)
        return improved

    # ------------------------------------------------------------------------------------------- checkpoints
    def last_good(self) -> str:
        path = self.run_dir / "last.pt"
        return f"the last good checkpoint, {path}, is intact" if path.is_file() else "no checkpoint was written"

    def ensure_finite(self) -> None:
        """Never evaluate or save weights that went NaN/inf (BatchNorm statistics can, even when every step with a
        non-finite loss was skipped)."""
        p = self.progress
        where = f"at epoch {p.epoch + 1} step {p.step}" if p.step else f"after epoch {p.epoch}"
        for prefix, module in (("", self.model), ("ema.", self.ema.module if self.ema is not None else None)):
            for name, t in (module.state_dict().items() if module is not None else ()):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise UserError(f"training diverged: {prefix}{name} holds NaN/inf {where}; {self.last_good()}; "
                                    "lower optim.lr, set trainer.grad_clip, or use trainer.precision=bf16/fp32")

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, EMA). DDP broadcasts them before each forward, but
        each rank's last forward then updates its own copy: without this, ranks would evaluate shards with different
        statistics, and differ from the model rank 0 saves."""
        if not self.dist.enabled:
            return
        import torch.distributed as tdist

        modules = [self.model] + ([self.ema] if self.ema is not None else [])  # the EMA's weights and counter too
        for module in modules:
            for t in module.buffers():
                tdist.broadcast(t, src=0)
        if self.ema is not None:
            for t in self.ema.parameters():
                tdist.broadcast(t.data, src=0)

    def save(self, name: str) -> None:
        """Model, EMA, optimizer, schedule, scaler, progress, RNG states and the resolved config, atomically."""
        self.sync_buffers()
        self.ensure_finite()
        p, ema = self.progress, self.ema
        self.on_main(lambda: save_atomic({
            "format_version": FORMAT_VERSION, "model": self.model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_state": ema.state_dict() if ema is not None else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": p.epoch, "step": p.step, "global_step": p.global_step, "best_top1": p.best_top1,
            "metrics": p.metrics, "rng": rng_states(), "config": self.config_dict,
        }, self.run_dir / name))

    def on_main(self, work) -> None:
        """Run `work` (writing files) on rank 0 alone. If it fails there, the other ranks stop too, rather than wait
        for rank 0 in their next collective until the timeout (where no torchrun agent ends them: submitit)."""
        error = None
        if self.dist.is_main:
            try:
                work()
            except Exception as e:  # noqa: BLE001 (raised again below, after the other ranks know)
                error = e
        if self.dist.enabled and any_rank(error is not None, self.dist.device):
            if error is None:
                raise UserError("rank 0 stopped with an error (its message is in rank 0's output); stopping too")
        if error is not None:
            raise error

    def close(self, hparams: bool) -> None:
        """Close the TensorBoard events, with the HParams entry of a finished run (TensorBoard's sweep view)."""
        if self.writer is None:
            return
        if hparams:
            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                      for k, v in flatten(self.config_dict).items() if not k.startswith("hydra")}
            metrics = {"hparam/top1": self.progress.metrics.get("top1", 0.0), "hparam/best_top1": self.progress.best_top1}
            self.writer.add_hparams(values, metrics, run_name=".")
        self.writer.close()
        self.writer = None


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as `cfg` says, writing into `run_dir`; returns the best validation top-1 (percent)."""
    return Trainer(cfg, run_dir).fit()


def make_profiler(run_dir: Path) -> torch.profiler.profile:
    """torch.profiler over training steps 2-7 (after a warm-up), trace written for TensorBoard's profiler view."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities, schedule=torch.profiler.schedule(wait=1, warmup=1, active=5, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir / "profile")))


def write_profile(profiler: torch.profiler.profile, run_dir: Path) -> None:
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (run_dir / "profile.txt").write_text(table)
    log.info("profile of the first training steps: %s (trace for TensorBoard in %s)", run_dir / "profile.txt",
             run_dir / "profile")


def check_ranks_agree(model: nn.Module, dist: DistInfo) -> None:
    """After a distributed run every rank must hold the same weights and buffers; compare float64 checksums."""
    import torch.distributed as tdist

    local = torch.stack([t.detach().double().sum() for t in model.state_dict().values()]).sum().reshape(1)
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
