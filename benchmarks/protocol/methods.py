"""Fine-tuning methods, their registry, and the one parser of method names.

A method decides which parameters train (``setup``, over the block split in ``config.blocks``) and may act
every epoch or step. The blocks it leaves frozen at the input side are the prefix the protocol precomputes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from surgical_optim import AutoRGN, AutoSNR, block_names, param_groups_by_block, select_blocks

from .config import ProtocolConfig

__all__ = [
    "Method", "NoAdaptation", "FullFineTuning", "BlockFineTuning", "AutoRGNMethod", "AutoSNRMethod",
    "GradualUnfreezing", "L1SP", "ALIASES", "SELECTION_METHODS", "EpochLosses", "register_method",
    "available_methods", "method_names", "make_method",
]

#: ``losses(n)``: the training losses of the epoch's first ``n`` batches (see :meth:`Method.epoch_optimizer`)
EpochLosses = Callable[[int], Iterator[torch.Tensor]]


class Method:
    """A fine-tuning method: which parameters train, with which optimizer, and per-epoch/step hooks.

    A fresh instance is made for every learning rate of the grid (see :func:`register_method`).
    Override :meth:`setup` (mandatory), and optionally :meth:`on_epoch_start`, :meth:`epoch_optimizer`,
    :meth:`penalty`, :meth:`after_step`, :meth:`diagnostics`.
    """

    name: str = "method"
    #: False: the method is evaluated once without training (no lr grid)
    trains: bool = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(options)}")

    def setup(
        self, model: nn.Module, lr: float, config: ProtocolConfig, make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        """Set ``requires_grad`` and return the optimizer (built with ``make_optimizer(groups)``)."""
        raise NotImplementedError

    def on_epoch_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
        pass

    def epoch_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, epochs: int,
                        losses: EpochLosses) -> torch.optim.Optimizer:
        """The optimizer for epoch ``epoch`` (0-based; called after :meth:`on_epoch_start`, with the weights
        as the previous epoch left them); default ``optimizer`` itself. ``losses(n)`` yields the training loss
        of each of this epoch's first ``n`` batches (fewer if it has fewer), computed as a training step computes
        it (after a precomputed prefix; under DDP this rank's share, scaled so that the all-reduced gradient is
        the global batch's), without :meth:`penalty`. Call ``backward()`` on each before reading the next (DDP
        reduces in backward) and clear the gradients afterwards. Reading them does not change the batches the
        epoch trains on. Which parameters require grad must not change here (do that in
        :meth:`on_epoch_start`)."""
        return optimizer

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


class NoAdaptation(Method):
    name = "none"
    trains = False

    def setup(self, model, lr, config, make_optimizer):  # pragma: no cover - never trained
        raise RuntimeError("'none' does not train")


class FullFineTuning(Method):
    name = "all"

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        return make_optimizer(param_groups_by_block(model, config.blocks))


class BlockFineTuning(Method):
    """Tune one block (or several: any ``select_blocks`` selection) and freeze the rest."""

    def __init__(self, which: Any, **options: Any) -> None:
        super().__init__(**options)
        self.which = which
        self.name = which if isinstance(which, str) else f"blocks:{which}"

    def setup(self, model, lr, config, make_optimizer):
        return make_optimizer(select_blocks(model, self.which, config.blocks))


class AutoRGNMethod(Method):
    """All blocks, each tensor's lr scaled by its normalised relative gradient norm (Auto-RGN).

    Options: ``refresh_every`` (default 1) and ``exclude``/… forwarded to ``surgical_optim.AutoRGN``.
    Diagnostics: the mean multiplier per block, averaged over all steps of the run.
    """

    name = "auto_rgn"

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._acc: dict[str, torch.Tensor] | None = None

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        opts = dict(self.options)
        if "exclude" in opts and "model" not in opts:
            opts["model"] = model
        return AutoRGN(make_optimizer(param_groups_by_block(model, config.blocks)), **opts)

    def after_step(self, model, optimizer, step):
        blocks = optimizer.block_multipliers()  # type: ignore[attr-defined]
        if self._acc is None:
            self._acc = {k: v.detach().clone().double() for k, v in blocks.items()}
        else:
            for k, v in blocks.items():
                self._acc[k] += v.detach().double()
        self._steps += 1

    def diagnostics(self):
        if not self._acc:
            return {}
        return {"block_multipliers": {k: float(v) / self._steps for k, v in self._acc.items()}}


class AutoSNRMethod(Method):
    """All blocks; ``surgical_optim.AutoSNR`` freezes tensors whose normalised gradient SNR is under
    ``threshold`` after ``samples`` steps. Diagnostics: ``trained_tensor_fraction``, the fraction of each
    block's tensors that train (a count of tensors, not of elements: ``AutoSNR.block_summary()``'s
    ``trained_fraction`` weighs them by size)."""

    name = "auto_snr"

    def __init__(self, **options: Any) -> None:
        self.options = {"threshold": 0.5, "samples": 5, **options}
        self._opt: AutoSNR | None = None

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        self._opt = AutoSNR(make_optimizer(param_groups_by_block(model, config.blocks)), **self.options)
        return self._opt

    def diagnostics(self):
        if self._opt is None:
            return {}
        mask = self._opt.mask().detach().cpu()
        out, start = {}, 0
        for group in self._opt.param_groups:
            count = len(group["params"])
            out[group.get("name", str(len(out)))] = float(mask[start : start + count].mean())
            start += count
        return {"trained_tensor_fraction": out}


class GradualUnfreezing(Method):
    """All blocks train eventually; at first only the last (``"last_first"``) or the first
    (``"first_last"``) block, one more every ``ceil(epochs / n_blocks)`` epochs."""

    def __init__(self, direction: str = "last_first", **options: Any) -> None:
        super().__init__(**options)
        if direction not in ("last_first", "first_last"):
            raise ValueError("direction must be 'last_first' or 'first_last'")
        self.direction = direction
        self.name = f"gradual_{direction}"
        self._groups: list[dict[str, Any]] = []

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        self._groups = param_groups_by_block(model, config.blocks)
        return make_optimizer(self._groups)

    def on_epoch_start(self, model, optimizer, epoch, epochs):
        n = len(self._groups)
        every = max(1, math.ceil(epochs / n))
        count = min(n, 1 + epoch // every)
        chosen = range(n - count, n) if self.direction == "last_first" else range(count)
        for i, group in enumerate(self._groups):
            for p in group["params"]:
                p.requires_grad_(i in chosen)
                if i not in chosen:
                    p.grad = None


class L1SP(Method):
    """Full fine-tuning with an L1 penalty towards the pre-trained weights (option ``strength``,
    default 1e-4, multiplying the sum over all parameters of |theta - theta_0|)."""

    name = "l1_sp"

    def __init__(self, strength: float = 1e-4, **options: Any) -> None:
        super().__init__(**options)
        self.strength = float(strength)
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        self._anchor = [(p, p.detach().clone()) for p in model.parameters()]
        return make_optimizer(param_groups_by_block(model, config.blocks))

    def penalty(self, model):
        return self.strength * sum((p - p0).abs().sum() for p, p0 in self._anchor)


_REGISTRY: dict[str, Callable[..., Method]] = {
    "none": NoAdaptation,
    "all": FullFineTuning,
    "auto_rgn": AutoRGNMethod,
    "auto_snr": AutoSNRMethod,
    "gradual_last_first": lambda **o: GradualUnfreezing("last_first", **o),
    "gradual_first_last": lambda **o: GradualUnfreezing("first_last", **o),
    "l1_sp": L1SP,
}


def register_method(name: str, factory: Callable[..., Method]) -> None:
    """Make ``name`` usable as ``finetune(..., method=name)``; ``factory(**options)`` returns a fresh
    :class:`Method` (options from ``ProtocolConfig.method_options[name]``)."""
    _REGISTRY[name] = factory


#: names that pick one of several methods' results rather than train one way (``finetune`` hands them to
#: ``benchmarks.protocol.select``); not :class:`Method` s, so :func:`make_method` refuses them
SELECTION_METHODS: tuple[str, ...] = ("auto_select",)


def available_methods(model: nn.Module | None = None) -> list[str]:
    """Registered method names and the selection methods, plus the model's block names when a model is given."""
    names = list(_REGISTRY) + list(SELECTION_METHODS)
    if model is not None:
        names += [n for n in block_names(model) if n not in _REGISTRY]
    return names


