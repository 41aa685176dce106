"""The shared fine-tuning protocol: one training loop for every benchmark of this repository.

It follows the paper's official code (Lee et al., ICLR 2023): Adam with weight decay 1e-4 and no
schedule, batch 64, BatchNorm kept in eval mode (running statistics and dropout frozen; BN affine
parameters still train when their block does), a grid of learning rates, and the (lr, epoch) with the
best *target-validation* accuracy reported on *target test* (plus worst-group accuracy when group labels
are given).

Usage::

    from benchmarks.protocol import ProtocolConfig, finetune
    cfg = ProtocolConfig(lrs=(1e-2, 1e-3, 1e-4), epochs=15)
    result = finetune(model, "layer1", train=(x, y), val=(xv, yv), test=(xt, yt, groups), config=cfg, seed=0)
    result.test_acc, result.lr, result.epoch, result.to_dict()

Data: a tuple of tensors ``(x, y)`` or ``(x, y, group)``, a ``Dataset`` yielding such tuples, or a
``DataLoader`` (used as it is for training; its batch size and shuffling then apply).

Methods (``method`` argument, a string or a :class:`Method` instance):

* ``"none"``: no adaptation (evaluated once, no lr grid);
* ``"all"``: full fine-tuning;
* a block name of ``surgical_optim.block_names(model)`` (``"stem"``, ``"layer1"``, ... ``"fc"``), or
  ``"first"``, ``"last"``, or ``"block:<name>"``: that block alone (``surgical_optim.select_blocks``);
* ``"auto_rgn"``: ``surgical_optim.AutoRGN`` around the optimizer over all blocks;
* ``"auto_snr"``: ``surgical_optim.AutoSNR`` (options: ``threshold``, ``samples``, ``estimator``);
* ``"gradual_last_first"`` / ``"gradual_first_last"``: gradual unfreezing, one more block every
  ``epochs / n_blocks`` epochs (rounded up), starting from the last (resp. first) block;
* ``"l1_sp"``: full fine-tuning plus ``strength * sum |theta - theta_pretrained|`` (option ``strength``).

New methods: subclass :class:`Method` and call :func:`register_method`. Options for a method travel in
``ProtocolConfig.method_options[name]``.

Speed: when the data are tensors and the model can be split into sequential stages (torchvision-ResNet
layout, an ``nn.Sequential``, or an explicit ``stages=`` list), the frozen prefix in front of the first
trainable block is run once per split, and only the rest of the network is trained. This is exact
because BatchNorm is in eval mode and there is no data augmentation. Pass a shared
:class:`PrefixCache` to :func:`finetune` to reuse the activations across methods on the same data.

Data parallel (DDP): when a ``torch.distributed`` process group with more than one rank is initialised
(or with ``ProtocolConfig(distributed=True)``), every rank calls :func:`finetune` with the same arguments;
each rank trains on its contiguous share of every global batch (same seed, same batch order, global batch
= ``batch_size``), the trained module (the whole copy, or the suffix after a precomputed prefix) is wrapped
in ``DistributedDataParallel``, the loss is scaled so that the averaged gradient is that of the global
batch's mean loss, and evaluation is sharded over the ranks (whole batches) and gathered, so every rank
selects the same (lr, epoch) and returns the same result. The frozen-prefix precompute runs on every rank.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from surgical_optim import AutoRGN, AutoSNR, block_names, param_groups_by_block, select_blocks

__all__ = [
    "PAPER_LRS",
    "ProtocolConfig",
    "FinetuneResult",
    "EvalResult",
    "Method",
    "NoAdaptation",
    "FullFineTuning",
    "BlockFineTuning",
    "AutoRGNMethod",
    "AutoSNRMethod",
    "GradualUnfreezing",
    "L1SP",
    "PrefixCache",
    "register_method",
    "make_method",
    "available_methods",
    "finetune",
    "evaluate",
    "split_stages",
    "default_optimizer",
]

#: The learning-rate grid of the official code.
PAPER_LRS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
OptimizerFactory = Callable[[list[dict[str, Any]], float, float], torch.optim.Optimizer]


def default_optimizer(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam with (coupled, L2) weight decay, as in the official code."""
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["distributed"]
        d["optimizer"] = None if self.optimizer is None else getattr(self.optimizer, "__name__", repr(self.optimizer))
        d["device"] = str(self.device)
        return d


