"""The training loop: set-up in `Trainer.__init__`, the loop itself in `Trainer.fit` and `Trainer.train_step`.

Reproducibility: data order and augmentation are a pure function of (seed, epoch, step) (see cvt_train.data), and
the global RNG (dropout, drop path) is reseeded from (seed, epoch, step, rank) before every batch, so a run resumed
from any checkpoint, at an epoch boundary or mid-epoch, continues exactly as if it had never stopped.

The machinery around the loop lives beside it: stop signals in signals.py, checkpoints and RNG states in
checkpoint.py, rank-0 writes, buffer broadcasts and the ranks' final check in distributed.py, the evaluation in
evaluate.py, the EMA in ema.py, the loop's meters in meters.py, trainer.profile in profile.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import build_data
from ..errors import UserError
from ..flops import count_macs
from ..models import CvT, model_config, num_params
from ..models.convert import extract_state_dict, head_classes, load_checkpoint, read_file
from . import distributed
from .allocation import set_threads
from .budget import GUARD_STOP, Plan, calibrate, describe, plan_epochs, process_age_s, replan
from .checkpoint import (
    FORMAT_VERSION,
    fault_point,
    load_training_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    rng_states,
    save_atomic,
    write_text_atomic,
)
from .checks import flatten, resume_mismatch, validate
from .distributed import all_reduce_max, broadcast_object, check_ranks_agree, init_distributed, on_main
from .ema import WeightEma
from .evaluate import run_evaluation
from .meters import EpochClock, StepMeters
from .optim import build_optimizer, build_scheduler, learning_rate, load_optimizer_state
from .precision import autocast, autocast_dtype, precision_name, set_gpu_defaults
from .profile import StepProfiler
from .resize import all_sizes, input_sizes, resize_batch
from .resize import describe as describe_sizes
from .signals import StopRequest  # (also reached as cvt_train.engine.trainer.StopRequest)

log = logging.getLogger("cvt_train")


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + step * 101 + rank) % (2**63)


def init_weights(model: CvT, path: str, verbose: bool) -> None:
    """trainer.init_from: start from the weights of another run or a release (ours, official or HF format), with a
    fresh classifier when the file's class count differs (fine-tuning); optimizer and schedule start anew."""
    sd = extract_state_dict(read_file(path), source=path)
    classes = head_classes(sd)
    drop_head = classes is not None and classes != model.cfg.num_classes
    fmt = load_checkpoint(
        model,
        sd,
        drop_head=drop_head,
        source=f"trainer.init_from={path}",
        advice="pass the model= (and model.* overrides) the weights were made for",
    )
    if verbose:
        head = (
            f"classifier re-initialised ({classes} classes in the file, {model.cfg.num_classes} here)"
            if drop_head
            else "classifier included"
        )
        log.info("initial weights from %s (%s format), %s", path, fmt, head)


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # batches done in the epoch after those (non-zero only when stopped by a signal mid-epoch)
    global_step: int = 0  # optimizer steps
    best_top1: float = 0.0
    metrics: dict = field(default_factory=dict)  # of the last evaluation


