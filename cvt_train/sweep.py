"""Sweep summaries: one row per job of a Hydra multirun dir (the overrides that vary, metrics, cost)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("cvt_train")
METRIC_KEYS = ("top1", "top5", "best_top1", "loss", "epoch", "params", "gmacs", "images_per_s", "wall_time_s")


def collect_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Each job dir (with .hydra/overrides.yaml) as {overrides: {key: value}, metrics...}."""
    jobs = []
    for overrides_file in sorted(
        Path(sweep_dir).glob("*/.hydra/overrides.yaml"), key=lambda p: (len(p.parent.parent.name), p.parent.parent.name)
    ):
        job_dir = overrides_file.parent.parent
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) or [] if "=" in o)
        row: dict[str, Any] = {"job": job_dir.name, "overrides": overrides}
        for name in ("metrics.json", "eval.json", "bench.json"):
            if (job_dir / name).is_file():
                try:
                    row.update({k: v for k, v in json.loads((job_dir / name).read_text()).items() if k in METRIC_KEYS})
                except json.JSONDecodeError:
                    row["status"] = f"unreadable {name}"
        row.setdefault("status", "ok" if any(k in row for k in METRIC_KEYS) else "no metrics")
        jobs.append(row)
    return jobs


def summarize(sweep_dir: str | Path) -> tuple[str, Path, Path]:
    """Write summary.md and summary.csv into `sweep_dir`; returns (markdown, md path, csv path)."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir)
    all_keys = sorted({k for j in jobs for k in j["overrides"]})
    varying = [k for k in all_keys if len({j["overrides"].get(k) for j in jobs}) > 1] or all_keys
    metrics = [k for k in METRIC_KEYS if any(k in j for j in jobs)]
    header = ["job", *varying, *metrics, "status"]
    rows = [
        [j["job"], *(j["overrides"].get(k, "") for k in varying), *(j.get(k, "") for k in metrics), j["status"]]
        for j in jobs
    ]
    md = (
        "\n".join(
            [
                "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header),
                *("| " + " | ".join(str(_fmt(v)) for v in r) + " |" for r in rows),
            ]
        )
        + "\n"
    )
    md_path, csv_path = sweep_dir / "summary.md", sweep_dir / "summary.csv"
    md_path.write_text(md)
    with csv_path.open("w", newline="") as f:  # full precision for other tools; the Markdown is rounded to read
        csv.writer(f).writerows([header, *rows])
    return md, md_path, csv_path


def _fmt(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


class SweepSummaryCallback(Callback):
    """At the end of a multirun, writes the summary table at the sweep root."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            md, md_path, _ = summarize(config.hydra.sweep.dir)
            log.info("sweep summary (%s):\n%s", md_path, md)
        except Exception as e:  # a summary must never turn a finished sweep into a failure
            log.warning("could not write the sweep summary: %s", e)
