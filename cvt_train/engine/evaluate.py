"""Top-1 / top-5 / loss over a validation stream, exact under DistributedDataParallel; the trainer's evaluation of
the model and its EMA after an epoch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import fault_point
from .distributed import DistInfo, all_reduce_sum
from .precision import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    progress=None,
    pad_to: int | None = None,
) -> dict:
    """Sums of loss and correct predictions, reduced over ranks, so each image counts exactly once.

    Each rank must see a disjoint shard with no padded duplicates (the data module guarantees it).
    pad_to: a smaller batch is padded with zero images to this size and their outputs dropped (eval-mode outputs
    are per image), so that a compiled model sees one shape. Accuracies are percent.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, labels in batches:
        n = images.shape[0]
        if pad_to is not None and n < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
        with autocast or contextlib.nullcontext():
            logits = model(images)
        logits, labels = logits[:n].float(), labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack(
            [
                F.cross_entropy(logits, labels, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(1).sum().double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ]
        )
        if progress is not None:
            progress.update(labels.numel())
    model.train(was_training)
    loss, top1, top5, n = all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": int(n)}


def run_evaluation(
    model: nn.Module,
    ema_model: nn.Module | None,
    data,
    dist: DistInfo,
    amp_dtype,
    progress: bool,
    epoch: int = 0,
    pad_to: int | None = None,
) -> dict:
    """Metrics of `model` (and `ema_` ones of the EMA's); pad_to: pad a smaller last batch (compiled models, so
    that it does not compile a second graph)."""
    bar = tqdm(
        total=data.num_val, desc="eval", disable=not (dist.is_main and progress), leave=False, dynamic_ncols=True
    )
    metrics = evaluate(
        model,
        _eval_fault_point(data.val_batches(), epoch),
        dist.device,
        autocast(dist.device, amp_dtype),
        bar,
        pad_to=pad_to,
    )
    if ema_model is not None:
        ema_metrics = evaluate(
            ema_model, data.val_batches(), dist.device, autocast(dist.device, amp_dtype), pad_to=pad_to
        )
        metrics.update({f"ema_{k}": v for k, v in ema_metrics.items() if k != "images"})
    bar.close()
    return metrics


def _eval_fault_point(batches, epoch: int):
    """Test hook (fault injection, see checkpoint.py): `eval:N` fires after the first batch of epoch N's evaluation."""
    for i, batch in enumerate(batches):
        yield batch
        if i == 0:
            fault_point("eval", epoch)
