"""One harness run (one method, one lr, one seed) through ``benchmarks.protocol.finetune``.

The paper's block split (``models.paper_block_matcher``) is handed to the protocol as its split, so every
method and the frozen-prefix precompute work on the paper's blocks. The protocol is called with ``lrs=(lr,)``:
every (method, lr, seed) is one independent, resumable run, and the harness picks the lr afterwards with the
protocol's own rule (``benchmarks.runs.select``). The row stores accuracies in percent, as the table shows them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import protocol
from .config import FinetuneConfig
from .data import TargetSplits
from .models import paper_block_matcher
from .plan import Run

__all__ = ["finetune"]


def _percent(v: Any) -> Any:
    return None if v is None else (100.0 * v if isinstance(v, (int, float)) and math.isfinite(v) else v)


def protocol_config(cfg: FinetuneConfig, lr: float | None, arch: str, device: torch.device) -> protocol.ProtocolConfig:
    return protocol.ProtocolConfig(
        lrs=(lr,) if lr is not None else (0.0,),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        eval_batch_size=cfg.eval_batch_size,
        device=device,
        method_options={"auto_snr": {"threshold": cfg.snr_threshold}, "l1_sp": {"strength": cfg.l1sp_weight}},
        blocks=paper_block_matcher(arch),
        patience=cfg.patience,
    )


def finetune(run: Run, model: nn.Module, cfg: FinetuneConfig, arch: str, device: torch.device,
             prepared: TargetSplits, *, prefix_cache: protocol.PrefixCache | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The row entries of one run (``best``, ``val_curve``, ``extra``); ``model`` is not modified (the
    protocol trains a copy)."""
    res = protocol.finetune(model, run.method, prepared.train, prepared.val, prepared.test,
                            config=protocol_config(cfg, run.lr, arch, device), seed=run.seed, prefix_cache=prefix_cache,
                            data_key=run.dataset if prefix_cache is not None else "", progress=progress)
    curve = next(iter(res.val_curves.values()), []) if res.val_curves else []
    groups = None if res.group_accs is None else {k: _percent(v) for k, v in res.group_accs.items()}
    return {
        "best": {"epoch": res.epoch, "val_acc": _percent(res.val_acc), "val_loss": res.val_loss,
                 "test_acc": _percent(res.test_acc), "test_loss": res.test_loss,
                 "test_worst": _percent(res.worst_group_acc), "test_group_accs": groups},
        "val_curve": [_percent(v) for v in curve],
        "extra": {"diagnostics": next(iter(res.diagnostics.values()), {}) if res.diagnostics else {},
                  "precomputed_prefix": res.precomputed_prefix, "seconds": res.seconds,
                  "epochs_run": next(iter(res.epochs_run.values()), 0), "steps": next(iter(res.steps.values()), 0)},
    }
