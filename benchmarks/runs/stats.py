"""The selection rule and the statistics over seeds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["selection_key", "select", "mean_se", "Cell"]


def selection_key(val_acc: float, val_loss: float | None) -> tuple[float, float]:
    """Higher is better: validation accuracy, ties broken by the lower validation loss (a missing or
    non-finite loss loses every tie). The protocol picks its (lr, epoch) by it, the harness its lr."""
    finite = val_loss is not None and math.isfinite(val_loss)
    return val_acc, -val_loss if finite else -math.inf  # type: ignore[operator]


def select(runs: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """Of runs recorded one per lr, the one whose best epoch wins :func:`selection_key`, ties broken by the
    larger lr; returns its ``best`` entry plus ``lr`` (None when no run has a validation accuracy)."""
    best_key, best = None, None
    for r in sorted(runs, key=lambda r: -(r["lr"] or 0.0)):
        b = r.get("best") or {}
        v = b.get("val_acc")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = selection_key(v, b.get("val_loss"))
        if best_key is None or key > best_key:
            best_key, best = key, {"lr": r["lr"], **b}
    return best


def mean_se(values: Iterable[float | None]) -> tuple[float, float, int]:
    """(mean, standard error = sample std / sqrt(n), n) of the values that are not None; (nan, nan, 0) for
    none, a standard error of 0 for one."""
    vals = [v for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    if n < 2:
        return mean, 0.0, n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return mean, math.sqrt(var / n), n


@dataclass
class Cell:
    """Mean ± standard error over seeds, as a table shows it."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Cell:
        return cls(*mean_se(values))

    def fmt(self) -> str:
        if math.isnan(self.mean):
            return "-"
        return f"{self.mean:.1f} ± {self.se:.1f}" if self.n > 1 else f"{self.mean:.1f}"
