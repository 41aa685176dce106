"""The source model: loaded from a checkpoint, torchvision's ImageNet weights, or pre-trained here once (cached
under a hash of everything it depends on; one process trains, the others wait for the file)."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets import BenchmarkData
from ..protocol import evaluate
from ..runs import atomic_torch_save, config_hash, train_supervised
from .config import HarnessConfig, SourceConfig, UsageError
from .data import make_loader
from .models import CheckpointMismatch, build_model, load_checkpoint

__all__ = ["get_source_model", "train_source", "source_identity", "seed_everything"]


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Batch-wise source-training augmentation on tensors: random horizontal flip, and for small (CIFAR-size)
    inputs a random crop with 4 pixels of zero padding."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if x.shape[-1] <= 64:
        n, _, h, w = x.shape
        padded = nn.functional.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2,)).tolist()  # one offset per batch keeps it vectorised
        x = padded[:, :, dy:dy + h, dx:dx + w]
    return x


def source_identity(cfg: HarnessConfig, data: BenchmarkData) -> dict[str, Any]:
    """Everything a pre-trained source model depends on (its cache key is a hash of this)."""
    src = cfg.source
    return {
        "family": cfg.data.family,
        "arch": src.arch,
        "num_classes": data.num_classes,
        "imagenet_init": src.imagenet_init,
        "source_epochs": src.epochs,
        "source_lr": src.lr,
        "source_batch_size": src.batch_size,
        "source_wd": src.weight_decay,
        "source_seed": src.seed,
        "data_seed": cfg.data.seed,
        "loader_kwargs": cfg.data.loader_kwargs,
        "n_source_train": len(data.source_train) if data.source_train is not None else None,
        "data_info": data.info.get("split", data.info.get("permutation")),
    }


def train_source(model: nn.Module, data: BenchmarkData, cfg: HarnessConfig, device: torch.device, desc: str) -> float:
    """Plain supervised source training (SGD, momentum 0.9, cosine schedule, batch-wise flip/crop); the
    source-validation accuracy (a fraction; nan without source-validation data)."""
    from tqdm.auto import tqdm

    src, workers = cfg.source, cfg.data.workers
    torch.manual_seed(src.seed)
    loader = make_loader(data.source_train, src.batch_size, True, workers, src.seed)
    opt = torch.optim.SGD(model.parameters(), lr=src.lr, momentum=0.9, weight_decay=src.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, src.epochs * len(loader)))
    bar = tqdm(total=src.epochs, desc=desc, disable=cfg.quiet)

    def prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _augment(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)

    def epoch_done(loss: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    train_supervised(model, lambda: loader, opt, sched, src.epochs, prepare=prepare, on_epoch=epoch_done)
    bar.close()
    if data.source_val is None or not len(data.source_val):
        return float("nan")
    batch = cfg.finetune.eval_batch_size
    return evaluate(model, make_loader(data.source_val, batch, False, workers), batch_size=batch, device=device).acc


def seed_everything(seed: int) -> None:
    """Seed every generator a run may draw from (Python, NumPy, torch on the CPU and every GPU), so that
    what happens next does not depend on what ran before in this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _architecture(src: SourceConfig, num_classes: int) -> nn.Module:
    """The source model's architecture, initialised from ``--source-seed`` (ImageNet weights where asked)."""
    seed_everything(src.seed)
    try:
        return build_model(src.arch, num_classes, imagenet_init=src.imagenet_init, width=src.width)
    except FileNotFoundError as e:  # ImageNet weights not in the local torch cache
        raise UsageError(str(e)) from e


def _load_checkpoint(model: nn.Module, src: SourceConfig) -> str:
    """Load ``--source-checkpoint`` into ``model``; its identity hash."""
    path = src.checkpoint
    if not Path(path).is_file():
        raise UsageError(f"--source-checkpoint {path}: no such file")
    try:
        load_checkpoint(model, path)
    except CheckpointMismatch as e:
        raise UsageError(f"--source-checkpoint {path} does not fit --arch {src.arch}: {e}; pass the --arch "
                         "it was trained with") from e
    except Exception as e:  # noqa: BLE001 - whatever torch.load says, the file is not a state dict
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"--source-checkpoint {path}: not a readable PyTorch state dict "
                         f"({type(e).__name__}: {first})") from e
    return config_hash({"checkpoint": os.path.abspath(path), "size": os.stat(path).st_size, "arch": src.arch}, 12)


def _check_imagenet_source(cfg: HarnessConfig, data: BenchmarkData) -> str:
    if data.num_classes != 1000:
        raise UsageError(f"imagenet_c: found {data.num_classes} class folders; the torchvision ResNet-50 "
                         "source model needs all 1000 (class index = sorted wnid order), or pass "
                         "--source-checkpoint")
    if cfg.source.arch != "resnet50":
        raise UsageError("imagenet_c: the source model is torchvision's ResNet-50 (--arch resnet50) or "
                         "--source-checkpoint")
    return config_hash({"torchvision": "resnet50/IMAGENET1K_V1"}, 12)


def get_source_model(cfg: HarnessConfig, data: BenchmarkData, device: torch.device) -> tuple[nn.Module, str]:
    """The source model and a hash identifying it (part of every run's config id). Built after seeding with
    ``--source-seed``, so the same config gives the same source model in every process."""
    model = _architecture(cfg.source, data.num_classes)
    if cfg.source.checkpoint:
        h = _load_checkpoint(model, cfg.source)
        return model.to(device), h
    if cfg.data.family == "imagenet_c":
        return model.to(device), _check_imagenet_source(cfg, data)
    if data.source_train is None:
        raise UsageError(
            f"{cfg.data.family}: no source data to pre-train on; pass --source-checkpoint PATH "
            "(e.g. RobustBench's Standard WRN-28-10 with --arch wrn28_10) or --cifar10-root DIR"
        )
    identity = source_identity(cfg, data)
    h = config_hash(identity, 12)
    path = cfg.source.cache / f"{cfg.data.family}-{cfg.source.arch}-{h}.pt"
    if _cached_or_locked(model, path, cfg.quiet):
        return model.to(device), h
    lock = path.with_suffix(".lock")
    try:
        model.to(device)
        val = train_source(model, data, cfg, device, desc=f"source {cfg.data.family}/{cfg.source.arch}")
        atomic_torch_save(model.state_dict(), path)
    finally:
        lock.unlink(missing_ok=True)
    meta = {"config": identity, "source_val_acc": val, "finished_at": datetime.now(timezone.utc).isoformat()}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
    if not cfg.quiet:
        print(f"source model saved to {path} (source val acc {100 * val:.2f}%)", file=sys.stderr)
    return model, h


def _cached_or_locked(model: nn.Module, path: Path, quiet: bool) -> bool:
    """Load the cached source model into ``model`` (True), or take the lock to train it (False). One process
    trains; the others wait for its file (a stale lock must be removed by hand)."""
    lock = path.with_suffix(".lock")
    while True:
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not quiet:
                print(f"waiting for {path} (being trained; lock {lock})", file=sys.stderr)
            time.sleep(30)
            continue
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        os.close(fd)
        return False
