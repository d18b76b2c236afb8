#!/usr/bin/env python
"""Turn a Hydra multirun dir into summary.md / summary.csv (and summary.png when matplotlib is installed).

python scripts/summarize_sweep.py multirun/2026-11-24/12-00-00 [--plot-x model.stages.0.patch_stride]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvt_train.sweep import collect_jobs, summarize


def plot(sweep_dir: Path, x_key: str | None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    jobs = [j for j in collect_jobs(sweep_dir) if "top1" in j]
    if not jobs:
        return None
    x_key = x_key or next(iter(jobs[0]["overrides"]), None)
    labels = [str(j["overrides"].get(x_key, j["job"])) for j in jobs]
    fig, ax = plt.subplots(figsize=(max(4, len(jobs) * 0.8), 3.5))
    ax.bar(labels, [j["top1"] for j in jobs])
    ax.set_xlabel(x_key or "job")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(sweep_dir.name)
    fig.tight_layout()
    out = sweep_dir / "summary.png"
    fig.savefig(out, dpi=120)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--plot-x", default=None, help="override key on the plot's x axis (default: the first)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir}: no such sweep dir", file=sys.stderr)
        return 2
    if not collect_jobs(args.sweep_dir):  # checked first, so that no summary lands in a dir that is no sweep
        print(
            f"error: {args.sweep_dir}: no job dirs with .hydra/overrides.yaml found; point to a multirun dir",
            file=sys.stderr,
        )
        return 2
    md, md_path, csv_path = summarize(args.sweep_dir)
    print(md)
    print(f"wrote {md_path} and {csv_path}")
    png = plot(args.sweep_dir, args.plot_x)
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
