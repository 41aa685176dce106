"""The one evaluator: accuracy and mean loss as fractions, per-group and worst-group accuracy when the data
carry groups; sharded over the ranks and gathered when training is data parallel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import EvalResult
from .data import Split, to_device

__all__ = ["evaluate", "evaluate_split"]

#: (correct, loss sum, count, correct per group, count per group)
Tally = tuple[float, float, int, dict[int, float], dict[int, int]]


@torch.no_grad()
def _tally(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, batch_size: int, device: torch.device,
           channels_last: bool, shard: tuple[int, int] | None) -> Tally:
    correct, loss_sum, n = 0.0, 0.0, 0
    group_correct: dict[int, float] = {}
    group_count: dict[int, int] = {}
    for xb, yb, gb in split.batches(batch_size, shuffle=False, shard=shard, split=False):
        xb, yb = to_device(xb, device, channels_last), yb.to(device)
        logits = forward(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        hit = (logits.argmax(1) == yb).float()
        correct += float(hit.sum())
        n += len(yb)
        if gb is not None:
            _tally_groups(hit, gb.to(device), group_correct, group_count)
    return correct, loss_sum, n, group_correct, group_count


def _tally_groups(hit: torch.Tensor, groups: torch.Tensor, correct: dict[int, float], count: dict[int, int]) -> None:
    for gval in torch.unique(groups).tolist():
        sel = groups == gval
        correct[gval] = correct.get(gval, 0.0) + float(hit[sel].sum())
        count[gval] = count.get(gval, 0) + int(sel.sum())


def _gather(tally: Tally, world: int) -> Tally:
    """Every rank evaluated whole batches of its own: sum the counts in rank order."""
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, tally)
    correct, loss_sum, n = (sum(p[i] for p in parts) for i in range(3))
    group_correct: dict[int, float] = {}
    group_count: dict[int, int] = {}
    for _, _, _, gc, gn in parts:
        for gval in gn:
            group_correct[gval] = group_correct.get(gval, 0.0) + gc[gval]
            group_count[gval] = group_count.get(gval, 0) + gn[gval]
    return correct, loss_sum, n, group_correct, group_count


def evaluate_split(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, batch_size: int,
                   device: torch.device, channels_last: bool = False,
                   shard: tuple[int, int] | None = None) -> EvalResult:
    tally = _tally(forward, split, batch_size, device, channels_last, shard)
    if shard is not None:
        tally = _gather(tally, shard[1])
    correct, loss_sum, n, group_correct, group_count = tally
    if n == 0:
        raise ValueError("empty evaluation split")
    result = EvalResult(acc=correct / n, loss=loss_sum / n, n=n)
    if group_count:
        accs = {str(k): group_correct[k] / group_count[k] for k in sorted(group_count)}
        result.group_accs = accs
        result.worst_group_acc = min(accs.values())
    return result


def evaluate(model: nn.Module, data: Any, *, batch_size: int = 512, device: str | torch.device = "cpu") -> EvalResult:
    """Accuracy, mean loss (and per-group / worst-group accuracy when groups are given) of ``model``
    on ``data`` (same forms as :func:`~benchmarks.protocol.finetune`), in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        return evaluate_split(model, Split(data, batch_size), batch_size, device)
    finally:
        model.train(was_training)