@dataclass
class EvalResult:
    acc: float
    loss: float
    n: int
    worst_group_acc: float | None = None
    group_accs: dict[str, float] | None = None


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns; ``to_dict()`` is JSON-serialisable."""

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
    #: per lr (``str(lr)``): validation accuracy after each epoch
    val_curves: dict[str, list[float]] = field(default_factory=dict)
    #: per lr: the method's diagnostics (e.g. Auto-RGN's mean multiplier per block)
    diagnostics: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    precomputed_prefix: int = 0
    #: the best model's state_dict (only with ``finetune(..., return_state=True)``; not serialised)
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "state"}
        return d


# ---------------------------------------------------------------------------------------------- data
class _Split:
    """A train/val/test split: either tensors (fast path) or a DataLoader."""

    def __init__(self, data: Any, batch_size: int) -> None:
        self.loader: DataLoader | None = None
        self.tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            if len(data) not in (2, 3):
                raise ValueError(f"tensor data must be (x, y) or (x, y, group), got {len(data)} tensors")
            x, y = data[0], data[1]
            g = data[2] if len(data) == 3 else None
            if len(x) != len(y) or (g is not None and len(g) != len(y)):
                raise ValueError("x, y (and group) must have the same length")
            self.tensors = (x, y.long(), None if g is None else g.long())
        elif isinstance(data, DataLoader):
            self.loader = data
        elif isinstance(data, Dataset):
            self.loader = DataLoader(data, batch_size=batch_size, shuffle=False)
            self._dataset_batch = batch_size
        else:
            raise TypeError(
                "data must be a tuple of tensors (x, y[, group]), a torch Dataset or a DataLoader, got "
                f"{type(data).__name__}"
            )

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[1])
        return len(self.loader.dataset)  # type: ignore[union-attr, arg-type]

    @property
    def has_groups(self) -> bool:
        if self.tensors is not None:
            return self.tensors[2] is not None
        return True  # decided per batch

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        min_last: int = 1,
        shard: tuple[int, int] | None = None,
        split: bool = True,
    ) -> Iterator[Batch]:
        """The batches; with ``shard=(rank, world)`` only this rank's part: its contiguous share of every
        batch (``split``, training: the global batches are unchanged) or every world-th whole batch
        (evaluation). A share may be empty (a last batch smaller than the world)."""
        if self.tensors is not None:
            x, y, g = self.tensors
            n = len(y)
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for k, start in enumerate(range(0, n, batch_size)):
                idx = order[start : start + batch_size]
                if start > 0 and len(idx) < min_last:
                    break
                if shard is not None:
                    if split:
                        idx = idx[_share(len(idx), *shard)]
                    elif k % shard[1] != shard[0]:
                        continue
                yield x[idx], y[idx], None if g is None else g[idx]
            return
        loader = self.loader
        if shuffle and isinstance(self.loader.dataset, Dataset) and getattr(self, "_dataset_batch", None):  # type: ignore[union-attr]
            # the permutation the tensor path draws: the same data as a Dataset or as tensors, the same batches
            order = torch.randperm(len(self), generator=generator).tolist()
            loader = DataLoader(self.loader.dataset, batch_size=batch_size, sampler=order)  # type: ignore[union-attr]
        if shard is not None:
            loader = _shard_loader(loader, *shard, split)  # type: ignore[arg-type]
        empty: Batch | None = None
        for item in loader:  # type: ignore[union-attr]
            if item is None:  # this rank's share of a batch smaller than the world
                if empty is None:
                    raise ValueError("a training batch smaller than the number of ranks came first")
                yield empty
                continue
            if isinstance(item, dict):
                xb, yb, gb = item["x"], item["y"], item.get("group")
            else:
                xb, yb = item[0], item[1]
                gb = item[2] if len(item) > 2 else None
            batch = (xb, torch.as_tensor(yb).long(), None if gb is None else torch.as_tensor(gb).long())
            if shard is not None:
                empty = tuple(None if t is None else t[:0] for t in batch)  # type: ignore[assignment]
            yield batch


def _share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one, like tensor_split)."""
    q, r = divmod(n, world)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


