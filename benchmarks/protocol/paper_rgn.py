"""``auto_rgn_paper``: Auto-RGN the way the paper's official code runs it (``get_lr_weights`` there).

At the start of every epoch, with the weights as the previous epoch left them, the training loss of each of
the epoch's first ``batches`` (5) mini-batches is differentiated on its own; each tensor's relative gradient
norm ||g|| / ||w|| of that batch is taken in float64 (the official code's ``.item()`` gives Python floats),
averaged over the batches, read to the host once and divided by the largest; then the optimizer is made anew from the protocol's factory (Adam with
weight decay by default: its state is lost every epoch), one param group per tensor with lr = base lr x that
multiplier, held for the whole epoch. Parameters whose name matches the ``exclude`` regex (default ``"bn"``,
the official code's ``"bn" not in name``) are frozen: they are never trained.

Where this differs from the official code, and why:

* its batches come from an extra pass of the shuffled loader (an extra shuffle, which moves every later batch);
  here they are the epoch's own first batches, read ahead, so the batch order is every other method's;
* a tensor with zero weight norm (the official code divides by zero) gets multiplier 1 when its gradient is
  non-zero and does not enter the max, as in ``surgical_optim.AutoRGN``; a non-finite RGN gets 0.

``auto_rgn`` (``surgical_optim.AutoRGN``) instead recomputes the multipliers every step from that step's
gradient, keeps the optimizer's state and trains every parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from surgical_optim import param_groups_by_block

from .methods import EpochLosses, Method, register_method

__all__ = ["AutoRGNPaper", "normalised_multipliers"]


class AutoRGNPaper(Method):
    """Options: ``batches`` (5) averaged per epoch; ``exclude`` (``"bn"``), a regex over parameter names
    (``re.search``; None or "" excludes nothing). Diagnostics: ``block_multipliers``, each block's mean
    multiplier over its trained tensors, averaged over the epochs."""

    name = "auto_rgn_paper"

    def __init__(self, batches: int = 5, exclude: str | None = "bn", **options: Any) -> None:
        super().__init__(**options)
        if int(batches) < 1:
            raise ValueError(f"auto_rgn_paper: batches must be at least 1, got {batches}")
        self.batches = int(batches)
        self.exclude = re.compile(exclude) if exclude else None
        self._tensors: list[nn.Parameter] = []
        self._blocks: dict[str, list[int]] = {}  # block name -> positions in _tensors
        self._make_optimizer: Any = None
        self._lr = 0.0
        self._sums: dict[str, float] = {}
        self._epochs = 0

    def setup(self, model, lr, config, make_optimizer):
        groups = param_groups_by_block(model, config.blocks, trainable_only=False)
        block_of = {id(p): g["name"] for g in groups for p in g["params"]}
        self._tensors, positions = [], {g["name"]: [] for g in groups}
        for name, p in model.named_parameters():
            trains = self.exclude is None or self.exclude.search(name) is None
            p.requires_grad_(trains)
            if trains:
                positions[block_of[id(p)]].append(len(self._tensors))
                self._tensors.append(p)
        if not self._tensors:
            pattern = self.exclude.pattern if self.exclude is not None else None
            raise ValueError(f"auto_rgn_paper: exclude={pattern!r} matches every parameter")
        self._blocks = {b: ps for b, ps in positions.items() if ps}
        self._make_optimizer, self._lr = make_optimizer, lr
        # never steps: epoch_optimizer replaces it before the first step of every epoch
        return make_optimizer([{"params": list(self._tensors)}])

    def epoch_optimizer(self, model, optimizer, epoch, epochs, losses):
        multipliers = normalised_multipliers(self._mean_rgn(model, losses))
        for block, positions in self._blocks.items():
            self._sums[block] = self._sums.get(block, 0.0) + sum(multipliers[i] for i in positions) / len(positions)
        self._epochs += 1
        return self._make_optimizer([{"params": [p], "lr": self._lr * m} for p, m in zip(self._tensors, multipliers)])

    def _mean_rgn(self, model: nn.Module, losses: EpochLosses) -> list[float]:
        """Each trained tensor's RGN, one batch's gradient at a time, averaged over the batches (in float64,
        as the official code's Python floats; read to the host once)."""
        weight_norms = _norms(self._tensors)
        sums, count = torch.zeros_like(weight_norms), 0
        for loss in losses(self.batches):
            for p in model.parameters():
                p.grad = None
            loss.backward()
            grad_norms = _norms([p.grad if p.grad is not None else p.new_zeros(()) for p in self._tensors])
            # a zero weight norm: unbounded for a non-zero gradient, 0 otherwise (the official code divides by 0)
            unbounded = torch.full_like(grad_norms, math.inf)
            zero_weight = torch.where(grad_norms > 0, unbounded, torch.zeros_like(grad_norms))
            sums += torch.where(weight_norms > 0, grad_norms / weight_norms, zero_weight)
            count += 1
        for p in model.parameters():
            p.grad = None
        return (sums / count).tolist()

    def diagnostics(self):
        if not self._epochs:
            return {}
        return {"block_multipliers": {b: s / self._epochs for b, s in self._sums.items()}}


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor, widened to float64: the values ``.item()`` per tensor gives (each norm is
    computed in its tensor's dtype, then widened exactly); one foreach call, nothing read to the host."""
    return torch.stack([n.double() for n in torch._foreach_norm([t.detach() for t in tensors])])


def normalised_multipliers(rgn: Sequence[float]) -> list[float]:
    """Each RGN over the largest finite one, so the largest trains at the full lr; an unbounded RGN (zero
    weight norm, non-zero gradient) gives 1, a non-finite one 0, and every RGN 0 gives every multiplier 0."""
    largest = max((r for r in rgn if math.isfinite(r)), default=0.0)

    def one(r: float) -> float:
        if r == math.inf:
            return 1.0
        return r / largest if math.isfinite(r) and largest > 0 else 0.0

    return [one(r) for r in rgn]


register_method("auto_rgn_paper", AutoRGNPaper)
