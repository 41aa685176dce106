"""Figures: accuracy relative to full fine-tuning per tuned block (like the paper's Fig. 2), the
block-noise experiment, and Auto-RGN's mean multiplier per block."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runs import atomic_write_bytes  # noqa: E402
from .runner import BLOCKS  # noqa: E402
COLOURS = {"input": "#4C72B0", "feature": "#55A868", "output": "#C44E52", "block-noise": "#8172B2"}


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _relative_grid(rows: dict[str, Any], title: str, path: Path, extra: tuple[str, ...] = ("auto_rgn", "auto_rgn_paper", "auto_snr", "auto_select")) -> None:
    names = list(rows)
    cols = min(4, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        entry = rows[name]
        methods = entry["methods"]
        labels = [b for b in (*BLOCKS, *extra) if b in methods]
        base = methods["all"]["mean"]
        vals = [methods[b]["mean"] - base for b in labels]
        errs = [methods[b]["stderr"] for b in labels]
        colours = [COLOURS.get(entry["type"], "grey") if b in BLOCKS else "#999999" for b in labels]
        ax.bar(range(len(labels)), vals, yerr=errs, color=colours, capsize=2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([l.replace("auto_", "auto\n") for l in labels], fontsize=7, rotation=0)
        ax.set_title(f"{name} ({entry['type']})\nfull FT = {base:.1f} %", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0, 0].set_ylabel("accuracy − full fine-tuning (points)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_all(summary: dict[str, Any], out: Path) -> list[Path]:
    out = Path(out)
    paths = []
    p = out / "relative_to_full_ft.png"
    _relative_grid(summary["shifts"], "Tuning one block vs. full fine-tuning (target test accuracy; bars: s.e.)", p)
    paths.append(p)
    if summary["block_noise"]:
        p = out / "block_noise.png"
        _relative_grid(summary["block_noise"], "Block-noise experiment: one block of the source model perturbed", p)
        paths.append(p)
    # Auto-RGN multipliers: a heatmap, rows = shifts, columns = blocks
    rows = {**summary["shifts"], **summary["block_noise"]}
    names = [n for n, e in rows.items() if e["methods"].get("auto_rgn", {}).get("block_multipliers")]
    if names:
        blocks = [b for b in BLOCKS if b in rows[names[0]]["methods"]["auto_rgn"]["block_multipliers"]]
        grid = [[rows[n]["methods"]["auto_rgn"]["block_multipliers"].get(b, float("nan")) for b in blocks] for n in names]
        fig, ax = plt.subplots(figsize=(1.1 * len(blocks) + 3, 0.42 * len(names) + 1.6))
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(max(r) for r in grid) or 1.0, aspect="auto")
        for i_, row in enumerate(grid):
            for j_, v in enumerate(row):
                ax.text(j_, i_, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 * max(max(r) for r in grid) else "black")
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels(blocks)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([f"{n} ({rows[n]['type']})" for n in names], fontsize=8)
        fig.colorbar(im, ax=ax, label="mean multiplier")
        ax.set_title("Auto-RGN: mean lr multiplier per block\n(selected lr; mean over tensors, steps and seeds)", fontsize=9)
        fig.tight_layout()
    else:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no Auto-RGN runs", ha="center")
        ax.axis("off")
    p = out / "auto_rgn_multipliers.png"
    _save(fig, p)
    paths.append(p)
    return paths
