"""``auto_select``: run several methods and keep the one with the best target validation score.

Like SubTuning's probe of each block (Kaplun et al. 2023), but over whole methods: every candidate is fine-tuned
by the protocol (its own lr grid and epoch selection), and the candidate whose selected (lr, epoch) has the best
validation accuracy (ties: lower validation loss, ``selection_key``; then the earlier candidate) gives the
reported test numbers. Only validation data decides, so the choice is a legitimate part of the method; its cost
is the sum of the candidates'. :func:`select_from_results` is the same choice over results already computed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from surgical_optim import block_names

from ..runs.stats import selection_key
from .config import FinetuneResult, ProtocolConfig
from .loop import finetune
from .methods import method_names
from .stages import PrefixCache

__all__ = ["select_method", "select_from_results", "candidates_for", "default_candidates", "configured_candidates"]


def candidates_for(blocks: Sequence[str]) -> list[str]:
    """``auto_select``'s default candidates for a split into ``blocks``: every block alone (``block:<name>``,
    input side first), then full fine-tuning."""
    return [f"block:{b}" for b in blocks] + ["all"]


def default_candidates(model: nn.Module, config: ProtocolConfig) -> list[str]:
    """:func:`candidates_for` the blocks of ``model`` under ``config.blocks``."""
    return candidates_for(block_names(model, config.blocks))


def configured_candidates(config: ProtocolConfig) -> list[str] | None:
    """``config.method_options["auto_select"]["candidates"]`` (None: the default candidates); ``TypeError`` for
    any other option."""
    options = dict(config.method_options.get("auto_select", {}))
    candidates = options.pop("candidates", None)
    if options:
        raise TypeError(f"auto_select takes only the option 'candidates', got {sorted(options)}")
    return None if candidates is None else list(candidates)


def _score(result: FinetuneResult | Mapping[str, Any]) -> tuple[float, float] | None:
    """The result's ``selection_key``, or None when it has no validation accuracy (nan or missing)."""
    if isinstance(result, FinetuneResult):
        acc, loss = result.val_acc, result.val_loss
    else:
        acc, loss = result.get("val_acc"), result.get("val_loss")
    if acc is None or math.isnan(acc):
        return None
    return selection_key(acc, loss)


def select_from_results(
    results: Mapping[str, FinetuneResult | Mapping[str, Any]],
) -> tuple[str, FinetuneResult | Mapping[str, Any]]:
    """``(name, result)`` of the best of ``results`` (candidate name -> a :class:`FinetuneResult` or a mapping
    with its ``val_acc`` and ``val_loss``, e.g. ``FinetuneResult.to_dict()``): highest validation accuracy,
    ties broken by the lower validation loss, then by the order of ``results``. Results without a validation
    accuracy are skipped; ``ValueError`` when none is left. Pure: nothing is run."""
    best: tuple[str, Any] | None = None
    best_score: tuple[float, float] | None = None
    for name, result in results.items():
        score = _score(result)
        if score is not None and (best_score is None or score > best_score):
            best, best_score = (name, result), score
    if best is None:
        raise ValueError(f"no candidate has a validation accuracy: {', '.join(results) or '(none given)'}")
    return best


def select_method(
    model: nn.Module,
    candidates: Sequence[str] | None,
    train: Any,
    val: Any,
    test: Any,
    *,
    config: ProtocolConfig | None = None,
    seed: int = 0,
    prefix_cache: PrefixCache | None = None,
    data_key: str = "",
    stages: Sequence[tuple[str, nn.Module]] | None = None,
    return_state: bool = False,
    progress: Callable[[int], None] | None = None,
) -> FinetuneResult:
    """:func:`~benchmarks.protocol.finetune` with every candidate (names as :func:`method_names` reads them,
    ``block:*`` included; None: :func:`default_candidates`), and the best by :func:`select_from_results`.

    The result is the chosen candidate's with ``method="auto_select"``, ``chosen`` its canonical name,
    ``candidates`` every candidate's selected ``lr``, ``epoch``, ``val_acc``, ``val_loss``, and ``seconds`` the
    time of all of them. The candidates share one prefix cache (``prefix_cache`` if given, with ``data_key``);
    ``progress`` counts the epochs of every candidate.
    """
    cfg = config or ProtocolConfig()
    started = time.perf_counter()
    blocks = block_names(model, cfg.blocks)
    names = method_names(candidates, blocks) if candidates is not None else default_candidates(model, cfg)
    if not names or "auto_select" in names:
        raise ValueError(f"auto_select needs candidate methods other than itself, got {names}")
    cache, key = (prefix_cache, data_key) if prefix_cache is not None else (PrefixCache(), "auto_select")
    results: dict[str, FinetuneResult] = {}
    for name in names:
        results[name] = finetune(model, name, train, val, test, config=cfg, seed=seed, prefix_cache=cache,
                                 data_key=key, stages=stages, return_state=return_state, progress=progress)
        chosen = _chosen(results)
        for other, result in results.items():  # only the chosen candidate's weights are kept
            if other != chosen:
                result.state = None
    chosen = _chosen(results)
    summary = {name: {"lr": r.lr, "epoch": r.epoch, "val_acc": r.val_acc, "val_loss": r.val_loss}
               for name, r in results.items()}
    return dataclasses.replace(results[chosen], method="auto_select", chosen=chosen, candidates=summary,
                               seconds=time.perf_counter() - started)


def _chosen(results: Mapping[str, FinetuneResult]) -> str:
    try:
        return select_from_results(results)[0]
    except ValueError:  # every candidate diverged at every lr: report the first (the pre-trained model)
        return next(iter(results))
