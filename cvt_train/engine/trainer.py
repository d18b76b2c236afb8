"""The training loop: plain PyTorch, one function per concern, the loop itself in `fit`.

Reproducibility: data order and augmentation are a pure function of (seed, epoch, step) (see cvt_train.data), and
the global RNG (dropout, drop path) is reseeded from (seed, epoch, step, rank) before every batch, so a run resumed
from any checkpoint, at an epoch boundary or mid-epoch, continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from .precision import autocast, autocast_dtype, set_gpu_defaults

log = logging.getLogger("cvt_train")
# SIGUSR1: what `sbatch --signal` sends by convention; SIGUSR2: submitit's preemption / time-out signal.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + step * 101 + rank) % (2**63)


class WeightEma:
    """EMA of the weights and buffers (BatchNorm statistics) kept in a `torch.optim.swa_utils.AveragedModel`, whose
    state dict (`module.*`, `n_averaged`) is what checkpoints store.

    Its own `update_parameters` reads `n_averaged` back to the host on every call (a GPU stall per step), so the
    update is done here instead, as fused `_foreach` ops over tensor lists made once (timm's ModelEmaV3 does the
    same), with the update count on the host (the optimizer step) and the skip decision a device tensor.
    Decay with warmup: min(decay, (1 + n) / (10 + n)) for the n-th update (n = 0: a plain copy, as AveragedModel).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool, device: torch.device):
        # device=: every tensor a collective (sync_buffers) touches must be on the rank's device, n_averaged too
        self.averaged = AveragedModel(model, device=device, use_buffers=True)
        self.decay, self.warmup = decay, warmup
        pairs = list(zip(self.averaged.module.state_dict().values(), model.state_dict().values()))
        self._floats = ([e for e, m in pairs if e.is_floating_point()], [m for e, m in pairs if e.is_floating_point()])
        self._others = ([e for e, m in pairs if not e.is_floating_point()],  # num_batches_tracked: copied
                        [m for e, m in pairs if not e.is_floating_point()])

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def weight(self, n: int) -> float:
        """How far the n-th update (0-based) moves the average towards the model: 1 - decay."""
        if n == 0:
            return 1.0
        return 1.0 - (min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay)

    @torch.no_grad()
    def update(self, n: int, keep: torch.Tensor) -> None:
        """The n-th update; `keep` (0-dim float on the device, 0 or 1) is 0 for a skipped optimizer step, which
        leaves the average as it was: ema * (1 - w) + model * w with w = keep * weight(n), all on the device.
        (One transient copy of the weights: no fused lerp takes a device-tensor weight on its fast path.)"""
        ema, model = self._floats
        w = keep * self.weight(n)
        torch._foreach_mul_(ema, 1.0 - w)
        torch._foreach_add_(ema, torch._foreach_mul(model, w))
        if self._others[0]:
            torch._foreach_copy_(*self._others)
        self.averaged.n_averaged.add_(1)


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

    def requested(self, dist: DistInfo) -> bool:
        """Whether a stop signal came: this process's flag alone, or, under DDP, whether any rank got one (so that
        every rank stops at the same step; call it at the same steps on every rank); adopts its number."""
        if not dist.enabled:
            return self.signum is not None
        signum = int(all_reduce_max(torch.full((1,), self.signum or 0, device=dist.device)).item())
        if signum and self.signum is None:
            self.signum = signum
        return signum > 0