class _ShardedBatches:
    """A batch sampler's batches, restricted to one rank (see ``_Split.batches``)."""

    def __init__(self, batches: Any, rank: int, world: int, split: bool) -> None:
        self.batches, self.rank, self.world, self.split = batches, rank, world, split

    def __iter__(self) -> Iterator[list[int]]:
        for k, batch in enumerate(self.batches):
            if self.split:
                batch = list(batch)
                yield batch[_share(len(batch), self.rank, self.world)]
            elif k % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        n = len(self.batches)
        return n if self.split else len(range(self.rank, n, self.world))


class _EmptyAsNone:
    """Collate an empty index list to None (a rank's empty share) instead of failing."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        return self.collate(items) if items else None


def _shard_loader(loader: DataLoader, rank: int, world: int, split: bool) -> Any:
    """``loader`` reading only this rank's share of each batch (or its whole batches); the batch sampler
    (and so the shuffling generator) is the same on every rank."""
    if loader.batch_sampler is None:  # iterable dataset or no automatic batching: shard after loading
        def sliced() -> Iterator[Any]:
            for k, item in enumerate(loader):
                if split:
                    n = len(item["y"] if isinstance(item, dict) else item[1])
                    sl = _share(n, rank, world)
                    yield {k_: v[sl] for k_, v in item.items()} if isinstance(item, dict) else [t[sl] for t in item]
                elif k % world == rank:
                    yield item
        return sliced()
    return DataLoader(
        loader.dataset,
        batch_sampler=_ShardedBatches(loader.batch_sampler, rank, world, split),
        num_workers=loader.num_workers,
        collate_fn=_EmptyAsNone(loader.collate_fn),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


class PrefixCache:
    """Activations of frozen prefixes, keyed by (split key, number of prefix stages); share it across
    :func:`finetune` calls on the same model weights and the same data to compute them once."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def get(self, key: tuple[str, int]):
        return self._store.get(key)

    def put(self, key: tuple[str, int], value) -> None:
        self._store[key] = value

    def clear(self) -> None:
        self._store.clear()


