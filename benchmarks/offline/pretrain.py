"""Pre-train the source model on the source distribution, cached on disk by a hash of its config."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..protocol import evaluate
from ..runs import atomic_torch_save, config_hash, train_supervised
from . import data
from .model import SmallResNet

__all__ = ["PretrainConfig", "pretrain", "load_or_pretrain", "load_source", "source_model", "source_path"]


@dataclass(frozen=True)
class PretrainConfig:
    n_train: int = 20000
    n_val: int = 2000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 1_000_003
    #: half the 0.2 widths (16-32-64-128) and a stride-2 stem (``layer4`` at stride 1, so that it still
    #: sees 2x2 pixels): a seventh of the 0.2 network's multiply-adds (a third of 0.4's), so that three
    #: source models and runs of up to 240 steps fit the main job's time
    widths: tuple[int, ...] = (8, 16, 32, 64)
    stem_stride: int = 2
    strides: tuple[int, ...] = (2, 2, 2, 1)
    styles: tuple[int, ...] = data.SOURCE_STYLES
    cue_agree: float = 0.9
    absent: float = 0.2
    version: int = 3  # bump when the data generator or the model changes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_model(cfg: PretrainConfig) -> SmallResNet:
    return SmallResNet(num_classes=data.NUM_CLASSES, widths=cfg.widths, stem_stride=cfg.stem_stride,
                       strides=cfg.strides)


def pretrain(cfg: PretrainConfig, progress: Callable[[int, int, float], None] | None = None) -> tuple[SmallResNet, dict]:
    """Train from scratch with Adam + one-cycle schedule; returns (model in eval mode, info)."""
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    train = data.sample(cfg.n_train, cfg.seed, styles=cfg.styles, cue_agree=cfg.cue_agree, absent=cfg.absent)
    val = data.sample(cfg.n_val, cfg.seed + 1, styles=cfg.styles, cue_agree=cfg.cue_agree, absent=cfg.absent)
    model = source_model(cfg).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = train["x"].contiguous(memory_format=torch.channels_last), train["y"]

    def batches():
        order = torch.randperm(cfg.n_train, generator=gen)
        return ((x[idx], y[idx]) for idx in order.split(cfg.batch_size))

    steps = iter(range(1, total + 1))
    report = None if progress is None else lambda loss: progress(next(steps), total, float(loss.detach()))
    train_supervised(model, batches, opt, sched, cfg.epochs, on_step=report)
    xv = val["x"].contiguous(memory_format=torch.channels_last)
    acc = evaluate(model, (xv, val["y"]), batch_size=len(xv)).acc  # one forward pass, as it always was
    info = {"source_val_acc": acc, "seconds": time.perf_counter() - started, "config": cfg.to_dict()}
    model = model.to(memory_format=torch.contiguous_format)
    return model, info


def source_path(cfg: PretrainConfig, cache_dir: Path) -> Path:
    """Where the source model of ``cfg`` is (or will be) cached: named by a hash of the config."""
    return Path(cache_dir) / f"source-{config_hash(cfg.to_dict())}.pt"


def load_or_pretrain(
    cfg: PretrainConfig, cache_dir: Path, progress: Callable[[int, int, float], None] | None = None
) -> tuple[Path, dict]:
    """Path of the cached source checkpoint (pre-training it first if missing) and its info."""
    path = source_path(cfg, cache_dir)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        info = json.loads(blob["info"])
        info["cached"] = True
        return path, info
    model, info = pretrain(cfg, progress)
    atomic_torch_save({"state_dict": model.state_dict(), "info": json.dumps(info)}, path)
    info["cached"] = False
    return path, info


def load_source(path: Path, cfg: PretrainConfig) -> SmallResNet:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = source_model(cfg)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
