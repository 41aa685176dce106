"""The unlabeled-stream experiment's outputs: the table of online accuracies (``stream.md``) and the chunk
accuracy curves (``stream_curves.png``), from the results :mod:`~benchmarks.offline.stream` returns."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..runs import Cell, atomic_write_bytes
from .stream import LOSSES, PAPER_MEMO, USABLE_INPUT_SHIFTS, VARIANTS

__all__ = ["PLOT_VARIANTS", "plot_stream_curves", "stream_table"]


def _mean_se(values: Sequence[float]) -> str:
    """``mean ± s.e.`` over seeds of accuracies given as fractions, in %, one decimal (the mean alone for a
    single seed)."""
    return Cell.of(100 * v for v in values).fmt()


def _accuracies(scored: Sequence[Mapping[str, Any]], variant: str, loss: str) -> dict[tuple[str, int], float]:
    """(shift, seed) -> online accuracy of ``variant`` under ``loss`` (an untuned variant under any loss)."""
    return {(r["shift"], r["seed"]): r["online_acc"] for r in scored
            if r["variant"] == variant and r["loss"] in (loss, None)}


def stream_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one table per loss, rows = variants, columns = the stream's shifts, the mean over the
    usable input-level shifts and (MEMO) the paper's CIFAR-10-C numbers; online accuracy on the scored
    stream, mean ± s.e. over seeds. Held-out results are ignored."""
    scored = [r for r in results if not r["held_out"]]
    shifts = list(dict.fromkeys(r["shift"] for r in scored))
    usable = [s for s in USABLE_INPUT_SHIFTS if s in shifts]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in scored)]
    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in scored)]
    lines = []
    for loss in losses:
        header = ["variant", *shifts, "input-level mean"] + (["paper (CIFAR-10-C)"] if loss == "memo" else [])
        lines += [f"**{loss}** (online accuracy %, scored stream)", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for variant in variants:
            acc = _accuracies(scored, variant, loss)
            if not acc:  # not run with this loss (MEMO runs on the paper's rows only)
                continue
            cells = [_mean_se([a for (s, _), a in acc.items() if s == shift]) if any(s == shift for s, _ in acc) else "—"
                     for shift in shifts]
            cells.append(_usable_mean(acc, usable))
            if loss == "memo":
                cells.append(f"{PAPER_MEMO[variant]:.1f}" if variant in PAPER_MEMO else "—")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _usable_mean(acc: Mapping[tuple[str, int], float], usable: Sequence[str]) -> str:
    """Mean ± s.e. over seeds of each seed's mean over the usable input-level shifts (seeds having all)."""
    seeds = sorted({seed for _, seed in acc})
    per_seed = [sum(acc[(s, seed)] for s in usable) / len(usable) for seed in seeds
                if usable and all((s, seed) in acc for s in usable)]
    return _mean_se(per_seed) if per_seed else "—"


#: the variants drawn in the curves
PLOT_VARIANTS: tuple[str, ...] = ("none", "bn_stats", "all", "first", "fc", "auto_rgn")


def plot_stream_curves(results: Sequence[Mapping[str, Any]], path: Path | str) -> None:
    """Accuracy of each chunk of the scored stream against stream position, mean over seeds, one panel
    per input-level shift; colour = variant, solid = entropy, dashed = MEMO (untuned: dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if not r["held_out"] and r["kind"] == "input" and r["variant"] in PLOT_VARIANTS]
    shifts = list(dict.fromkeys(r["shift"] for r in scored))
    cols = min(3, max(1, len(shifts)))
    rows = max(1, math.ceil(len(shifts) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colours = dict(zip(PLOT_VARIANTS, plt.get_cmap("tab10").colors))
    styles = {None: ":", "entropy": "-", "memo": "--"}
    for ax, shift in zip(axes.flat, shifts):
        for (variant, loss), runs in _curves_by_line(scored, shift).items():
            mean = [sum(values) / len(values) for values in zip(*(r["curve"]["chunk_acc"] for r in runs))]
            ax.plot(runs[0]["curve"]["position"], mean, styles[loss], color=colours[variant],
                    label=variant if loss is None else f"{variant} ({loss})")
        ax.set(title=shift, xlabel="stream position (images)", ylabel="chunk accuracy", ylim=(0, 1))
    for ax in axes.flat[len(shifts) :]:
        ax.axis("off")
    if shifts:
        axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _curves_by_line(scored: Sequence[Mapping[str, Any]], shift: str) -> dict[tuple[str, str | None], list[Mapping[str, Any]]]:
    lines: dict[tuple[str, str | None], list[Mapping[str, Any]]] = {}
    for r in scored:
        if r["shift"] == shift:
            lines.setdefault((r["variant"], r["loss"]), []).append(r)
    return dict(sorted(lines.items(), key=lambda item: (PLOT_VARIANTS.index(item[0][0]), str(item[0][1]))))
