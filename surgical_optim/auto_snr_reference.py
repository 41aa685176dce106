"""Slow, obviously-correct Auto-SNR, for tests: stores every gradient sample and loops per tensor.

Matches ``AutoSNR(estimator="samples", refresh_every=None)``: the first ``samples`` steps train every
tensor and record its gradient; from step ``samples + 1`` on, tensors whose normalised SNR is below
``threshold`` have their gradient dropped before the inner step.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .snr import DEFAULT_EPS

__all__ = ["reference_tensor_snr", "ReferenceAutoSNR"]


def reference_tensor_snr(samples: list[torch.Tensor], eps: float = DEFAULT_EPS) -> float:
    """mean over elements of mean^2 / (var + eps * mean^2) across samples (0 where the mean is 0)."""
    if len(samples) < 2:
        return 0.0
    stacked = torch.stack([s.double() for s in samples])
    mean = stacked.mean(0)
    variance = stacked.var(0, unbiased=True)
    ratios = []
    for m, v in zip(mean.flatten().tolist(), variance.flatten().tolist()):
        ratios.append(0.0 if m == 0.0 else m * m / (v + eps * m * m))
    return sum(ratios) / len(ratios)


class ReferenceAutoSNR:
    def __init__(self, optimizer: Optimizer, threshold: float, samples: int = 5, eps: float = DEFAULT_EPS):
        self.optimizer = optimizer
        self.threshold = threshold
        self.samples = samples
        self.eps = eps
        self.history: dict[int, list[torch.Tensor]] = {}
        self.steps = 0
        self.keep: list[bool] | None = None
        self.normalised: list[float] = []

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self) -> None:
        params = self.params()
        collecting = self.steps < self.samples
        if collecting:
            for i, p in enumerate(params):
                if p.grad is not None:
                    # a sparse gradient is the dense one with zeros in the untouched rows
                    self.history.setdefault(i, []).append(p.grad.detach().to_dense().clone())
        if self.keep is not None:
            for p, k in zip(params, self.keep):
                if not k:
                    p.grad = None
        self.optimizer.step()
        self.steps += 1
        if collecting and self.steps == self.samples:
            raw = [reference_tensor_snr(self.history.get(i, []), self.eps) for i in range(len(params))]
            largest = max(raw)
            self.normalised = [r / largest if largest > 0 else 0.0 for r in raw]
            self.keep = [r >= self.threshold for r in self.normalised]
