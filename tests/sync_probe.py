"""Run one training job under HostReads and a count of Python-level collectives; write the counts as JSON.

    python tests/sync_probe.py OUT.json OVERRIDE...                                  (one process)
    python -m torch.distributed.run --nproc_per_node=2 tests/sync_probe.py OUT.json OVERRIDE...   (OUT.rankN.json)

Used by tests/test_gpu_path.py (and scripts/gpu_check.py's idea, on CPU): host reads and collectives per optimizer
step are the difference between two runs of different lengths divided by the difference in steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as tdist
from hydra import compose, initialize_config_module

from cvt_train.engine.distributed import cleanup
from cvt_train.engine.hostsync import HostReads
from cvt_train.engine.trainer import Trainer

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "broadcast_object_list", "barrier")


def probe(overrides: list[str], run_dir: Path) -> dict:
    """Train as `overrides` say; count host reads and the trainer's collectives over the whole run."""
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    calls = {"n": 0}
    real = {name: getattr(tdist, name) for name in COLLECTIVES}

    def counter(name):
        def counted(*args, **kwargs):
            calls["n"] += 1
            return real[name](*args, **kwargs)

        return counted

    for name in COLLECTIVES:  # the trainer's own collectives (DDP's gradient all-reduce runs in C++: not counted)
        setattr(tdist, name, counter(name))
    try:
        trainer = Trainer(cfg, run_dir)
        with HostReads(trace=True) as reads:
            trainer.fit()
    finally:
        for name, fn in real.items():
            setattr(tdist, name, fn)
    return {
        "reads": reads.count,
        "where": reads.where,
        "collectives": calls["n"],
        "global_step": trainer.progress.global_step,
    }


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    result = probe(overrides, out.parent / "run")
    out.with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    cleanup()


if __name__ == "__main__":
    main()
