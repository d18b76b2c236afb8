"""`cvt-train`: the Hydra entry point. All the work happens in engine/trainer.py."""

from __future__ import annotations

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .cli import check_overrides, friendly_errors, prepare_distributed_argv
from .engine.distributed import cleanup


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@friendly_errors
def run(cfg: DictConfig) -> float:
    from .engine.trainer import train

    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)  # the metric a Hydra sweeper optimises
    finally:
        cleanup()


def main() -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one report is enough
        check_overrides("train")
    prepare_distributed_argv()
    run()


if __name__ == "__main__":
    main()
