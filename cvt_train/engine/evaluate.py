"""Top-1 / top-5 / loss over a validation stream, exact under DistributedDataParallel."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None, progress=None) -> dict:
    """Sums of loss and correct predictions, reduced over ranks, so each image counts exactly once.

    Each rank must see a disjoint shard with no padded duplicates (the data module guarantees it).
    Accuracies are percent.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, labels in batches:
        with autocast or contextlib.nullcontext():
            logits = model(images)
        logits, labels = logits.float(), labels.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
        if progress is not None:
            progress.update(labels.numel())
    model.train(was_training)
    loss, top1, top5, n = all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": int(n)}
