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
             autocast: contextlib.AbstractContextManager | None = None, progress=None, pad_to: int | None = None) -> dict:
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
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
        if progress is not None:
            progress.update(labels.numel())
    model.train(was_training)
    loss, top1, top5, n = all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "images": int(n)}
