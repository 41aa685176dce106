"""Slow, obviously-correct Auto-RGN, for tests: one Python loop per tensor, ``.item()`` everywhere.

Two references:

* ``ReferenceAutoRGN`` applies multipliers by rescaling each tensor's update, like ``AutoRGN`` but
  without batching, caching or any attempt at avoiding host synchronisation.
* ``per_tensor_lr_step`` is the paper's formulation: one param group per tensor with
  ``lr x multiplier``. For optimizers whose update is linear in the learning rate both must agree.

Only ``refresh_every=1`` (the features the fast path adds are tested separately); the normaliser's
options (``quantile``, ``max_over``, ``per``) are AutoRGN's, passed as keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["reference_multipliers", "ReferenceAutoRGN", "per_tensor_lr_step"]


def reference_multipliers(
    params: list[torch.Tensor],
    *,
    quantile: float = 1.0,
    max_over: str = "all",
    per: str = "tensor",
    group_index: Sequence[int] | None = None,
    excluded: Sequence[bool] | None = None,
) -> list[float]:
    """Multipliers for tensors that have gradients (0 for the others), as the AutoRGN docstrings say.

    ``quantile``, ``max_over`` and ``per`` as ``AutoRGN``'s; ``group_index`` (needed for
    ``per="group"``) is each tensor's param group, ``excluded`` marks the tensors ``exclude=`` drops.
    With ``per="group"`` every tensor of a group reads the group's multiplier, excluded ones 0.
    """
    excluded = list(excluded) if excluded is not None else [False] * len(params)
    if per == "tensor":
        units = [[i] for i in range(len(params))]
    else:
        assert group_index is not None, "per='group' needs group_index"
        units = [[i for i, g in enumerate(group_index) if g == group] for group in dict.fromkeys(group_index)]
    stats = [_unit_rgn([params[i] for i in unit if params[i].grad is not None and not excluded[i]]) for unit in units]
    is_matrix = [any(params[i].dim() >= 2 and not excluded[i] for i in unit) for unit in units]
    taking_part = [k for k, (_, _, takes_part) in enumerate(stats) if takes_part]
    setters = [k for k in taking_part if is_matrix[k] or max_over == "all"] or taking_part
    scale = torch.quantile(torch.tensor([stats[k][0] for k in setters], dtype=torch.float64), quantile).item() if setters else 0.0
    out = [0.0] * len(params)
    for unit, (rgn, unbounded, _) in zip(units, stats):
        if unbounded:
            m = 1.0
        elif scale > 0.0:
            m = min(max(rgn / scale, 0.0), 1.0)
        else:  # min(1, rgn / 0): 1 for a positive RGN, 0/0 -> 0
            m = 1.0 if rgn > 0.0 else 0.0
        for i in unit:
            out[i] = 0.0 if excluded[i] else m
    return out


def _unit_rgn(params: list[torch.Tensor]) -> tuple[float, bool, bool]:
    """``(rgn, unbounded, takes_part)`` of the concatenation of ``params`` (all with gradients)."""
    if not params:
        return 0.0, False, False
    # a sparse gradient stands for its dense form (duplicate indices add up)
    grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in params]
    g_norm = torch.cat([g.double().flatten() for g in grads]).norm().item()
    w_norm = torch.cat([p.detach().double().flatten() for p in params]).norm().item()
    if not math.isfinite(g_norm) or not math.isfinite(w_norm):
        return 0.0, False, False
    if w_norm == 0.0:
        return 0.0, g_norm > 0.0, False
    ratio = g_norm / w_norm
    if not math.isfinite(ratio):  # beyond the float range: unbounded, like a zero weight
        return 0.0, g_norm > 0.0, False
    return ratio, False, True


class ReferenceAutoRGN:
    """Per-tensor loop version of ``AutoRGN.step`` (not an Optimizer; tests only)."""

    def __init__(self, optimizer: Optimizer, **options: Any) -> None:
        self.optimizer = optimizer
        self.options = options  # reference_multipliers' quantile, max_over, per
        self.last_multipliers: list[float] = []

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        params = self.params()
        group_index = [k for k, group in enumerate(self.optimizer.param_groups) for _ in group["params"]]
        multipliers = reference_multipliers(params, group_index=group_index, **self.options)
        self.last_multipliers = multipliers
        old = {}
        for p in params:
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                old[p] = p.detach().clone()
        self.optimizer.step()
        for p, m in zip(params, multipliers):
            if p in old:
                p.copy_(old[p] + m * (p - old[p]))


def per_tensor_lr_step(
    optimizer: Optimizer, params: list[torch.Tensor], base_lr: float, **options: Any
) -> list[float]:
    """One step of an optimizer built with one param group per tensor (same order as ``params``):
    sets each group's ``lr`` to ``base_lr x multiplier`` and steps. Returns the multipliers.
    ``options`` go to ``reference_multipliers`` (for ``per="group"``, pass the wrapper's
    ``group_index``: this optimizer's own groups are one per tensor)."""
    multipliers = reference_multipliers(params, **options)
    for group, m in zip(optimizer.param_groups, multipliers):
        group["lr"] = base_lr * m
    optimizer.step()
    return multipliers
