"""`cvt-train`: the Hydra entry point. All the work happens in engine/trainer.py."""

from __future__ import annotations

import os
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import config as _config  # noqa: F401  (registers the schemas before @hydra.main composes)
from .cli import check_overrides, friendly_errors, prepare_distributed_argv
from .engine.distributed import cleanup, lost_peer
from .errors import UserError
from .sweep import summarize


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@friendly_errors
def run(cfg: DictConfig) -> float:
    from .engine.trainer import Trainer

    finished = False
    try:
        trainer = Trainer(cfg, HydraConfig.get().runtime.output_dir)
        best_top1 = trainer.fit()
        finished = True
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        # another rank died (torchrun stops the others with SIGTERM): no step, no save is finished without it. One
        # line instead of a traceback; the dead rank's own output says why it died
        rank = int(os.environ.get("RANK", "0"))
        reason = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))  # ([gloo's source file:line] ...)
        reason = re.split(r"\.\s", reason, maxsplit=1)[0][:200]  # its first sentence
        raise UserError(
            f"rank {rank}: another rank is gone ({reason}); stopping. Under torchrun --max-restarts the group "
            "restarts and trainer.resume=auto continues from last.pt"
        ) from e
    finally:
        cleanup(graceful=finished)
    hydra_cfg = HydraConfig.get()
    if trainer.stop_signal and hydra_cfg.mode == RunMode.MULTIRUN and not os.environ.get("SUBMITIT_EXECUTOR"):
        # a stop signal ends a sequential sweep, not just this job (its last.pt is written), with the signal's exit
        # status; the summary covers the jobs so far. (submitit runs jobs apart: each stops alone, and requeues.)
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                summarize(hydra_cfg.sweep.dir)
            except OSError:  # the stop matters more than the table
                pass
            print(
                f"sweep stopped by signal {trainer.stop_signal}; rerun the same command with "
                f"hydra.sweep.dir={hydra_cfg.sweep.dir} trainer.resume=auto to continue it",
                file=sys.stderr,
            )
        sys.exit(128 + trainer.stop_signal)
    return best_top1  # the metric a Hydra sweeper optimises


def main() -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one report is enough
        check_overrides("train")
    prepare_distributed_argv()
    run()


if __name__ == "__main__":
    main()
