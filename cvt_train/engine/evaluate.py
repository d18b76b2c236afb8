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
    tta: str | None = None,
) -> dict:
    """Sums of loss and correct predictions, reduced over ranks, so each image counts exactly once.

    Each rank must see a disjoint shard with no padded duplicates (the data module guarantees it).
    pad_to: a smaller batch is padded with zero images to this size and their outputs dropped (eval-mode outputs
    are per image), so that a compiled model sees one shape. tta="flip": also the metrics of the mean of the logits
    of each image and its horizontal mirror, as tta_top1 / tta_top5 / tta_loss beside the plain ones. Accuracies
    are percent.
    """
    was_training = model.training
    model.eval()
    views = 2 if tta == "flip" else 1
    sums = torch.zeros(1 + 3 * views, dtype=torch.float64, device=device)  # images, then loss, top-1, top-5 per view
    for images, labels in batches:
        n = images.shape[0]
        if pad_to is not None and n < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
        with autocast or contextlib.nullcontext():
            logits = model(images)
            if views == 2:
                mirrored = model(images.flip(-1))
        labels = labels.to(device)
        parts = [torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)]
        parts += _scores(logits[:n].float(), labels)
        if views == 2:
            parts += _scores((logits[:n].float() + mirrored[:n].float()) / 2, labels)
        sums += torch.stack(parts)
        if progress is not None:
            progress.update(labels.numel())
    model.train(was_training)
    n, *rest = all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    metrics = {"top1": 100.0 * rest[1] / n, "top5": 100.0 * rest[2] / n, "loss": rest[0] / n, "images": int(n)}
    if views == 2:
        metrics.update(tta_top1=100.0 * rest[4] / n, tta_top5=100.0 * rest[5] / n, tta_loss=rest[3] / n)
    return metrics


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Summed loss, top-1 hits, top-5 hits of a batch (float64, on the device)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [
        F.cross_entropy(logits, labels, reduction="sum").double(),
        hits[:, 0].sum().double(),
        hits.any(1).sum().double(),
    ]


def run_evaluation(
    model: nn.Module,
    ema_model: nn.Module | None,
    data,
    dist: DistInfo,
    amp_dtype,
    progress: bool,
    epoch: int = 0,
    pad_to: int | None = None,
    tta: str | None = None,
) -> dict:
    """Metrics of `model` (and `ema_` ones of the EMA's); pad_to: pad a smaller last batch (compiled models, so
    that it does not compile a second graph); tta: see evaluate."""
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
        tta=tta,
    )
    if ema_model is not None:
        ema_metrics = evaluate(
            ema_model, data.val_batches(), dist.device, autocast(dist.device, amp_dtype), pad_to=pad_to, tta=tta
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
