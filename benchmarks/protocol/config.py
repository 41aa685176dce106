"""The protocol's settings and what it returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from surgical_optim import BlockMatcher

__all__ = ["PROTOCOL_VERSION", "PAPER_LRS", "OptimizerFactory", "default_optimizer", "ProtocolConfig", "EvalResult", "FinetuneResult"]

#: Bump when the protocol's numbers change in a way ``ProtocolConfig.to_dict()`` does not show, so stores that
#: key runs by their settings add it to the key. 2: fused Adam by default; patience counts epochs without a
#: higher validation accuracy (1: per-tensor Adam; a lower loss at equal accuracy was progress).
PROTOCOL_VERSION = 2

#: The learning-rate grid of the official code.
PAPER_LRS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)

OptimizerFactory = Callable[[list[dict[str, Any]], float, float], torch.optim.Optimizer]


def default_optimizer(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam with (coupled, L2) weight decay, as in the official code; the fused implementation (the same
    update, one kernel per param group: on a CPU a fifth of a small network's step went to the per-tensor
    loop)."""
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass
class ProtocolConfig:
    """Hyperparameters of the protocol (defaults: the paper's official code)."""

    lrs: tuple[float, ...] = PAPER_LRS
    epochs: int = 15
    batch_size: int = 64
    weight_decay: float = 1e-4
    #: ``factory(param_groups, lr, weight_decay) -> Optimizer``; None: :func:`default_optimizer` (Adam)
    optimizer: OptimizerFactory | None = None
    #: keep BatchNorm (and dropout) in eval mode while training
    bn_eval: bool = True
    #: precompute the frozen prefix's activations when possible ("auto": tensor data only)
    precompute_prefix: bool | str = "auto"
    eval_batch_size: int = 512
    #: run convolutions in channels_last memory format (faster on CPU for small CNNs)
    channels_last: bool = False
    device: str | torch.device = "cpu"
    #: per-method keyword options, e.g. ``{"auto_snr": {"threshold": 0.5}}``
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: drop a trailing training batch smaller than this (a batch of 1 is noisy); 1 keeps all
    min_last_batch: int = 1
    #: a training loss that becomes non-finite ends that lr's run (its later epochs are skipped)
    stop_on_nonfinite: bool = True
    #: data-parallel training over the initialised process group (DDP); None: whenever one with more than
    #: one rank is initialised. An execution detail, not a hyperparameter: left out of ``to_dict()``
    distributed: bool | None = None
    #: the block split every method and the frozen-prefix precompute use: a ``surgical_optim`` matcher
    #: (parameter name -> block name); None: the library's default split (``block_names(model)``)
    blocks: BlockMatcher | None = None
    #: early stopping: an lr's run ends after this many consecutive epochs without a higher validation
    #: accuracy of that lr (``stopping.Plateau``); None: every epoch runs
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 (or None), got {self.patience}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["distributed"]
        d["optimizer"] = _callable_name(self.optimizer)
        d["device"] = str(self.device)
        # settings at their default that were added later add no key, so runs recorded before them keep
        # their identity (the hash of this dict)
        if self.blocks is None:
            del d["blocks"]
        else:
            d["blocks"] = _callable_name(self.blocks)
        if self.patience is None:
            del d["patience"]
        return d


def _callable_name(fn: Any) -> str | None:
    return None if fn is None else getattr(fn, "__name__", repr(fn))


@dataclass
class EvalResult:
    """Accuracy and mean loss as fractions of the evaluated examples (percent only when printed)."""

    acc: float
    loss: float
    n: int
    worst_group_acc: float | None = None
    group_accs: dict[str, float] | None = None


@dataclass
class FinetuneResult:
    """What :func:`~benchmarks.protocol.finetune` returns; ``to_dict()`` is JSON-serialisable."""

    method: str
    seed: int
    lr: float | None
    epoch: int
    val_acc: float
    val_loss: float
    test_acc: float
    test_loss: float
    worst_group_acc: float | None = None
    group_accs: dict[str, float] | None = None
    #: per lr (``str(lr)``): validation accuracy after each epoch that ran (nan from a diverged epoch on;
    #: shorter than ``epochs`` after early stopping)
    val_curves: dict[str, list[float]] = field(default_factory=dict)
    #: per lr: the method's diagnostics (e.g. Auto-RGN's mean multiplier per block)
    diagnostics: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per lr: the epochs that ran to the end (fewer than ``epochs`` after early stopping or divergence)
    epochs_run: dict[str, int] = field(default_factory=dict)
    #: per lr: the optimizer steps taken (to tell a method that learns slowly from one that stepped less)
    steps: dict[str, int] = field(default_factory=dict)
    #: ``auto_select`` only: the candidate method whose result this is
    chosen: str | None = None
    #: ``auto_select`` only: per candidate, its selected ``lr``, ``epoch``, ``val_acc`` and ``val_loss``
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    #: how many leading blocks of the split were run once, frozen, instead of in every step
    precomputed_prefix: int = 0
    #: the best model's state_dict (only with ``finetune(..., return_state=True)``; not serialised)
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "state"}
