"""The sweep: check everything, load or pre-train the source model, then run every unfinished (method, lr,
seed) of this shard and append its row to the store; under torchrun every run trains data-parallel and rank 0
alone writes."""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgical_optim import block_names

from ..datasets import BenchmarkData
from ..protocol import PrefixCache, method_names
from ..protocol.config import PROTOCOL_VERSION
from ..runs import ResultStore, config_hash
from .config import HarnessConfig, UsageError
from .data import TargetSplits, load_variant, prepare_data
from .finetune import finetune
from .models import build_model, paper_block_matcher
from .plan import Run, enumerate_runs, runs_for, shard_runs
from .results import write_report
from .source import get_source_model

__all__ = ["run_harness", "paper_blocks", "run_identity"]


def paper_blocks(model: nn.Module, arch: str) -> list[str]:
    return block_names(model, paper_block_matcher(arch))


def _skeleton_blocks(cfg: HarnessConfig, num_classes: int) -> list[str]:
    """The paper's blocks of ``--arch``, from a model built on the meta device (no memory, no random draws)."""
    with torch.device("meta"):
        skeleton = build_model(cfg.source.arch, num_classes, imagenet_init=False, width=cfg.source.width)
    return paper_blocks(skeleton, cfg.source.arch)


def _check_methods(methods: tuple[str, ...], blocks: list[str]) -> list[str]:
    """The runs ``--methods`` asks for (canonical names, ``block:*`` expanded over the paper's ``blocks``)."""
    try:
        return method_names(methods, blocks)
    except KeyError as e:
        raise UsageError(f"--methods {e.args[0]}") from None


def run_identity(cfg: HarnessConfig, source_hash: str) -> dict[str, Any]:
    """Everything a run's numbers depend on besides (variant, method, lr, seed); its hash is the config id."""
    ft = cfg.finetune
    return {
        "source": source_hash,
        "epochs": ft.epochs,
        "batch_size": ft.batch_size,
        "weight_decay": ft.weight_decay,
        "data_seed": cfg.data.seed,
        "loader_kwargs": cfg.data.loader_kwargs,
        "l1sp_weight": ft.l1sp_weight,
        "snr_threshold": ft.snr_threshold,
        "protocol": PROTOCOL_VERSION,
        # settings added later join the identity only when set, so earlier runs keep their ids
        **({"patience": ft.patience} if ft.patience is not None else {}),
    }


