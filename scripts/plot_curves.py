"""Validation top-1 against wall time, one curve per run, from the runs' TensorBoard events -> a PNG.

    python scripts/plot_curves.py outputs/cifar10_cpu outputs/cifar10_cpu_old --labels new old --out docs/cifar10_cpu.png

Each run folder holds tb/ (the trainer's events). x: minutes since the run's first event (the trainer opens its
events after reading the data and building the model, so a run's start-up is not on the axis; the recipe files
give whole-process times). y: val/top1 at each evaluation, and val/tta_top1 dashed where the run logged it.
Needs matplotlib (pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def curve(run: Path, tag: str) -> tuple[list[float], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    if tag not in tags:
        return [], []
    first = min(e.wall_time for t in tags for e in events.Scalars(t))
    points = events.Scalars(tag)
    return [(p.wall_time - first) / 60 for p in points], [p.value for p in points]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (each with tb/)")
    ap.add_argument("--labels", nargs="*", help="one label per run (default: the folder names)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--title", default="validation top-1 against wall time")
    a = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install -e '.[plot]'")
    labels = a.labels or [r.name for r in a.runs]
    if len(labels) != len(a.runs):
        sys.exit(f"error: --labels: {len(labels)} labels for {len(a.runs)} runs; give one per run")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run, label in zip(a.runs, labels):
        if not (run / "tb").is_dir():
            sys.exit(f"error: {run}: no tb/ folder of TensorBoard events; pass the run folders cvt-train wrote")
        x, y = curve(run, "val/top1")
        if not x:
            sys.exit(f"error: {run}: no val/top1 in its events (did an evaluation run?)")
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=f"{label} (top-1 {y[-1]:.2f})")
        tx, ty = curve(run, "val/tta_top1")
        if tx:
            ax.plot(tx, ty, linestyle="--", color=line.get_color(), label=f"{label}, flip TTA ({ty[-1]:.2f})")
    ax.set_xlabel("minutes since the run's first event")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(a.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