class Trainer:
    """Set-up in __init__, the loop in `fit` and `train_step`, one method per part of it."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        validate(cfg)
        self.cfg, tcfg = cfg, cfg.trainer
        self.dist = dist = init_distributed(tcfg.device, tcfg.dist_timeout_min)
        set_threads(tcfg.threads)
        self.run_dir = Path(broadcast_object(str(run_dir)))
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_gpu_defaults(dist.device, tf32=tcfg.tf32, benchmark=not tcfg.deterministic)
        torch.manual_seed(tcfg.seed)

        resume_path = self._resume_path()
        ckpt = load_training_checkpoint(resume_path) if resume_path else None
        on_main(self._remove_stale_temporaries, dist)
        self.data = data = build_data(cfg, rank=dist.rank, world_size=dist.world_size, device=dist.device)
        if data.num_classes != cfg.data.num_classes:
            raise UserError(
                f"data.num_classes={cfg.data.num_classes} but {cfg.data.root} holds {data.num_classes} "
                f"classes; set data.num_classes={data.num_classes}"
            )
        self.model = model = self._build_model(init_from=tcfg.init_from if ckpt is None else None)
        self.amp_dtype = autocast_dtype(tcfg.precision, dist.device)
        self.steps_per_epoch = self._steps_per_epoch()
        self.ema = WeightEma(model, tcfg.ema.decay, tcfg.ema.warmup, dist.device) if tcfg.ema.enabled else None
        self.plan = self._plan(ckpt)  # trainer.time_budget_min: the epochs, from a timed calibration
        self.epochs = self.plan.epochs if self.plan is not None else tcfg.epochs
        # trainer.resize (resize.py); a budgeted run keeps the sizes of its plan (re-planning moves them)
        planned_sizes = self.plan.sizes if self.plan is not None else []
        self.input_sizes = planned_sizes or input_sizes(self.epochs, tcfg.resize, cfg.data.image_size)
        global_batch = cfg.data.batch_size * dist.world_size * tcfg.accum_steps
        self.lr = lr = learning_rate(cfg.optim, global_batch)
        self.optimizer = build_optimizer(model, cfg.optim, lr)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.sched, lr, self.steps_per_epoch // tcfg.accum_steps, self.epochs
        )
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.grad_params = [p for p in model.parameters() if p.requires_grad]
        # Fused optimizers skip a step on the device when told `found_inf` (the GradScaler's contract); others
        # need the decision on the host: one read per step (the log says so).
        self.skips_on_device = bool(self.optimizer.param_groups[0].get("fused"))
        self.meters = StepMeters(dist.device, tcfg.max_nonfinite)
        self.progress = Progress()
        if ckpt is not None:
            self._restore(ckpt, resume_path)
        self.meters.step.fill_(self.progress.global_step)
        self.train_model, self.eval_model, self.ema_eval_model = self._wrap_models()

        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
        self.train_loss = float("nan")  # mean over the last epoch
        self.log_history: list[dict] = []  # one entry per log point: step, epoch, loss, lr, skipped
        self.data_wait = 0.0  # fraction of the last epoch spent waiting for the data loader
        self.stop_signal: int | None = None  # the signal that stopped the run early, if one did
        self._warned_budget = False
        # trainer.time_budget_replan: what this process's whole epochs ({input size: seconds}) and evaluations took,
        # and when the first of them started
        self.epoch_seconds: dict[int, list[float]] = {}
        self.eval_seconds: list[float] = []
        self.paced_since: float | None = None
        self.config_dict = OmegaConf.to_container(cfg, resolve=True)
        image = (cfg.model.in_chans, cfg.data.image_size, cfg.data.image_size)
        self.run_info = {"params": num_params(model), "gmacs": count_macs(model, image) / 1e9}
        self.wall_start = time.perf_counter() - self.progress.metrics.get("wall_time_s", 0.0)
        self.profiler = StepProfiler(self.run_dir) if tcfg.profile and dist.is_main else None
        # called with the global step after each optimizer step, out of the loop's way: a test hook that kills the
        # process at a chosen step (fault injection, checkpoint.py), and the profiler's schedule
        self.step_hooks = [partial(fault_point, "step")] + ([self.profiler.after_step] if self.profiler else [])
        self.writer = None
        on_main(partial(self._open_run_dir, lr, global_batch), dist)

    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume == "auto":  # rank 0 decides: every rank must start where it does
            last = self.run_dir / "last.pt"
            found = broadcast_object(last.is_file())
            if found and not last.is_file():
                raise UserError(
                    f"trainer.resume=auto: rank {self.dist.rank} cannot see {last}, which rank 0 resumes from; put "
                    "hydra.run.dir on a file system every node sees"
                )
            if not found and self.dist.is_main:
                log.info("trainer.resume=auto: no %s yet, starting fresh", last)
            return last if found else None
        return Path(str(resume)) if resume else None

    def _plan(self, ckpt: dict | None) -> Plan | None:
        """trainer.time_budget_min: the checkpoint's plan when resuming (so the run ends where it would have),
        else a new one from a calibration (rank 0's, for every rank); None without a budget."""
        tcfg, dist = self.cfg.trainer, self.dist
        if tcfg.time_budget_min is None:
            return None
        if ckpt is not None:
            if not ckpt.get("plan"):
                raise UserError(
                    "trainer.time_budget_min: the checkpoint resumed from was made without a time budget; resume "
                    "it without trainer.time_budget_min (its trainer.epochs decide)"
                )
            plan = Plan(**ckpt["plan"])
            if plan.budget_min != tcfg.time_budget_min and dist.is_main:
                log.warning(
                    "trainer.time_budget_min=%g: resuming keeps the checkpoint's plan of %d epochs (made for %g min)",
                    tcfg.time_budget_min,
                    plan.epochs,
                    plan.budget_min,
                )
            return plan
        forwards = (2 if tcfg.eval_tta == "flip" else 1) * (2 if self.ema is not None else 1)
        full, rc = self.cfg.data.image_size, tcfg.resize
        train_rates, eval_rate = calibrate(self, forwards, all_sizes(rc, full))
        size_costs = {s: train_rates[full] / rate for s, rate in train_rates.items()}
        ws, data = dist.world_size, self.data
        plan = plan_epochs(
            tcfg.time_budget_min,
            process_age_s(),
            train_rates[full] * ws,
            eval_rate * ws,
            self.steps_per_epoch * data.batch_size * ws,
            data.num_val,
            tcfg.eval_every,
            (lambda n: [size_costs[s] for s in input_sizes(n, rc, full)]) if rc.min_size is not None else None,
        )
        plan.size_costs = size_costs
        plan.sizes = input_sizes(plan.epochs, rc, full)
        plan = broadcast_object(plan)
        if dist.is_main:
            log.info("%s", describe(plan))
        return plan

    def _keep_to_budget(self) -> bool:
        """After an epoch of a budgeted run: re-plan the remaining epochs (trainer.time_budget_replan), warn when the
        run is projected to end past its budget anyway, and say to stop (at this epoch boundary) when past
        GUARD_STOP of it. Without re-planning the projection scales the plan's remaining time by how much slower
        than calibrated the epochs so far ran."""
        plan, p, tcfg = self.plan, self.progress, self.cfg.trainer
        if plan is None or p.epoch >= self.epochs:
            return False
        elapsed = time.perf_counter() - self.wall_start
        if tcfg.time_budget_replan and self.epoch_seconds:
            measured = sum(map(sum, self.epoch_seconds.values())) + sum(self.eval_seconds)
            overhead = max(1.0, (time.perf_counter() - self.paced_since) / measured)
            epochs, slower, projected = broadcast_object(  # rank 0's clock decides for every rank
                replan(plan, p.epoch, elapsed, self.epoch_seconds, self.eval_seconds, overhead, self._sizes_for)
            )
            if epochs != self.epochs:
                self._set_epochs(epochs, slower, projected)
        else:
            slower = elapsed / max(plan.seconds(p.epoch), 1e-9)
            slower, projected = broadcast_object((slower, plan.spent_s + slower * plan.seconds(self.epochs)))
        budget = plan.budget_min * 60
        stop = projected > GUARD_STOP * budget  # (the same on every rank: rank 0's figures)
        if projected > budget and self.dist.is_main and (stop or not self._warned_budget):
            self._warned_budget = True
            log.warning(
                "time budget %g min: epochs run %.2fx slower than calibrated; projected end at %.1f min%s",
                plan.budget_min,
                slower,
                projected / 60,
                f": stopping after epoch {p.epoch} of the planned {self.epochs} (last.pt written)" if stop else "",
            )
        return stop

    def _sizes_for(self, epochs: int) -> list[int]:
        """The input sizes of a run re-planned to `epochs`: those run so far, then the schedule's for `epochs`, never
        smaller than the last one run."""
        done = self.progress.epoch
        planned = input_sizes(epochs, self.cfg.trainer.resize, self.cfg.data.image_size)
        return self.input_sizes[:done] + [max(size, self.input_sizes[done - 1]) for size in planned[done:]]

    def _set_epochs(self, epochs: int, slower: float, projected: float) -> None:
        """Re-plan to `epochs`: the plan (stored with the next checkpoint), the input sizes to come, and the
        learning-rate schedule rebuilt for the new total and brought to this step (the rate moves by a few
        percent)."""
        plan, p, tcfg = self.plan, self.progress, self.cfg.trainer
        if self.dist.is_main:
            log.info(
                "time budget %g min: after epoch %d, %d epochs planned instead of %d (epochs take %.2fx their "
                "calibrated time; predicted end at %.1f min)",
                plan.budget_min,
                p.epoch,
                epochs,
                self.epochs,
                slower,
                projected / 60,
            )
        self.input_sizes = plan.sizes = self._sizes_for(epochs)
        if plan.epoch_times:
            plan.epoch_times = [plan.epoch_time(s) for s in plan.sizes]
        plan.replans.append([p.epoch, epochs])
        self.epochs = plan.epochs = epochs
        for group in self.optimizer.param_groups:  # a new scheduler starts from the peak rate it decays from
            group["lr"] = group["initial_lr"]
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.sched, self.lr, self.steps_per_epoch // tcfg.accum_steps, epochs
        )
        for _ in range(p.global_step):
            self.scheduler.step()

    def _remove_stale_temporaries(self) -> None:
        for tmp in remove_stale_temporaries(self.run_dir):
            log.info("removed %s, left by a process killed while writing a checkpoint", tmp)

    def _build_model(self, init_from: str | None) -> nn.Module:
        """The model on the rank's device; init_from: trainer.init_from (a resumed run has its weights in the
        checkpoint instead)."""
        tcfg, dist = self.cfg.trainer, self.dist
        model = CvT(model_config(self.cfg.model))
        if init_from:
            init_weights(model, str(init_from), verbose=dist.is_main)
        model = model.to(dist.device)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if tcfg.sync_bn and dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _steps_per_epoch(self) -> int:
        """Batches per epoch: only whole accumulation windows, since a partial one at the end of an epoch would leak
        its gradients into the next epoch (and a run restarted from that epoch boundary would not have them)."""
        tcfg, steps = self.cfg.trainer, self.data.steps_per_epoch
        if tcfg.max_steps_per_epoch:
            steps = min(steps, int(tcfg.max_steps_per_epoch))
        if steps < tcfg.accum_steps:
            raise UserError(
                f"trainer.accum_steps={tcfg.accum_steps}: more than the {steps} batches of an epoch; "
                "lower trainer.accum_steps or data.batch_size"
            )
        return steps // tcfg.accum_steps * tcfg.accum_steps

    def _wrap_models(self) -> tuple[nn.Module, nn.Module, nn.Module | None]:
        """What trains (DDP-wrapped under torchrun), what evaluates, and the EMA's model; compiled with
        trainer.compile."""
        tcfg, dist, model = self.cfg.trainer, self.dist, self.model
        train_model, ema_model = model, self.ema.module if self.ema is not None else None
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            # bucket views: gradients live in DDP's buckets (no second copy). Not static_graph: its reducer reads
            # its used-parameter map back every backward (cvt_cifar_tiny: 142 per step with gloo)
            train_model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        if not tcfg.compile:
            return train_model, model, ema_model
        compile_ = partial(torch.compile, mode=tcfg.compile_mode)
        return compile_(train_model), compile_(model), compile_(ema_model) if ema_model is not None else None

    def _open_run_dir(self, lr: float, global_batch: int) -> None:
        """Rank 0: the run dir, TensorBoard's writer, the resolved config.yaml, and the run's first log line."""
        from torch.utils.tensorboard import SummaryWriter

        cfg, data = self.cfg, self.data
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        except OSError as e:
            raise UserError(
                f"{self.run_dir}: cannot write the run's files ({e.strerror or e}); free disk space "
                "or fix the output dir's permissions"
            ) from e
        write_text_atomic(OmegaConf.to_yaml(self.config_dict), self.run_dir / "config.yaml")  # resolved
        log.info(
            "model %s: %.2fM params | data %s: %d train / %d val images, %d classes | lr %.3g (global batch %d, "
            "world size %d, precision %s)",
            cfg.model.name,
            self.run_info["params"] / 1e6,
            cfg.data.name,
            data.num_train,
            data.num_val,
            data.num_classes,
            lr,
            global_batch,
            self.dist.world_size,
            precision_name(self.amp_dtype),
        )
        if not self.skips_on_device:
            log.warning(
                "optim.fused=false: skipping non-finite steps needs a host read per step (a GPU stall); "
                "fused optimizers decide on the device"
            )

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
            self.progress = Progress(
                ckpt["epoch"],
                ckpt.get("step", 0),
                ckpt["global_step"],
                ckpt.get("best_top1", 0.0),
                ckpt.get("metrics", {}),
            )
        except (KeyError, ValueError, RuntimeError, TypeError) as e:  # resumed with other overrides than it was made
            raise resume_mismatch(path, ckpt, self.cfg, e) from e
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d step %d", path, self.progress.epoch + 1, self.progress.step)

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> float:
        """Train to trainer.epochs (or until a stop signal); returns the best validation top-1 (percent)."""
        tcfg, dist, p = self.cfg.trainer, self.dist, self.progress
        if tcfg.resize.min_size is not None and dist.is_main:
            log.info("progressive resizing: %s", describe_sizes(self.input_sizes))
        try:
            with StopRequest() as stop, self.profiler or contextlib.nullcontext():
                epoch = p.epoch
                while epoch < self.epochs:  # (self.epochs may change: trainer.time_budget_replan)
                    self.train_model.train()
                    first = p.step if epoch == p.epoch else 0  # (mid-epoch after a resume)
                    if first == 0 and self.paced_since is None:
                        self.paced_since = time.perf_counter()
                    clock = EpochClock(
                        self.steps_per_epoch,
                        first,
                        f"epoch {epoch + 1}/{self.epochs}",
                        show=dist.is_main and tcfg.progress,
                    )
                    for step, (images, targets) in clock.batches(self.data.train_batches(epoch, first)):
                        images = resize_batch(images, self.input_sizes[epoch])
                        if not self.train_step(images, targets, epoch, step):
                            continue  # inside an accumulation window
                        clock.bar.update(tcfg.accum_steps)
                        for hook in self.step_hooks:  # fault injection (tests), the profiler
                            hook(p.global_step)
                        at_log_point = p.global_step % tcfg.log_every == 0
                        if at_log_point:  # the loop's one host read
                            self.log_point(clock)
                        # one process: a Python flag, every step; DDP: a collective, so only at log points (same step)
                        if (at_log_point or not dist.enabled) and stop.requested(dist):
                            p.step = step + 1
                            self.log_point()  # the divergence check comes before the save
                            self.save("last.pt")
                            clock.close()
                            return self.stopped(stop)
                    clock.close()
                    self.log_point(clock)
                    self.data_wait, self.train_loss = clock.rates(dist.world_size)[1], self.meters.read_epoch()
                    if self.paced_since is not None:
                        self.epoch_seconds.setdefault(self.input_sizes[epoch], []).append(clock.seconds)
                    p.epoch, p.step = epoch + 1, 0
                    over_budget = self._keep_to_budget()  # before the evaluation: re-planning moves the last epoch
                    if p.epoch % tcfg.eval_every == 0 or p.epoch == self.epochs:
                        started = time.perf_counter()
                        improved = self.evaluate(clock.seen, clock.seconds)
                        if self.paced_since is not None:
                            self.eval_seconds.append(time.perf_counter() - started)
                        if improved:
                            self.save("best.pt")  # before last.pt: a kill between the two redoes the epoch and best.pt
                    self.save("last.pt")
                    if p.epoch < self.epochs and stop.requested(dist):  # it came during the evaluation
                        return self.stopped(stop)
                    if over_budget:  # the machine slowed down badly: end at this epoch boundary
                        break
                    epoch += 1
                if stop.requested(dist):  # during the last evaluation: the run is complete, but a sweep must
                    self.stop_signal = stop.signum  # still stop (train.py)
            self.finish()
            return p.best_top1
        finally:  # an error or Ctrl-C too: flush the TensorBoard events written so far
            self.close(hparams=False)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int) -> bool:
        """Forward and backward of one batch, and the optimizer step at the end of an accumulation window (returns
        whether it came). No host read: a step with non-finite gradients is skipped on the device."""
        tcfg, dist = self.cfg.trainer, self.dist
        torch.manual_seed(step_seed(tcfg.seed, epoch, step, dist.rank))  # dropout, drop path: resumable
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
            norm = nn.utils.get_total_norm([q.grad for q in self.grad_params if q.grad is not None])
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
        return True

    # ---------------------------------------------------------------------------------------- around the loop
    def log_point(self, clock: EpochClock | None = None) -> None:
        """Read the step meters back (the loop's one host read: every trainer.log_every steps, at the end of an
        epoch and before a save), stop a diverged run, log the window's loss with `clock`'s throughput."""
        p, dist, tcfg = self.progress, self.dist, self.cfg.trainer
        loss, batches, skipped, tripped = self.meters.read_window()
        if dist.enabled:  # each rank saw its own losses; all stop together
            tripped = int(all_reduce_max(torch.full((1,), tripped, device=dist.device)).item())
        if tripped:
            epoch, step = divmod(tripped - 1, self.steps_per_epoch // tcfg.accum_steps)
            raise UserError(
                f"training diverged: non-finite loss for {tcfg.max_nonfinite} consecutive steps (epoch {epoch + 1}, "
                f"step {(step + 1) * tcfg.accum_steps}); {self.last_good()}; lower optim.lr, set trainer.grad_clip, "
                "or use trainer.precision=bf16/fp32"
            )
        if clock is None or not batches:  # (the check before a save; or nothing since the last log point)
            return
        images_per_s, data_wait = clock.rates(dist.world_size)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log_history.append(
            {"step": p.global_step, "epoch": p.epoch + 1, "loss": loss, "lr": lr, "skipped": skipped}
        )
        if clock.bar is not None:  # (closed at the end of the epoch)
            clock.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}", data_wait=f"{data_wait:.0%}"
            )
        if self.writer is not None:
            for name, value in (("loss", loss), ("lr", lr), ("images_per_s", images_per_s), ("skipped_steps", skipped)):
                self.writer.add_scalar(f"train/{name}", value, p.global_step)

    def stopped(self, stop: StopRequest) -> float:
        """last.pt is written where the run stopped: say how to resume, let an earlier handler have the signal,
        return the best top-1 so far."""
        p = self.progress
        self.stop_signal = stop.signum
        if self.dist.is_main:
            log.warning(
                "stopped by signal %s at epoch %d step %d; last.pt written. Resume with: "
                "cvt-train <same overrides> hydra.run.dir=%s trainer.resume=auto",
                stop.signum,
                p.epoch + 1,
                p.step,
                self.run_dir,
            )
        stop.pass_on()
        return p.best_top1

    def evaluate(self, seen: int, seconds: float) -> bool:
        """Validate after an epoch, log and write metrics.json; returns whether top-1 improved on the best."""
        p, dist, tcfg = self.progress, self.dist, self.cfg.trainer
        self.sync_buffers()
        self.ensure_finite()
        images_per_s = seen * dist.world_size / max(seconds, 1e-9)
        metrics = run_evaluation(
            self.eval_model,
            self.ema_eval_model,
            self.data,
            dist,
            self.amp_dtype,
            tcfg.progress,
            p.epoch,
            pad_to=self.data.batch_size if tcfg.compile else None,
            tta=tcfg.eval_tta,
        )
        metrics.update(
            epoch=p.epoch,
            **self.run_info,
            wall_time_s=time.perf_counter() - self.wall_start,
            images_per_s=images_per_s,
            data_wait=self.data_wait,
        )
        if self.data.skipped:  # data.skip_corrupt=true: how many unreadable images were left out so far
            metrics["skipped_images"] = len(self.data.skipped)
        improved = metrics["top1"] > p.best_top1
        p.best_top1 = metrics["best_top1"] = max(p.best_top1, metrics["top1"])
        p.metrics = metrics
        on_main(partial(self._report, metrics, seconds), dist)
        return improved

    def _report(self, metrics: dict, seconds: float) -> None:
        """Rank 0: an evaluation's log line, TensorBoard scalars and metrics.json."""
        p, writer = self.progress, self.writer
        log.info(
            "epoch %d/%d: train loss %.4f | val top1 %.2f top5 %.2f loss %.4f%s | %.0f img/s, %.0f%% of the "
            "time waiting for data",
            p.epoch,
            self.epochs,
            self.train_loss,
            metrics["top1"],
            metrics["top5"],
            metrics["loss"],
            (f" | flip-TTA top1 {metrics['tta_top1']:.2f}" if "tta_top1" in metrics else "")
            + (f" | ema top1 {metrics['ema_top1']:.2f}" if "ema_top1" in metrics else ""),
            metrics["images_per_s"],
            100 * self.data_wait,
        )
        for key in ("top1", "top5", "loss", "tta_top1", "ema_top1", "ema_top5", "ema_tta_top1"):
            if key in metrics:
                writer.add_scalar(f"val/{key}", metrics[key], p.epoch)
        writer.add_scalar("train/epoch_time_s", seconds, p.epoch)
        writer.add_scalar("train/data_wait", self.data_wait, p.epoch)  # fraction of the epoch
        write_text_atomic(json.dumps(metrics, indent=2), self.run_dir / "metrics.json")

    def finish(self) -> None:
        """After the last epoch: the profile's table, the ranks' agreement, TensorBoard's HParams entry."""
        on_main(self.profiler.write if self.profiler is not None else lambda: None, self.dist)
        if self.dist.enabled:
            check_ranks_agree(self.model, self.dist)
        self.close(hparams=True)

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
                raise UserError(
                    f"training diverged: {name} holds NaN/inf {where}; {self.last_good()}; "
                    "lower optim.lr, set trainer.grad_clip, or use trainer.precision=bf16/fp32"
                )

    def sync_buffers(self) -> None:
        """Before an evaluation or a save, every rank takes rank 0's BatchNorm statistics and EMA (its weights and
        update counter too), so that all ranks hold the model that is saved."""
        ema = [self.ema.averaged] if self.ema is not None else []
        distributed.sync_buffers([self.model, *ema], self.dist, weights_of=ema)

    def save(self, name: str) -> None:
        """Model, EMA, optimizer, schedule, scaler, progress, RNG states and the resolved config, atomically."""
        self.sync_buffers()
        self.ensure_finite()
        on_main(partial(self._write_checkpoint, name), self.dist)

    def _write_checkpoint(self, name: str) -> None:
        p, ema = self.progress, self.ema
        save_atomic(
            {
                "format_version": FORMAT_VERSION,
                "model": self.model.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "ema_state": ema.averaged.state_dict() if ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": p.epoch,
                "step": p.step,
                "global_step": p.global_step,
                "best_top1": p.best_top1,
                "metrics": p.metrics,
                "rng": rng_states(),
                "config": self.config_dict,
                "classes": list(self.data.classes),
                "plan": dataclasses.asdict(self.plan) if self.plan is not None else None,
            },
            self.run_dir / name,
        )

    def close(self, hparams: bool) -> None:
        """Close the TensorBoard events, with the HParams entry of a finished run (TensorBoard's sweep view)."""
        if self.writer is None:
            return
        if hparams:
            values = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flatten(self.config_dict).items()
                if not k.startswith("hydra")
            }
            p = self.progress
            metrics = {"hparam/top1": p.metrics.get("top1", 0.0), "hparam/best_top1": p.best_top1}
            self.writer.add_hparams(values, metrics, run_name=".")
        self.writer.close()
        self.writer = None


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as `cfg` says, writing into `run_dir`; returns the best validation top-1 (percent)."""
    return Trainer(cfg, run_dir).fit()
