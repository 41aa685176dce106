"""Supervised source pre-training: the loop both suites train their source model with (their recipes, the
optimizer, schedule, batches and augmentation, are arguments)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["train_supervised"]

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def train_supervised(
    model: nn.Module,
    batches: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epochs: int,
    *,
    prepare: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    on_epoch: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """``epochs`` passes of cross-entropy training in train mode over ``batches()`` (called once per epoch),
    the scheduler stepped after every optimizer step. ``prepare(x, y)``: device transfer and augmentation;
    ``on_step(loss)`` / ``on_epoch(last loss)``: progress (the loss tensor is not synchronised here)."""
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        model.train()
        for x, y in batches():
            if prepare is not None:
                x, y = prepare(x, y)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if on_step is not None:
                on_step(loss)
        if on_epoch is not None:
            on_epoch(loss)
