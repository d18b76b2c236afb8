"""Images/s of the training data pipeline alone (decode, augmentation, batching; no model), to set against the
model's images/s from cvt-bench or a training run's log (whose `data_wait` says how long the model waited).

    python scripts/loader_bench.py data=cifar10 data.root=/data/cifar10-jpeg data.val_split=0.1
    python scripts/loader_bench.py data=imagenet data.root=/data/imagenet aug=imagenet data.num_workers=8 --batches 50

Takes the same overrides as cvt-train (the model is not built). Prints the set-up time (reading / decoding into
memory, or listing the files) and the median batches/s over the timed batches after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

from hydra import compose, initialize_config_module

from cvt_train.data import build_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="cvt-train overrides (data=..., data.root=..., aug=...)")
    ap.add_argument("--batches", type=int, default=100, help="timed batches (default 100)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches first (workers starting; default 5)")
    a = ap.parse_args()
    with initialize_config_module("cvt_train.conf", version_base="1.3"):
        cfg = compose("train", overrides=a.overrides)
    t0 = time.perf_counter()
    data = build_data(cfg)
    setup = time.perf_counter() - t0
    print(f"{data!r}\nset-up {setup:.1f} s")
    times, images, epoch = [], 0, 0
    last = time.perf_counter()
    while len(times) < a.warmup + a.batches:
        for x, _ in data.train_batches(epoch):
            now = time.perf_counter()
            times.append(now - last)
            last = now
            if len(times) > a.warmup:
                images += x.shape[0]
            if len(times) == a.warmup + a.batches:
                break
        epoch += 1
    timed = times[a.warmup :]
    per_batch = statistics.median(timed)
    print(
        f"{len(timed)} batches of {data.batch_size} ({data.num_workers} workers, aug={data.aug.name}): "
        f"{data.batch_size / per_batch:,.0f} images/s (median), {images / sum(timed):,.0f} images/s (mean)"
    )
    data.close()


if __name__ == "__main__":
    main()
