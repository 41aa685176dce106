"""Slow, obviously-correct Auto-RGN, for tests: one Python loop per tensor, ``.item()`` everywhere.

Two references:

* ``ReferenceAutoRGN`` applies multipliers by rescaling each tensor's update, like ``AutoRGN`` but
  without batching, caching or any attempt at avoiding host synchronisation.
* ``per_tensor_lr_step`` is the paper's formulation: one param group per tensor with
  ``lr x multiplier``. For optimizers whose update is linear in the learning rate both must agree.

Only ``refresh_every=1`` and no exclusion: the features the fast path adds are tested separately.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

__all__ = ["reference_multipliers", "ReferenceAutoRGN", "per_tensor_lr_step"]


def reference_multipliers(params: list[torch.Tensor]) -> list[float]:
    """Multipliers for tensors that have gradients (0 for the others), as the AutoRGN docstring says."""
    rgn: list[float] = []
    zero_weight: list[bool] = []
    for p in params:
        if p.grad is None:
            rgn.append(0.0)
            zero_weight.append(False)
            continue
        g_norm = p.grad.double().norm().item()
        w_norm = p.detach().double().norm().item()
        if not math.isfinite(g_norm) or not math.isfinite(w_norm):
            rgn.append(0.0)
            zero_weight.append(False)
        elif w_norm == 0.0:
            rgn.append(0.0)
            zero_weight.append(g_norm > 0.0)
        else:
            ratio = g_norm / w_norm
            if math.isfinite(ratio):
                rgn.append(ratio)
                zero_weight.append(False)
            else:  # beyond the float range: unbounded, like a zero weight
                rgn.append(0.0)
                zero_weight.append(g_norm > 0.0)
    largest = max(rgn) if rgn else 0.0
    out = []
    for r, zw in zip(rgn, zero_weight):
        if zw:
            out.append(1.0)
        elif largest > 0.0:
            out.append(min(max(r / largest, 0.0), 1.0))
        else:
            out.append(0.0)
    return out


class ReferenceAutoRGN:
    """Per-tensor loop version of ``AutoRGN.step`` (not an Optimizer; tests only)."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.last_multipliers: list[float] = []

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        params = self.params()
        multipliers = reference_multipliers(params)
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
    optimizer: Optimizer, params: list[torch.Tensor], base_lr: float
) -> list[float]:
    """One step of an optimizer built with one param group per tensor (same order as ``params``):
    sets each group's ``lr`` to ``base_lr x multiplier`` and steps. Returns the multipliers."""
    multipliers = reference_multipliers(params)
    for group, m in zip(optimizer.param_groups, multipliers):
        group["lr"] = base_lr * m
    optimizer.step()
    return multipliers