def rng_states() -> dict:
    """The host generators' states. No CUDA states: every batch reseeds torch (CPU and CUDA) from (seed, epoch,
    step, rank), so they carry nothing a resume needs, and one state per visible GPU would tie the checkpoint to
    the GPU count of the machine that wrote it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain data, so weights_only loading accepts it
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}}


def restore_rng(states: dict) -> None:
    """The host generators; a "cuda" entry (checkpoints of earlier versions) is ignored, whatever GPUs are here."""
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


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


class StepMeters:
    """What the loop needs to know about its steps, kept on the device and read back only at log points (one host
    read every `trainer.log_every` steps instead of several per step: each read lets the GPU run dry).

    Per optimizer step: the summed finite losses, the steps skipped for non-finite gradients, and the run of
    consecutive steps with a non-finite loss, with the global step at which it first reached `max_nonfinite`.
    """

    def __init__(self, device: torch.device, max_nonfinite: int):
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.max_nonfinite = max_nonfinite
        self.window_loss, self.window_batches, self.window_skipped = zero(), zero(), zero()
        self.epoch_loss, self.epoch_batches = zero(), zero()
        self.bad_window = zero()  # a non-finite loss in the accumulation window in progress
        self.streak, self.tripped_at = zero(), zero()  # tripped_at: global step (1-based) the streak hit the limit
        self.step = zero()  # the global step, counted on the device too (no host-to-device copy per step)

    def add_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        value = torch.where(finite, loss, 0.0)
        for total in (self.window_loss, self.epoch_loss):
            total.add_(value)
        for count in (self.window_batches, self.epoch_batches):
            count.add_(finite)
        self.bad_window.logical_or_(~finite)

    def end_step(self, skipped: torch.Tensor) -> None:
        self.step.add_(1)
        self.window_skipped.add_(skipped)
        self.streak.add_(1).mul_(self.bad_window)  # +1 on a bad step, back to 0 on a good one
        newly = (self.streak >= self.max_nonfinite) & (self.tripped_at == 0)
        self.tripped_at.copy_(torch.where(newly, self.step, self.tripped_at))
        self.bad_window.zero_()

    def read_window(self) -> tuple[float, int, int, int]:
        """(mean loss, batches, skipped steps) since the last read, and the tripped step (0 if none): one read."""
        loss, batches, skipped, tripped = torch.stack(
            [self.window_loss, self.window_batches, self.window_skipped, self.tripped_at]).tolist()
        for t in (self.window_loss, self.window_batches, self.window_skipped):
            t.zero_()
        return loss / batches if batches else float("nan"), int(batches), int(skipped), int(tripped)

    def read_epoch(self) -> float:
        loss, batches = torch.stack([self.epoch_loss, self.epoch_batches]).tolist()
        self.epoch_loss.zero_(), self.epoch_batches.zero_()
        return loss / batches if batches else float("nan")


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
        self.dist = dist = init_distributed(tcfg.device, tcfg.dist_timeout_min)
        self.run_dir = Path(broadcast_object(str(run_dir)))
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_gpu_defaults(dist.device, tf32=tcfg.tf32, benchmark=not tcfg.deterministic)
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
        self.grad_params = [p for p in model.parameters() if p.requires_grad]
        # Fused optimizers skip a step on the device when told `found_inf` (the GradScaler's contract); others
        # need the decision on the host: one read per step (the log says so below).
        self.skips_on_device = bool(self.optimizer.param_groups[0].get("fused"))
        self.ema = WeightEma(model, tcfg.ema.decay, tcfg.ema.warmup, dist.device) if tcfg.ema.enabled else None
        self.meters = StepMeters(dist.device, tcfg.max_nonfinite)
        self.progress = Progress()
        if ckpt is not None:
            self._restore(ckpt, resume_path)
        self.meters.step.fill_(self.progress.global_step)

        self.train_model = self.eval_model = model
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            # bucket views: gradients live in DDP's buckets (no second copy). Not static_graph: its reducer reads
            # its used-parameter map back every backward (cvt_cifar_tiny: 142 per step with gloo)
            self.train_model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        self.ema_eval_model = self.ema.module if self.ema is not None else None
        if tcfg.compile:
            compile_ = lambda m: torch.compile(m, mode=tcfg.compile_mode)  # noqa: E731
            self.train_model, self.eval_model = compile_(self.train_model), compile_(model)
            self.ema_eval_model = compile_(self.ema.module) if self.ema is not None else None

        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
        self.train_loss = float("nan")  # mean over the last epoch
        self.log_history: list[dict] = []  # one entry per log point: step, epoch, loss, lr, skipped
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
            if not self.skips_on_device:
                log.warning("optim.fused=false: skipping non-finite steps needs a host read per step (a GPU stall); "
                            "fused optimizers decide on the device")

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
                self.ema.averaged.load_state_dict(ckpt["ema_state"])
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
                    if improved:  # best.pt before last.pt: a kill between the two redoes the epoch and best.pt
                        self.save("best.pt")
                self.save("last.pt")
                if p.epoch < tcfg.epochs and stop.requested(self.dist):  # it came during the evaluation
                    self.stopped(stop)
                    return p.best_top1
            if stop.requested(self.dist):  # during the last evaluation: the run is complete, but a sweep
                self.stop_signal = stop.signum  # must still stop (train.py)
        self.on_main(lambda: profiler is not None and write_profile(profiler, self.run_dir))
        if self.dist.enabled:
            check_ranks_agree(self.model, self.dist)
        self.close(hparams=True)
        return p.best_top1

    def train_epoch(self, epoch: int, first: int, stop: StopRequest, profiler) -> tuple[int, float] | None:
        """Batches `first`.. of `epoch`; returns (images seen, seconds), or None after a stop signal (any rank's),
        with last.pt written at the step reached. Nothing is read back from the device between log points."""
        tcfg, dist = self.cfg.trainer, self.dist
        self.train_model.train()
        t0, seen = time.perf_counter(), 0
        loader_clock = StopWatch()  # time blocked waiting for the next batch
        bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                   disable=not (dist.is_main and tcfg.progress), dynamic_ncols=True, leave=False, mininterval=1.0)
        batches = loader_clock.timed(self.data.train_batches(epoch, start_step=first))
        for step, (images, targets) in enumerate(batches, start=first):
            if step >= self.steps_per_epoch:
                break
            seen += images.shape[0]
            if not self.train_step(images, targets, epoch, step):  # inside an accumulation window
                continue
            bar.update(tcfg.accum_steps)
            if profiler is not None:
                profiler.step()
            at_log_point = self.progress.global_step % tcfg.log_every == 0
            if at_log_point:
                elapsed = time.perf_counter() - t0
                self.log_point(bar, seen * dist.world_size / elapsed, loader_clock.seconds / elapsed)
            # one process: a Python flag, every step; DDP: a collective, so only at log points (same step everywhere)
            if (at_log_point or not dist.enabled) and stop.requested(dist):
                self.progress.step = step + 1
                self.log_point(bar)  # the divergence check comes before the save
                self.save("last.pt")
                bar.close()
                self.stopped(stop)
                return None
        bar.close()
        seconds = max(time.perf_counter() - t0, 1e-9)
        self.data_wait = loader_clock.seconds / seconds
        self.log_point(None, seen * dist.world_size / seconds, self.data_wait)
        self.train_loss = self.meters.read_epoch()
        return seen, seconds

    def log_point(self, bar=None, images_per_s: float | None = None, data_wait: float | None = None) -> None:
        """Read the step meters back (the loop's one host read, every trainer.log_every steps, at the end of an
        epoch and before a save), stop a diverged run, log."""
        p, dist, tcfg = self.progress, self.dist, self.cfg.trainer
        loss, batches, skipped, tripped = self.meters.read_window()
        if dist.enabled:  # each rank saw its own losses; all stop together
            tripped = int(all_reduce_max(torch.full((1,), tripped, device=dist.device)).item())
        if tripped:
            epoch, step = divmod(tripped - 1, self.steps_per_epoch // tcfg.accum_steps)
            raise UserError(
                f"training diverged: non-finite loss for {tcfg.max_nonfinite} consecutive steps (epoch {epoch + 1}, "
                f"step {(step + 1) * tcfg.accum_steps}); {self.last_good()}; lower optim.lr, set trainer.grad_clip, "
                "or use trainer.precision=bf16/fp32")
        if images_per_s is None or not batches:  # (nothing since the last log point)
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.log_history.append({"step": p.global_step, "epoch": p.epoch + 1, "loss": loss, "lr": lr,
                                 "skipped": skipped})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}",
                            data_wait=f"{data_wait:.0%}")
        if self.writer is not None:
            for name, value in (("loss", loss), ("lr", lr), ("images_per_s", images_per_s),
                                ("skipped_steps", skipped)):
                self.writer.add_scalar(f"train/{name}", value, p.global_step)

    def stopped(self, stop: StopRequest) -> None:
        """last.pt is written where the run stopped: say how to resume, then let an earlier handler have the signal."""
        p = self.progress
        self.stop_signal = stop.signum
        if self.dist.is_main:
            log.warning("stopped by signal %s at epoch %d step %d; last.pt written. Resume with: "
                        "cvt-train <same overrides> hydra.run.dir=%s trainer.resume=auto",
                        stop.signum, p.epoch + 1, p.step, self.run_dir)
        stop.pass_on()

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int) -> bool:
        """Forward and backward of one batch, and the optimizer step at the end of an accumulation window (returns
        whether it came). No host read: a step with non-finite gradients is skipped on the device."""
        tcfg, dist = self.cfg.trainer, self.dist
        torch.manual_seed(step_seed(tcfg.seed, epoch, step, dist.rank))
        boundary = (step + 1) % tcfg.accum_steps == 0
        sync = contextlib.nullcontext() if boundary or not dist.enabled else self.train_model.no_sync()
        with sync:
            with autocast(dist.device, self.amp_dtype):
                logits = self.train_model(images)
            loss = self.loss_fn(logits.float(), targets)
            self.scaler.scale(loss / tcfg.accum_steps).backward()
        self.meters.add_loss(loss.detach())
        if not boundary:
            return False
        # Gradients are all-reduced by now, so every rank reaches the same decision with no collective.
        self.scaler.unscale_(self.optimizer)  # (a no-op unless fp16)
        if tcfg.grad_clip:
            norm = nn.utils.clip_grad_norm_(self.grad_params, tcfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([q.grad for q in self.grad_params if q.grad is not None])
        skip = (~torch.isfinite(norm)).float()  # 0-dim, on the device
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # passes its found_inf (the same decision) to the fused kernel
            self.scaler.update()
        elif self.skips_on_device:
            self.optimizer.found_inf = skip  # read by the fused kernels: the update is skipped where it is 1
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skip.item():  # unfused: the decision must come to the host
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.progress.global_step, 1.0 - skip)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.meters.end_step(skip)
        self.progress.global_step += 1
        fault_point("step", self.progress.global_step)  # test hook (fault injection), see checkpoint.py
        return True

    def evaluate(self, seen: int, seconds: float) -> bool:
        """Validate after an epoch, log and write metrics.json; returns whether top-1 improved on the best."""
        p, dist, tcfg = self.progress, self.dist, self.cfg.trainer
        self.sync_buffers()
        self.ensure_finite()
        images_per_s = seen * dist.world_size / max(seconds, 1e-9)
        metrics = run_evaluation(self.eval_model, self.ema_eval_model, self.data, dist, self.amp_dtype, tcfg.progress,
                                 p.epoch, pad_to=self.data.batch_size if tcfg.compile else None)
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
        tensors = {name: t for name, t in self.model.state_dict().items() if t.is_floating_point()}
        if self.ema is not None:
            tensors.update({f"ema.{n}": t for n, t in self.ema.module.state_dict().items() if t.is_floating_point()})
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()  # one host read
        for name, ok in zip(tensors, finite):
            if not ok:
                raise UserError(f"training diverged: {name} holds NaN/inf {where}; {self.last_good()}; "
                                "lower optim.lr, set trainer.grad_clip, or use trainer.precision=bf16/fp32")

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, EMA). DDP broadcasts them before each forward, but
        each rank's last forward then updates its own copy: without this, ranks would evaluate shards with different
        statistics, and differ from the model rank 0 saves."""
        if not self.dist.enabled:
            return
        import torch.distributed as tdist

        modules = [self.model] + ([self.ema.averaged] if self.ema is not None else [])  # EMA weights, counter too
        for module in modules:
            for t in module.buffers():
                tdist.broadcast(t, src=0)
        if self.ema is not None:
            for t in self.ema.averaged.parameters():
                tdist.broadcast(t.data, src=0)

    def save(self, name: str) -> None:
        """Model, EMA, optimizer, schedule, scaler, progress, RNG states and the resolved config, atomically."""
        self.sync_buffers()
        self.ensure_finite()
        p, ema = self.progress, self.ema
        self.on_main(lambda: save_atomic({
            "format_version": FORMAT_VERSION, "model": self.model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_state": ema.averaged.state_dict() if ema is not None else None,
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


def run_evaluation(model: nn.Module, ema_model: nn.Module | None, data, dist: DistInfo, amp_dtype, progress: bool,
                   epoch: int = 0, pad_to: int | None = None) -> dict:
    """Metrics of `model` (and `ema_` ones of the EMA's); pad_to: pad a smaller last batch (compiled models, so
    that it does not compile a second graph)."""
    bar = tqdm(total=data.num_val, desc="eval", disable=not (dist.is_main and progress), leave=False,
               dynamic_ncols=True)
    metrics = evaluate(model, _eval_fault_point(data.val_batches(), epoch), dist.device,
                       autocast(dist.device, amp_dtype), bar, pad_to=pad_to)
    if ema_model is not None:
        ema_metrics = evaluate(ema_model, data.val_batches(), dist.device, autocast(dist.device, amp_dtype),
                               pad_to=pad_to)
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "images"})
    bar.close()
    return metrics


def _eval_fault_point(batches, epoch: int):
    """Test hook (fault injection, see checkpoint.py): `eval:N` fires after the first batch of epoch N's evaluation."""
    for i, batch in enumerate(batches):
        yield batch
        if i == 0:
            fault_point("eval", epoch)