#: other spellings accepted wherever a method is named (command lines, the paper's own names)
ALIASES: dict[str, str] = {
    "full": "all",
    "l1sp": "l1_sp",
    "gu_first_last": "gradual_first_last",
    "gu_last_first": "gradual_last_first",
    "linear_probe": "last",
}


def _block_of(name: str, blocks: list[str]) -> str | None:
    """The block a name tunes alone (``"first"``/``"last"`` kept as such), or None if it names no block."""
    which = name[len("block:"):] if name.startswith("block:") else name
    return which if which in blocks or which in ("first", "last") else None


def _unknown(name: str, blocks: list[str]) -> KeyError:
    if name.startswith("block:"):
        return KeyError(f"{name}: no such block; the blocks are {', '.join(blocks)}")
    return KeyError(f"{name}: unknown method; known: {', '.join([*_REGISTRY, *SELECTION_METHODS])}, block:<name>, "
                    f"block:*, first, last, {', '.join(ALIASES)}")


def method_names(specs: Iterable[str], blocks: list[str]) -> list[str]:
    """The runs ``specs`` ask for, in canonical names: aliases resolved, ``block:*`` expanded to one
    ``block:<name>`` per block of ``blocks``, a block (by name, ``first`` or ``last``) as ``block:<name>``;
    duplicates dropped. ``KeyError`` (one line) for an unknown method or block."""
    out: list[str] = []
    for spec in specs:
        name = ALIASES.get(spec, spec)
        if name == "block:*":
            out.extend(f"block:{b}" for b in blocks)
        elif name in _REGISTRY or name in SELECTION_METHODS:
            out.append(name)
        elif (which := _block_of(name, blocks)) is not None:
            out.append("block:" + {"first": blocks[0], "last": blocks[-1]}.get(which, which))
        else:
            raise _unknown(spec, blocks)
    return list(dict.fromkeys(out))


def make_method(spec: str | Method | Callable[[], Method], model: nn.Module, config: ProtocolConfig) -> Method:
    """A fresh :class:`Method` from a name (any form :func:`method_names` reads, but ``block:*``), an instance
    (deep-copied) or a zero-argument factory."""
    if isinstance(spec, Method):
        return copy.deepcopy(spec)
    if callable(spec) and not isinstance(spec, str):
        return spec()
    if not isinstance(spec, str):
        raise TypeError(f"method must be a name or a Method, got {type(spec).__name__}")
    name = ALIASES.get(spec, spec)
    if name in SELECTION_METHODS:
        raise ValueError(f"{name} runs several methods and picks one: call finetune() or select_method(), "
                         "not make_method()")
    options = dict(config.method_options.get(name, config.method_options.get(spec, {})))
    if name in _REGISTRY:
        return _REGISTRY[name](**options)
    blocks = block_names(model, config.blocks)
    which = _block_of(name, blocks)
    if which is None:
        raise _unknown(spec, blocks)
    return BlockFineTuning(which, **options)