def init_distributed(cfg: HarnessConfig) -> tuple[HarnessConfig, int, int, bool]:
    """(config, rank, world size, whether this call created the process group). Under torchrun
    (``WORLD_SIZE`` > 1) the process group is initialised from the environment: NCCL on CUDA (device
    ``cuda:LOCAL_RANK``, set in the returned config), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return cfg, 0, 1, False
    cuda = torch.device(cfg.device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        cfg = replace(cfg, device=f"cuda:{local_rank}")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return cfg, dist.get_rank(), dist.get_world_size(), created


def run_harness(cfg: HarnessConfig) -> int:
    cfg, rank, world, created = init_distributed(cfg)
    try:
        code = _sweep(replace(cfg, quiet=True) if rank != 0 else cfg, rank, world)
        if world > 1:
            dist.barrier()  # the other ranks wait for rank 0's files
        return code
    finally:
        if created:
            dist.destroy_process_group()


@dataclass
class _Sweep:
    """What every run of the sweep shares."""

    cfg: HarnessConfig
    datasets: dict[str, BenchmarkData]
    blocks: list[str]
    source: nn.Module
    identity: dict[str, Any]
    rank: int
    world: int


def _finished_ids(store: ResultStore, world: int) -> set[str]:
    done = store.finished_ids()
    if world > 1:  # every rank must run the same list: rank 0's view of the finished runs
        box = [done]
        dist.broadcast_object_list(box, src=0)
        done = box[0]
    return done


def _sweep(cfg: HarnessConfig, rank: int, world: int) -> int:
    # the same run gives the same numbers: cuDNN uses deterministic kernels, not the fastest it can time
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    variants = cfg.data.variants()
    # every variant's files and split sizes, and every method, are checked before the first run is written
    datasets = {v: load_variant(cfg.data, v) for v in variants}
    first = datasets[variants[0]]
    blocks = _skeleton_blocks(cfg, first.num_classes)
    methods = _check_methods(cfg.finetune.methods, blocks)
    store = ResultStore(cfg.out / "results", cfg.shard)
    done = _finished_ids(store, world)
    source, source_hash = get_source_model(cfg, first, torch.device(cfg.device))
    if cfg.source.pretrain_only:
        return 0
    identity = run_identity(cfg, source_hash)
    ft = cfg.finetune
    runs = shard_runs(enumerate_runs(variants, cfg.data.family, runs_for(methods, blocks), list(ft.lrs),
                                     list(ft.seeds), config_hash(identity, 12)), cfg.shard)
    todo = [r for r in runs if r.run_id not in done]
    if not cfg.quiet:
        print(f"{len(runs)} runs in shard {cfg.shard[0]}/{cfg.shard[1]}, {len(runs) - len(todo)} already "
              f"finished, {len(todo)} to do", file=sys.stderr)
    if cfg.max_runs is not None:
        todo = todo[: cfg.max_runs]
    _run_all(_Sweep(cfg, datasets, blocks, source, identity, rank, world), todo, store)
    if rank == 0:
        write_report(cfg.out, cfg.quiet)
    return 0


def _run_all(sweep: _Sweep, todo: list[Run], store: ResultStore) -> None:
    """Run ``todo`` in order, one variant's data (and prefix activations) in memory at a time."""
    from tqdm.auto import tqdm

    variant, prepared, prefix = None, None, None
    for run in tqdm(todo, desc="sweep", disable=sweep.cfg.quiet):
        if run.dataset != variant:
            variant, prepared, prefix = run.dataset, None, PrefixCache()
        data = sweep.datasets[run.dataset]
        fresh = prepared if prepared is not None else _prepare(sweep.cfg, data, run.seed)
        prepared = fresh if fresh.in_memory else None
        # share frozen-prefix activations across runs only for small (CIFAR-size) inputs: for 224-pixel
        # inputs they would take tens of GiB per prefix length
        share = fresh.in_memory and data.input_size[-1] <= 64
        record = _run_one(sweep, run, fresh, prefix if share else None)
        if sweep.rank == 0:
            store.append(record)


def _prepare(cfg: HarnessConfig, data: BenchmarkData, seed: int) -> TargetSplits:
    ft = cfg.finetune
    return prepare_data(data, seed=seed, batch_size=ft.batch_size, eval_batch_size=ft.eval_batch_size,
                        workers=cfg.data.workers, max_tensor_bytes=cfg.data.max_tensor_bytes)


def _run_one(sweep: _Sweep, run: Run, prepared: TargetSplits, prefix: PrefixCache | None) -> dict[str, Any]:
    """One run and its row."""
    from tqdm.auto import tqdm

    cfg = sweep.cfg
    t0 = time.time()
    n_epochs = 0 if run.method == "none" else cfg.finetune.epochs
    with tqdm(total=n_epochs, desc=f"{run.method} lr={run.lr} seed={run.seed}", leave=False,
              disable=cfg.quiet or n_epochs == 0) as bar:
        result = finetune(run, sweep.source, cfg.finetune, cfg.source.arch, torch.device(cfg.device), prepared,
                          prefix_cache=prefix, progress=bar.update)
    return {
        "run_id": run.run_id, "config_id": run.config_id, "config": sweep.identity, "dataset": run.dataset,
        "family": run.family, "method": run.method, "lr": run.lr, "seed": run.seed, "epochs": n_epochs,
        "arch": cfg.source.arch, "block_order": sweep.blocks, **result,
        "time_s": round(time.time() - t0, 3), "finished_at": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(), "torch": torch.__version__, "python": platform.python_version(),
        "world_size": sweep.world,
    }
