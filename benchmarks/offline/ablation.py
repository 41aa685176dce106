"""Ablations of Auto-RGN on the offline rows: one named variant per command, one row of the ablation table.

``python -m benchmarks.offline --ablation NAME`` runs the variant (and full fine-tuning under the same
budget) on every row and seed, writes ``<out>/ablations/NAME.json`` and prints the ablation table built from
every variant found there. Runs share the main job's cache: a variant only re-runs what it changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..runs import atomic_write_text, mean_se
from .runner import OfflineConfig

__all__ = ["ABLATIONS", "Ablation", "ablation_config", "ablation_row", "ablation_table", "write_ablation"]


@dataclass(frozen=True)
class Ablation:
    """One variant: the method it runs (with its options) and the protocol settings it changes."""

    method: str
    what: str
    options: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)


#: 0.2.0's budget: batch 64 for 15 epochs, 4 steps per epoch on 250 images, 60 steps in all
_SHORT_BUDGET = {"batch_size": 64, "epochs": 15, "patience": None}

ABLATIONS: dict[str, Ablation] = {
    "paper_protocol": Ablation(
        "auto_rgn_paper", "the official code's schedule: multipliers from 5 fixed-weight batches at each epoch "
        "start, held for the epoch, Adam rebuilt every epoch, `bn` tensors frozen"),
    "every_step": Ablation("auto_rgn", "the library's rule: multipliers from each step's own gradients"),
    "every_step_short_budget": Ablation("auto_rgn", "the library's rule under 0.2.0's budget (batch 64, 15 epochs: "
                                        "60 steps)", protocol=_SHORT_BUDGET),
    "refresh_per_epoch": Ablation("auto_rgn", "multipliers from the RGN averaged over an epoch (8 steps), held "
                                  "for the next 8", {"refresh_every": 8}),
    "exclude_bn": Ablation("auto_rgn", "`bn` tensors frozen and out of the max, as the official code",
                           {"exclude": "bn"}),
    "per_block": Ablation("auto_rgn", "one RGN per block (norms over the block's tensors together)",
                          {"per": "group"}),
    "max_over_matrices": Ablation("auto_rgn", "only tensors with 2 or more dimensions set the normaliser "
                                  "(biases and norm weights left out, as LARS and LAMB leave them out)",
                                  {"max_over": "matrices"}),
    "quantile_0.9": Ablation("auto_rgn", "divide by the 0.9 quantile of the RGNs, not the largest",
                             {"quantile": 0.9}),
}


def ablation_config(cfg: OfflineConfig, name: str) -> OfflineConfig:
    """``cfg`` running ablation ``name``: its method and full fine-tuning, every row and seed."""
    if name not in ABLATIONS:
        raise KeyError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    ab = ABLATIONS[name]
    options = {**cfg.method_options, ab.method: dict(ab.options)} if ab.options else dict(cfg.method_options)
    return replace(cfg, methods=("all", ab.method), method_options=options, **ab.protocol)


def ablation_row(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Per row: the variant's mean test accuracy and its gap to full fine-tuning; averaged over rows."""
    ab = ABLATIONS[name]
    rows = {**summary["shifts"], **summary["block_noise"]}
    cells = {}
    for row, entry in rows.items():
        method, full = entry["methods"][ab.method], entry["methods"]["all"]
        gaps = [a - b for a, b in zip(method["accs"], full["accs"])]
        cells[row] = {"mean": method["mean"], "stderr": method["stderr"], "minus_all": mean_se(gaps)[0],
                      "epoch": method["epoch"], "lr": method["lr"]}
    gap = [c["minus_all"] for c in cells.values()]
    return {"name": name, "what": ab.what, "method": ab.method, "options": ab.options, "protocol": ab.protocol,
            "rows": cells, "mean_minus_all": sum(gap) / len(gap),
            "rows_at_or_above_all": sum(g >= 0 for g in gap), "seeds": summary["setup"]["seeds"]}


def write_ablation(out_dir: str, row: dict[str, Any]) -> str:
    """Store one variant's row and return the table of every variant stored so far."""
    folder = Path(out_dir) / "ablations"
    atomic_write_text(folder / f"{row['name']}.json", json.dumps(row, indent=1))
    found = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    ordered = [found[n] for n in ABLATIONS if n in found]
    table = ablation_table(ordered)
    atomic_write_text(folder / "table.md", table)
    return table


def ablation_table(rows: list[dict[str, Any]]) -> str:
    """Rows = variants; columns = the variant's accuracy minus full fine-tuning's on each offline row
    (same seeds, same budget), then the mean gap and on how many rows it is at least full fine-tuning."""
    if not rows:
        return ""
    names = list(rows[0]["rows"])
    head = "| variant | " + " | ".join(names) + " | mean gap | rows ≥ full FT |"
    lines = [head, "|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [f"{r['rows'][n]['minus_all']:+.1f}" if n in r["rows"] else "-" for n in names]
        lines.append(f"| `{r['name']}` | " + " | ".join(cells)
                     + f" | {r['mean_minus_all']:+.1f} | {r['rows_at_or_above_all']}/{len(r['rows'])} |")
    return "\n".join(lines)
