"""Glue between the paper harness and ``benchmarks.protocol`` (the shared fine-tuning loop).

What this adds on top of the protocol, without a second training loop:

* the paper's block split. The paper tunes conv1 together with the first stage (CIFAR: conv1+block1 | block2
  | block3 | fc; ImageNet: conv1+layer1 | layer2 | layer3 | layer4 | fc): ``paper_models.paper_block_matcher``
  is handed to the protocol as its split (``ProtocolConfig(blocks=...)``), so every method and the frozen-prefix
  precompute work on the paper's blocks.
* data. Small target sets are materialised as tensors (``(x, y)`` or ``(x, y, group)``), which enables the
  protocol's frozen-prefix precomputation; larger ones are passed as DataLoaders with worker processes
  (training loader shuffled with a generator seeded by the run seed).
* one learning rate per run: the protocol is called with ``lrs=(lr,)``, so every (method, lr, seed) is one
  independent, resumable run; the harness then picks the lr with the protocol's own rule (best validation
  accuracy, ties: lower validation loss) across runs (``paper_results.select``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import protocol
from .datasets import BenchmarkData, WithGroups
from .paper_models import paper_block_matcher

__all__ = ["prepare_data", "run_protocol"]


def _materialise(ds: Dataset, workers: int, batch_size: int = 256) -> tuple[torch.Tensor, ...]:
    xs, ys, gs = [], [], []
    for item in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers):
        xs.append(item[0])
        ys.append(torch.as_tensor(item[1]))
        if len(item) > 2:
            gs.append(torch.as_tensor(item[2]))
    out = (torch.cat(xs), torch.cat(ys).long())
    return out + ((torch.cat(gs).long(),) if gs else ())


def prepare_data(data: BenchmarkData, *, seed: int, batch_size: int, eval_batch_size: int, workers: int,
                 max_tensor_bytes: int) -> tuple[Any, Any, Any]:
    """(train, val, test) in a form ``protocol.finetune`` accepts (see the module docstring)."""
    splits = [data.target_train, data.target_val, data.target_test]
    if data.num_groups:
        splits = [WithGroups(s) for s in splits]
    n = sum(len(s) for s in splits)
    nbytes = n * math.prod(data.input_size) * 4
    if nbytes <= max_tensor_bytes:
        return tuple(_materialise(s, workers) for s in splits)  # type: ignore[return-value]
    g = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    train = DataLoader(splits[0], batch_size=batch_size, shuffle=True, generator=g, num_workers=workers,
                       pin_memory=pin)
    val, test = (DataLoader(s, batch_size=eval_batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
                 for s in splits[1:])
    return train, val, test


def _pct(v):
    return None if v is None else (100.0 * v if isinstance(v, (int, float)) and math.isfinite(v) else v)


def run_protocol(run, model: nn.Module, data: BenchmarkData, args, device: torch.device,
                 prepared: tuple[Any, Any, Any] | None = None, prefix_cache: protocol.PrefixCache | None = None,
                 progress=None) -> dict[str, Any]:
    """One run (one method, one lr, one seed) through ``protocol.finetune``; accuracies in percent."""
    options = {
        "auto_snr": {"threshold": args.snr_threshold},
        "l1_sp": {"strength": args.l1sp_weight},
    }
    cfg = protocol.ProtocolConfig(
        lrs=(run.lr,) if run.lr is not None else (0.0,),
        epochs=args.epochs,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        eval_batch_size=args.eval_batch_size,
        device=device,
        method_options=options,
        blocks=paper_block_matcher(args.arch),
    )
    if prepared is None:
        prepared = prepare_data(data, seed=run.seed, batch_size=args.batch_size,
                                eval_batch_size=args.eval_batch_size, workers=args.workers,
                                max_tensor_bytes=args.max_tensor_bytes)
    train, val, test = prepared
    res = protocol.finetune(model, run.method, train, val, test, config=cfg, seed=run.seed,
                            prefix_cache=prefix_cache, data_key=run.dataset if prefix_cache is not None else "",
                            progress=progress)
    curve = next(iter(res.val_curves.values()), []) if res.val_curves else []
    return {
        "best": {
            "epoch": res.epoch,
            "val_acc": _pct(res.val_acc),
            "val_loss": res.val_loss,
            "test_acc": _pct(res.test_acc),
            "test_loss": res.test_loss,
            "test_worst": _pct(res.worst_group_acc),
            "test_group_accs": None if res.group_accs is None else {k: _pct(v) for k, v in res.group_accs.items()},
        },
        "val_curve": [_pct(v) for v in curve],
        "extra": {"diagnostics": next(iter(res.diagnostics.values()), {}) if res.diagnostics else {},
                  "precomputed_prefix": res.precomputed_prefix, "seconds": res.seconds},
    }
