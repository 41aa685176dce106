"""The harness's settings, parsed once from the command line (``cli``) into typed, frozen configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "DEFAULT_METHODS", "FAMILY_DEFAULTS", "DataConfig", "SourceConfig", "FinetuneConfig",
           "HarnessConfig", "UsageError"]

FAMILIES = ("cifar10c", "imagenet_c", "living17", "entity30", "cifar_flip", "waterbirds", "celeba")
#: methods run by default; "block:*" expands to one run per block of the model (the paper's split);
#: "auto_select" costs no run of its own (the report picks among "all" and the blocks, ``plan.runs_for``)
DEFAULT_METHODS = ("none", "all", "block:*", "auto_rgn", "auto_snr", "gradual_first_last", "gradual_last_first",
                   "l1_sp", "auto_rgn_paper", "auto_select")

# Per-family defaults (every one overridable on the command line).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # epochs = fine-tuning epochs (official README: 15 for CIFAR-C, 10 for ImageNet-C)
    "cifar10c": {"arch": "resnet26", "epochs": 15, "source_epochs": 200, "source_lr": 0.1, "imagenet_init": False},
    "cifar_flip": {"arch": "resnet26", "epochs": 15, "source_epochs": 200, "source_lr": 0.1, "imagenet_init": False},
    "imagenet_c": {"arch": "resnet50", "epochs": 10, "source_epochs": 0, "source_lr": 0.0, "imagenet_init": True},
    # BREEDS: the source model must not have seen ImageNet (its target subclasses are ImageNet classes)
    "living17": {"arch": "resnet50", "epochs": 15, "source_epochs": 90, "source_lr": 0.1, "imagenet_init": False},
    "entity30": {"arch": "resnet50", "epochs": 15, "source_epochs": 90, "source_lr": 0.1, "imagenet_init": False},
    # spurious correlations: ImageNet-initialised ResNet-50 trained on the source (train) split, as in group DRO
    "waterbirds": {"arch": "resnet50", "epochs": 15, "source_epochs": 50, "source_lr": 1e-3, "imagenet_init": True},
    "celeba": {"arch": "resnet50", "epochs": 15, "source_epochs": 20, "source_lr": 1e-3, "imagenet_init": True},
}


@dataclass(frozen=True)
class DataConfig:
    """Which data, and how it is read."""

    family: str
    root: str
    corruptions: tuple[str, ...]
    severity: int
    #: fixes the target splits (the same for every run seed)
    seed: int
    #: extra keyword options of the family's loader (``--loader-arg``)
    loader_kwargs: dict[str, Any]
    cifar10_root: str | None
    breeds_info_dir: str | None
    workers: int
    #: target sets up to this size are held as tensors (enables the frozen-prefix precompute)
    max_tensor_bytes: int

    def variants(self) -> list[str]:
        """The variant keys of the sweep, e.g. ``cifar10c/fog/5``."""
        if self.family in ("cifar10c", "imagenet_c"):
            return [f"{self.family}/{c}/{self.severity}" for c in self.corruptions]
        return [self.family]


@dataclass(frozen=True)
class SourceConfig:
    """The source model: its architecture, and how it is loaded or pre-trained."""

    arch: str
    width: int
    imagenet_init: bool
    checkpoint: str | None
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    seed: int
    #: folder of the pre-trained source models
    cache: Path
    pretrain_only: bool


@dataclass(frozen=True)
class FinetuneConfig:
    """The sweep: methods x learning rates x seeds, and the protocol's settings."""

    methods: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    weight_decay: float
    eval_batch_size: int
    l1sp_weight: float
    snr_threshold: float
    #: early stopping (``ProtocolConfig.patience``); None: every epoch runs
    patience: int | None = None


@dataclass(frozen=True)
class HarnessConfig:
    data: DataConfig
    source: SourceConfig
    finetune: FinetuneConfig
    out: Path
    #: (I, N): this process runs the runs whose index is I modulo N
    shard: tuple[int, int]
    max_runs: int | None
    device: str
    quiet: bool


class UsageError(Exception):
    """A bad command line or an unusable input file; ``cli.main`` prints it as one line and exits with 2."""
