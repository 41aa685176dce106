"""The training loop: prepare (copy, splits, frozen prefix) -> train one lr -> evaluate -> select."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..runs.stats import selection_key
from .config import EvalResult, FinetuneResult, ProtocolConfig, default_optimizer
from .data import PeekableBatches, Split, to_device
from .evaluate import evaluate_split
from .methods import ALIASES, SELECTION_METHODS, EpochLosses, Method, make_method
from .stages import PrefixCache, Stages, forward_stages, frozen_prefix, prefix_split, split_stages
from .stopping import Plateau

__all__ = ["finetune"]

MethodSpec = str | Method | Callable[[], Method]


@dataclass
class _Prepared:
    """One call's working state: the trained copy, the function the steps run, the data it reads."""

    work: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    splits: dict[str, Split]
    method: Method
    prefix: int
    device: torch.device
    shard: tuple[int, int] | None

    def evaluate(self, name: str, cfg: ProtocolConfig) -> EvalResult:
        self.work.train(False)
        return evaluate_split(self.forward, self.splits[name], cfg.eval_batch_size, self.device, cfg.channels_last,
                              self.shard)


@dataclass
class _Selection:
    """The (lr, epoch) with the best validation accuracy so far (ties: lower validation loss, then earlier)."""

    score: tuple[float, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = None

    def offer(self, lr: float, epoch: int, val: EvalResult, model: nn.Module) -> None:
        score = selection_key(val.acc, val.loss)
        if self.score is None or score > self.score:
            self.score = score
            self.info = {"lr": lr, "epoch": epoch, "val_acc": val.acc, "val_loss": val.loss}
            self.state = {k: t.detach().clone() for k, t in model.state_dict().items()}


def finetune(
    model: nn.Module,
    method: MethodSpec,
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
    under ``data_key + '/train'`` etc.). ``stages``: the model as sequential stages, one per block of
    ``config.blocks`` (default: derived from the model). ``progress(n)`` is called after every epoch with n=1
    (and with the number of epochs left out when an lr's run stops early).
    ``method="auto_select"`` runs :func:`~benchmarks.protocol.select.select_method` (candidates from
    ``config.method_options["auto_select"]["candidates"]``, default every block and ``all``).
    """
    cfg = config or ProtocolConfig()
    if isinstance(method, str) and ALIASES.get(method, method) in SELECTION_METHODS:
        from .select import configured_candidates, select_method  # select builds on finetune

        return select_method(model, configured_candidates(cfg), train, val, test, config=cfg, seed=seed,
                             prefix_cache=prefix_cache, data_key=data_key, stages=stages, return_state=return_state,
                             progress=progress)
    started = time.perf_counter()
    run = _prepare(model, method, (train, val, test), cfg, stages, prefix_cache, data_key)
    name = run.method.name if isinstance(method, Method) else str(method)
    if not run.method.trains:
        return _result(run, cfg, name, seed, started, _Selection(info={"lr": None, "epoch": 0}), return_state)
    initial = {k: v.detach().clone() for k, v in run.work.state_dict().items()}
    selection, records = _Selection(), {}
    for lr in cfg.lrs:
        records[str(lr)] = _train_one_lr(run, method, lr, cfg, seed, initial, selection, progress)
    if selection.state is None:  # every lr diverged at once: report the pre-trained model
        selection = _Selection(info={"lr": None, "epoch": 0, "val_acc": float("nan"), "val_loss": float("nan")},
                               state=initial)
    run.work.load_state_dict(selection.state)
    result = _result(run, cfg, name, seed, started, selection, return_state)
    result.val_curves = {lr: r.curve for lr, r in records.items()}
    result.diagnostics = {lr: r.diagnostics for lr, r in records.items()}
    result.epochs_run = {lr: r.epochs for lr, r in records.items()}
    result.steps = {lr: r.steps for lr, r in records.items()}
    return result


# -------------------------------------------------------------------------------------------- prepare
def _prepare(model: nn.Module, spec: MethodSpec, data: tuple[Any, Any, Any], cfg: ProtocolConfig,
             stages: Sequence[tuple[str, nn.Module]] | None, cache: PrefixCache | None, data_key: str) -> _Prepared:
    device = torch.device(cfg.device)
    if stages is not None:
        # copy the model and the caller's stages together, so the stages point into the copy we train
        work, stages = copy.deepcopy((model, list(stages)))
    else:
        work = copy.deepcopy(model)
    work = work.to(device)  # Module.to is in place: copied stages move with it
    if cfg.channels_last:
        work = work.to(memory_format=torch.channels_last)
    splits = {k: Split(v, cfg.batch_size) for k, v in zip(("train", "val", "test"), data)}
    for k, s in splits.items():
        if len(s) == 0:
            raise ValueError(f"the {k} split is empty")
    run = _Prepared(work, work, splits, make_method(spec, work, cfg), 0, device, _data_parallel(cfg))
    usable = _usable_stages(run, cfg, stages)
    if usable is not None:
        _precompute_prefix(run, cfg, usable, cache, data_key)
    return run


def _usable_stages(run: _Prepared, cfg: ProtocolConfig, given: Stages | None) -> Stages | None:
    """The stages to precompute a frozen prefix with, or None when the protocol must run the whole model."""
    tensors_only = all(s.tensors is not None for s in run.splits.values())
    want = cfg.precompute_prefix
    if not cfg.bn_eval or not (want is True or (want == "auto" and tensors_only)):
        return None
    if given is not None:
        return list(given)
    stages = split_stages(run.work, cfg.blocks)
    if stages is None:
        return None
    # check that the stages compose to the model on a probe batch
    probe = to_device(next(run.splits["val"].batches(8, shuffle=False))[0], run.device, cfg.channels_last)
    run.work.train(False)
    with torch.no_grad():
        same = torch.allclose(run.work(probe), forward_stages(stages, probe), atol=1e-5, rtol=1e-4)
    return stages if same else None


def _precompute_prefix(run: _Prepared, cfg: ProtocolConfig, stages: Stages, cache: PrefixCache | None,
                       data_key: str) -> None:
    """Replace the splits by the activations after the blocks the method leaves frozen (at least the last
    block trains), and the trained function by the stages after them."""
    if run.method.trains:  # what the method's setup leaves frozen; the probe's optimizer never steps
        run.method.setup(run.work, cfg.lrs[0], cfg, lambda groups: torch.optim.SGD(groups, lr=0.0))
        k = min(frozen_prefix(run.work, cfg.blocks), len(stages) - 1)
    else:
        k = len(stages)
    if k == 0:
        return
    if cache is not None and not data_key:
        raise ValueError("a shared prefix_cache needs a data_key identifying the data")
    cache = cache if cache is not None else PrefixCache()
    key = data_key or f"local-{id(cache)}"
    run.work.train(False)  # the stages of `work` hold the same weights as the caller's model
    run.splits = {name: prefix_split(s, f"{key}/{name}", stages, k, cache, cfg.eval_batch_size, run.device,
                                     cfg.channels_last) for name, s in run.splits.items()}
    run.forward = nn.Sequential(*(m for _, m in stages[k:]))
    run.prefix = k


def _optimizer(cfg: ProtocolConfig, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    return (cfg.optimizer or default_optimizer)(groups, lr, cfg.weight_decay)


def _data_parallel(cfg: ProtocolConfig) -> tuple[int, int] | None:
    """(rank, world size) when this call trains data-parallel (see ``ProtocolConfig.distributed``)."""
    active = dist.is_available() and dist.is_initialized()
    wanted = cfg.distributed if cfg.distributed is not None else active and dist.get_world_size() > 1
    if not wanted:
        return None
    if not active:
        raise RuntimeError("ProtocolConfig(distributed=True) needs an initialised torch.distributed process group")
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------------------ train one lr
class _DataParallel:
    """The trained function in DistributedDataParallel over the parameters that require grad now (DDP
    registers them at construction: rebuilt when a method changes the set, e.g. gradual unfreezing)."""

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.params: list[int] = []

    def wrap(self, forward: nn.Module, device: torch.device) -> nn.Module:
        trained = [id(p) for p in forward.parameters() if p.requires_grad]
        if self.module is None or trained != self.params:
            ids = None
            if device.type == "cuda":
                ids = [device.index if device.index is not None else torch.cuda.current_device()]
            self.module = nn.parallel.DistributedDataParallel(forward, device_ids=ids)
            self.params = trained
        return self.module


@dataclass
class _LrRecord:
    """One lr's run: validation accuracy per epoch (nan once the loss diverged), the epochs that ran to the
    end, the optimizer steps taken, the method's diagnostics."""

    curve: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    diverged: bool = False
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _train_one_lr(run: _Prepared, spec: MethodSpec, lr: float, cfg: ProtocolConfig, seed: int,
                  initial: dict[str, torch.Tensor], selection: _Selection,
                  progress: Callable[[int], None] | None) -> _LrRecord:
    """Train from ``initial`` at ``lr`` for every epoch (or until the validation score plateaus, see
    ``ProtocolConfig.patience``), offering each epoch to ``selection``."""
    run.work.load_state_dict(initial)
    for p in run.work.parameters():
        p.grad = None
    method = make_method(spec, run.work, cfg)
    optimizer = method.setup(run.work, lr, cfg, lambda groups: _optimizer(cfg, groups, lr))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ddp = _DataParallel() if run.shard is not None else None
    record, plateau = _LrRecord(), Plateau(cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        optimizer = _run_epoch(run, method, optimizer, cfg, gen, ddp, epoch, record)
        if record.diverged:
            record.curve.append(float("nan"))
        else:
            val = run.evaluate("val", cfg)
            record.curve.append(val.acc)
            record.epochs += 1
            selection.offer(lr, epoch, val, run.work)
            plateau.offer(val.acc)
        if progress is not None:
            progress(1)
        if plateau.stalled:
            if progress is not None and epoch < cfg.epochs:
                progress(cfg.epochs - epoch)
            break
    record.diagnostics = method.diagnostics()
    return record


def _run_epoch(run: _Prepared, method: Method, optimizer: torch.optim.Optimizer, cfg: ProtocolConfig,
               gen: torch.Generator, ddp: _DataParallel | None, epoch: int, record: _LrRecord) -> torch.optim.Optimizer:
    """The method's epoch-start hooks, then one pass over the training batches (none once diverged); the
    optimizer the epoch used."""
    run.work.train(not cfg.bn_eval)
    method.on_epoch_start(run.work, optimizer, epoch - 1, cfg.epochs)
    if record.diverged:
        return optimizer
    batches = PeekableBatches(run.splits["train"].batches(cfg.batch_size, shuffle=True, generator=gen,
                                                          min_last=cfg.min_last_batch, shard=run.shard))
    # the function a step differentiates: the model after any precomputed prefix, in DDP when data-parallel
    forward = run.forward if ddp is None else ddp.wrap(run.forward, run.device)  # type: ignore[arg-type]
    optimizer = method.epoch_optimizer(run.work, optimizer, epoch - 1, cfg.epochs,
                                       _epoch_losses(run, forward, batches, cfg))
    _train_epoch(run, forward, method, optimizer, cfg, batches, record)
    return optimizer


def _epoch_losses(run: _Prepared, forward: Callable[[torch.Tensor], torch.Tensor], batches: PeekableBatches,
                  cfg: ProtocolConfig) -> EpochLosses:
    """``losses(n)``: the training losses of the epoch's first ``n`` batches (``Method.epoch_optimizer``)."""
    def losses(n: int) -> Iterator[torch.Tensor]:
        for xb, yb, _ in batches.peek(n):
            yield _loss(forward, to_device(xb, run.device, cfg.channels_last), yb.to(run.device), run.shard)[0]
    return losses


def _train_epoch(run: _Prepared, forward: Callable[[torch.Tensor], torch.Tensor], method: Method,
                 optimizer: torch.optim.Optimizer, cfg: ProtocolConfig, batches: PeekableBatches,
                 record: _LrRecord) -> None:
    """One pass over the training batches, counted in ``record`` (which notes a non-finite loss: the run
    stops there)."""
    for xb, yb, _ in batches:
        xb, yb = to_device(xb, run.device, cfg.channels_last), yb.to(run.device)
        optimizer.zero_grad(set_to_none=True)
        loss, check = _loss(forward, xb, yb, run.shard)
        extra = method.penalty(run.work)
        if extra is not None:
            loss = loss + extra
            check = loss if run.shard is None else check + extra.detach()
        if cfg.stop_on_nonfinite and not torch.isfinite(check):
            record.diverged = True
            return
        loss.backward()
        optimizer.step()
        record.steps += 1
        method.after_step(run.work, optimizer, record.steps)


def _loss(forward: Callable[[torch.Tensor], torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
          shard: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to differentiate, the global batch's mean loss to check for divergence)."""
    if shard is None:
        loss = nn.functional.cross_entropy(forward(xb), yb)
        return loss, loss
    # this rank's share of the global batch: DDP averages the gradients over the ranks, so scale the shard's
    # summed loss by world / global batch size
    loss = nn.functional.cross_entropy(forward(xb), yb, reduction="sum")
    total = torch.stack([loss.detach(), torch.tensor(float(len(yb)), device=loss.device)])
    dist.all_reduce(total)
    return loss * (shard[1] / total[1]), total[0] / total[1]


# ------------------------------------------------------------------------------------------ evaluate, select
def _result(run: _Prepared, cfg: ProtocolConfig, name: str, seed: int, started: float, selection: _Selection,
            return_state: bool) -> FinetuneResult:
    """Test (and, without training, validation) evaluation of the selected weights, as a result."""
    info = selection.info
    if "val_acc" not in info:  # no adaptation: the pre-trained model's validation numbers
        val = run.evaluate("val", cfg)
        info = {**info, "val_acc": val.acc, "val_loss": val.loss}
    test = run.evaluate("test", cfg)
    state = selection.state if selection.state is not None else copy.deepcopy(run.work.state_dict())
    return FinetuneResult(
        method=name, seed=seed, lr=info["lr"], epoch=info["epoch"], val_acc=info["val_acc"],
        val_loss=info["val_loss"], test_acc=test.acc, test_loss=test.loss, worst_group_acc=test.worst_group_acc,
        group_accs=test.group_accs, seconds=time.perf_counter() - started, precomputed_prefix=run.prefix,
        state=state if return_state else None,
    )
