"""Per-block reports of what a wrapper's per-tensor rule does, one schema for AutoRGN and AutoSNR.

Both rules give each tensor a score normalised by the largest among the optimizer's tensors
(Auto-RGN: RGN / max RGN, which is the tensor's learning-rate multiplier; Auto-SNR: SNR / max SNR,
which the threshold compares), and both decide which tensors move. A block is a param group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["BlockMultipliers", "BlockSummary", "summarise_blocks"]


class BlockSummary(tuple):
    """One row per param group, input side first; ``print()`` shows them as a table.

    Each row is a dict with the same keys for every wrapper:

    * ``name``: the group's ``"name"`` (``param_groups_by_block`` names them after the blocks);
      ``group<i>`` for a group without one (``torch.optim.Adam(model.parameters())`` has one
      unnamed group, ``group0``);
    * ``tensors``, ``params``: the group's tensors and elements;
    * ``trained_tensors``, ``trained_fraction``: the tensors that take a step, and the fraction of
      the group's elements they hold (Auto-RGN: multiplier > 0; Auto-SNR: not frozen);
    * ``mean_score``, ``max_score``: the rule's normalised per-tensor score over the group
      (``score`` says which: ``"multiplier"`` or ``"snr"``).
    """

    score: str
    unnamed_groups: bool  # some group has no "name": the table says how to get block names

    def __new__(cls, rows: Iterable[dict[str, Any]], score: str, unnamed_groups: bool = False) -> BlockSummary:
        summary = super().__new__(cls, rows)
        summary.score = score
        summary.unnamed_groups = unnamed_groups
        return summary

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (tuple(self), self.score, self.unnamed_groups)

    def __str__(self) -> str:
        header = ("block", "tensors", "params", "trained", f"mean {self.score}", f"max {self.score}")
        lines = [header]
        for row in self:
            lines.append((
                row["name"],
                f"{row['trained_tensors']}/{row['tensors']}",
                f"{row['params']:,}",
                f"{100.0 * row['trained_fraction']:.1f}%",
                f"{row['mean_score']:.4f}",
                f"{row['max_score']:.4f}",
            ))
        widths = [max(len(line[col]) for line in lines) for col in range(len(header))]
        text = [
            "  ".join(cell.ljust(w) if col == 0 else cell.rjust(w) for col, (cell, w) in enumerate(zip(line, widths)))
            for line in lines
        ]
        if self.unnamed_groups:
            text.append(
                "groupN: param group N has no \"name\"; build the optimizer from "
                "param_groups_by_block(model) for one named group per block"
            )
        return "\n".join(text)


class BlockMultipliers(dict):
    """Block name -> mean multiplier, a 0-d tensor on the parameters' device (made without a host
    synchronisation, for logging every step); ``print()`` shows the values."""

    def __str__(self) -> str:
        return ", ".join(f"{name}: {float(value):.4f}" for name, value in self.items())


def summarise_blocks(
    groups: Iterable[tuple[str, dict[str, Any]]],
    scores: torch.Tensor,
    trained: Sequence[bool],
    score: str,
) -> BlockSummary:
    """Rows of :class:`BlockSummary` from per-tensor ``scores`` (host tensor, ``param_groups`` order)
    and whether each tensor is ``trained``."""
    rows, start, unnamed = [], 0, False
    for name, group in groups:
        params = group["params"]
        chunk = slice(start, start + len(params))
        sizes = [p.numel() for p in params]
        kept = list(trained[chunk])
        values = scores[chunk]
        unnamed = unnamed or "name" not in group
        rows.append({
            "name": name,
            "tensors": len(params),
            "params": sum(sizes),
            "trained_tensors": sum(kept),
            "trained_fraction": sum(n for n, k in zip(sizes, kept) if k) / max(sum(sizes), 1),
            "mean_score": float(values.mean()) if len(params) else 0.0,
            "max_score": float(values.max()) if len(params) else 0.0,
        })
        start += len(params)
    return BlockSummary(rows, score, unnamed)