# --------------------------------------------------------------------------------------------- stages
def split_stages(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]] | None:
    """Split ``model`` into sequential stages aligned with its blocks, or None if it cannot be.

    Recognises the torchvision-ResNet layout (``conv1``, ``bn1``, ``relu``, optional ``maxpool``,
    ``layer1``..``layer4``, ``avgpool``, ``fc``: stages ``stem, layer1..4, fc``) and ``nn.Sequential``
    models whose children are exactly the blocks. The caller checks the composition on a probe batch.
    """
    names = list(block_names(model)) if names is None else list(names)
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1", "fc")):
        layers = [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
        if names != ["stem", *layers, "fc"]:
            return None
        stem = [model.conv1, model.bn1, getattr(model, "relu", nn.ReLU())]
        if isinstance(getattr(model, "maxpool", None), nn.Module):
            stem.append(model.maxpool)
        head = [getattr(model, "avgpool", nn.AdaptiveAvgPool2d(1)), nn.Flatten(1), model.fc]
        return [("stem", nn.Sequential(*stem))] + [(n, getattr(model, n)) for n in layers] + [("fc", nn.Sequential(*head))]
    if isinstance(model, nn.Sequential):
        # each child with parameters starts a stage; parameter-free children (activations, pooling)
        # join the stage before them (or the first stage)
        stages: list[tuple[str, list[nn.Module]]] = []
        leading: list[nn.Module] = []
        for child_name, child in model.named_children():
            if any(True for _ in child.parameters()):
                stages.append((child_name, leading + [child]))
                leading = []
            elif stages:
                stages[-1][1].append(child)
            else:
                leading.append(child)
        if [n for n, _ in stages] == names:
            return [(n, mods[0] if len(mods) == 1 else nn.Sequential(*mods)) for n, mods in stages]
    return None


def _forward_stages(stages: Sequence[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for _, module in stages:
        x = module(x)
    return x


# -------------------------------------------------------------------------------------------- methods
class Method:
    """A fine-tuning method: which parameters train, with which optimizer, and per-epoch/step hooks.

    A fresh instance is made for every learning rate of the grid (see :func:`register_method`).
    Override :meth:`setup` (mandatory), and optionally :meth:`first_trainable_block`,
    :meth:`on_epoch_start`, :meth:`penalty`, :meth:`after_step`, :meth:`diagnostics`.
    """

    name: str = "method"
    #: False: the method is evaluated once without training (no lr grid)
    trains: bool = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} takes no options, got {sorted(options)}")

    def first_trainable_block(self, names: list[str]) -> int:
        """Index of the first block whose parameters may change (the prefix before it is frozen)."""
        return 0

    def setup(
        self, model: nn.Module, lr: float, config: ProtocolConfig, make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        """Set ``requires_grad`` and return the optimizer (built with ``make_optimizer(groups)``)."""
        raise NotImplementedError

    def on_epoch_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
        pass

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


class NoAdaptation(Method):
    name = "none"
    trains = False

    def first_trainable_block(self, names: list[str]) -> int:
        return len(names)

    def setup(self, model, lr, config, make_optimizer):  # pragma: no cover - never trained
        raise RuntimeError("'none' does not train")


class FullFineTuning(Method):
    name = "all"

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        return make_optimizer(param_groups_by_block(model))


class BlockFineTuning(Method):
    """Tune one block (or several: any ``select_blocks`` selection) and freeze the rest."""

    def __init__(self, which: Any, **options: Any) -> None:
        super().__init__(**options)
        self.which = which
        self.name = which if isinstance(which, str) else f"blocks:{which}"

    def _indices(self, names: list[str]) -> list[int]:
        # a light resolution for the prefix precompute; select_blocks resolves it for real in setup
        if isinstance(self.which, str):
            if self.which == "first":
                return [0]
            if self.which == "last":
                return [len(names) - 1]
            if self.which == "all":
                return list(range(len(names)))
            if self.which in names:
                return [names.index(self.which)]
        if isinstance(self.which, int):
            return [self.which % len(names)]
        return [0]  # unknown form: no prefix precompute (always correct)

    def first_trainable_block(self, names: list[str]) -> int:
        return min(self._indices(names))

    def setup(self, model, lr, config, make_optimizer):
        return make_optimizer(select_blocks(model, self.which))


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
        return AutoRGN(make_optimizer(param_groups_by_block(model)), **opts)

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
    ``threshold`` after ``samples`` steps. Diagnostics: fraction of tensors trained per block."""

    name = "auto_snr"

    def __init__(self, **options: Any) -> None:
        self.options = {"threshold": 0.5, "samples": 5, **options}
        self._opt: AutoSNR | None = None

    def setup(self, model, lr, config, make_optimizer):
        for p in model.parameters():
            p.requires_grad_(True)
        self._opt = AutoSNR(make_optimizer(param_groups_by_block(model)), **self.options)
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
        return {"trained_fraction": out}


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
        self._groups = param_groups_by_block(model)
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
        return make_optimizer(param_groups_by_block(model))

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


def available_methods(model: nn.Module | None = None) -> list[str]:
    """Registered method names, plus the model's block names when a model is given."""
    names = list(_REGISTRY)
    if model is not None:
        names += [n for n in block_names(model) if n not in _REGISTRY]
    return names


def make_method(spec: str | Method | Callable[[], Method], model: nn.Module, config: ProtocolConfig) -> Method:
    """A fresh :class:`Method` from a name, an instance (deep-copied) or a zero-argument factory."""
    if isinstance(spec, Method):
        return copy.deepcopy(spec)
    if callable(spec) and not isinstance(spec, str):
        return spec()
    if not isinstance(spec, str):
        raise TypeError(f"method must be a name or a Method, got {type(spec).__name__}")
    options = dict(config.method_options.get(spec, {}))
    if spec in _REGISTRY:
        return _REGISTRY[spec](**options)
    which = spec[len("block:") :] if spec.startswith("block:") else spec
    names = block_names(model)
    if which in names or which in ("first", "last"):
        return BlockFineTuning(which, **options)
    raise KeyError(f"unknown method {spec!r}; registered: {sorted(_REGISTRY)}; blocks of this model: {names}")


# ----------------------------------------------------------------------------------------- evaluation
def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def _evaluate_split(
    forward: Callable[[torch.Tensor], torch.Tensor],
    split: _Split,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    shard: tuple[int, int] | None = None,
) -> EvalResult:
    correct = 0.0
    loss_sum = 0.0
    n = 0
    group_correct: dict[int, float] = {}
    group_count: dict[int, int] = {}
    for xb, yb, gb in split.batches(batch_size, shuffle=False, shard=shard, split=False):
        xb, yb = _to(xb, device, channels_last), yb.to(device)
        logits = forward(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        hit = (logits.argmax(1) == yb).float()
        correct += float(hit.sum())
        n += len(yb)
        if gb is not None:
            gb = gb.to(device)
            for gval in torch.unique(gb).tolist():
                sel = gb == gval
                group_correct[gval] = group_correct.get(gval, 0.0) + float(hit[sel].sum())
                group_count[gval] = group_count.get(gval, 0) + int(sel.sum())
    if shard is not None:  # every rank evaluated whole batches of its own: sum the counts in rank order
        parts: list[Any] = [None] * shard[1]
        dist.all_gather_object(parts, (correct, loss_sum, n, group_correct, group_count))
        correct, loss_sum, n = (sum(p[i] for p in parts) for i in range(3))
        group_correct, group_count = {}, {}
        for _, _, _, gc, gn in parts:
            for gval in gn:
                group_correct[gval] = group_correct.get(gval, 0.0) + gc[gval]
                group_count[gval] = group_count.get(gval, 0) + gn[gval]
    if n == 0:
        raise ValueError("empty evaluation split")
    result = EvalResult(acc=correct / n, loss=loss_sum / n, n=n)
    if group_count:
        accs = {str(k): group_correct[k] / group_count[k] for k in sorted(group_count)}
        result.group_accs = accs
        result.worst_group_acc = min(accs.values())
    return result


def evaluate(model: nn.Module, data: Any, *, batch_size: int = 512, device: str | torch.device = "cpu") -> EvalResult:
    """Accuracy, mean loss (and per-group / worst-group accuracy when groups are given) of ``model``
    on ``data`` (same forms as :func:`finetune`), in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        return _evaluate_split(model, _Split(data, batch_size), batch_size, device)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------ finetune
def _set_mode(model: nn.Module, bn_eval: bool) -> None:
    model.train(not bn_eval)


def _data_parallel(cfg: ProtocolConfig) -> tuple[int, int] | None:
    """(rank, world size) when this call trains data-parallel (see ``ProtocolConfig.distributed``)."""
    active = dist.is_available() and dist.is_initialized()
    wanted = cfg.distributed if cfg.distributed is not None else active and dist.get_world_size() > 1
    if not wanted:
        return None
    if not active:
        raise RuntimeError("ProtocolConfig(distributed=True) needs an initialised torch.distributed process group")
    return dist.get_rank(), dist.get_world_size()


def _wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel over the parameters that require grad now (DDP registers them
    at construction; rebuilt when a method changes the set, e.g. gradual unfreezing)."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _prefix_split(
    split: _Split,
    key: str,
    stages: Sequence[tuple[str, nn.Module]],
    k: int,
    cache: PrefixCache,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
) -> _Split:
    if k == 0:
        return split
    cached = cache.get((key, k))
    if cached is None:
        prev = cache.get((key, k - 1)) if k > 1 else None
        xs, ys, gs = [], [], []
        start_stage = 0
        src = split
        if prev is not None:  # continue from a shorter cached prefix
            src = _Split(tuple(t for t in prev if t is not None), batch_size)
            start_stage = k - 1
        with torch.no_grad():
            for xb, yb, gb in src.batches(batch_size, shuffle=False):
                xs.append(_forward_stages(stages[start_stage:k], _to(xb, device, channels_last)))
                ys.append(yb)
                if gb is not None:
                    gs.append(gb)
        cached = (torch.cat(xs), torch.cat(ys), torch.cat(gs) if gs else None)
        cache.put((key, k), cached)
    return _Split(tuple(t for t in cached if t is not None), batch_size)


def finetune(
    model: nn.Module,
    method: str | Method,
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
    """Fine-tune a copy of ``model`` with ``method`` on ``train`` for every lr of the grid, select the
    (lr, epoch) with the best ``val`` accuracy (ties: lower val loss, then earlier), report ``test``.

    ``model`` itself is never modified. ``seed`` fixes the batch order (the same for every lr).
    ``prefix_cache`` + ``data_key``: share precomputed prefix activations between calls on the same
    data (``data_key`` must identify the data; activations of ``train``/``val``/``test`` are stored
    under ``data_key + '/train'`` etc.). ``progress(n)`` is called after every epoch with n=1.
    """
    cfg = config or ProtocolConfig()
    device = torch.device(cfg.device)
    shard = _data_parallel(cfg)
    started = time.perf_counter()
    if stages is not None:
        # copy the model and the caller's stages together, so the stages point into the copy we train
        work, stages = copy.deepcopy((model, list(stages)))
        work = work.to(device)  # Module.to is in place: the copied stages move with it
    else:
        work = copy.deepcopy(model).to(device)
    if cfg.channels_last:
        work = work.to(memory_format=torch.channels_last)
    names = block_names(work)
    proto = make_method(method, work, cfg)
    method_name = proto.name if isinstance(method, Method) else str(method)

    splits = {k: _Split(v, cfg.batch_size) for k, v in (("train", train), ("val", val), ("test", test))}
    for k, s in splits.items():
        if len(s) == 0:
            raise ValueError(f"the {k} split is empty")

    # ---- prefix precompute
    k_prefix = 0
    use_stages = None
    want = cfg.precompute_prefix
    tensors_only = all(s.tensors is not None for s in splits.values())
    if cfg.bn_eval and (want is True or (want == "auto" and tensors_only)):
        use_stages = list(stages) if stages is not None else split_stages(work, names)
        if use_stages is not None and stages is None:
            # check that the stages compose to the model on a probe batch
            probe = _to(next(splits["val"].batches(8, shuffle=False))[0], device, cfg.channels_last)
            _set_mode(work, True)
            with torch.no_grad():
                if not torch.allclose(work(probe), _forward_stages(use_stages, probe), atol=1e-5, rtol=1e-4):
                    use_stages = None
        if use_stages is not None:
            k_prefix = min(proto.first_trainable_block(names), len(use_stages) - 1 if proto.trains else len(use_stages))
    cache = prefix_cache if prefix_cache is not None else PrefixCache()
    if k_prefix > 0 and use_stages is not None:
        if prefix_cache is not None and not data_key:
            raise ValueError("a shared prefix_cache needs a data_key identifying the data")
        key = data_key or f"local-{id(cache)}"
        # the stages of `work` hold the same weights as `model`
        _set_mode(work, True)
        splits = {
            k: _prefix_split(s, f"{key}/{k}", use_stages, k_prefix, cache, cfg.eval_batch_size, device, cfg.channels_last)
            for k, s in splits.items()
        }
        suffix_modules = [m for _, m in use_stages[k_prefix:]]
        forward: Callable[[torch.Tensor], torch.Tensor] = nn.Sequential(*suffix_modules)
    else:
        forward = work

    # ---- no adaptation
    if not proto.trains:
        _set_mode(work, True)
        v = _evaluate_split(forward, splits["val"], cfg.eval_batch_size, device, cfg.channels_last, shard)
        t = _evaluate_split(forward, splits["test"], cfg.eval_batch_size, device, cfg.channels_last, shard)
        return FinetuneResult(
            method=method_name, seed=seed, lr=None, epoch=0, val_acc=v.acc, val_loss=v.loss, test_acc=t.acc,
            test_loss=t.loss, worst_group_acc=t.worst_group_acc, group_accs=t.group_accs,
            seconds=time.perf_counter() - started, precomputed_prefix=k_prefix,
            state=copy.deepcopy(work.state_dict()) if return_state else None,
        )

    initial = {k: v.detach().clone() for k, v in work.state_dict().items()}
    factory = cfg.optimizer or default_optimizer
    best: tuple[float, float] | None = None
    best_info: dict[str, Any] = {}
    best_state: dict[str, torch.Tensor] | None = None
    curves: dict[str, list[float]] = {}
    diagnostics: dict[str, dict[str, Any]] = {}

    for lr in cfg.lrs:
        work.load_state_dict(initial)
        for p in work.parameters():
            p.grad = None
        run = make_method(method, work, cfg)
        optimizer = run.setup(work, lr, cfg, lambda groups, _lr=lr: factory(groups, _lr, cfg.weight_decay))
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        curve: list[float] = []
        step = 0
        diverged = False
        ddp: nn.Module | None = None
        ddp_params: list[nn.Parameter] = []
        for epoch in range(1, cfg.epochs + 1):
            _set_mode(work, cfg.bn_eval)
            run.on_epoch_start(work, optimizer, epoch - 1, cfg.epochs)
            if shard is not None and not diverged:
                trained = [p for p in forward.parameters() if p.requires_grad]
                if ddp is None or [id(p) for p in trained] != [id(p) for p in ddp_params]:
                    ddp, ddp_params = None, trained
                    ddp = _wrap_ddp(forward, device)
            if not diverged:
                batches = splits["train"].batches(
                    cfg.batch_size, shuffle=True, generator=gen, min_last=cfg.min_last_batch, shard=shard
                )
                for xb, yb, _ in batches:
                    xb, yb = _to(xb, device, cfg.channels_last), yb.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    if ddp is None:
                        loss = nn.functional.cross_entropy(forward(xb), yb)
                        check = loss
                    else:
                        # this rank's share of the global batch: DDP averages the gradients over the ranks,
                        # so scale the shard's summed loss by world / global batch size
                        loss = nn.functional.cross_entropy(ddp(xb), yb, reduction="sum")
                        total = torch.stack([loss.detach(), torch.tensor(float(len(yb)), device=loss.device)])
                        dist.all_reduce(total)
                        check = total[0] / total[1]
                        loss = loss * (shard[1] / total[1])  # type: ignore[index]
                    extra = run.penalty(work)
                    if extra is not None:
                        loss = loss + extra
                        check = loss if ddp is None else check + extra.detach()
                    if cfg.stop_on_nonfinite and not torch.isfinite(check):
                        diverged = True
                        break
                    loss.backward()
                    optimizer.step()
                    step += 1
                    run.after_step(work, optimizer, step)
            _set_mode(work, True)
            if diverged:
                curve.append(float("nan"))
            else:
                v = _evaluate_split(forward, splits["val"], cfg.eval_batch_size, device, cfg.channels_last, shard)
                curve.append(v.acc)
                score = (v.acc, -v.loss if math.isfinite(v.loss) else -math.inf)
                if best is None or score > best:
                    best = score
                    best_info = {"lr": lr, "epoch": epoch, "val_acc": v.acc, "val_loss": v.loss}
                    best_state = {k: t.detach().clone() for k, t in work.state_dict().items()}
            if progress is not None:
                progress(1)
        curves[str(lr)] = curve
        diagnostics[str(lr)] = run.diagnostics()

    if best_state is None:  # every lr diverged at once: report the pre-trained model
        best_state = initial
        best_info = {"lr": None, "epoch": 0, "val_acc": float("nan"), "val_loss": float("nan")}
    work.load_state_dict(best_state)
    _set_mode(work, True)
    t = _evaluate_split(forward, splits["test"], cfg.eval_batch_size, device, cfg.channels_last, shard)
    return FinetuneResult(
        method=method_name, seed=seed, lr=best_info["lr"], epoch=best_info["epoch"], val_acc=best_info["val_acc"],
        val_loss=best_info["val_loss"], test_acc=t.acc, test_loss=t.loss, worst_group_acc=t.worst_group_acc,
        group_accs=t.group_accs, val_curves=curves, diagnostics=diagnostics,
        seconds=time.perf_counter() - started, precomputed_prefix=k_prefix,
        state=best_state if return_state else None,
    )
